//! Gathers the facts `fleetctl doctor` checks ([`crate::doctor::Facts`]): a probe of each hub
//! address (its answer, its `Date`, its certificate chain), the pinned CA's notAfter (parsed with
//! `x509-parser`), and on a node the MTUs of its fleet devices and of its underlay (`ip -j`).

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_hub_api::client::{ClientOptions, HubClient, HubError, Probe};
use fleet_hub_api::tls::CaHash;
use fleet_hub_api::wire::Credential;
use serde_json::Value;

use crate::doctor::{ClockSample, HubFacts, LocalNode, MtuFacts, Refusal};

/// This node's fleet-nri, asked for its status over the node API socket.
pub fn local_node(socket: &std::path::Path) -> LocalNode {
    let client = fleet_proto::node::NodeClient::new(socket, Duration::from_secs(5));
    LocalNode {
        socket: socket.display().to_string(),
        status: client.status().map_err(|e| e.to_string()),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The hub as one probe sees it; `ca` picks the pinned CA out of the presented chain.
pub async fn hub_facts(client: &HubClient, ca: CaHash) -> HubFacts {
    match client.probe().await {
        Err(e) => HubFacts::Down {
            error: match e {
                HubError::Unreachable { errors, .. } => errors,
                other => other.to_string(),
            },
        },
        Ok(probe) => from_probe(probe, ca),
    }
}

/// Each hub address probed on its own, all at once, so a dead replica is seen even when
/// another answers: the facts of the first address (in `--hub` order) that answered, else
/// `Down` with every address's error; and the addresses that did not answer, with why.
pub async fn hub_facts_per_address(
    endpoints: &[String],
    ca: CaHash,
    credential: &Credential,
    options: ClientOptions,
) -> Result<(HubFacts, Vec<(String, String)>), HubError> {
    let mut probes = Vec::new();
    for endpoint in endpoints {
        let client = HubClient::new([endpoint.clone()], ca, options.clone())?
            .with_credential(credential.clone());
        probes.push((
            endpoint.clone(),
            tokio::spawn(async move { hub_facts(&client, ca).await }),
        ));
    }
    let mut reached = None;
    let mut down = Vec::new();
    for (endpoint, probe) in probes {
        let facts = probe.await.unwrap_or_else(|e| HubFacts::Down {
            error: format!("probe task failed: {e}"),
        });
        match facts {
            HubFacts::Down { error } => {
                // A one-address probe's error starts with its address.
                let why = error
                    .strip_prefix(&format!("{endpoint}: "))
                    .unwrap_or(&error)
                    .to_string();
                down.push((endpoint, why));
            }
            up if reached.is_none() => reached = Some(up),
            _ => {}
        }
    }
    Ok(match reached {
        Some(facts) => (facts, down),
        None => {
            let error = down
                .iter()
                .map(|(endpoint, why)| format!("{endpoint}: {why}"))
                .collect::<Vec<_>>()
                .join("; ");
            (HubFacts::Down { error }, Vec::new())
        }
    })
}

fn from_probe(probe: Probe, ca: CaHash) -> HubFacts {
    let clock = probe.hub_time.map(|t| ClockSample {
        hub_time: unix_ms(t) / 1000,
        sent_at_ms: unix_ms(probe.sent_at),
        round_trip_ms: probe.round_trip.as_millis() as u64,
    });
    let ca_not_after = probe
        .chain
        .iter()
        .find(|der| CaHash::of_der(der) == ca)
        .and_then(|der| not_after(der));
    HubFacts::Reached {
        endpoint: probe.endpoint,
        clock,
        ca_not_after,
        answer: probe.answer.map_err(|e| Refusal {
            code: e.code(),
            message: e.to_string(),
        }),
    }
}

/// A certificate's notAfter, unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// `ip -j <args>` (in `netns` when given: a name in /run/netns or a path), parsed.
fn ip_json(netns: Option<&str>, args: &[&str]) -> Result<Value, String> {
    let mut cmd = match netns {
        Some(path) if path.contains('/') => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={path}")).arg("ip");
            c
        }
        Some(name) => {
            let mut c = Command::new("ip");
            c.args(["-n", name]);
            c
        }
        None => Command::new("ip"),
    };
    cmd.arg("-j").args(args);
    let out = cmd.output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}{}` failed: {}",
            netns.map_or(String::new(), |n| format!("-n {n} ")),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("`ip -j` printed no JSON: {e}"))
}

fn mtu_of(links: &Value, name: &str) -> Option<u32> {
    links
        .as_array()?
        .iter()
        .find(|l| l["ifname"] == name)
        .and_then(|l| l["mtu"].as_u64())
        .map(|m| m as u32)
}

/// The MTUs on this node: its CNF netns' `fleet0`, `fleetvx` and WireGuard device (a
/// `wireguard` or `tun` link), and the device this netns routes `hub_ip` through.
pub fn mtu_facts(cnf_netns: &str, hub_ip: std::net::IpAddr) -> Result<MtuFacts, String> {
    let links = ip_json(Some(cnf_netns), &["-d", "link", "show"])?;
    let route = ip_json(None, &["route", "get", &hub_ip.to_string()])?;
    let device = route[0]["dev"]
        .as_str()
        .ok_or_else(|| format!("no route to the hub's {hub_ip} on this node"))?
        .to_string();
    let underlay = ip_json(None, &["link", "show", "dev", &device])?;
    let underlay_mtu = mtu_of(&underlay, &device)
        .ok_or_else(|| format!("`ip link show dev {device}` gave no MTU"))?;
    let wireguard = links.as_array().and_then(|all| {
        all.iter().find_map(|l| {
            let kind = l["linkinfo"]["info_kind"].as_str()?;
            matches!(kind, "wireguard" | "tun").then(|| {
                (
                    l["ifname"].as_str().unwrap_or("?").to_string(),
                    l["mtu"].as_u64().unwrap_or(0) as u32,
                )
            })
        })
    });
    Ok(MtuFacts {
        cnf_netns: cnf_netns.to_string(),
        underlay_device: device,
        underlay_mtu,
        underlay_ipv6: hub_ip.is_ipv6(),
        bridge_mtu: mtu_of(&links, "fleet0"),
        overlay_mtu: mtu_of(&links, "fleetvx"),
        wireguard,
    })
}

/// The first hub address's IP, resolved (for the underlay route).
pub fn hub_ip(endpoint: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    endpoint.to_socket_addrs().ok()?.next().map(|a| a.ip())
}

/// Runs `fut`; if it takes longer than `after`, says on `err` (stderr) what it waits for, and
/// again every `every` — never on stdout, which `-o json` keeps for the result.
pub async fn with_progress<T>(
    what: &str,
    after: Duration,
    every: Duration,
    err: &mut impl std::io::Write,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(fut);
    let started = tokio::time::Instant::now();
    let mut next = after;
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tokio::time::sleep_until(started + next) => {
                let _ = writeln!(
                    err,
                    "fleetctl: waiting for {what} ({} s)…",
                    started.elapsed().as_secs()
                );
                next += every;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_says_what_it_waits_for_on_stderr() {
        let mut err = Vec::new();
        let value = with_progress(
            "the hub at 203.0.113.10:7443 (listing the fleet)",
            Duration::from_secs(1),
            Duration::from_secs(5),
            &mut err,
            async {
                tokio::time::sleep(Duration::from_secs(7)).await;
                42
            },
        )
        .await;
        assert_eq!(value, 42);
        let text = String::from_utf8(err).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "at 1 s and 6 s: {text}");
        assert!(
            lines[0].contains("waiting for the hub at 203.0.113.10:7443 (listing the fleet) (1 s)"),
            "{text}"
        );
        assert!(lines[1].contains("(6 s)"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_call_prints_nothing() {
        let mut err = Vec::new();
        with_progress(
            "x",
            Duration::from_secs(1),
            Duration::from_secs(5),
            &mut err,
            async {},
        )
        .await;
        assert!(err.is_empty());
    }

    #[test]
    fn not_after_reads_a_certificate() {
        // A self-signed certificate valid until 2035-01-01T00:00:00Z.
        let pem = include_str!("../tests/fixtures/ca-2035.pem");
        let der = fleet_hub_api::tls::first_cert_der(pem).unwrap();
        assert_eq!(not_after(&der), Some(2_051_222_400));
    }
}

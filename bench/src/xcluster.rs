//! The cross-cluster benchmarks' common ground (`cross-cluster-latency`,
//! `cross-cluster-throughput`): fleet-e2e's sandbox fleet — hub `cc` with its relay, members
//! `aa` and `bb` behind NAT with two real containerd nodes each, one `fleet-controller` per
//! member on its gateway node (node 1) — and three busybox pods:
//!
//! - `P1` on aa's node 2 (not the gateway node),
//! - `P2` on aa's node 1 (the gateway node),
//! - `P3` on bb's node 2 (not the gateway node).
//!
//! P1 ↔ P2 is the intra-cluster path (eth-fleet → CNF netns → VXLAN → CNF netns → eth-fleet);
//! P3 → P1 the cross-cluster one (VXLAN to bb's gateway node → WireGuard to aa's gateway's
//! key → bb's NAT → the hub relay, which forwards the ciphertext → aa's NAT → aa's gateway
//! → VXLAN → P1). Tools run "in the pod" with `nsenter
//! --net=<the pod's netns path from CRI>`: the host's binaries (busybox, iperf3) in the pod's
//! network namespace.
//!
//! Everything is dropped with the [`SandboxFleet`] (pods, controllers, nodes, routers, hub,
//! internet; processes by PID).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleet_e2e::fleet::{HUB_IP, RELAY_PORT};
use fleet_e2e::{Pod, SandboxFleet};

/// The sandbox with its three pods. Field order: pods are plain data, the fleet drops last.
pub struct CrossClusterPods {
    /// aa node 2.
    pub p1: Pod,
    /// aa node 1 (gateway node).
    pub p2: Pod,
    /// bb node 2.
    pub p3: Pod,
    pub fleet: SandboxFleet,
}

impl CrossClusterPods {
    /// Starts the fleet, its controllers and the pods; returns once P3 reaches P1 through the
    /// relay and P1 reaches P2, and after checking that the cross path is the relayed one:
    /// each gateway has exactly two peers, the hub relay (no allowed IPs) and the other
    /// member's gateway (its key, allowed IPs covering the remote pod), both at the relay's
    /// address, and the relay forwards for both gateways' keys.
    pub fn start(bench: &str) -> Result<CrossClusterPods> {
        let t0 = Instant::now();
        let mut fleet = SandboxFleet::standard().context("start the sandbox fleet")?;
        fleet
            .start_controllers(false)
            .context("start the controllers")?;
        println!(
            "{bench}: sandbox fleet up (hub cc + relay, aa and bb with 2 nodes each, controllers) in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        let p1 = fleet.run_pod("aa", 1, "p1")?;
        let p2 = fleet.run_pod("aa", 0, "p2")?;
        let p3 = fleet.run_pod("bb", 1, "p3")?;
        for p in [&p1, &p2, &p3] {
            println!(
                "{bench}: pod {} on {}/node {} eth-fleet {} netns {}",
                p.name,
                p.member,
                p.node + 1,
                p.fleet_ip,
                p.netns.display()
            );
        }
        let t = Instant::now();
        fleet
            .time_until_ping(&p3, &p1, t, Duration::from_secs(60))
            .context("P3 -> P1 across the fleet")?;
        fleet
            .time_until_ping(&p1, &p2, t, Duration::from_secs(30))
            .context("P1 -> P2 within aa")?;
        println!(
            "{bench}: first pings through after {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let me = CrossClusterPods { p1, p2, p3, fleet };
        let relay = format!("{HUB_IP}:{RELAY_PORT}");
        let dumps = [me.gateway_wg("aa", "dump")?, me.gateway_wg("bb", "dump")?];
        let keys: Vec<String> = dumps
            .iter()
            .map(|d| {
                d.lines()
                    .next()
                    .and_then(|l| l.split('\t').nth(1))
                    .map(str::to_string)
                    .context("wg show dump: no interface line")
            })
            .collect::<Result<_>>()?;
        for (i, (m, other_pod)) in [("aa", &me.p3), ("bb", &me.p1)].into_iter().enumerate() {
            check_relayed_gateway(&dumps[i], &relay, &keys[1 - i], &other_pod.fleet_ip)
                .with_context(|| format!("{bench}: {m}'s gateway is not relayed as expected"))?;
        }
        let forwarded_for = me.fleet.hub.relay_members()?;
        for (m, key) in ["aa", "bb"].iter().zip(&keys) {
            if !forwarded_for.contains(key) {
                bail!(
                    "{bench}: the hub relay does not forward for {m}'s gateway key {key} (it forwards for {forwarded_for:?})"
                );
            }
        }
        Ok(me)
    }

    /// `wg show <member's active gateway device> <what>`.
    pub fn gateway_wg(&self, member: &str, what: &str) -> Result<String> {
        let m = self.fleet.member(member);
        let active = m
            .active_controller()
            .with_context(|| format!("{member} has no active gateway device"))?;
        Ok(m.controllers[active].wg_show(what)?)
    }

    /// Data datagrams the hub's relay has forwarded between members so far (its
    /// `fleetboard_relay_forwarded_datagrams_total{type="data"}`).
    pub fn relay_forwarded_data(&self) -> Result<u64> {
        let text = self.fleet.hub.relay_metrics()?;
        relay_data_datagrams(&text)
            .with_context(|| format!("no forwarded data counter in the relay's metrics:\n{text}"))
    }

    /// `program` run in `pod`'s network namespace (`nsenter --net=<netns> -- program`).
    pub fn in_pod(&self, pod: &Pod, program: &str) -> Command {
        self.fleet.pod_command(pod, program)
    }

    /// `count` ICMP echos from `from` to `to_ip` over eth-fleet, one every `interval`, with
    /// busybox's `ping` in the pod's netns; returns each reply's RTT and the number of echos
    /// that got no reply.
    pub fn ping(
        &self,
        from: &Pod,
        to_ip: &str,
        count: usize,
        interval: Duration,
    ) -> Result<(Vec<Duration>, usize)> {
        let deadline = (interval.as_secs_f64() * count as f64).ceil() as u64 + 5;
        let out = self
            .in_pod(from, "busybox")
            .args([
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                &format!("{:.3}", interval.as_secs_f64()),
                "-W",
                "2",
                "-w",
                &deadline.to_string(),
                "-I",
                "eth-fleet",
                to_ip,
            ])
            .output()
            .context("run busybox ping in the pod's netns")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rtts = parse_ping_rtts(&text);
        if rtts.is_empty() {
            bail!(
                "ping {} -> {to_ip}: no replies\n{text}{}",
                from.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((rtts.clone(), count.saturating_sub(rtts.len())))
    }
}

/// Checks one gateway's `wg show <dev> dump` for the relayed design: exactly two peers, both
/// with `relay` as their endpoint — the relay itself (no allowed IPs) and the other member's
/// gateway (key `other_key`, allowed IPs containing `other_pod_ip`).
pub fn check_relayed_gateway(
    dump: &str,
    relay: &str,
    other_key: &str,
    other_pod_ip: &str,
) -> Result<()> {
    // Peer lines: public-key, preshared-key, endpoint, allowed-ips, handshake, rx, tx, keepalive.
    let peers: Vec<Vec<&str>> = dump
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    if peers.len() != 2 {
        bail!(
            "expected two peers (the relay and the other member), found {}:\n{dump}",
            peers.len()
        );
    }
    if let Some(p) = peers.iter().find(|p| p[2] != relay) {
        bail!(
            "peer {} has endpoint {}, not the relay {relay}:\n{dump}",
            p[0],
            p[2]
        );
    }
    if !peers.iter().any(|p| p[3] == "(none)" && p[0] != other_key) {
        bail!("no peer without allowed IPs (the relay's own session):\n{dump}");
    }
    let Some(member) = peers.iter().find(|p| p[0] == other_key) else {
        bail!("the other member's key {other_key} is not a peer:\n{dump}");
    };
    let ip: std::net::Ipv4Addr = other_pod_ip
        .parse()
        .with_context(|| format!("pod address {other_pod_ip}"))?;
    if !member[3].split(',').any(|net| net_contains(net.trim(), ip)) {
        bail!(
            "the other member's peer allows {}, which does not cover its pod {ip}:\n{dump}",
            member[3]
        );
    }
    Ok(())
}

/// The relay's forwarded data datagrams from its Prometheus text.
fn relay_data_datagrams(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let v = l.strip_prefix("fleetboard_relay_forwarded_datagrams_total{type=\"data\"} ")?;
        v.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// Whether IPv4 network `net` (`a.b.c.d/len`) contains `ip`.
fn net_contains(net: &str, ip: std::net::Ipv4Addr) -> bool {
    let Some((addr, len)) = net.split_once('/') else {
        return false;
    };
    let (Ok(addr), Ok(len)) = (addr.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    if len > 32 {
        return false;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(addr) & mask == u32::from(ip) & mask
}

/// The RTTs of busybox/iputils `ping` reply lines (`... time=0.123 ms`).
pub fn parse_ping_rtts(text: &str) -> Vec<Duration> {
    text.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|ms| ms.parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_nanos((ms * 1e6).round() as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAY: &str = "203.0.113.10:51820";

    fn dump(peers: &[(&str, &str, &str)]) -> String {
        let mut text = "cHJpdg==\tb3du\t51820\toff\n".to_string();
        for (key, endpoint, allowed) in peers {
            text.push_str(&format!(
                "{key}\t(none)\t{endpoint}\t{allowed}\t1700000000\t10\t20\t25\n"
            ));
        }
        text
    }

    #[test]
    fn relayed_gateway_has_the_relay_and_the_other_member() {
        let ok = dump(&[
            ("cmVsYXk=", RELAY, "(none)"),
            ("YmI=", RELAY, "100.97.0.0/16"),
        ]);
        check_relayed_gateway(&ok, RELAY, "YmI=", "100.97.1.3").unwrap();
        // The other member's block must cover its pod.
        assert!(check_relayed_gateway(&ok, RELAY, "YmI=", "100.98.1.3").is_err());
        // The other member's key must be a peer.
        assert!(check_relayed_gateway(&ok, RELAY, "Y2M=", "100.97.1.3").is_err());
        // Only the relay (the design before the forwarding relay): refused.
        let relay_only = dump(&[("cmVsYXk=", RELAY, "100.97.0.0/16")]);
        assert!(check_relayed_gateway(&relay_only, RELAY, "YmI=", "100.97.1.3").is_err());
        // A direct peer is not the relayed path.
        let direct = dump(&[
            ("cmVsYXk=", RELAY, "(none)"),
            ("YmI=", "203.0.113.22:51820", "100.97.0.0/16"),
        ]);
        assert!(check_relayed_gateway(&direct, RELAY, "YmI=", "100.97.1.3").is_err());
        // No relay session peer.
        let no_relay = dump(&[
            ("cmVsYXk=", RELAY, "100.98.0.0/16"),
            ("YmI=", RELAY, "100.97.0.0/16"),
        ]);
        assert!(check_relayed_gateway(&no_relay, RELAY, "YmI=", "100.97.1.3").is_err());
    }

    #[test]
    fn relay_data_counter_is_read() {
        let text = "# TYPE fleetboard_relay_forwarded_datagrams counter\n\
                    fleetboard_relay_forwarded_datagrams_total{type=\"initiation\"} 4\n\
                    fleetboard_relay_forwarded_datagrams_total{type=\"data\"} 123456\n";
        assert_eq!(relay_data_datagrams(text), Some(123_456));
        assert_eq!(relay_data_datagrams("fleetboard_relay_peers 2\n"), None);
    }

    #[test]
    fn networks_contain_their_addresses() {
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        assert!(net_contains("100.96.0.0/12", ip("100.97.3.4")));
        assert!(!net_contains("100.96.0.0/16", ip("100.97.3.4")));
        assert!(net_contains("0.0.0.0/0", ip("1.2.3.4")));
        assert!(net_contains("100.97.3.4/32", ip("100.97.3.4")));
        assert!(!net_contains("100.97.3.4/33", ip("100.97.3.4")));
        assert!(!net_contains("garbage", ip("100.97.3.4")));
    }

    #[test]
    fn ping_rtts_are_read_from_reply_lines_only() {
        let text = "PING 100.96.1.2 (100.96.1.2): 56 data bytes\n\
                    64 bytes from 100.96.1.2: seq=0 ttl=62 time=0.412 ms\n\
                    64 bytes from 100.96.1.2: seq=1 ttl=62 time=1.003 ms\n\
                    \n--- 100.96.1.2 ping statistics ---\n\
                    3 packets transmitted, 2 packets received, 33% packet loss\n\
                    round-trip min/avg/max = 0.412/0.707/1.003 ms\n";
        let rtts = parse_ping_rtts(text);
        assert_eq!(
            rtts,
            vec![Duration::from_micros(412), Duration::from_micros(1003)]
        );
        assert!(parse_ping_rtts("ping: sendto: Network unreachable\n").is_empty());
    }
}

//! The datapaths the cross-cluster benchmarks compare, side by side in one sandbox fleet.
//!
//! The two gateways' CNF netns pick one per run with a policy-routing table (`ip rule to
//! <remote pod>/32 lookup 50`, table 50's route changes):
//!
//! - **ours**: table 50 empty, so the controller's routes apply: aa's and bb's
//!   fleet-gateway devices (interface in the gateway node's CNF netns, UDP in the node's netns)
//!   → NAT → the hub relay's fleet-gateway device → NAT → the other gateway.
//! - **wireguard-go**, once per build ([`crate::wg_go::builds`]: trixie's 0.0.20231211, the
//!   baseline, and bookworm's 0.0.20220316): one `wireguard-go` per gateway and one for the
//!   relay, each started in the netns that holds its twin's UDP socket (gateway node netns,
//!   hub netns) and its interface moved into its twin's interface netns (gateway CNF netns,
//!   relay netns) — the same split as ours (wireguard-go follows a moved interface: it polls
//!   the TUN fd for up/down). Configured with `wg` from `wg showconf` of the twin: same
//!   private keys, same peers and allowed IPs, same keepalive, same MTU; only the UDP port
//!   differs (51821, 51822) so all run at once. A relay twin routes with `ip rule iif <its
//!   interface>`.
//! - **plain**: no tunnel: veths gateway CNF netns ↔ relay netns ↔ gateway CNF netns,
//!   kernel routing only. It skips what only a tunnel needs (the UDP legs through the node
//!   netns, the NAT routers and the internet bridge, since plain packets cannot cross NAT).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Proc;
use crate::wg_go::{GoBuild, cpu_seconds};
use crate::xcluster::CrossClusterPods;

/// UDP port of the first wireguard-go build's twins (ours use 51820); the next build +1.
const GO_PORT: u16 = 51821;
/// Gateways' policy-routing table and rule preference.
const MODE_TABLE: &str = "50";
/// Relay netns tables for the wireguard-go relays (51, 53) and for plain.
const GO_TABLE: u32 = 51;
const PLAIN_TABLE: &str = "52";
const PLAIN_GW_DEV: &str = "fbplain0";
/// Plain veth addresses: aa CNF .1 / relay .2, bb CNF .5 / relay .6.
const PLAIN_NET: &str = "169.254.51";

/// One datapath between P3 (bb) and P1 (aa).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ours,
    /// The wireguard-go build at this index of [`crate::wg_go::builds`] (0: the baseline).
    WireguardGo(usize),
    Plain,
}

/// A gateway CNF netns as the bench uses it.
struct Gateway {
    /// Its CNF netns (named).
    cnf: String,
    /// The controller's WireGuard interface there.
    ours_dev: String,
    /// The remote pod whose /32 the mode table steers.
    remote_ip: String,
}

/// The wireguard-go twins of one build: relay, aa gateway, bb gateway.
struct GoSet {
    build: GoBuild,
    devs: Vec<GoDevice>,
}

/// Everything the bench adds to the sandbox; dropping it stops the wireguard-go processes
/// and removes the rules, routes and veths (the netns themselves go with the fleet).
pub struct TunnelModes {
    gateways: Vec<Gateway>,
    go: Vec<GoSet>,
    /// The processes running our tunnels, named: the hub (relay device) and the two
    /// gateway nodes' fleet-nri (gateway devices).
    ours_pids: Vec<(String, u32)>,
    relay_ns: String,
    /// The netns holding the tunnels' UDP sockets (relay replica, aa and bb gateway nodes).
    underlay_ns: Vec<String>,
    cleanup: Vec<Vec<String>>,
    _keys: tempfile::TempDir,
}

impl TunnelModes {
    /// Every mode this bench set up: ours, each wireguard-go build, plain.
    pub fn modes(&self) -> Vec<Mode> {
        let mut v = vec![Mode::Ours];
        v.extend((0..self.go.len()).map(Mode::WireguardGo));
        v.push(Mode::Plain);
        v
    }

    pub fn label(&self, mode: Mode) -> String {
        match mode {
            Mode::Ours => "ours (fleet-gateway + relay)".into(),
            Mode::WireguardGo(i) => format!("{} (gateways + relay)", self.go[i].build.label),
            Mode::Plain => "plain (routing, no tunnel)".into(),
        }
    }

    pub fn short(&self, mode: Mode) -> &'static str {
        match mode {
            Mode::Ours => "ours",
            Mode::WireguardGo(i) => self.go[i].build.tag,
            Mode::Plain => "plain",
        }
    }

    /// Builds every mode beside the controller-managed fleet; `builds` are the wireguard-go
    /// builds to twin (see [`crate::wg_go::builds`]).
    pub fn build(x: &CrossClusterPods, builds: &[GoBuild]) -> Result<TunnelModes> {
        let bench_name = "tunnel-modes";
        let relay_ns = x
            .fleet
            .hub
            .relay_netns
            .as_ref()
            .context("the sandbox hub runs no relay")?
            .name()
            .to_string();
        // The relay runs with the last hub replica: its UDP socket is in that replica's netns.
        let relay_replica = x
            .fleet
            .hub
            .replicas
            .last()
            .context("the sandbox hub has no replica")?;
        let hub_ns = relay_replica.netns.name().to_string();
        let relay_dev = x
            .fleet
            .hub
            .relay_name
            .clone()
            .context("the sandbox hub names no relay interface")?;
        let keys = tempfile::tempdir()?;
        let mut bench = TunnelModes {
            gateways: Vec::new(),
            go: builds
                .iter()
                .map(|b| GoSet {
                    build: b.clone(),
                    devs: Vec::new(),
                })
                .collect(),
            ours_pids: Vec::new(),
            relay_ns: relay_ns.clone(),
            underlay_ns: vec![hub_ns.clone()],
            cleanup: Vec::new(),
            _keys: keys,
        };
        let tag = std::process::id() % 100_000;
        // Our relay device runs in whichever process serves it (the hub replica or a relay
        // process of its own): every process with the interface's name as an argument.
        let relay_pids = pids_naming(&relay_dev);
        if relay_pids.is_empty() {
            bail!("no process names the relay interface {relay_dev} on its command line");
        }
        bench
            .ours_pids
            .extend(relay_pids.into_iter().map(|p| ("relay".to_string(), p)));

        // The relay's twin: in the hub netns (UDP), interface moved into the relay netns.
        let relay_conf = WgConf::show(&relay_ns, &relay_dev)?;
        let relay_mtu = mtu(&relay_ns, &relay_dev)?;
        println!(
            "{bench_name}: relay {relay_dev} in {relay_ns}: {} peers, mtu {relay_mtu}",
            relay_conf.peers.len()
        );
        for (j, set) in bench.go.iter_mut().enumerate() {
            let go_relay = format!("fbg{tag}{j}r");
            let port = GO_PORT + j as u16;
            let table = (GO_TABLE + 2 * j as u32).to_string();
            // The relay learns its peers' (NATed) endpoints from their handshakes; the twin
            // must too: the addresses the relay learnt belong to its peers' other sockets.
            let mut conf = relay_conf.clone();
            conf.listen_port = Some(port);
            conf.peers.iter_mut().for_each(|p| p.endpoint = None);
            set.devs.push(GoDevice::start(
                &set.build,
                &go_relay,
                &hub_ns,
                &relay_ns,
                &conf,
                relay_mtu,
                bench._keys.path(),
            )?);
            for p in &relay_conf.peers {
                for a in &p.allowed_ips {
                    run(
                        "ip",
                        &ip_args(
                            &relay_ns,
                            &["route", "add", a, "dev", &go_relay, "table", &table],
                        ),
                    )?;
                }
            }
            let rule = [
                "rule", "add", "iif", &go_relay, "lookup", &table, "pref", &table,
            ];
            run("ip", &ip_args(&relay_ns, &rule))?;
            let mut del = rule.to_vec();
            del[1] = "del";
            bench.cleanup.push(ip_args(&relay_ns, &del));
            bench
                .cleanup
                .push(ip_args(&relay_ns, &["route", "flush", "table", &table]));
        }
        for (i, (member, remote)) in [("aa", &x.p3), ("bb", &x.p1)].into_iter().enumerate() {
            let m = x.fleet.member(member);
            let cnf = m.gateway_cnf().to_string();
            let node_ns = m.gateway().node.netns.name().to_string();
            bench.underlay_ns.push(node_ns.clone());
            let active = m
                .active_controller()
                .with_context(|| format!("{member}: no active gateway device"))?;
            let ours_dev = m.controllers[active].wg_name.clone();
            // The gateway node's fleet-nri runs the member's WireGuard device.
            bench.ours_pids.push((
                format!("{member} gateway"),
                m.gateway().node.nri.pid().with_context(|| {
                    format!("{member}: its gateway node's fleet-nri is not running")
                })?,
            ));
            let ours_conf = WgConf::show(&cnf, &ours_dev)?;
            let gw_mtu = mtu(&cnf, &ours_dev)?;
            println!(
                "{bench_name}: {member} gateway {ours_dev} in {cnf}: peers {:?}, mtu {gw_mtu}",
                ours_conf
                    .peers
                    .iter()
                    .map(|p| (p.endpoint.clone(), p.allowed_ips.clone()))
                    .collect::<Vec<_>>()
            );
            // wireguard-go twin: UDP in the gateway node's netns, interface in its CNF netns,
            // dialing the relay's twin.
            for (j, set) in bench.go.iter_mut().enumerate() {
                let go_dev = format!("fbg{tag}{j}{}", &member[..1]);
                let port = GO_PORT + j as u16;
                let mut conf = ours_conf.clone();
                conf.listen_port = Some(port);
                for p in &mut conf.peers {
                    if let Some(ep) = &mut p.endpoint {
                        let host = ep.rsplit_once(':').map(|(h, _)| h.to_string());
                        if host.as_deref() != Some(relay_replica.ip.as_str()) {
                            bail!(
                                "{member}'s gateway peer {ep} is not the hub relay: not a relayed fleet"
                            );
                        }
                        *ep = format!("{}:{port}", relay_replica.ip);
                    }
                }
                set.devs.push(GoDevice::start(
                    &set.build,
                    &go_dev,
                    &node_ns,
                    &cnf,
                    &conf,
                    gw_mtu,
                    bench._keys.path(),
                )?);
            }
            // plain: a veth from the CNF netns to the relay netns.
            let relay_end = format!("fbpl{tag}{}", &member[..1]);
            let (gw_ip, relay_ip) = (
                format!("{PLAIN_NET}.{}", 1 + 4 * i),
                format!("{PLAIN_NET}.{}", 2 + 4 * i),
            );
            bench.ip(
                &cnf,
                &[
                    "link",
                    "add",
                    PLAIN_GW_DEV,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &relay_end,
                    "netns",
                    &relay_ns,
                ],
            )?;
            bench
                .cleanup
                .push(ip_args(&cnf, &["link", "del", PLAIN_GW_DEV]));
            bench.ip(
                &cnf,
                &["addr", "add", &format!("{gw_ip}/30"), "dev", PLAIN_GW_DEV],
            )?;
            bench.ip(&cnf, &["link", "set", PLAIN_GW_DEV, "up"])?;
            bench.ip(
                &relay_ns,
                &["addr", "add", &format!("{relay_ip}/30"), "dev", &relay_end],
            )?;
            bench.ip(&relay_ns, &["link", "set", &relay_end, "up"])?;
            let own_pod = if member == "aa" { &x.p1 } else { &x.p3 };
            bench.ip(
                &relay_ns,
                &[
                    "route",
                    "add",
                    &format!("{}/32", own_pod.fleet_ip),
                    "via",
                    &gw_ip,
                    "table",
                    PLAIN_TABLE,
                ],
            )?;
            bench.rule(
                &relay_ns,
                &[
                    "iif",
                    &relay_end,
                    "lookup",
                    PLAIN_TABLE,
                    "pref",
                    PLAIN_TABLE,
                ],
            )?;
            // The mode switch.
            let remote_ip = remote.fleet_ip.clone();
            bench.rule(
                &cnf,
                &[
                    "to",
                    &format!("{remote_ip}/32"),
                    "lookup",
                    MODE_TABLE,
                    "pref",
                    MODE_TABLE,
                ],
            )?;
            bench.gateways.push(Gateway {
                cnf,
                ours_dev,
                remote_ip,
            });
        }
        Ok(bench)
    }

    /// `ip -n <ns> <args>`, failing with its error.
    fn ip(&self, ns: &str, args: &[&str]) -> Result<String> {
        run("ip", &ip_args(ns, args))
    }

    /// Adds an `ip rule` and remembers to delete it.
    fn rule(&mut self, ns: &str, args: &[&str]) -> Result<()> {
        let mut add = vec!["rule", "add"];
        add.extend(args);
        self.ip(ns, &add)?;
        let mut del = vec!["rule", "del"];
        del.extend(args);
        self.cleanup.push(ip_args(ns, &del));
        Ok(())
    }

    /// Points both gateways' mode table at `mode`'s interface.
    pub fn select(&self, mode: Mode) -> Result<()> {
        for (i, g) in self.gateways.iter().enumerate() {
            let dst = format!("{}/32", g.remote_ip);
            match mode {
                Mode::Ours => {
                    // Empty table: the lookup falls through to the main table (the controller's).
                    let _ = self.ip(&g.cnf, &["route", "del", &dst, "table", MODE_TABLE]);
                }
                Mode::WireguardGo(j) => {
                    let dev = &self.go[j].devs[1 + i].name;
                    self.ip(
                        &g.cnf,
                        &["route", "replace", &dst, "dev", dev, "table", MODE_TABLE],
                    )?;
                }
                Mode::Plain => {
                    let via = format!("{PLAIN_NET}.{}", 2 + 4 * i);
                    self.ip(
                        &g.cnf,
                        &[
                            "route",
                            "replace",
                            &dst,
                            "via",
                            &via,
                            "dev",
                            PLAIN_GW_DEV,
                            "table",
                            MODE_TABLE,
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The interface each mode uses in aa's gateway CNF netns.
    pub fn aa_devices(&self) -> Vec<(Mode, String)> {
        let mut v = vec![(Mode::Ours, self.gateways[0].ours_dev.clone())];
        for (j, set) in self.go.iter().enumerate() {
            v.push((Mode::WireguardGo(j), set.devs[1].name.clone()));
        }
        v.push((Mode::Plain, PLAIN_GW_DEV.to_string()));
        v
    }

    /// CPU seconds used so far by each process running `mode`'s tunnels, named (relay, aa
    /// gateway, bb gateway; none for plain). Ours may list several relay processes (every
    /// process naming the relay interface).
    pub fn tunnel_cpu(&self, mode: Mode) -> Vec<(String, f64)> {
        match mode {
            Mode::Ours => self
                .ours_pids
                .iter()
                .map(|(n, p)| (n.clone(), cpu_seconds(*p)))
                .collect(),
            Mode::WireguardGo(j) => self.go[j]
                .devs
                .iter()
                .zip(["relay", "aa gateway", "bb gateway"])
                .map(|(d, n)| (n.to_string(), cpu_seconds(d.proc.0.id())))
                .collect(),
            Mode::Plain => Vec::new(),
        }
    }

    /// rx+tx bytes of each mode's interface in aa's gateway CNF netns.
    pub fn aa_bytes(&self) -> Result<Vec<u64>> {
        let cnf = &self.gateways[0].cnf;
        self.aa_devices()
            .iter()
            .map(|(_, dev)| link_bytes(cnf, dev))
            .collect()
    }

    /// UDP datagrams dropped for a full socket receive buffer in each underlay netns (relay
    /// replica, aa's gateway node, bb's gateway node).
    pub fn udp_rcvbuf_errors(&self) -> Vec<u64> {
        self.underlay_ns
            .iter()
            .map(|ns| udp_rcvbuf_errors(ns))
            .collect()
    }
}

impl Drop for TunnelModes {
    fn drop(&mut self) {
        for args in self.cleanup.iter().rev() {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["-n", &self.relay_ns, "route", "flush", "table", PLAIN_TABLE])
            .stderr(Stdio::null())
            .status();
        for g in &self.gateways {
            let _ = Command::new("ip")
                .args(["-n", &g.cnf, "route", "flush", "table", MODE_TABLE])
                .stderr(Stdio::null())
                .status();
        }
        self.go.clear();
    }
}

#[derive(Debug, Clone, Default)]
pub struct WgConf {
    private_key: String,
    listen_port: Option<u16>,
    peers: Vec<WgPeer>,
}

#[derive(Debug, Clone, Default)]
struct WgPeer {
    public_key: String,
    allowed_ips: Vec<String>,
    endpoint: Option<String>,
    keepalive: Option<u16>,
}

impl WgConf {
    /// `wg showconf <dev>` run in the device's netns (kernel devices are only visible there;
    /// userspace ones answer on their UAPI socket either way).
    fn show(ns: &str, dev: &str) -> Result<WgConf> {
        let text = run(
            "nsenter",
            &[
                format!("--net=/run/netns/{ns}"),
                "--".into(),
                "wg".into(),
                "showconf".into(),
                dev.into(),
            ],
        )?;
        let conf = WgConf::parse(&text);
        if conf.private_key.is_empty() || conf.peers.is_empty() {
            bail!("wg showconf {dev} in {ns}: no private key or no peers:\n{text}");
        }
        Ok(conf)
    }

    fn parse(text: &str) -> WgConf {
        let mut conf = WgConf::default();
        for line in text.lines() {
            let line = line.trim();
            if line == "[Peer]" {
                conf.peers.push(WgPeer::default());
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            match (conf.peers.last_mut(), k) {
                (None, "PrivateKey") => conf.private_key = v.to_string(),
                (None, "ListenPort") => conf.listen_port = v.parse().ok(),
                (Some(p), "PublicKey") => p.public_key = v.to_string(),
                (Some(p), "AllowedIPs") => {
                    p.allowed_ips = v
                        .split(',')
                        .map(|a| a.trim().to_string())
                        .filter(|a| !a.is_empty())
                        .collect()
                }
                (Some(p), "Endpoint") => p.endpoint = Some(v.to_string()),
                (Some(p), "PersistentKeepalive") => p.keepalive = v.parse().ok(),
                _ => {}
            }
        }
        conf
    }
}

/// A wireguard-go process whose interface was moved into another netns; dropping it stops
/// the process (SIGTERM), which removes its interface and UAPI socket.
struct GoDevice {
    name: String,
    proc: Proc,
}

impl GoDevice {
    /// Starts `<build> -f <name>` in `udp_ns` (where its UDP socket will live), moves the
    /// interface into `if_ns`, configures it with `wg set` from `conf`, sets `mtu` and brings
    /// it up there.
    fn start(
        build: &GoBuild,
        name: &str,
        udp_ns: &str,
        if_ns: &str,
        conf: &WgConf,
        mtu: u32,
        key_dir: &Path,
    ) -> Result<GoDevice> {
        let proc = Proc::spawn(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{udp_ns}"))
                .arg("--")
                .arg(&build.path)
                .args(["-f", name])
                .env("LOG_LEVEL", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            build.label,
        )?;
        let dev = GoDevice {
            name: name.to_string(),
            proc,
        };
        let sock = uapi(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                bail!(
                    "wireguard-go {name}: UAPI socket {} did not appear",
                    sock.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        run(
            "ip",
            &ip_args(udp_ns, &["link", "set", name, "netns", if_ns]),
        )?;
        let key_file = key_dir.join(format!("{name}.key"));
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_file)?;
            writeln!(f, "{}", conf.private_key)?;
        }
        let mut args: Vec<String> = vec!["set".into(), name.into()];
        args.push("private-key".into());
        args.push(key_file.display().to_string());
        if let Some(port) = conf.listen_port {
            args.extend(["listen-port".into(), port.to_string()]);
        }
        for p in &conf.peers {
            args.extend(["peer".into(), p.public_key.clone()]);
            if let Some(ep) = &p.endpoint {
                args.extend(["endpoint".into(), ep.clone()]);
            }
            args.extend(["allowed-ips".into(), p.allowed_ips.join(",")]);
            if let Some(k) = p.keepalive {
                args.extend(["persistent-keepalive".into(), k.to_string()]);
            }
        }
        run("wg", &args)?;
        run(
            "ip",
            &ip_args(if_ns, &["link", "set", name, "mtu", &mtu.to_string(), "up"]),
        )?;
        Ok(dev)
    }
}

fn uapi(name: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{name}.sock"))
}

/// PIDs of the processes with `arg` as one of their command-line arguments (exact match).
fn pids_naming(arg: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        })
        .collect()
}

fn mtu(ns: &str, dev: &str) -> Result<u32> {
    let out = run("ip", &ip_args(ns, &["-j", "link", "show", "dev", dev]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["mtu"]
        .as_u64()
        .map(|m| m as u32)
        .with_context(|| format!("no mtu for {dev} in {ns}: {out}"))
}

/// `Udp: RcvbufErrors` of /proc/net/snmp as seen in netns `ns` (0 when unreadable).
fn udp_rcvbuf_errors(ns: &str) -> u64 {
    let Ok(text) = run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{ns}"),
            "--",
            "cat",
            "/proc/net/snmp",
        ],
    ) else {
        return 0;
    };
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let [names, values] = udp.as_slice() else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn link_bytes(ns: &str, dev: &str) -> Result<u64> {
    let out = run(
        "ip",
        &ip_args(ns, &["-j", "-s", "link", "show", "dev", dev]),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = &v[0]["stats64"];
    match (s["rx"]["bytes"].as_u64(), s["tx"]["bytes"].as_u64()) {
        (Some(rx), Some(tx)) => Ok(rx + tx),
        _ => bail!("no byte counters for {dev} in {ns}: {out}"),
    }
}

fn ip_args(ns: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec!["-n".to_string(), ns.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(cmd: &str, args: &[S]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("{cmd} {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn showconf_is_parsed_per_peer() {
        let text = "[Interface]\nListenPort = 51820\nPrivateKey = cHJpdg==\n\n\
                    [Peer]\nPublicKey = YWFh\nAllowedIPs = 100.96.0.0/16, 100.97.0.0/16\n\
                    Endpoint = 203.0.113.21:4500\nPersistentKeepalive = 25\n\n\
                    [Peer]\nPublicKey = YmJi\nAllowedIPs = 100.98.0.0/16\n";
        let c = WgConf::parse(text);
        assert_eq!(c.private_key, "cHJpdg==");
        assert_eq!(c.listen_port, Some(51820));
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].allowed_ips, ["100.96.0.0/16", "100.97.0.0/16"]);
        assert_eq!(c.peers[0].endpoint.as_deref(), Some("203.0.113.21:4500"));
        assert_eq!(c.peers[0].keepalive, Some(25));
        assert_eq!(c.peers[1].public_key, "YmJi");
        assert_eq!(c.peers[1].endpoint, None);
    }
}

//! The datapaths the cross-cluster benchmarks compare, side by side in one sandbox fleet.
//!
//! The two gateways' CNF netns pick one per run with a policy-routing table (`ip rule to
//! <remote pod>/32 lookup 50`, table 50's route changes):
//!
//! - **ours**: table 50 empty, so the controller's routes apply: the product path. aa's and
//!   bb's gateway devices (fleet-gateway run by the gateway node's `fleet-nri`: interface in
//!   its CNF netns, UDP in the node's netns) are WireGuard peers of each other end to end,
//!   with the hub's address as the endpoint → NAT → the hub's forwarding relay (`fleet-hub
//!   relay`: one UDP socket, forwards the ciphertext, decrypts nothing) → NAT → the other
//!   gateway. One encryption and one decryption per packet.
//! - **wireguard-go**, once per build ([`crate::wg_go::builds`]: trixie's 0.0.20231211, the
//!   baseline, and bookworm's 0.0.20220316): what a wireguard-go user runs without
//!   fleetboard's forwarder — a hub-and-spoke WireGuard network whose relay **decrypts and
//!   re-encrypts**. Per build three `wireguard-go` processes: one per gateway (same private
//!   key as ours, one peer: the relay, allowed IPs = the other members' blocks, same
//!   keepalive and MTU) and the relay (a key of its own, one peer per member with allowed IPs
//!   = its block, no endpoints: it learns the members' NATed addresses from their
//!   handshakes). Each is started in the netns that holds ours' UDP socket (gateway node
//!   netns; the hub replica's netns, so it listens on the hub's address) and its interface
//!   is moved into the netns that routes it (gateway CNF netns; for the relay, a netns of
//!   the bench's own with forwarding on, `ip rule iif <relay interface>` picking its table).
//!   Same underlay path as ours: the members' NAT routers → the hub's address. Only the UDP
//!   port differs (51821, 51822), so all sets run at once. Four crypto operations per packet.
//!   (wireguard-go follows a moved interface: it polls the TUN fd for up/down.)
//! - **plain**: no tunnel: veths gateway CNF netns ↔ the bench's relay netns ↔ gateway CNF
//!   netns, kernel routing only. It skips what only a tunnel needs (the UDP legs through the
//!   node netns, the NAT routers and the internet bridge, since plain packets cannot cross NAT).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleet_e2e::TestNetns;
use fleet_e2e::fleet::RELAY_PORT;

use crate::Proc;
use crate::wg_go::{CpuTimes, GoBuild, cpu_times};
use crate::xcluster::CrossClusterPods;

/// UDP port of the first wireguard-go build's processes (ours use 51820); the next build +1.
const GO_PORT: u16 = 51821;
/// Gateways' policy-routing table and rule preference.
const MODE_TABLE: &str = "50";
/// Relay netns tables for the wireguard-go relays (51, 53) and for plain.
const GO_TABLE: u32 = 51;
const PLAIN_TABLE: &str = "52";
const PLAIN_GW_DEV: &str = "fbplain0";
/// Plain veth addresses: aa CNF .1 / relay .2, bb CNF .5 / relay .6.
const PLAIN_NET: &str = "169.254.51";
/// A gateway's keepalive towards the relay when ours has none configured (the controller
/// always sets one on the relay peer).
const DEFAULT_KEEPALIVE: u16 = 25;

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
    /// The MTU of `ours_dev` (bytes): the largest packet a gateway seals or opens.
    mtu: u32,
}

/// The wireguard-go processes of one build: relay, aa gateway, bb gateway.
struct GoSet {
    build: GoBuild,
    devs: Vec<GoDevice>,
}

/// What the bench reads of one member's gateway before building the modes.
struct MemberGateway {
    member: &'static str,
    cnf: String,
    node_ns: String,
    ours_dev: String,
    conf: WgConf,
    public_key: String,
    mtu: u32,
    remote_ip: String,
    own_pod_ip: String,
}

/// Everything the bench adds to the sandbox; dropping it stops the wireguard-go processes,
/// removes the rules, routes and veths it added to the fleet's netns and deletes its relay
/// netns (the fleet's netns themselves go with the fleet).
pub struct TunnelModes {
    gateways: Vec<Gateway>,
    go: Vec<GoSet>,
    /// The processes running our tunnels, named: the hub's relay process and the two
    /// gateway nodes' fleet-nri (gateway devices).
    ours_pids: Vec<(String, u32)>,
    /// The netns holding the tunnels' UDP sockets (hub relay replica, aa and bb gateway nodes).
    underlay_ns: Vec<String>,
    cleanup: Vec<Vec<String>>,
    /// The bench's relay netns: the wireguard-go relays' interfaces and plain's router.
    /// Dropped after the processes (field order).
    relay_ns: TestNetns,
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
            Mode::Ours => "ours (fleet-gateway + forwarding relay)".into(),
            Mode::WireguardGo(i) => format!("{} (decrypting relay)", self.go[i].build.label),
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
    /// builds to run (see [`crate::wg_go::builds`]).
    pub fn build(x: &CrossClusterPods, builds: &[GoBuild]) -> Result<TunnelModes> {
        let bench_name = "tunnel-modes";
        // The relay runs with the last hub replica: its UDP socket is in that replica's netns.
        let relay_replica = x
            .fleet
            .hub
            .replicas
            .last()
            .context("the sandbox hub has no replica")?;
        let hub_ns = relay_replica.netns.name().to_string();
        let hub_ip = relay_replica.ip.clone();
        let relay_endpoint = format!("{hub_ip}:{RELAY_PORT}");
        let relay_pid = relay_process(&relay_replica.data_dir())?;
        let relay_ns = TestNetns::try_new("fbrelay").context("create the bench's relay netns")?;
        sysctl(
            relay_ns.name(),
            &[
                "net.ipv4.ip_forward=1",
                // Packets leave by the interface they came in on: no ICMP redirects.
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
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
            ours_pids: vec![("relay".to_string(), relay_pid)],
            underlay_ns: vec![hub_ns.clone()],
            cleanup: Vec::new(),
            relay_ns,
            _keys: keys,
        };
        let relay_ns = bench.relay_ns.name().to_string();
        let tag = std::process::id() % 100_000;

        // Ours as the controller built it: each gateway's peers are the relay (no allowed
        // IPs) and the other member (its block), both at the relay's address.
        let mut members = Vec::new();
        for (member, remote, own) in [("aa", &x.p3, &x.p1), ("bb", &x.p1, &x.p3)] {
            let m = x.fleet.member(member);
            let cnf = m.gateway_cnf().to_string();
            let node_ns = m.gateway().node.netns.name().to_string();
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
            let conf = WgConf::show(&cnf, &ours_dev)?;
            for p in &conf.peers {
                if p.endpoint.as_deref() != Some(relay_endpoint.as_str()) {
                    bail!(
                        "{member}'s gateway peer {} has endpoint {:?}, not the hub relay {relay_endpoint}: not a relayed fleet",
                        p.public_key,
                        p.endpoint
                    );
                }
            }
            let mtu = mtu(&cnf, &ours_dev)?;
            let public_key = wg_pubkey(&conf.private_key)?;
            println!(
                "{bench_name}: {member} gateway {ours_dev} in {cnf}, mtu {mtu}: peers {:?}",
                conf.peers
                    .iter()
                    .map(|p| (p.endpoint.clone(), p.allowed_ips.clone()))
                    .collect::<Vec<_>>()
            );
            bench.underlay_ns.push(node_ns.clone());
            members.push(MemberGateway {
                member,
                cnf,
                node_ns,
                ours_dev,
                conf,
                public_key,
                mtu,
                remote_ip: remote.fleet_ip.clone(),
                own_pod_ip: own.fleet_ip.clone(),
            });
        }
        // Each member's block, as the other gateways route it (their peer for its key).
        let blocks: Vec<Vec<String>> = members
            .iter()
            .map(|m| {
                let block: Vec<String> = members
                    .iter()
                    .flat_map(|o| &o.conf.peers)
                    .filter(|p| p.public_key == m.public_key)
                    .flat_map(|p| p.allowed_ips.clone())
                    .collect();
                if block.is_empty() {
                    bail!(
                        "no other gateway has {}'s key {} as a peer with allowed IPs",
                        m.member,
                        m.public_key
                    );
                }
                Ok(block)
            })
            .collect::<Result<_>>()?;
        let relay_mtu = members.iter().map(|m| m.mtu).max().unwrap_or(1420);

        for (j, set) in bench.go.iter_mut().enumerate() {
            let port = GO_PORT + j as u16;
            let table = (GO_TABLE + 2 * j as u32).to_string();
            // The relay: a key of its own, every member a peer with its block.
            let go_relay = format!("fbg{tag}{j}r");
            let relay_key = run("wg", &["genkey"])?.trim().to_string();
            let relay_conf = WgConf {
                private_key: relay_key.clone(),
                listen_port: Some(port),
                peers: members
                    .iter()
                    .zip(&blocks)
                    .map(|(m, block)| WgPeer {
                        public_key: m.public_key.clone(),
                        allowed_ips: block.clone(),
                        endpoint: None,
                        keepalive: None,
                    })
                    .collect(),
            };
            set.devs.push(GoDevice::start(
                &set.build,
                &go_relay,
                &hub_ns,
                &relay_ns,
                &relay_conf,
                relay_mtu,
                bench._keys.path(),
            )?);
            for a in blocks.iter().flatten() {
                run(
                    "ip",
                    &ip_args(
                        &relay_ns,
                        &["route", "add", a, "dev", &go_relay, "table", &table],
                    ),
                )?;
            }
            run(
                "ip",
                &ip_args(
                    &relay_ns,
                    &[
                        "rule", "add", "iif", &go_relay, "lookup", &table, "pref", &table,
                    ],
                ),
            )?;
            // The gateways: their own key, one peer (the relay) for the other blocks.
            let relay_public = wg_pubkey(&relay_key)?;
            for m in &members {
                let go_dev = format!("fbg{tag}{j}{}", &m.member[..1]);
                let keepalive = m
                    .conf
                    .peers
                    .iter()
                    .find(|p| p.allowed_ips.is_empty())
                    .and_then(|p| p.keepalive)
                    .unwrap_or(DEFAULT_KEEPALIVE);
                let conf = WgConf {
                    private_key: m.conf.private_key.clone(),
                    listen_port: Some(port),
                    peers: vec![WgPeer {
                        public_key: relay_public.clone(),
                        allowed_ips: m
                            .conf
                            .peers
                            .iter()
                            .flat_map(|p| p.allowed_ips.clone())
                            .collect(),
                        endpoint: Some(format!("{hub_ip}:{port}")),
                        keepalive: Some(keepalive),
                    }],
                };
                set.devs.push(GoDevice::start(
                    &set.build,
                    &go_dev,
                    &m.node_ns,
                    &m.cnf,
                    &conf,
                    m.mtu,
                    bench._keys.path(),
                )?);
            }
            println!(
                "{bench_name}: {}: relay {go_relay} (UDP {hub_ip}:{port}, interface in {relay_ns}, mtu {relay_mtu}) with peers aa {:?}, bb {:?}",
                set.build.label, blocks[0], blocks[1]
            );
        }
        for (i, m) in members.iter().enumerate() {
            // plain: a veth from the CNF netns to the bench's relay netns.
            let cnf = &m.cnf;
            let relay_end = format!("fbpl{tag}{}", &m.member[..1]);
            let (gw_ip, relay_ip) = (
                format!("{PLAIN_NET}.{}", 1 + 4 * i),
                format!("{PLAIN_NET}.{}", 2 + 4 * i),
            );
            bench.ip(
                cnf,
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
                .push(ip_args(cnf, &["link", "del", PLAIN_GW_DEV]));
            bench.ip(
                cnf,
                &["addr", "add", &format!("{gw_ip}/30"), "dev", PLAIN_GW_DEV],
            )?;
            bench.ip(cnf, &["link", "set", PLAIN_GW_DEV, "up"])?;
            bench.ip(
                &relay_ns,
                &["addr", "add", &format!("{relay_ip}/30"), "dev", &relay_end],
            )?;
            bench.ip(&relay_ns, &["link", "set", &relay_end, "up"])?;
            bench.ip(
                &relay_ns,
                &[
                    "route",
                    "add",
                    &format!("{}/32", m.own_pod_ip),
                    "via",
                    &gw_ip,
                    "table",
                    PLAIN_TABLE,
                ],
            )?;
            bench.ip(
                &relay_ns,
                &[
                    "rule",
                    "add",
                    "iif",
                    &relay_end,
                    "lookup",
                    PLAIN_TABLE,
                    "pref",
                    PLAIN_TABLE,
                ],
            )?;
            // The mode switch.
            bench.rule(
                cnf,
                &[
                    "to",
                    &format!("{}/32", m.remote_ip),
                    "lookup",
                    MODE_TABLE,
                    "pref",
                    MODE_TABLE,
                ],
            )?;
            bench.gateways.push(Gateway {
                cnf: cnf.clone(),
                ours_dev: m.ours_dev.clone(),
                remote_ip: m.remote_ip.clone(),
                mtu: m.mtu,
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

    /// The smallest MTU of our gateways' WireGuard interfaces (bytes): the size of a
    /// full-size packet they seal and open.
    pub fn ours_mtu(&self) -> u32 {
        self.gateways.iter().map(|g| g.mtu).min().unwrap_or(1420)
    }

    /// CPU time used so far by each process running `mode`'s tunnels, named (relay, aa
    /// gateway, bb gateway; none for plain). Ours may list several relay processes (every
    /// process naming the relay interface).
    pub fn tunnel_cpu(&self, mode: Mode) -> Vec<(String, CpuTimes)> {
        match mode {
            Mode::Ours => self
                .ours_pids
                .iter()
                .map(|(n, p)| (n.clone(), cpu_times(*p)))
                .collect(),
            Mode::WireguardGo(j) => self.go[j]
                .devs
                .iter()
                .zip(["relay", "aa gateway", "bb gateway"])
                .map(|(d, n)| (n.to_string(), cpu_times(d.proc.0.id())))
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

/// The PID of the relay process serving the hub replica whose data dir is `data_dir`: the
/// one its `relay.pid` names, checked to be a `fleet-hub ... relay` on that data dir.
fn relay_process(data_dir: &Path) -> Result<u32> {
    let file = data_dir.join("relay.pid");
    let pid: u32 = std::fs::read_to_string(&file)
        .with_context(|| format!("the hub's relay names no process: {}", file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no PID", file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let dir = data_dir.as_os_str().as_encoded_bytes();
    if !(args.contains(&&b"relay"[..])
        && args
            .windows(2)
            .any(|w| w[0] == b"--data-dir" && w[1] == dir))
    {
        bail!(
            "{} names PID {pid}, which is not a running relay on that data dir",
            file.display()
        );
    }
    Ok(pid)
}

/// `sysctl -qw <settings>` inside netns `ns`.
fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec![
        format!("--net=/run/netns/{ns}"),
        "--".into(),
        "sysctl".into(),
        "-qw".into(),
    ];
    args.extend(settings.iter().map(|s| s.to_string()));
    run("nsenter", &args).map(|_| ())
}

/// The public key of a base64 WireGuard private key (`wg pubkey`).
fn wg_pubkey(private_key: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn wg pubkey")?;
    child
        .stdin
        .take()
        .context("wg pubkey: no stdin")?
        .write_all(format!("{private_key}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg pubkey: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
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

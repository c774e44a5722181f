//! A sandbox fleet on one machine, all in PID-unique network namespaces:
//!
//! ```text
//!                          "internet" netns: bridge inet0, 203.0.113.0/24 (TEST-NET-3)
//!        ┌───────────────────────────┬──────────────────────────────┐
//!   hub cc 203.0.113.10        router aa (wan0 203.0.113.21)    router bb (wan0 203.0.113.22)
//!   fleet-hub serve :7443      nft masquerade, fwd only          same
//!   relay UDP :51820           established back in
//!                              lan0 bridge 198.51.100.1/24      lan0 198.51.100.1/24 (same LAN!)
//!                               ├─ node aa-1 198.51.100.11       ├─ node bb-1 198.51.100.11
//!                               └─ node aa-2 198.51.100.12       └─ node bb-2 198.51.100.12
//! ```
//!
//! Every node runs real containerd (bridge + host-local, primary pod CIDR 10.244.1.0/24 on
//! every node of every member) with fleet-cni chained and fleet-nri in the node's netns. The
//! internet has no route to any LAN: members reach the hub only through their router's NAT.
//! A "public" member's router also forwards UDP 51820 to its gateway node (a port forward),
//! and its controller declares that address as its endpoint.
//!
//! Processes: [`FleetHub`] (`fleet-hub serve` in cc with the embedded store and the relay;
//! or, with [`FleetBuilder::hub_replicas_on_etcd`], replicas at 203.0.113.10, .11, ... on a
//! real etcd that sits on a private hub network, 192.0.2.0/24), one or two
//! [`FleetController`]s per member (`fleet-controller run` in a node's netns, the contract's
//! flags, nodes.json written for the member), `fleetctl` run from a member node. The gateway's
//! WireGuard device is run by the gateway node's fleet-nri (one interface name per member);
//! [`ProbeStream`] measures how long a process restart stalls a TCP stream between pods.
//!
//! Drop order: pods, controllers, containerd + fleet-nri, routers, hub, etcd, internet. Process
//! logs are printed when the dropping thread is panicking (a failed test), or always with
//! `FLEET_E2E_LOGS=1`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::capture::{Capture, Packets};
use crate::cluster_node::{ClusterNode, inet_of};
use crate::cri::PodSpec;
use crate::error::{Error, Result};
use crate::netns::TestNetns;
use crate::process::ManagedProcess;
use crate::util::{poll_until, run_command};
use crate::workspace_bin;

/// The simulated internet.
pub const INTERNET_CIDR: &str = "203.0.113.0/24";
/// The hub's address: the only reachable address of the fleet.
pub const HUB_IP: &str = "203.0.113.10";
pub const HUB_API_PORT: u16 = 7443;
/// The hub relay's WireGuard UDP port.
pub const RELAY_PORT: u16 = 51820;
/// The relay process's `/metrics` port (on the relay replica's IP).
pub const RELAY_METRICS_PORT: u16 = 9102;
/// Every member's LAN (identical on purpose).
pub const LAN_PREFIX: &str = "198.51.100";
/// The gateway's WireGuard UDP port on its node.
pub const GATEWAY_PORT: u16 = 51820;
/// The DNS VIP of the default VIP range (its first usable address): pods' name server.
pub const DNS_VIP: &str = "100.112.0.1";
/// Interface of the internet bridge (in the internet netns).
pub const INTERNET_BRIDGE: &str = "inet0";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A netns with IPv6 off (no link-local chatter in captures) and, optionally, forwarding.
fn quiet_netns(prefix: &str, forward: bool) -> Result<TestNetns> {
    let ns = TestNetns::try_new(prefix)?;
    let mut sysctls = vec![
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ];
    if forward {
        sysctls.push("net.ipv4.ip_forward=1");
    }
    run_command(ns.command("sysctl").arg("-qw").args(&sysctls))?;
    Ok(ns)
}

/// Connects `ns` to a bridge in `bridge_ns`: a veth whose end `port` (in `bridge_ns`) is a
/// port of `bridge` and whose end `ifname` (in `ns`) gets `cidr` and comes up.
fn plug(
    bridge_ns: &TestNetns,
    bridge: &str,
    port: &str,
    ns: &TestNetns,
    ifname: &str,
    cidr: &str,
) -> Result<()> {
    bridge_ns.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        ifname,
        "netns",
        ns.name(),
    ])?;
    bridge_ns.ip(&["link", "set", port, "master", bridge, "up"])?;
    ns.ip(&["addr", "add", cidr, "dev", ifname])?;
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(())
}

/// Applies an nftables ruleset inside `ns`.
fn nft(ns: &TestNetns, ruleset: &str) -> Result<()> {
    use std::io::Write;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("spawn nft in", ns.path(), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| Error::io("write nft ruleset to", ns.path(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("wait for nft in", ns.path(), e))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "nft in {}: {}\n{ruleset}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The simulated internet: one bridge in its own netns, no addresses, no routing.
pub struct Internet {
    pub netns: TestNetns,
}

impl Internet {
    pub fn new() -> Result<Internet> {
        let netns = quiet_netns("inet", false)?;
        netns.ip(&["link", "add", INTERNET_BRIDGE, "type", "bridge"])?;
        netns.ip(&["link", "set", INTERNET_BRIDGE, "up"])?;
        Ok(Internet { netns })
    }

    /// Gives `ns` an interface `ifname` with `cidr` on the internet.
    pub fn attach(&self, port: &str, ns: &TestNetns, ifname: &str, cidr: &str) -> Result<()> {
        plug(&self.netns, INTERNET_BRIDGE, port, ns, ifname, cidr)
    }

    /// Starts a capture of everything crossing the internet bridge.
    pub fn capture(&self, max: Duration) -> Result<Capture> {
        Capture::start(&self.netns.path(), INTERNET_BRIDGE, max)
    }
}

/// A member's NAT router: `wan0` on the internet, bridge `lan0` (198.51.100.1/24) for its nodes.
pub struct NatRouter {
    pub netns: TestNetns,
    pub public_ip: String,
}

impl NatRouter {
    fn new(
        internet: &Internet,
        member: &str,
        public_ip: &str,
        forward_to: Option<&str>,
    ) -> Result<NatRouter> {
        let netns = quiet_netns(&format!("{member}-rt"), true)?;
        internet.attach(
            &format!("p-{member}"),
            &netns,
            "wan0",
            &format!("{public_ip}/24"),
        )?;
        netns.ip(&["link", "add", "lan0", "type", "bridge"])?;
        netns.ip(&["addr", "add", &format!("{LAN_PREFIX}.1/24"), "dev", "lan0"])?;
        netns.ip(&["link", "set", "lan0", "up"])?;
        // Bridged LAN traffic (node to node) passes the forward hook too where the kernel has
        // bridge netfilter built in: accept it. Outbound is masqueraded; inbound only for established flows (and the port forward of
        // a public member). Nothing routes from the internet into the LAN otherwise.
        let dnat = forward_to
            .map(|gw| {
                format!("iifname \"wan0\" udp dport {GATEWAY_PORT} dnat to {gw}:{GATEWAY_PORT}")
            })
            .unwrap_or_default();
        nft(
            &netns,
            &format!(
                "table ip fe2e_nat {{\n\
                 chain prerouting {{\n type nat hook prerouting priority -100;\n {dnat}\n }}\n\
                 chain postrouting {{\n type nat hook postrouting priority 100;\n \
                 oifname \"wan0\" masquerade\n }}\n\
                 }}\n\
                 table ip fe2e_filter {{\n\
                 chain forward {{\n type filter hook forward priority 0; policy drop;\n\
                 iifname \"lan0\" oifname \"wan0\" accept\n\
                 iifname \"lan0\" oifname \"lan0\" accept\n\
                 ct state established,related accept\n\
                 ct status dnat accept\n\
                 }}\n\
                 }}\n"
            ),
        )?;
        Ok(NatRouter {
            netns,
            public_ip: public_ip.to_string(),
        })
    }
}

/// One node of a member: `name` (`aa-1`) is its name in nodes.json.
pub struct FleetNode {
    pub name: String,
    pub node: ClusterNode,
}

impl FleetNode {
    /// The nodes.json entry (contract: name, socket, underlay_ip, netns).
    pub fn nodes_json_entry(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "socket": self.node.nri.socket(),
            "underlay_ip": self.node.underlay_ip,
            "netns": self.node.netns.path(),
        })
    }

    pub fn netns_path(&self) -> PathBuf {
        self.node.netns.path()
    }

    /// Whether fleet-nri has a plan (the controller has spoken).
    pub fn ready(&self) -> bool {
        self.node.nri.status().map(|s| s.ready).unwrap_or(false)
    }
}

/// How a member is built.
#[derive(Debug, Clone)]
pub struct MemberOpts {
    pub nodes: usize,
    /// Its router forwards UDP 51820 to the gateway node, and its controller declares
    /// `--endpoint <router>:51820` (direct tunnels).
    pub public: bool,
}

impl MemberOpts {
    pub fn nat(nodes: usize) -> Self {
        MemberOpts {
            nodes,
            public: false,
        }
    }
    pub fn public(nodes: usize) -> Self {
        MemberOpts {
            nodes,
            public: true,
        }
    }
}

/// One member cluster: router, nodes, controllers (by default index 0 runs on node 0, the
/// gateway node; a standby on node 1). The gateway's WireGuard device lives in the gateway
/// node's fleet-nri, under one name per member that every controller replica passes on.
pub struct Member {
    pub id: String,
    pub opts: MemberOpts,
    /// The gateway's WireGuard interface name (host-unique: it names the UAPI socket).
    pub wg_name: String,
    pub controllers: Vec<FleetController>,
    /// `fleet-dns`, once started ([`SandboxFleet::start_dns`]).
    pub dns: Option<ManagedProcess>,
    pub nodes: Vec<FleetNode>,
    pub router: NatRouter,
    /// credential file, nodes.json, controller data dirs, logs.
    pub dir: PathBuf,
}

impl Member {
    pub fn gateway(&self) -> &FleetNode {
        &self.nodes[0]
    }

    pub fn credential_file(&self) -> PathBuf {
        self.dir.join("credential")
    }

    pub fn nodes_json(&self) -> PathBuf {
        self.dir.join("nodes.json")
    }

    /// `ip:port` the controller declares with `--endpoint` (public members only).
    pub fn endpoint(&self) -> Option<String> {
        self.opts
            .public
            .then(|| format!("{}:{GATEWAY_PORT}", self.router.public_ip))
    }

    fn write_nodes_json(&self) -> Result<()> {
        let entries: Vec<_> = self.nodes.iter().map(FleetNode::nodes_json_entry).collect();
        let path = self.nodes_json();
        std::fs::write(&path, serde_json::Value::Array(entries).to_string())
            .map_err(|e| Error::io("write", &path, e))
    }

    /// The controller that currently runs (if several, the first).
    pub fn running_controllers(&mut self) -> Vec<usize> {
        let mut up = Vec::new();
        for (i, c) in self.controllers.iter_mut().enumerate() {
            if c.process.running() {
                up.push(i);
            }
        }
        up
    }

    /// The CNF netns of the gateway node (where the gateway's WireGuard interface lives).
    pub fn gateway_cnf(&self) -> &str {
        self.gateway().node.nri.cnf_netns()
    }

    /// Whether the gateway's WireGuard interface exists in the gateway node's CNF netns.
    pub fn gateway_device_up(&self) -> bool {
        crate::netns::ip_in(
            self.gateway_cnf(),
            &["-o", "link", "show", "dev", &self.wg_name],
        )
        .is_ok_and(|o| !o.is_empty())
    }

    /// Index of the running controller that holds the lease (its log's last word on the
    /// lease says active), while the gateway device is up.
    pub fn active_controller(&self) -> Option<usize> {
        if !self.gateway_device_up() {
            return None;
        }
        self.controllers
            .iter()
            .position(|c| c.pid().is_some() && c.holds_lease())
    }

    /// IPv4 routes of node `node`'s CNF netns.
    pub fn cnf_routes(&self, node: usize) -> String {
        self.nodes[node].node.nri.ip_cnf(&["-4", "route", "show"])
    }

    /// All process logs of this member (controllers, fleet-nri tails).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for c in &self.controllers {
            s.push_str(&format!(
                "---- {} log:\n{}\n",
                c.process.label(),
                tail(&c.log(), 120)
            ));
        }
        if let Some(dns) = &self.dns {
            s.push_str(&format!(
                "---- {} log:\n{}\n",
                dns.label(),
                tail(
                    &std::fs::read_to_string(dns.log_path()).unwrap_or_default(),
                    40
                )
            ));
        }
        for n in &self.nodes {
            s.push_str(&format!(
                "---- fleet-nri {} log:\n{}\n",
                n.name,
                tail(&n.node.nri.log(), 40)
            ));
        }
        s
    }

    fn remove_pods(&self) {
        for n in &self.nodes {
            n.node.remove_all_pods();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.remove_pods();
        if let Some(dns) = &mut self.dns {
            dns.terminate(Duration::from_secs(5));
        }
        for c in &mut self.controllers {
            c.process.terminate(Duration::from_secs(5));
        }
        self.controllers.clear();
        self.nodes.clear();
        // A fleet-nri killed with -9 leaves its userspace device's UAPI socket behind.
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.wg_name));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One `fleet-hub serve` replica in its own netns at `203.0.113.(10+i)`.
pub struct HubReplica {
    pub process: ManagedProcess,
    pub netns: TestNetns,
    pub ip: String,
    pub dir: PathBuf,
}

impl HubReplica {
    pub fn endpoint(&self) -> String {
        format!("{}:{HUB_API_PORT}", self.ip)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts (or restarts) it and waits until it serves.
    pub fn spawn(&mut self) -> Result<()> {
        self.process.spawn()?;
        self.process
            .await_log("hub API serving", Duration::from_secs(30))
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    pub fn running(&mut self) -> bool {
        self.process.running()
    }
}

impl Drop for HubReplica {
    fn drop(&mut self) {
        // SIGTERM: the replica also stops the relay process it runs.
        self.process.terminate(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The hub `cc`: one `fleet-hub serve` on the embedded store at 203.0.113.10:7443, or several
/// replicas (203.0.113.10, .11, ...) on a real etcd that lives on a private hub network
/// (192.0.2.0/24, not on the internet). The last replica runs the relay (UDP 51820, a
/// forwarder of WireGuard datagrams; its `/metrics` on the same IP, port 9102).
pub struct FleetHub {
    pub replicas: Vec<HubReplica>,
    /// Always `None`: the relay forwards WireGuard datagrams and has no interface of its own
    /// any more. Kept only so `bench/` builds until it stops reading it.
    pub relay_netns: Option<TestNetns>,
    /// Always `None` (see `relay_netns`).
    pub relay_name: Option<String>,
    /// The relay's `/metrics` (`--relay-metrics-address`): the netns it is reachable from
    /// and its address, when relaying.
    pub relay_metrics: Option<(PathBuf, String)>,
    /// etcd (in `backnet`), with several replicas.
    pub etcd: Option<ManagedProcess>,
    pub backnet: Option<TestNetns>,
    etcd_dir: Option<PathBuf>,
}

/// etcd's address on the hub's private network.
pub const ETCD_IP: &str = "192.0.2.1";

impl FleetHub {
    fn start(internet: &Internet, relay: bool, replicas: usize) -> Result<FleetHub> {
        let replicas = replicas.max(1);
        let mut hub = FleetHub {
            replicas: Vec::new(),
            relay_netns: None,
            relay_name: None,
            relay_metrics: None,
            etcd: None,
            backnet: None,
            etcd_dir: None,
        };
        let mut store_args: Vec<OsString> = Vec::new();
        if replicas > 1 {
            hub.start_etcd()?;
            // Plain http on the sandbox's own private link between the hub's netns and etcd's
            // (a real deployment uses https with --etcd-cacert).
            store_args = os(&[
                "--etcd",
                &format!("http://{ETCD_IP}:2379"),
                "--etcd-allow-insecure",
            ]);
        }
        for i in 0..replicas {
            let ip = format!("203.0.113.{}", 10 + i);
            let netns = quiet_netns(&format!("cc{i}"), false)?;
            internet.attach(&format!("p-cc{i}"), &netns, "wan0", &format!("{ip}/24"))?;
            if let Some(back) = &hub.backnet {
                plug(
                    back,
                    "hubnet0",
                    &format!("r{i}"),
                    &netns,
                    "back0",
                    &format!("192.0.2.{}/24", 10 + i),
                )?;
            }
            let dir =
                std::env::temp_dir().join(format!("fe2e-hub-{}-{}", std::process::id(), seq()));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
            let mut args = vec![OsString::from("--data-dir"), dir.join("data").into()];
            args.extend(store_args.iter().cloned());
            args.extend(os(&["serve", "--listen", &format!("{ip}:{HUB_API_PORT}")]));
            if relay && i == replicas - 1 {
                let metrics = format!("{ip}:{RELAY_METRICS_PORT}");
                args.extend(os(&[
                    "--relay-listen",
                    &format!("{ip}:{RELAY_PORT}"),
                    "--relay-metrics-address",
                    &metrics,
                ]));
                hub.relay_metrics = Some((netns.path(), metrics));
            }
            let process = ManagedProcess::new(
                &format!("fleet-hub cc{i}"),
                workspace_bin("fleet-hub"),
                args,
                &netns.path(),
                dir.join("hub.log"),
            )
            .env("FLEET_LOG", "info");
            let mut replica = HubReplica {
                process,
                netns,
                ip,
                dir,
            };
            // One after the other: the first publishes the shared CA in the store, the
            // others adopt it.
            replica.spawn()?;
            hub.replicas.push(replica);
        }
        Ok(hub)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let back = quiet_netns("hubdb", false)?;
        back.ip(&["link", "add", "hubnet0", "type", "bridge"])?;
        back.ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "hubnet0"])?;
        back.ip(&["link", "set", "hubnet0", "up"])?;
        let dir = std::env::temp_dir().join(format!("fe2e-etcd-{}-{}", std::process::id(), seq()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let client = format!("http://{ETCD_IP}:2379");
        let peer = "http://127.0.0.1:2380";
        let mut etcd = ManagedProcess::new(
            "etcd",
            "/usr/bin/etcd",
            vec![
                "--name=fleet-sandbox".into(),
                format!("--data-dir={}", dir.join("data").display()).into(),
                format!("--listen-client-urls={client}").into(),
                format!("--advertise-client-urls={client}").into(),
                format!("--listen-peer-urls={peer}").into(),
                format!("--initial-advertise-peer-urls={peer}").into(),
                format!("--initial-cluster=fleet-sandbox={peer}").into(),
                "--log-level=warn".into(),
            ],
            &back.path(),
            dir.join("etcd.log"),
        );
        etcd.spawn()?;
        let ns = back.path();
        poll_until("etcd to listen", Duration::from_secs(30), || {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", ns.display()))
                .args(["--", "ss", "-Hltn", "sport = :2379"])
                .output()
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        })
        .map_err(|e| Error::Invalid(format!("{e}\n{}", etcd.log())))?;
        self.etcd = Some(etcd);
        self.backnet = Some(back);
        self.etcd_dir = Some(dir);
        Ok(())
    }

    /// Starts every replica that is not running (after `kill9`).
    pub fn spawn(&mut self) -> Result<()> {
        for r in &mut self.replicas {
            if !r.running() {
                r.spawn()?;
            }
        }
        Ok(())
    }

    /// SIGKILL to every replica (`replicas[i].kill9()` for one).
    pub fn kill9(&mut self) {
        for r in &mut self.replicas {
            r.kill9();
        }
    }

    /// The relay's Prometheus metrics text (fetched from inside the relay replica's netns).
    pub fn relay_metrics(&self) -> Result<String> {
        let (netns, addr) = self
            .relay_metrics
            .as_ref()
            .ok_or_else(|| Error::Invalid("the hub runs no relay".into()))?;
        let out = run_command(
            Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["--", "busybox", "wget", "-q", "-O", "-"])
                .arg(format!("http://{addr}/metrics")),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The public keys (base64) of the members the relay forwards for.
    pub fn relay_members(&self) -> Result<Vec<String>> {
        let text = self.relay_metrics()?;
        let prefix = "fleetboard_relay_peer_received_bytes_total{peer=\"";
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_string)
            .collect())
    }

    /// The first replica's API address.
    pub fn endpoint(&self) -> String {
        self.replicas[0].endpoint()
    }

    /// Every replica's API address, comma-separated (what controllers and fleetctl get).
    pub fn endpoints(&self) -> String {
        self.replicas
            .iter()
            .map(HubReplica::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first replica's data dir (CA, admin credential: shared by all replicas).
    pub fn data_dir(&self) -> PathBuf {
        self.replicas[0].data_dir()
    }

    /// The hub CA's SHA-256 (hex), what members pin.
    pub fn ca_hash(&self) -> Result<String> {
        let path = self.data_dir().join("ca.pem");
        let pem = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
        ca_hash_of_pem(&pem)
            .ok_or_else(|| Error::Invalid(format!("no certificate in {}", path.display())))
    }

    /// Runs the `fleet-hub` CLI against a serving replica (admin credential and CA from its
    /// data dir), from inside that replica's netns.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut last = None;
        for r in &self.replicas {
            let out = r
                .netns
                .command(workspace_bin("fleet-hub").to_str().unwrap_or("fleet-hub"))
                .arg("--data-dir")
                .arg(r.data_dir())
                .args(["--hub", &r.endpoint()])
                .args(args)
                .env("NO_COLOR", "1")
                .output()
                .map_err(|e| Error::io("run fleet-hub in", r.netns.path(), e))?;
            // Next replica only when this one is not serving.
            let down = String::from_utf8_lossy(&out.stderr).contains("Connection refused");
            if !down {
                return Ok(out);
            }
            last = Some(out);
        }
        last.ok_or_else(|| Error::Invalid("the hub has no replica".into()))
    }

    /// `fleet-hub token create`: the join string for one member.
    pub fn create_join_string(&self, description: &str) -> Result<String> {
        let out = self.cli(&[
            "token",
            "create",
            "--ttl",
            "1h",
            "--description",
            description,
        ])?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "fleet-hub token create: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `fleet-hub cluster remove <id>` through the admin API.
    pub fn remove_cluster(&self, id: &str) -> Result<String> {
        let out = self.cli(&["cluster", "remove", id])?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "fleet-hub cluster remove {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        for r in &self.replicas {
            s.push_str(&tail(&r.process.log(), 120));
            s.push('\n');
        }
        if let Some(e) = &self.etcd {
            s.push_str(&format!("---- etcd log:\n{}\n", tail(&e.log(), 30)));
        }
        s
    }
}

impl Drop for FleetHub {
    fn drop(&mut self) {
        self.replicas.clear();
        if let Some(mut etcd) = self.etcd.take() {
            etcd.terminate(Duration::from_secs(10));
        }
        if let Some(dir) = &self.etcd_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SHA-256 of the first certificate's DER in a PEM text, as lowercase hex.
pub fn ca_hash_of_pem(pem: &str) -> Option<String> {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = pem.find(begin)? + begin.len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let b64: String = pem[start..end].split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(
        Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// One `fleet-controller run` instance of a member (contract flags), in a node's netns.
pub struct FleetController {
    pub process: ManagedProcess,
    pub holder: String,
    pub data_dir: PathBuf,
    pub wg_name: String,
}

impl FleetController {
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// SIGTERM; returns the exit status (contract: 0 on a clean stop).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.process.terminate(Duration::from_secs(10))
    }

    pub fn restart(&mut self) -> Result<()> {
        if self.process.running() {
            self.stop();
        }
        self.process.spawn()
    }

    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// `wg show <the member's interface> <what>` (through the UAPI socket of the device the
    /// gateway node's fleet-nri runs).
    pub fn wg_show(&self, what: &str) -> Result<String> {
        let out = run_command(Command::new("wg").args(["show", &self.wg_name, what]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Whether its log's last word on the lease is that it holds it.
    pub fn holds_lease(&self) -> bool {
        let log = self.log();
        let active = log.rfind("active: holding the cluster lease");
        let standby = [
            "standby: waiting for the cluster lease",
            "stepping down",
            "stopping",
        ]
        .iter()
        .filter_map(|m| log.rfind(m))
        .max();
        match (active, standby) {
            (Some(a), Some(s)) => a > s,
            (a, _) => a.is_some(),
        }
    }

    /// How many times it became active (across restarts: the log is appended to).
    pub fn activations(&self) -> usize {
        self.log()
            .matches("active: holding the cluster lease")
            .count()
    }
}

impl Drop for FleetController {
    fn drop(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }
}

/// A pod of the sandbox: where it runs and its addresses.
#[derive(Debug, Clone)]
pub struct Pod {
    pub member: String,
    pub node: usize,
    pub name: String,
    pub sandbox: String,
    pub container: String,
    pub fleet_ip: String,
    pub primary_ip: String,
    /// The pod's network namespace (for running host tools such as socat "in the pod").
    pub netns: PathBuf,
}

/// Building a [`SandboxFleet`].
#[derive(Debug, Clone)]
pub struct FleetBuilder {
    members: Vec<(String, MemberOpts)>,
    relay: bool,
    hub_replicas: usize,
}

impl FleetBuilder {
    pub fn member(mut self, id: &str, opts: MemberOpts) -> Self {
        self.members.push((id.to_string(), opts));
        self
    }

    /// `n` hub replicas on a real etcd (default: one on the embedded store).
    pub fn hub_replicas_on_etcd(mut self, n: usize) -> Self {
        self.hub_replicas = n;
        self
    }

    /// Run the hub's relay (default on).
    pub fn relay(mut self, on: bool) -> Self {
        self.relay = on;
        self
    }

    /// Builds the internet, the hub and every member's router and nodes (nodes start in
    /// parallel). Controllers are started with [`SandboxFleet::start_controllers`].
    pub fn start(self) -> Result<SandboxFleet> {
        crate::require_root("SandboxFleet");
        let internet = Internet::new()?;
        let hub = FleetHub::start(&internet, self.relay, self.hub_replicas)?;
        let mut members = Vec::new();
        for (i, (id, opts)) in self.members.into_iter().enumerate() {
            let public_ip = format!("203.0.113.{}", 21 + i);
            let gateway_ip = format!("{LAN_PREFIX}.11");
            let router = NatRouter::new(
                &internet,
                &id,
                &public_ip,
                opts.public.then_some(gateway_ip.as_str()),
            )?;
            let mut spots = Vec::new();
            for k in 0..opts.nodes {
                let name = format!("{id}-{}", k + 1);
                let ns = quiet_netns(&format!("{id}-n{}", k + 1), false)?;
                let ip = format!("{LAN_PREFIX}.{}", 11 + k);
                plug(
                    &router.netns,
                    "lan0",
                    &format!("n{}", k + 1),
                    &ns,
                    "lan0",
                    &format!("{ip}/24"),
                )?;
                ns.ip(&["route", "add", "default", "via", &format!("{LAN_PREFIX}.1")])?;
                spots.push((name, ns, ip));
            }
            // containerd start-up dominates: start the member's nodes in parallel.
            let handles: Vec<_> = spots
                .into_iter()
                .map(|(name, ns, ip)| {
                    std::thread::spawn(move || {
                        ClusterNode::start(&name, ns, &ip).map(|node| FleetNode { name, node })
                    })
                })
                .collect();
            let mut nodes = Vec::new();
            for h in handles {
                nodes.push(
                    h.join()
                        .map_err(|_| Error::Invalid("node start-up panicked".into()))??,
                );
            }
            let dir = std::env::temp_dir().join(format!(
                "fe2e-mem-{id}-{}-{}",
                std::process::id(),
                seq()
            ));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
            let wg_name = format!("fw{}{id}{}", std::process::id() % 100_000, seq());
            let member = Member {
                id,
                opts,
                wg_name,
                controllers: Vec::new(),
                dns: None,
                nodes,
                router,
                dir,
            };
            member.write_nodes_json()?;
            members.push(member);
        }
        Ok(SandboxFleet {
            controller_extra_args: Vec::new(),
            members,
            hub,
            internet,
        })
    }
}

/// The whole sandbox. Field order is drop order after `Drop::drop` (members: pods,
/// controllers, nodes, routers; then the hub; then the internet).
pub struct SandboxFleet {
    /// Appended to every `fleet-controller run` started from now on (benchmarks tune
    /// intervals with it).
    pub controller_extra_args: Vec<String>,
    pub members: Vec<Member>,
    pub hub: FleetHub,
    pub internet: Internet,
}

impl SandboxFleet {
    /// Hub `cc` plus members added with [`FleetBuilder::member`]; relay on.
    pub fn builder() -> FleetBuilder {
        FleetBuilder {
            members: Vec::new(),
            relay: true,
            hub_replicas: 1,
        }
    }

    /// The issue's topology: members aa and bb, behind NAT, two nodes each.
    pub fn standard() -> Result<SandboxFleet> {
        Self::builder()
            .member("aa", MemberOpts::nat(2))
            .member("bb", MemberOpts::nat(2))
            .start()
    }

    pub fn member(&self, id: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    pub fn member_mut(&mut self, id: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    /// `--status-interval` of the controllers: 1s unless the extra arguments set it.
    fn status_interval(&self) -> &str {
        self.controller_extra_args
            .iter()
            .position(|a| a == "--status-interval")
            .and_then(|i| self.controller_extra_args.get(i + 1))
            .map_or("1s", String::as_str)
    }

    /// The `fleet-controller run` arguments for an instance of `member` (contract flags).
    fn controller_args(
        &self,
        member: &Member,
        join: Option<&str>,
        ca: &str,
        holder: &str,
        data_dir: &Path,
        wg_name: &str,
    ) -> Vec<OsString> {
        let mut args = os(&[
            "run",
            "--cluster",
            &member.id,
            "--hub",
            &self.hub.endpoints(),
            "--ca",
            ca,
            "--gateway-node",
            &member.gateway().name,
            "--holder",
            holder,
            "--wg-name",
            wg_name,
            "--listen-port",
            &GATEWAY_PORT.to_string(),
            "--status-interval",
            self.status_interval(),
            // fleet-dns (when started, see `start_dns`) binds in the gateway node's CNF netns.
            "--dns-backend",
            &format!("{}:53", member.gateway().name),
            "--endpoint-poll-interval",
            "200ms",
            // The sandbox has no Kubernetes; say so, in case the tests run inside a pod.
            "--leader-election",
            "hub",
        ]);
        args.push("--credential-file".into());
        args.push(member.credential_file().into());
        args.push("--data-dir".into());
        args.push(data_dir.into());
        args.push("--nodes".into());
        args.push(member.nodes_json().into());
        if let Some(join) = join {
            args.push("--join".into());
            args.push(join.into());
        }
        if let Some(ep) = member.endpoint() {
            args.push("--endpoint".into());
            args.push(ep.into());
        }
        let mut extra = self.controller_extra_args.iter();
        while let Some(a) = extra.next() {
            if a == "--status-interval" {
                extra.next(); // already given
                continue;
            }
            args.push(a.into());
        }
        args
    }

    /// Adds and starts a controller instance of `member` in the netns of its node `on_node`
    /// (node 0 is the gateway node). The first instance joins with a fresh token (`--join`);
    /// later ones share its credential file (wait for it first) and get only `--ca`.
    pub fn add_controller(&mut self, member: &str, on_node: usize) -> Result<usize> {
        let m = self.member(member);
        let ca = self.hub.ca_hash()?;
        let k = m.controllers.len();
        let join = if k == 0 {
            Some(
                self.hub
                    .create_join_string(&format!("sandbox member {member}"))?,
            )
        } else {
            None
        };
        if k > 0 {
            let cred = m.credential_file();
            poll_until(
                "the first controller's credential file",
                Duration::from_secs(30),
                || cred.exists().then_some(()),
            )
            .map_err(|e| Error::Invalid(format!("{e}\n{}", m.logs())))?;
        }
        let holder = format!("{member}-ctl{k}");
        let data_dir = m.dir.join(format!("ctl{k}"));
        std::fs::create_dir_all(&data_dir).map_err(|e| Error::io("create", &data_dir, e))?;
        let wg_name = m.wg_name.clone();
        let args = self.controller_args(m, join.as_deref(), &ca, &holder, &data_dir, &wg_name);
        let mut process = ManagedProcess::new(
            &format!("fleet-controller {holder}"),
            workspace_bin("fleet-controller"),
            args,
            &m.nodes[on_node].netns_path(),
            m.dir.join(format!("{holder}.log")),
        )
        .env("FLEET_LOG", "info");
        process.spawn()?;
        let m = self.member_mut(member);
        m.controllers.push(FleetController {
            process,
            holder,
            data_dir,
            wg_name,
        });
        Ok(k)
    }

    /// One controller per member on its gateway node (plus a standby on node 1 when
    /// `standby`), then waits until every node of every member has its plan.
    pub fn start_controllers(&mut self, standby: bool) -> Result<()> {
        self.start_controllers_on(0, standby)
    }

    /// One controller per member on its node `node` (0 is the gateway node; the controller
    /// need not run there), plus a standby on node 1 when `standby`; then waits until every
    /// node of every member has its plan.
    pub fn start_controllers_on(&mut self, node: usize, standby: bool) -> Result<()> {
        let ids: Vec<String> = self.members.iter().map(|m| m.id.clone()).collect();
        for id in &ids {
            self.add_controller(id, node)?;
        }
        if standby {
            for id in &ids {
                self.add_controller(id, 1)?;
            }
        }
        self.wait_nodes_ready(Duration::from_secs(60))
    }

    /// Waits until every node of every member has a plan from its controller.
    pub fn wait_nodes_ready(&self, timeout: Duration) -> Result<()> {
        poll_until(
            "every node to get its plan from the controller",
            timeout,
            || {
                self.members
                    .iter()
                    .all(|m| m.nodes.iter().all(FleetNode::ready))
                    .then_some(())
            },
        )
        .map_err(|e| Error::Invalid(format!("{e}\n{}", self.logs())))
    }

    /// Runs a busybox pod named `name` on node `node` of `member` (retrying while the node
    /// has no plan yet) and reads its addresses.
    pub fn run_pod(&self, member: &str, node: usize, name: &str) -> Result<Pod> {
        self.run_pod_spec(member, node, PodSpec::new(name))
    }

    /// [`Self::run_pod`] with labels, namespace etc. from `spec`. Without its own DNS
    /// settings the pod resolves with the cluster's fleet-dns through the DNS VIP.
    pub fn run_pod_spec(&self, member: &str, node: usize, mut spec: PodSpec) -> Result<Pod> {
        let n = &self.member(member).nodes[node].node;
        if spec.dns.is_none() {
            let search = format!("{}.svc.clusterset.local", spec.namespace);
            spec = spec.dns(&[DNS_VIP], &[&search, "svc.clusterset.local"]);
        }
        let name = spec.name.clone();
        let name = name.as_str();
        let mut last = String::new();
        let (sandbox, container) = poll_until(
            &format!("pod {name} on {member}/{node}"),
            Duration::from_secs(30),
            || {
                match n.cri().run_busybox_pod(&spec) {
                    Ok(ids) => Some(ids),
                    Err(e) => {
                        last = e.to_string();
                        // A failed sandbox stays listed; remove it before retrying.
                        for p in n.cri().list_pods().unwrap_or_default() {
                            if p.metadata.as_ref().is_some_and(|md| md.name == name) {
                                let _ = n.cri().stop_pod(&p.id);
                                let _ = n.cri().remove_pod(&p.id);
                            }
                        }
                        None
                    }
                }
            },
        )
        .map_err(|e| Error::Invalid(format!("{e}: {last}\n{}", n.nri.log())))?;
        let fleet = n.exec(&container, &["ip", "-4", "-o", "addr", "show", "eth-fleet"])?;
        let eth0 = n.exec(&container, &["ip", "-4", "-o", "addr", "show", "eth0"])?;
        Ok(Pod {
            member: member.to_string(),
            node,
            name: name.to_string(),
            netns: n.cri().pod_netns_path(&sandbox)?,
            sandbox,
            container,
            fleet_ip: inet_of(&fleet)
                .ok_or_else(|| Error::Invalid(format!("no eth-fleet address: {fleet}")))?,
            primary_ip: inet_of(&eth0)
                .ok_or_else(|| Error::Invalid(format!("no eth0 address: {eth0}")))?,
        })
    }

    /// A pod labelled `app=<app>` serving `body` over HTTP on port 80 (busybox httpd).
    pub fn run_http_pod(
        &self,
        member: &str,
        node: usize,
        name: &str,
        app: &str,
        body: &str,
    ) -> Result<Pod> {
        let pod = self.run_pod_spec(member, node, PodSpec::new(name).label("app", app))?;
        self.exec(
            &pod,
            &[
                "sh",
                "-c",
                &format!("mkdir -p /www && echo {body} > /www/index.html && httpd -p 80 -h /www"),
            ],
        )?;
        Ok(pod)
    }

    /// Stops and removes the pod (as kubelet does when a pod is deleted).
    pub fn delete_pod(&self, pod: &Pod) -> Result<()> {
        let cri = self.node_of(pod).cri();
        cri.stop_pod(&pod.sandbox)?;
        cri.remove_pod(&pod.sandbox)
    }

    /// Starts `fleet-dns` for `member`: in its gateway node's netns (it talks to the hub from
    /// there, with the member's credential), its sockets bound in that node's CNF netns on
    /// port 53, where the controller's `--dns-backend <gateway>:53` points the DNS VIP.
    pub fn start_dns(&mut self, member: &str) -> Result<()> {
        let ca = self.hub.ca_hash()?;
        let hub = self.hub.endpoints();
        let m = self.member(member);
        let cred = m.credential_file();
        poll_until(
            "the member's credential file",
            Duration::from_secs(30),
            || cred.exists().then_some(()),
        )
        .map_err(|e| Error::Invalid(format!("{e}\n{}", m.logs())))?;
        let mut args = os(&[
            "--hub",
            &hub,
            "--ca",
            &ca,
            "--netns",
            m.gateway_cnf(),
            "--listen",
            "0.0.0.0:53",
        ]);
        args.push("--credential-file".into());
        args.push(cred.into());
        let mut process = ManagedProcess::new(
            &format!("fleet-dns {member}"),
            workspace_bin("fleet-dns"),
            args,
            &m.gateway().netns_path(),
            m.dir.join("fleet-dns.log"),
        )
        .env("FLEET_LOG", "info");
        process.spawn()?;
        self.member_mut(member).dns = Some(process);
        Ok(())
    }

    fn node_of(&self, pod: &Pod) -> &ClusterNode {
        &self.member(&pod.member).nodes[pod.node].node
    }

    /// Runs `cmd` in the pod's container; non-zero exit is an error.
    pub fn exec(&self, pod: &Pod, cmd: &[&str]) -> Result<String> {
        self.node_of(pod).exec(&pod.container, cmd)
    }

    pub fn exec_ok(&self, pod: &Pod, cmd: &[&str]) -> bool {
        self.node_of(pod).exec_ok(&pod.container, cmd)
    }

    /// `ping -c 1 -W <secs> -I eth-fleet <ip>` from `pod`.
    pub fn ping(&self, pod: &Pod, ip: &str, wait_secs: u32) -> bool {
        self.exec_ok(
            pod,
            &[
                "ping",
                "-c",
                "1",
                "-W",
                &wait_secs.to_string(),
                "-I",
                "eth-fleet",
                ip,
            ],
        )
    }

    /// A host program run in the pod's network namespace (e.g. socat for UDP: busybox's nc
    /// has no UDP mode).
    pub fn pod_command(&self, pod: &Pod, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", pod.netns.display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Measures how long until `from` pings `to` again (polling every ~100 ms), up to
    /// `timeout`.
    pub fn time_until_ping(
        &self,
        from: &Pod,
        to: &Pod,
        since: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Invalid(format!(
                    "{} did not reach {} within {timeout:?}\n{}",
                    from.name,
                    to.fleet_ip,
                    self.logs()
                )));
            }
            if let Some(took) = self.first_echo(from, &to.fleet_ip, since, left)? {
                return Ok(took);
            }
            // ping gave up early (e.g. sendto failed while a route was missing): again.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One echo every 100 ms from the pod's netns (the host's busybox, which takes fractional
    /// intervals) until the first reply: its time since `since`, so the measured recovery is
    /// within 0.1 s of the real one (a `ping -c 1 -W 1` per try would add up to a second per
    /// failed try). `None` when ping ends without a reply.
    fn first_echo(
        &self,
        from: &Pod,
        ip: &str,
        since: Instant,
        within: Duration,
    ) -> Result<Option<Duration>> {
        let secs = within.as_secs().max(1).to_string();
        let mut child = self
            .pod_command(from, "busybox")
            .args(["ping", "-i", "0.1", "-w", &secs, "-I", "eth-fleet", ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Invalid(format!("cannot run busybox ping: {e}")))?;
        let mut answered = None;
        if let Some(stdout) = child.stdout.take() {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("bytes from") {
                    answered = Some(since.elapsed());
                    break;
                }
            }
        }
        // Ours, by its handle (PID); it would stop by itself at `-w`.
        let _ = child.kill();
        let _ = child.wait();
        Ok(answered)
    }

    /// Captures on the internet bridge for `duration`.
    pub fn capture_internet(&self, duration: Duration) -> Result<Packets> {
        Capture::for_duration(&self.internet.netns.path(), INTERNET_BRIDGE, duration)
    }

    /// Runs `fleetctl <args> --hub .. --ca .. --credential-file <member's>` from the member's
    /// gateway node (through its NAT).
    pub fn fleetctl(&self, member: &str, subcommand: &[&str]) -> Result<Output> {
        let m = self.member(member);
        let bin = workspace_bin("fleetctl");
        m.gateway()
            .node
            .netns
            .command(bin.to_str().unwrap_or("fleetctl"))
            .args(subcommand)
            .args(["--hub", &self.hub.endpoints(), "--ca", &self.hub.ca_hash()?])
            .arg("--credential-file")
            .arg(m.credential_file())
            .env("NO_COLOR", "1")
            .output()
            .map_err(|e| Error::io("run fleetctl in", m.gateway().netns_path(), e))
    }

    /// Ready-to-paste commands for an operator while the sandbox is up: `fleetctl status` and
    /// `doctor` as `member`, the hub's admin view, and the board's login link with how to reach
    /// a hub that listens only inside its netns.
    pub fn operator_commands(&self, member: &str) -> Result<String> {
        let m = self.member(member);
        let hub = &self.hub.replicas[0];
        Ok(operator_commands(&OperatorSetup {
            member,
            member_netns: m.gateway().netns_path(),
            credential_file: m.credential_file(),
            hub_netns: hub.netns.path(),
            hub_endpoint: hub.endpoint(),
            hub_endpoints: self.hub.endpoints(),
            hub_data_dir: hub.data_dir(),
            ca_hash: self.hub.ca_hash()?,
            fleetctl: workspace_bin("fleetctl"),
            fleet_hub: workspace_bin("fleet-hub"),
        }))
    }

    /// `fleetctl status --json`, parsed.
    pub fn status_json(&self, member: &str) -> Result<serde_json::Value> {
        let out = self.fleetctl(member, &["status", "--json"])?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "fleetctl status --json: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            Error::Invalid(format!(
                "fleetctl status --json output: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })
    }

    /// Every process log (hub, controllers, fleet-nri tails).
    pub fn logs(&self) -> String {
        let mut s = format!("---- fleet-hub log:\n{}\n", tail(&self.hub.log(), 120));
        for m in &self.members {
            s.push_str(&m.logs());
        }
        s
    }
}

impl Drop for SandboxFleet {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("FLEET_E2E_LOGS").is_some() {
            eprintln!("==== fleet-e2e: the sandbox fleet's logs\n{}", self.logs());
        }
        // Members (pods, controllers, nodes, routers) before the hub and the internet.
        self.members.clear();
    }
}

/// A TCP stream between two pods' network namespaces for as long as a test runs: the client
/// (in `from`'s netns) sends a numbered 1 KiB message every [`ProbeStream::INTERVAL`]; the
/// server (in `to`'s netns, port `port`) echoes every byte back; the client notes when each
/// echo arrives. The longest gap between echoes over a span of time is the stall a process
/// restart caused; [`ProbeStream::finish`] says whether every byte came back on the same
/// connection (no reset).
pub struct ProbeStream {
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
    reader: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
    server: Option<std::thread::JoinHandle<std::io::Result<u64>>>,
}

/// Runs `f` on a new thread inside the network namespace at `netns` (only that thread moves).
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<std::io::Result<T>> {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    })
}

impl ProbeStream {
    pub const INTERVAL: Duration = Duration::from_millis(50);
    const MESSAGE: usize = 1024;

    /// Connects `from` to `to`'s fleet address (retrying for up to 30 s) and starts the stream.
    pub fn start(from: &Pod, to: &Pod, port: u16) -> Result<ProbeStream> {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = in_netns(&to.netns, move || {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
            let _ = ready_tx.send(());
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut echoed = 0u64;
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    conn.shutdown(std::net::Shutdown::Write)?;
                    return Ok(echoed);
                }
                conn.write_all(&buf[..n])?;
                echoed += n as u64;
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| Error::Invalid("the probe stream's server did not listen".into()))?;
        let addr: std::net::SocketAddr = format!("{}:{port}", to.fleet_ip)
            .parse()
            .map_err(|e| Error::Invalid(format!("{e}")))?;
        let connect = in_netns(&from.netns, move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(c) => return Ok(c),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        let conn = connect
            .join()
            .map_err(|_| Error::Invalid("connect thread panicked".into()))?
            .map_err(|e| Error::Invalid(format!("cannot connect the probe stream: {e}")))?;
        conn.set_nodelay(true).ok();
        conn.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut read_half = conn
            .try_clone()
            .map_err(|e| Error::Invalid(format!("{e}")))?;
        let reader = {
            let arrivals = arrivals.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; Self::MESSAGE];
                let mut got = 0u64;
                loop {
                    let n = read_half.read(&mut buf)?;
                    if n == 0 {
                        return Ok(got);
                    }
                    let before = got / Self::MESSAGE as u64;
                    got += n as u64;
                    if got / Self::MESSAGE as u64 > before {
                        arrivals.lock().expect("arrivals").push(Instant::now());
                    }
                }
            })
        };
        let mut write_half = conn;
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                let mut seq = 0u64;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let mut msg = vec![b'.'; Self::MESSAGE];
                    msg[..8].copy_from_slice(&seq.to_be_bytes());
                    write_half.write_all(&msg)?;
                    sent += msg.len() as u64;
                    seq += 1;
                    next += Self::INTERVAL;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                write_half.shutdown(std::net::Shutdown::Write)?;
                Ok(sent)
            })
        };
        Ok(ProbeStream {
            arrivals,
            stop,
            writer: Some(writer),
            reader: Some(reader),
            server: Some(server),
        })
    }

    /// Echoes that have come back so far.
    pub fn echoes(&self) -> usize {
        self.arrivals.lock().expect("arrivals").len()
    }

    /// Waits until `n` more echoes than now have come back (the stream flows), up to `timeout`.
    pub fn await_flowing(&self, n: usize, timeout: Duration) -> Result<()> {
        let target = self.echoes() + n;
        poll_until("the probe stream to flow", timeout, || {
            (self.echoes() >= target).then_some(())
        })
    }

    /// The longest gap between consecutive echoes arriving in `since..`, including the gap
    /// into the first of them.
    pub fn longest_gap_since(&self, since: Instant) -> Duration {
        let arrivals = self.arrivals.lock().expect("arrivals");
        let mut longest = Duration::ZERO;
        for pair in arrivals.windows(2) {
            if pair[1] >= since {
                longest = longest.max(pair[1] - pair[0]);
            }
        }
        longest
    }

    /// Stops sending and waits for the rest: `Ok((sent, echoed back))` when the connection
    /// ended cleanly on both sides, the I/O error (e.g. a reset) otherwise.
    pub fn finish(mut self) -> Result<(u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let join = |h: Option<std::thread::JoinHandle<std::io::Result<u64>>>, what: &str| {
            h.expect("joined once")
                .join()
                .map_err(|_| Error::Invalid(format!("the probe stream's {what} panicked")))?
                .map_err(|e| Error::Invalid(format!("the probe stream's {what} failed: {e}")))
        };
        let sent = join(self.writer.take(), "writer")?;
        let back = join(self.reader.take(), "reader")?;
        let echoed = join(self.server.take(), "server")?;
        if echoed != sent {
            return Err(Error::Invalid(format!(
                "the server echoed {echoed} of {sent} bytes"
            )));
        }
        Ok((sent, back))
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        // Unfinished (a failed test): the writer stops; the rest end with the namespaces.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where the commands of [`operator_commands`] point.
pub struct OperatorSetup<'a> {
    pub member: &'a str,
    /// The member's gateway node netns: where its fleetctl reaches the hub.
    pub member_netns: PathBuf,
    pub credential_file: PathBuf,
    pub hub_netns: PathBuf,
    /// The first replica's `ip:port`.
    pub hub_endpoint: String,
    pub hub_endpoints: String,
    pub hub_data_dir: PathBuf,
    pub ca_hash: String,
    pub fleetctl: PathBuf,
    pub fleet_hub: PathBuf,
}

/// The operator's commands against a running sandbox, one per line with a comment above each.
pub fn operator_commands(o: &OperatorSetup) -> String {
    let (member, hub) = (o.member, &o.hub_endpoints);
    let member_ns = o.member_netns.display();
    let hub_ns = o.hub_netns.display();
    let fleetctl = o.fleetctl.display();
    let data = o.hub_data_dir.display();
    let (hub_host, hub_port) = o
        .hub_endpoint
        .rsplit_once(':')
        .unwrap_or((o.hub_endpoint.as_str(), "7443"));
    let as_member = |cmd: &str| {
        format!(
            "nsenter --net={member_ns} {fleetctl} {cmd} --hub {hub} --ca {} --credential-file {}",
            o.ca_hash,
            o.credential_file.display()
        )
    };
    [
        format!(
            "# the fleet as cluster {member} sees it (the hub is reachable only from the \
             sandbox's namespaces: run fleetctl in {member}'s gateway node netns)"
        ),
        as_member("status"),
        format!("# what is wrong and what to do, as cluster {member}"),
        as_member("doctor"),
        "# the hub's admin view (the admin credential; the CA from ca.pem beside it)".into(),
        format!(
            "nsenter --net={hub_ns} {fleetctl} clusters --hub {hub} --credential-file \
             {data}/admin.credential"
        ),
        "# the fleet board: a one-time login link, to open within 60 s".into(),
        format!(
            "nsenter --net={hub_ns} {} --data-dir {data} --hub {} board-url",
            o.fleet_hub.display(),
            o.hub_endpoint
        ),
        format!(
            "# the hub listens only inside its netns: to open the board in a browser on this \
             machine, forward a local port into it (keep this running), then open the link \
             with 127.0.0.1:{hub_port} in place of {} and accept the hub's certificate (its \
             CA is {data}/ca.pem)",
            o.hub_endpoint
        ),
        format!(
            "socat TCP-LISTEN:{hub_port},bind=127.0.0.1,reuseaddr,fork EXEC:\"nsenter \
             --net={hub_ns} socat STDIO TCP\\:{hub_host}\\:{hub_port}\""
        ),
        "# or, without a browser: sign in with the link, then fetch the board, inside the \
         hub's netns"
            .into(),
        format!(
            "nsenter --net={hub_ns} sh -c \"curl -sk -c /tmp/board.cookies '<the link>' && curl \
             -sk -b /tmp/board.cookies https://{}/board\"",
            o.hub_endpoint
        ),
    ]
    .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_commands_are_complete_and_runnable_as_printed() {
        let text = operator_commands(&OperatorSetup {
            member: "aa",
            member_netns: "/run/netns/fe2e-aa-1".into(),
            credential_file: "/tmp/s/aa/credential".into(),
            hub_netns: "/run/netns/fe2e-hub".into(),
            hub_endpoint: "203.0.113.10:7443".into(),
            hub_endpoints: "203.0.113.10:7443".into(),
            hub_data_dir: "/tmp/s/hub/data".into(),
            ca_hash: "ab".repeat(32),
            fleetctl: "/w/target/release/fleetctl".into(),
            fleet_hub: "/w/target/release/fleet-hub".into(),
        });
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let ca = "ab".repeat(32);
        assert_eq!(
            lines[0],
            format!(
                "nsenter --net=/run/netns/fe2e-aa-1 /w/target/release/fleetctl status --hub \
                 203.0.113.10:7443 --ca {ca} --credential-file /tmp/s/aa/credential"
            )
        );
        assert!(
            lines[1].contains("fleetctl doctor --hub 203.0.113.10:7443 --ca"),
            "{text}"
        );
        assert!(
            lines[2].ends_with("--credential-file /tmp/s/hub/data/admin.credential"),
            "{text}"
        );
        assert_eq!(
            lines[3],
            "nsenter --net=/run/netns/fe2e-hub /w/target/release/fleet-hub --data-dir \
             /tmp/s/hub/data --hub 203.0.113.10:7443 board-url"
        );
        assert_eq!(
            lines[4],
            "socat TCP-LISTEN:7443,bind=127.0.0.1,reuseaddr,fork EXEC:\"nsenter \
             --net=/run/netns/fe2e-hub socat STDIO TCP\\:203.0.113.10\\:7443\""
        );
        assert!(
            text.contains("127.0.0.1:7443 in place of 203.0.113.10:7443"),
            "{text}"
        );
        assert_eq!(
            lines[5],
            "nsenter --net=/run/netns/fe2e-hub sh -c \"curl -sk -c /tmp/board.cookies '<the \
             link>' && curl -sk -b /tmp/board.cookies https://203.0.113.10:7443/board\""
        );
    }

    #[test]
    fn ca_hash_is_the_sha256_of_the_der() {
        // "hello" as a fake DER body: sha256("hello").
        let pem = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        assert_eq!(
            ca_hash_of_pem(pem).unwrap(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(ca_hash_of_pem("nothing").is_none());
    }
}

//! `fleet-controller run` against a real `fleet-hub serve` (on 127.0.0.1) and real `fleet-nri`
//! daemons (`--no-nri`, each in a node netns the test creates): node plans and peers, the
//! WireGuard gateway that the gateway node's fleet-nri runs for it in its CNF netns (UDP in
//! the node's netns), records, another member's arrival and removal, kill -9 and restart, a
//! standby taking over (same device, same key), SIGTERM (the device stays), and the cluster's
//! own removal (the device goes). Needs root. The cross-cluster traffic tests live in e2e/.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_e2e::{
    FleetNri, FleetNriOpts, TestNetns, ip_in, poll_until, require_root, workspace_bin,
};
use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::model::{ClusterId, FleetView, GatewayState, JoinRequest, PublicKey};
use fleet_hub_api::wire::{CaHash, Credential, JoinString};
use ipnetwork::Ipv4Network;

const WAIT: Duration = Duration::from_secs(30);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A real `fleet-hub serve` on a free port of 127.0.0.1; killed on drop.
struct Hub {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
}

impl Hub {
    fn start() -> Hub {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{port}");
        let child = Self::spawn(dir.path(), &addr);
        let mut hub = Hub { child, dir, addr };
        hub.wait_serving();
        hub
    }

    fn spawn(dir: &Path, addr: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("hub.log"))
            .unwrap();
        Command::new(workspace_bin("fleet-hub"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["serve", "--listen", addr])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn wait_serving(&mut self) {
        poll_until("the hub to serve", WAIT, || {
            (self.data().join("admin.credential").exists()
                && std::net::TcpStream::connect(&self.addr).is_ok())
            .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), &self.addr);
        self.wait_serving();
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    fn ca(&self) -> CaHash {
        CaHash::of_pem(&std::fs::read_to_string(self.data().join("ca.pem")).unwrap()).unwrap()
    }

    fn join_string(&self) -> String {
        let out = Command::new(workspace_bin("fleet-hub"))
            .args(["--hub", &self.addr, "--data-dir"])
            .arg(self.data())
            .args(["token", "create", "--ttl", "1h"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn admin(&self) -> HubClient {
        let cred = std::fs::read_to_string(self.data().join("admin.credential")).unwrap();
        HubClient::new([self.addr.clone()], self.ca(), ClientOptions::default())
            .unwrap()
            .with_credential(Credential::parse(&cred).unwrap())
    }

    fn view(&self) -> FleetView {
        rt().block_on(self.admin().list()).unwrap()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node: its netns and its fleet-nri (no plan until the controller sends one).
struct Node {
    nri: FleetNri,
    netns: TestNetns,
    underlay_ip: String,
}

impl Node {
    fn new(tag: &str, underlay_ip: &str) -> Node {
        let netns = TestNetns::new(tag);
        let nri = FleetNri::start_with(FleetNriOpts {
            node_subnet: None,
            nri_socket: None,
            netns: Some(netns.path()),
        })
        .unwrap();
        Node {
            nri,
            netns,
            underlay_ip: underlay_ip.into(),
        }
    }

    fn name(&self) -> &str {
        self.netns.name()
    }

    fn subnet(&self) -> Option<String> {
        self.nri
            .client()
            .get_plan()
            .ok()
            .flatten()
            .map(|p| p.node_subnet)
    }

    fn routed_via(&self, peer: &str) -> Option<Vec<String>> {
        self.nri
            .client()
            .list_peers()
            .ok()?
            .into_iter()
            .find(|p| p.name == peer)
            .map(|p| p.routed_cidrs)
    }

    /// Local UDP ports open in this node's own netns.
    fn udp_ports(netns: &Path) -> Vec<u16> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["--", "cat", "/proc/net/udp", "/proc/net/udp6"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|local| local.rsplit(':').next())
            .filter_map(|port| u16::from_str_radix(port, 16).ok())
            .collect()
    }
}

fn nodes_json(dir: &Path, nodes: &[&Node]) -> PathBuf {
    let list: Vec<_> = nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.name(),
                "socket": n.nri.socket(),
                "underlay_ip": n.underlay_ip,
                "netns": n.netns.path(),
            })
        })
        .collect();
    let path = dir.join("nodes.json");
    std::fs::write(&path, serde_json::to_string(&list).unwrap()).unwrap();
    path
}

/// One `fleet-controller run` process.
struct Controller {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Controller {
    fn start(args: Vec<String>, log: PathBuf) -> Controller {
        let mut c = Controller {
            child: None,
            args,
            log,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(workspace_bin("fleet-controller"))
            .args(&self.args)
            .env("FLEET_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit code (within 15 s).
    fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        Self::wait_exit(&mut c)
    }

    fn wait_exit(c: &mut Child) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        panic!("the controller did not exit within 15 s");
    }

    /// Waits for the process to exit by itself; its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        Self::wait_exit(&mut c)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // SIGTERM lets it remove its device; then make sure it is gone.
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // A replica killed with -9 leaves its UAPI socket behind (the next start of the same
        // name removes it); names here are test-unique, so remove it now.
        if let Some(name) = self
            .args
            .iter()
            .position(|a| a == "--wg-name")
            .and_then(|i| self.args.get(i + 1))
        {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{name}.sock"));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn controller_args(
    hub: &Hub,
    credential: &Path,
    join: Option<&str>,
    data_dir: &Path,
    nodes: &Path,
    gateway: &str,
    wg_name: &str,
    holder: &str,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--cluster",
        "aa",
        "--hub",
        &hub.addr,
        "--ca",
        &hub.ca().to_string(),
        "--credential-file",
        credential.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--nodes",
        nodes.to_str().unwrap(),
        "--gateway-node",
        gateway,
        "--wg-name",
        wg_name,
        "--wg-backend",
        "userspace",
        "--holder",
        holder,
        "--lease-ttl",
        "2s",
        "--leader-election",
        "hub",
        "--status-interval",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(j) = join {
        args.extend(["--join".to_string(), j.to_string()]);
    }
    args
}

fn link_exists(cnf: &str, name: &str) -> bool {
    ip_in(cnf, &["-o", "link", "show", "dev", name]).is_ok_and(|o| o.contains(name))
}

/// `wg show <name> dump` peers: public key -> (endpoint, allowed ips).
fn wg_peers(name: &str) -> Option<BTreeMap<String, (String, String)>> {
    let out = Command::new("wg")
        .args(["show", name, "dump"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() >= 4).then(|| (f[0].to_string(), (f[2].to_string(), f[3].to_string())))
            })
            .collect(),
    )
}

fn record(view: &FleetView, owner: &str, name: &str) -> Option<serde_json::Value> {
    view.records
        .iter()
        .find(|r| r.owner.as_str() == owner && r.name == name)
        .and_then(|r| serde_json::from_slice(&r.value).ok())
}

fn block_of(view: &FleetView, id: &str) -> Option<Ipv4Network> {
    view.clusters
        .iter()
        .find(|c| c.id.as_str() == id)
        .map(|c| c.block)
}

fn uniq(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

#[test]
fn the_controller_plans_nodes_runs_the_gateway_follows_the_fleet_and_survives_kill_9() {
    require_root(
        "the_controller_plans_nodes_runs_the_gateway_follows_the_fleet_and_survives_kill_9",
    );
    let mut hub = Hub::start();
    let n1 = Node::new("ct-n1", "192.0.2.1");
    let n2 = Node::new("ct-n2", "192.0.2.2");
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_json(dir.path(), &[&n1, &n2]);
    let credential = dir.path().join("secret/aa.credential");
    let data_dir = dir.path().join("data");
    let wg = uniq("fct");
    let join = hub.join_string();
    let mut ctl = Controller::start(
        controller_args(
            &hub,
            &credential,
            Some(&join),
            &data_dir,
            &nodes,
            n1.name(),
            &wg,
            "ctl-a",
        ),
        dir.path().join("ctl.log"),
    );
    let hub_log = hub.dir.path().join("hub.log");
    let fail = |what: &str, ctl: &Controller| -> String {
        let hub = std::fs::read_to_string(&hub_log).unwrap_or_default();
        format!("{what}\ncontroller log:\n{}\nhub log:\n{hub}", ctl.log())
    };

    // Both nodes get distinct subnets of aa's block.
    let (s1, s2) = poll_until("both nodes to get a plan", WAIT, || {
        n1.subnet().zip(n2.subnet())
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    let view = hub.view();
    let block = block_of(&view, "aa").unwrap();
    let (p1, p2): (Ipv4Network, Ipv4Network) = (s1.parse().unwrap(), s2.parse().unwrap());
    assert!(
        block.contains(p1.network()) && block.contains(p2.network()),
        "{block} {s1} {s2}"
    );
    assert_ne!(p1, p2);
    assert_eq!(p1.prefix(), 24);
    // Identity files are private; the WireGuard key is the gateway node's, not the
    // controller's.
    use std::os::unix::fs::PermissionsExt;
    for f in [credential.clone(), n1.nri.data_dir().join("wg.key")] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    assert!(!data_dir.join("wg.key").exists());
    assert!(!n2.nri.data_dir().join("wg.key").exists());

    // Peers: each node has the other; nothing routed yet (aa is alone).
    poll_until("the nodes to peer", WAIT, || {
        (n2.routed_via(n1.name()) == Some(vec![]) && n1.routed_via(n2.name()) == Some(vec![]))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));

    // The device: interface in n1's CNF netns, its UDP socket in n1's own netns.
    let cnf = n1.nri.status().unwrap().cnf_netns;
    assert!(cnf.ends_with(n1.nri.cnf_netns()), "{cnf}");
    poll_until("the WireGuard device", WAIT, || {
        link_exists(n1.nri.cnf_netns(), &wg).then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    assert!(
        Node::udp_ports(&n1.netns.path()).contains(&51820),
        "UDP in the node netns"
    );
    assert!(
        !Node::udp_ports(Path::new(&cnf)).contains(&51820),
        "no UDP in the CNF netns"
    );
    assert!(
        !link_exists(n2.nri.cnf_netns(), &wg),
        "only on the gateway node"
    );
    // Unassigned addresses of our own block fail at once instead of looping via the relay;
    // the node subnets stay routed.
    let own_route = format!("unreachable {block}");
    poll_until("the own-block unreachable route", WAIT, || {
        ip_in(n1.nri.cnf_netns(), &["route", "show"])
            .ok()
            .filter(|r| r.contains(&own_route))
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    let via = ip_in(
        n1.nri.cnf_netns(),
        &["route", "get", &p2.nth(5).unwrap().to_string()],
    )
    .unwrap();
    assert!(via.contains("fleetvx"), "{via}");

    // Records and the hub's view of the gateway.
    let view = poll_until("node and gateway records, gateway up", WAIT, || {
        let v = hub.view();
        let up = v
            .clusters
            .iter()
            .any(|c| c.id.as_str() == "aa" && c.gateway == GatewayState::Up);
        (up && record(&v, "aa", "gateway").is_some()).then_some(v)
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    let r1 = record(&view, "aa", &format!("node/{}", n1.name())).unwrap();
    assert_eq!(r1["subnet"], s1.as_str());
    assert_eq!(r1["underlay_ip"], "192.0.2.1");
    let g = record(&view, "aa", "gateway").unwrap();
    assert_eq!(g["node"], n1.name());
    assert_eq!(g["holder"], "ctl-a");
    assert_eq!(g["backend"], "userspace");
    assert_eq!(g["listen_port"], 51820);
    let aa_key = view
        .clusters
        .iter()
        .find(|c| c.id.as_str() == "aa")
        .unwrap()
        .public_key;
    assert_eq!(g["public_key"], aa_key.to_string());

    // fleetctl with the hub's admin credential (CA from ca.pem beside it).
    let out = Command::new(workspace_bin("fleetctl"))
        .args(["status", "--hub", &hub.addr, "--json", "--credential-file"])
        .arg(hub.data().join("admin.credential"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["clusters"][0]["id"], "aa");
    assert_eq!(status["clusters"][0]["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(status["clusters"][0]["tunnel"]["node"], n1.name());

    // Another member with a public endpoint joins: a direct peer, and n2 routes its block
    // via n1.
    let bb_key = fleet_gateway::PrivateKey::generate().public_key();
    let bb_join = JoinString::parse(&hub.join_string()).unwrap();
    let bb = rt()
        .block_on(
            HubClient::new([hub.addr.clone()], hub.ca(), ClientOptions::default())
                .unwrap()
                .join(
                    &bb_join,
                    JoinRequest {
                        cluster: ClusterId::new("bb").unwrap(),
                        public_key: PublicKey::from_bytes(*bb_key.as_bytes()),
                        endpoint: Some("198.51.100.2:51820".parse().unwrap()),
                    },
                ),
        )
        .unwrap();
    let bb_block = bb.record.block.to_string();
    poll_until(
        "bb as a direct peer and routed via the gateway node",
        WAIT,
        || {
            let peers = wg_peers(&wg)?;
            let (endpoint, allowed) = peers.get(&bb_key.to_base64())?;
            (endpoint == "198.51.100.2:51820"
                && allowed == &bb_block
                && n2.routed_via(n1.name()) == Some(vec![bb_block.clone()]))
            .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));

    // bb never answers (nothing listens at its endpoint): the gateway node re-adds its peer
    // to initiate again rather than waiting for WireGuard's 5 s rekey timeout, and it stays
    // configured.
    poll_until("a re-added peer without a handshake", WAIT, || {
        n1.nri
            .log()
            .contains("no handshake yet: peers re-added")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    assert!(wg_peers(&wg).unwrap().contains_key(&bb_key.to_base64()));

    // kill -9 and restart: same subnets, same key, the device and its peers back.
    ctl.kill9();
    // Meanwhile someone clears n2's peers: the restarted controller programs them again.
    n2.nri.client().set_peers(vec![]).unwrap();
    ctl.spawn();
    poll_until("the restarted controller's device and peers", WAIT, || {
        let peers = wg_peers(&wg)?;
        (peers.contains_key(&bb_key.to_base64())
            && n2.routed_via(n1.name()) == Some(vec![bb_block.clone()]))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    assert_eq!(n1.subnet().unwrap(), s1);
    assert_eq!(n2.subnet().unwrap(), s2);
    let view = hub.view();
    assert_eq!(block_of(&view, "aa"), Some(block));
    assert_eq!(
        view.clusters
            .iter()
            .find(|c| c.id.as_str() == "aa")
            .unwrap()
            .public_key,
        aa_key,
        "same key after a restart with the same data dir"
    );

    // bb is removed: its peer and its route disappear.
    assert!(
        rt().block_on(hub.admin().remove_cluster(&ClusterId::new("bb").unwrap()))
            .unwrap()
    );
    poll_until("bb's peer and route to go", WAIT, || {
        let peers = wg_peers(&wg)?;
        (!peers.contains_key(&bb_key.to_base64()) && n2.routed_via(n1.name()) == Some(vec![]))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));

    // The hub dies: the active stays active and leaves the data plane alone, past the lease's
    // life; when the hub is back it carries on (publishing its status again).
    let peers_before = wg_peers(&wg).unwrap();
    hub.kill9();
    poll_until("the controller to notice the hub is gone", WAIT, || {
        ctl.log()
            .contains("hub unreachable: staying active")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    std::thread::sleep(Duration::from_secs(3)); // longer than the 2 s lease: nothing may change
    assert!(link_exists(n1.nri.cnf_netns(), &wg), "{}", ctl.log());
    assert_eq!(wg_peers(&wg).unwrap(), peers_before);
    assert_eq!(n2.routed_via(n1.name()), Some(vec![]));
    assert_eq!(n1.subnet().unwrap(), s1);
    let back = fleet_hub_api::records::unix_secs(std::time::SystemTime::now());
    hub.restart();
    poll_until(
        "a fresh gateway record after the hub's return",
        WAIT,
        || {
            let g = record(&hub.view(), "aa", "gateway")?;
            (g["updated_at"].as_u64()? > back).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{}", fail(&e.to_string(), &ctl)));
    assert!(link_exists(n1.nri.cnf_netns(), &wg));

    // SIGTERM: exit 0; the data plane stays up on the gateway node (device, peers, UAPI
    // socket, own-block route), and the hub still says the gateway is up.
    assert_eq!(ctl.terminate(), Some(0), "{}", ctl.log());
    assert!(link_exists(n1.nri.cnf_netns(), &wg));
    assert_eq!(wg_peers(&wg).unwrap(), peers_before);
    assert!(Path::new(&format!("/var/run/wireguard/{wg}.sock")).exists());
    let routes = ip_in(n1.nri.cnf_netns(), &["route", "show"]).unwrap();
    assert!(routes.contains(&own_route), "{routes}");
    let view = hub.view();
    let aa = view
        .clusters
        .iter()
        .find(|c| c.id.as_str() == "aa")
        .unwrap();
    assert_eq!(aa.gateway, GatewayState::Up);
}

#[test]
fn a_standby_takes_over_after_kill_9_and_a_removed_cluster_stops_with_exit_1() {
    require_root("a_standby_takes_over_after_kill_9_and_a_removed_cluster_stops_with_exit_1");
    let hub = Hub::start();
    let n1 = Node::new("ct-s1", "192.0.2.1");
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_json(dir.path(), &[&n1]);
    let credential = dir.path().join("aa.credential");
    let join = hub.join_string();
    // The replicas of a cluster share the gateway's settings: one device on the gateway node.
    let wg = uniq("fca");
    let mut a = Controller::start(
        controller_args(
            &hub,
            &credential,
            Some(&join),
            &dir.path().join("a"),
            &nodes,
            n1.name(),
            &wg,
            "ctl-a",
        ),
        dir.path().join("a.log"),
    );
    // b has no join string: it waits for a's credential file, then stands by.
    let mut b = Controller::start(
        controller_args(
            &hub,
            &credential,
            None,
            &dir.path().join("b"),
            &nodes,
            n1.name(),
            &wg,
            "ctl-b",
        ),
        dir.path().join("b.log"),
    );
    let logs = |a: &Controller, b: &Controller| {
        format!("a:\n{}\nb:\n{}\nhub:\n{}", a.log(), b.log(), hub.log())
    };
    let cnf = n1.nri.cnf_netns().to_string();
    poll_until("a active with the device", WAIT, || {
        let g = record(&hub.view(), "aa", "gateway")?;
        (link_exists(&cnf, &wg) && g["holder"] == "ctl-a").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&a, &b)));
    poll_until("b standing by", WAIT, || {
        b.log().contains("another replica is active").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&a, &b)));
    let subnet = n1.subnet().unwrap();
    let key_before = n1.nri.client().gateway_key().unwrap().public_key;

    let killed = Instant::now();
    a.kill9();
    poll_until("b to take over", WAIT, || {
        let g = record(&hub.view(), "aa", "gateway")?;
        (link_exists(&cnf, &wg) && g["holder"] == "ctl-b").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&a, &b)));
    let took = killed.elapsed();
    eprintln!(
        "standby took over {} ms after kill -9 of the active (lease ttl 2 s)",
        took.as_millis()
    );
    assert_eq!(
        n1.subnet().unwrap(),
        subnet,
        "same subnet under the new active"
    );
    let view = hub.view();
    let key = view
        .clusters
        .iter()
        .find(|c| c.id.as_str() == "aa")
        .unwrap()
        .public_key;
    assert_eq!(
        key, key_before,
        "b re-joined with the gateway node's key: no re-keying on a take-over"
    );
    assert!(
        !b.log().contains("WireGuard gateway made"),
        "the device a made is the one b drives:\n{}",
        b.log()
    );

    // The cluster is removed at the hub: b clears the device and exits 1, saying why.
    assert!(
        rt().block_on(hub.admin().remove_cluster(&ClusterId::new("aa").unwrap()))
            .unwrap()
    );
    assert_eq!(b.exit_code(), Some(1), "{}", logs(&a, &b));
    assert!(b.log().contains("removed from the fleet"), "{}", b.log());
    assert!(!link_exists(&cnf, &wg));
    assert_eq!(n1.nri.client().gateway_status().unwrap(), None);
    assert!(!n1.nri.data_dir().join("gateway.json").exists());
}

/// Runs `fleet-controller` to its exit; (code, stderr).
fn run_to_exit(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(workspace_bin("fleet-controller"))
        .args(args)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_join_strings_and_settings_are_clear_errors_that_change_nothing() {
    require_root("bad_join_strings_and_settings_are_clear_errors_that_change_nothing");
    let hub = Hub::start();
    // A real gateway node: the controller joins with the key that node's fleet-nri keeps.
    let n1 = Node::new("ct-b1", "192.0.2.1");
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_json(dir.path(), &[&n1]);
    let credential = dir.path().join("aa.credential");
    let args = |join: &str, wg: &str| {
        controller_args(
            &hub,
            &credential,
            Some(join),
            &dir.path().join("data"),
            &nodes,
            n1.name(),
            wg,
            "h",
        )
    };

    // A revoked token: the hub's reason, exit 1, no credential, no cluster at the hub.
    let join = hub.join_string();
    let id = join.split('.').next().unwrap();
    let out = Command::new(workspace_bin("fleet-hub"))
        .args(["--hub", &hub.addr, "--data-dir"])
        .arg(hub.data())
        .args(["token", "revoke", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (code, err) = run_to_exit(&args(&join, "fcbad"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("revoked"), "{err}");
    assert!(!credential.exists());
    assert!(hub.view().clusters.is_empty());

    // A malformed join string and a bad interface name: refused before anything runs.
    let (code, err) = run_to_exit(&args("not-a-join-string", "fcbad"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--join"), "{err}");
    let (code, err) = run_to_exit(&args(&hub.join_string(), "an-interface-name-too-long"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--wg-name"), "{err}");
    assert!(!credential.exists());
    assert!(hub.view().clusters.is_empty());
}

#[test]
fn replicas_racing_to_join_share_one_credential_and_one_is_active() {
    require_root("replicas_racing_to_join_share_one_credential_and_one_is_active");
    let hub = Hub::start();
    let n1 = Node::new("ct-r1", "192.0.2.1");
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_json(dir.path(), &[&n1]);
    let credential = dir.path().join("aa.credential");
    let join = hub.join_string();
    let names: Vec<String> = (0..3).map(|i| uniq(&format!("fcr{i}x"))).collect();
    // All three start at once, each with the join string.
    let replicas: Vec<Controller> = names
        .iter()
        .enumerate()
        .map(|(i, wg)| {
            Controller::start(
                controller_args(
                    &hub,
                    &credential,
                    Some(&join),
                    &dir.path().join(format!("r{i}")),
                    &nodes,
                    n1.name(),
                    wg,
                    &format!("ctl-{i}"),
                ),
                dir.path().join(format!("r{i}.log")),
            )
        })
        .collect();
    let logs = || {
        replicas
            .iter()
            .map(|r| r.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let cnf = n1.nri.cnf_netns().to_string();
    let devices = || names.iter().filter(|n| link_exists(&cnf, n)).count();
    poll_until("one replica active", WAIT, || {
        (devices() == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    poll_until("the other two standing by", WAIT, || {
        let standing = replicas
            .iter()
            .filter(|r| r.log().contains("another replica is active"))
            .count();
        (standing == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let joined = replicas
        .iter()
        .filter(|r| r.log().contains("joined the fleet"))
        .count();
    assert_eq!(joined, 1, "exactly one join wins:\n{}", logs());
    assert_eq!(hub.view().clusters.len(), 1);
    assert_eq!(devices(), 1, "{}", logs());
}

/// `--metrics-address`: the active controller's `/metrics`, parsed with a Prometheus text
/// parser: leadership, reconcile passes with their durations, the hub's reachability and the
/// age of the last published heartbeat.
#[test]
fn the_active_controller_serves_metrics() {
    use prometheus_parse::{Scrape, Value};
    require_root("the_active_controller_serves_metrics");
    let hub = Hub::start();
    let n1 = Node::new("ctm-n1", "192.0.2.1");
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_json(dir.path(), &[&n1]);
    let credential = dir.path().join("secret/aa.credential");
    let metrics: std::net::SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut args = controller_args(
        &hub,
        &credential,
        Some(&hub.join_string()),
        &dir.path().join("data"),
        &nodes,
        n1.name(),
        &uniq("fcm"),
        "ctl-m",
    );
    args.extend(["--metrics-address".to_string(), metrics.to_string()]);
    let ctl = Controller::start(args, dir.path().join("ctl.log"));
    let value = |s: &Scrape, name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        let sample = s.samples.iter().find(|x| {
            x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
        })?;
        match &sample.value {
            Value::Counter(v) | Value::Gauge(v) => Some(*v),
            Value::Histogram(b) => b.last().map(|b| b.count),
            _ => None,
        }
    };
    let scrape = poll_until("the controller to be active and converged", WAIT, || {
        let body = fleet_metrics::scrape(metrics).ok()?;
        let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid text");
        (value(&s, "fleetboard_controller_active", &[]) == Some(1.0)
            && value(
                &s,
                "fleetboard_controller_reconcile_passes_total",
                &[("pass", "nodes"), ("result", "ok")],
            )
            .is_some_and(|n| n >= 1.0)
            && value(&s, "fleetboard_controller_publish_age_seconds", &[]).is_some())
        .then_some(s)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", ctl.log()));
    assert_eq!(
        value(
            &scrape,
            "fleetboard_build_info",
            &[("component", "fleet-controller")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&scrape, "fleetboard_controller_hub_reachable", &[]),
        Some(1.0)
    );
    assert!(
        value(
            &scrape,
            "fleetboard_controller_reconcile_duration_seconds",
            &[("pass", "nodes")]
        )
        .is_some_and(|n| n >= 1.0)
    );
    assert!(
        value(&scrape, "fleetboard_controller_publish_age_seconds", &[]).unwrap() < 30.0,
        "published with --status-interval 1s"
    );
    assert_eq!(
        value(&scrape, "fleetboard_controller_exports", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &scrape,
            "fleetboard_controller_import_clusters",
            &[("state", "live")]
        ),
        Some(0.0)
    );
    // The passes keep coming (every --status-interval): the counter moves.
    let first = value(
        &scrape,
        "fleetboard_controller_reconcile_passes_total",
        &[("pass", "nodes"), ("result", "ok")],
    )
    .unwrap();
    poll_until("another reconcile pass", WAIT, || {
        let body = fleet_metrics::scrape(metrics).ok()?;
        let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()?;
        value(
            &s,
            "fleetboard_controller_reconcile_passes_total",
            &[("pass", "nodes"), ("result", "ok")],
        )
        .filter(|n| *n > first)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", ctl.log()));
}

//! Two nodes of one cluster, end to end: each node is a netns on a simulated node network
//! (192.0.2.0/24, a veth between the two), running its own containerd (bridge + host-local
//! with the *same* primary pod CIDR on both, fleet-cni chained) and its own fleet-nri inside
//! the node's netns. The test plays the cluster controller through the node API: it hands each
//! node its plan and its peer. Needs root.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleet_e2e::{ClusterNode, PodSpec, TestNetns, poll_until, require_root};
use fleet_proto::node::{PeerNode, PlanChange, SetPlanRequest, code};

const UNDERLAY_LINK: &str = "under0";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// What the test adds to the library's node ([`ClusterNode`]): it plays the controller.
trait Controlled {
    /// Runs `cmd` in `container`; panics unless it exits 0.
    fn run(&self, container: &str, cmd: &[&str]) -> String;
    fn set_plan(&self, subnet: &str) -> PlanChange;
    fn as_peer(&self, subnet: &str) -> PeerNode;
    fn set_peers(&self, peers: Vec<PeerNode>);
    /// The fleet leaves nothing in the node's netns but the overlay's UDP socket: no fleet
    /// link, no fleet route.
    fn assert_node_netns_clean(&self);
}

impl Controlled for ClusterNode {
    fn run(&self, container: &str, cmd: &[&str]) -> String {
        self.exec(container, cmd).unwrap()
    }

    fn set_plan(&self, subnet: &str) -> PlanChange {
        self.nri
            .client()
            .set_plan(plan(subnet))
            .unwrap_or_else(|e| panic!("set_plan {subnet}: {e}\n{}", self.nri.log()))
    }

    fn as_peer(&self, subnet: &str) -> PeerNode {
        PeerNode {
            name: self.netns.name().to_string(),
            underlay_ip: self.underlay_ip.parse().unwrap(),
            node_subnet: subnet.into(),
            routed_cidrs: vec![],
        }
    }

    fn set_peers(&self, peers: Vec<PeerNode>) {
        self.nri
            .client()
            .set_peers(peers)
            .unwrap_or_else(|e| panic!("set_peers: {e}\n{}", self.nri.log()));
    }

    fn assert_node_netns_clean(&self) {
        let links = self.in_node("ip", &["-o", "link"]);
        let names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .collect();
        for name in &names {
            assert!(
                *name == "lo"
                    || *name == UNDERLAY_LINK
                    || name.starts_with("fe2e-mbr")
                    || name.starts_with("veth"),
                "unexpected link {name} in the node netns: {links}"
            );
        }
        let routes = self.in_node("ip", &["-4", "route", "show", "table", "all"]);
        assert!(
            !routes.contains("100.96."),
            "fleet route in the node netns: {routes}"
        );
        assert!(
            !routes.contains("100.112."),
            "fleet route in the node netns: {routes}"
        );
    }
}

fn plan(subnet: &str) -> SetPlanRequest {
    SetPlanRequest {
        fleet_cidr: "100.96.0.0/12".into(),
        vip_range: "100.112.0.0/16".into(),
        node_subnet: subnet.into(),
    }
}

/// The fleet IP on eth-fleet inside a container, from `ip -4 -o addr`.
fn fleet_ip(node: &ClusterNode, container: &str) -> String {
    let out = node.run(container, &["ip", "-4", "-o", "addr", "show", "eth-fleet"]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no inet on eth-fleet: {out}"))
        .to_string()
}

/// Two node netns joined by a veth on 192.0.2.0/24; nothing leads out of them.
fn node_network() -> (TestNetns, TestNetns) {
    let a = TestNetns::new("mn-a");
    let b = TestNetns::new("mn-b");
    a.ip(&[
        "link",
        "add",
        UNDERLAY_LINK,
        "type",
        "veth",
        "peer",
        "name",
        UNDERLAY_LINK,
        "netns",
        b.name(),
    ])
    .unwrap();
    for (ns, ip) in [(&a, "192.0.2.1/24"), (&b, "192.0.2.2/24")] {
        // No IPv6 link-local chatter: the capture must show only what the fleet sends.
        ns.command("sysctl")
            .args([
                "-qw",
                &format!("net.ipv6.conf.{UNDERLAY_LINK}.disable_ipv6=1"),
            ])
            .status()
            .unwrap();
        ns.ip(&["addr", "add", ip, "dev", UNDERLAY_LINK]).unwrap();
        ns.ip(&["link", "set", UNDERLAY_LINK, "up"]).unwrap();
    }
    (a, b)
}

/// tcpdump on the node's underlay link, writing a pcap; stopped (SIGINT) by PID.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(node: &ClusterNode) -> Capture {
        let file = std::env::temp_dir().join(format!(
            "fe2e-mn-{}-{}.pcap",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = file.with_extension("log");
        let child = node
            .netns
            .command("timeout")
            // --immediate-mode: without it packets wait in the capture ring for a block timeout
            // and are lost when tcpdump is stopped right after the traffic.
            .args([
                "120",
                "tcpdump",
                "--immediate-mode",
                "-i",
                UNDERLAY_LINK,
                "-n",
                "-U",
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        poll_until("tcpdump to listen", Duration::from_secs(10), || {
            std::fs::read_to_string(&stderr)
                .ok()
                .filter(|s| s.contains("listening on"))
        })
        .unwrap();
        let _ = std::fs::remove_file(&stderr);
        Capture {
            child: Some(child),
            file,
        }
    }

    /// Stops the capture and returns tcpdump's decoding of it, one packet per timestamped line.
    fn finish(mut self) -> String {
        if let Some(mut c) = self.child.take() {
            // `timeout` forwards SIGINT to tcpdump, which flushes and exits.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

#[test]
fn pods_on_two_nodes_reach_each_other_over_the_overlay_the_controller_programs() {
    require_root("pods_on_two_nodes_reach_each_other_over_the_overlay_the_controller_programs");
    let (ns_a, ns_b) = node_network();
    let (subnet_a, subnet_b) = ("100.96.30.0/24", "100.96.31.0/24");
    let mut b = ClusterNode::start("mn-b", ns_b, "192.0.2.2").unwrap();
    let a = ClusterNode::start("mn-a", ns_a, "192.0.2.1").unwrap();

    // Before the controller has spoken: not ready, and a pod's ADD fails with code 11.
    let status = a.nri.status().unwrap();
    assert!(!status.ready && status.node_subnet.is_empty(), "{status:?}");
    let err = a.cri().run_pod(&PodSpec::new("too-early")).unwrap_err();
    assert!(
        err.to_string().contains("not yet given a subnet"),
        "{err}\n{}",
        a.nri.log()
    );

    // The controller hands each node its plan (idempotent).
    assert_eq!(a.set_plan(subnet_a), PlanChange::Applied);
    assert_eq!(a.set_plan(subnet_a), PlanChange::Unchanged);
    assert_eq!(b.set_plan(subnet_b), PlanChange::Applied);
    assert_eq!(a.nri.status().unwrap().node_subnet, subnet_a);

    let (_, web_c) = b.cri().run_busybox_pod(&PodSpec::new("web")).unwrap();
    let (_, cli_c) = a.cri().run_busybox_pod(&PodSpec::new("client")).unwrap();
    let web_ip = fleet_ip(&b, &web_c);
    let cli_ip = fleet_ip(&a, &cli_c);
    assert!(web_ip.starts_with("100.96.31."), "{web_ip}");
    assert!(cli_ip.starts_with("100.96.30."), "{cli_ip}");
    // Identical primary pod CIDRs on both nodes.
    for (node, c) in [(&a, &cli_c), (&b, &web_c)] {
        let eth0 = node.run(c, &["ip", "-4", "-o", "addr", "show", "eth0"]);
        assert!(eth0.contains("inet 10.244.1."), "{eth0}");
    }
    let ping = [
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "-I",
        "eth-fleet",
        web_ip.as_str(),
    ];
    assert!(
        !a.exec_ok(&cli_c, &ping),
        "no peers yet: no route to node B"
    );

    // With live pods the plan cannot change.
    let err = a.nri.client().set_plan(plan("100.96.40.0/24")).unwrap_err();
    assert_eq!(err.code, code::PLAN_CONFLICT, "{err}");
    assert!(err.details.contains("drain the node"), "{err}");

    // The controller hands each node its peers.
    a.set_peers(vec![b.as_peer(subnet_b)]);
    b.set_peers(vec![a.as_peer(subnet_a)]);
    a.set_peers(vec![b.as_peer(subnet_b)]); // idempotent
    let route = a.nri.ip_cnf(&["-4", "route", "show", subnet_b]);
    assert!(
        route.contains("via 100.96.31.0 dev fleetvx") && route.contains("onlink"),
        "{route}"
    );
    assert_eq!(a.nri.client().list_peers().unwrap().len(), 1);

    let capture = Capture::start(&a);
    a.run(&cli_c, &ping);
    b.run(
        &web_c,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo fleet-across-nodes > /www/index.html && httpd -p 8080 -h /www",
        ],
    );
    let url = format!("http://{web_ip}:8080/");
    let wget = ["timeout", "5", "wget", "-q", "-O", "-", url.as_str()];
    assert_eq!(a.run(&cli_c, &wget).trim(), "fleet-across-nodes");
    let packets = capture.finish();

    // Everything on the node network was the overlay's VXLAN (UDP 4789) between the nodes,
    // carrying the pods' own addresses.
    let top: Vec<&str> = packets
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(!top.is_empty(), "nothing captured: {packets}");
    for l in &top {
        assert!(
            l.contains(" ARP, ") || l.contains(".4789: VXLAN"),
            "non-overlay packet on the underlay: {l}\n{packets}"
        );
    }
    assert!(
        top.iter()
            .any(|l| l.contains("192.0.2.1.") && l.contains("192.0.2.2.4789: VXLAN")),
        "{packets}"
    );
    assert!(
        packets.contains(&format!("IP {cli_ip} > {web_ip}: ICMP echo request")),
        "{packets}"
    );
    assert!(packets.contains(&format!("{web_ip}.8080")), "{packets}");

    // Nothing of the fleet in the node netns but the overlay's UDP socket, which is not in
    // the CNF netns; the machine's own netns holds no overlay link.
    for node in [&a, &b] {
        node.assert_node_netns_clean();
        assert!(ClusterNode::udp_ports(node.netns.name()).contains(&4789));
        assert!(!ClusterNode::udp_ports(node.nri.cnf_netns()).contains(&4789));
    }
    let host = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&host.stdout).contains("fleetvx"));

    // kill -9 of node B's daemon: the kernel keeps forwarding. Remove B's route while it is
    // down; the restarted daemon restores plan, peers and overlay from its data dir.
    b.nri.kill9();
    assert!(a.exec_ok(&cli_c, &ping), "the datapath outlives the daemon");
    fleet_e2e::ip_in(b.nri.cnf_netns(), &["route", "del", subnet_a]).unwrap();
    assert!(!a.exec_ok(&cli_c, &ping), "B has no route back to A");
    b.nri.spawn().unwrap();
    let st = b.nri.status().unwrap();
    assert!(st.ready && st.node_subnet == subnet_b, "{st:?}");
    assert_eq!(
        b.nri.client().list_peers().unwrap(),
        vec![a.as_peer(subnet_a)]
    );
    poll_until(
        "traffic across nodes again",
        Duration::from_secs(10),
        || a.exec_ok(&cli_c, &ping).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", b.nri.log()));
    assert_eq!(a.run(&cli_c, &wget).trim(), "fleet-across-nodes");
    let links = b.nri.ip_cnf(&["-o", "link"]);
    assert_eq!(links.matches("fleetvx").count(), 1, "{links}");

    // The controller removes the peer: the route, the device and its socket go; traffic stops.
    a.set_peers(vec![]);
    assert!(a.nri.ip_cnf(&["-4", "route", "show", subnet_b]).is_empty());
    assert!(!a.nri.ip_cnf(&["-o", "link"]).contains("fleetvx"));
    assert!(!ClusterNode::udp_ports(a.netns.name()).contains(&4789));
    assert!(!a.exec_ok(&cli_c, &ping), "no peer, no traffic");
    assert!(a.nri.client().list_peers().unwrap().is_empty());
    a.assert_node_netns_clean();
}

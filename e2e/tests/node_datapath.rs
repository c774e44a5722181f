//! The node datapath end to end: real containerd 1.7 with Debian's bridge + host-local as the
//! primary CNI, fleet-cni chained after them, fleet-nri registered over NRI. Needs root.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fleet_e2e::{
    BridgeNetwork, Containerd, ContainerdOpts, Cri, FleetNri, PodSpec, TestNetns, poll_until,
    require_root, workspace_bin,
};
use fleet_proto::node::{AttachRequest, Attachment, AttachmentKey, Origin, PodMeta};

const EXEC: Duration = Duration::from_secs(10);
static SEQ: AtomicU32 = AtomicU32::new(0);

/// One node: containerd in its own netns, fleet-nri on its NRI socket. Field order is drop
/// order: pods go (CNI DEL reaches a live fleet-nri) before the daemon and the netns.
struct Node {
    cri: Option<Cri>,
    containerd: Containerd,
    nri: Option<FleetNri>,
    subnet: String,
    _netns: TestNetns,
}

impl Node {
    /// `chained`: put fleet-cni in the conflist. `start_nri`: start fleet-nri now.
    fn new(tag: &str, fleet_subnet: &str, chained: bool, start_nri: bool) -> Node {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let netns = TestNetns::new(tag);
        let containerd = Containerd::start(
            ContainerdOpts::new(tag)
                .netns(&netns)
                .cni_plugin(workspace_bin("fleet-cni")),
        )
        .unwrap();
        let mut node = Node {
            cri: None,
            containerd,
            nri: None,
            subnet: fleet_subnet.to_string(),
            _netns: netns,
        };
        let mut net = BridgeNetwork::new("podnet", &format!("fe2e-br{n}"), "10.244.1.0/24");
        if start_nri || chained {
            node.start_nri();
        }
        if chained {
            net = net.chain(node.nri().cni_entry());
        }
        net.write_to(&node.containerd).unwrap();
        let cri = node.containerd.cri().unwrap();
        cri.wait_network_ready(Duration::from_secs(15)).unwrap();
        node.cri = Some(cri);
        node
    }

    fn start_nri(&mut self) {
        let nri = FleetNri::start(&self.subnet, Some(&self.containerd.nri_socket())).unwrap();
        poll_until(
            "fleet-nri to register over NRI",
            Duration::from_secs(15),
            || nri.status().ok().filter(|s| s.nri_registered),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", nri.log()));
        self.nri = Some(nri);
    }

    fn nri(&self) -> &FleetNri {
        self.nri.as_ref().expect("fleet-nri started")
    }

    fn cri(&self) -> &Cri {
        self.cri.as_ref().expect("cri connected")
    }

    fn exec(&self, container: &str, cmd: &[&str]) -> String {
        let out = self.cri().exec_sync(container, cmd, EXEC).unwrap();
        assert!(out.success(), "{cmd:?} failed: {out:?}");
        out.stdout
    }

    fn attachment_of(&self, sandbox: &str) -> Option<Attachment> {
        self.nri()
            .client()
            .list_attachments()
            .unwrap()
            .into_iter()
            .find(|a| a.key.container_id == sandbox)
    }

    fn remove_pod(&self, sandbox: &str) {
        self.cri().stop_pod(sandbox).unwrap();
        self.cri().remove_pod(sandbox).unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(cri) = self.cri.take() {
            // Remove pods while fleet-nri still answers CNI DEL.
            for pod in cri.list_pods().unwrap_or_default() {
                let _ = cri.stop_pod(&pod.id);
                let _ = cri.remove_pod(&pod.id);
            }
        }
    }
}

/// The fleet IP on eth-fleet inside a container, from `ip -4 -o addr`.
fn fleet_ip(node: &Node, container: &str) -> String {
    let out = node.exec(container, &["ip", "-4", "-o", "addr", "show", "eth-fleet"]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no inet on eth-fleet: {out}"))
        .to_string()
}

#[test]
fn pods_get_eth_fleet_the_fleet_ip_in_env_and_reach_each_other() {
    require_root("pods_get_eth_fleet_the_fleet_ip_in_env_and_reach_each_other");
    let node = Node::new("dp", "100.96.20.0/24", true, true);
    let web = PodSpec::new("web").namespace("shop").label("app", "web");
    let (web_sb, web_c) = node.cri().run_busybox_pod(&web).unwrap();
    let (cli_sb, cli_c) = node
        .cri()
        .run_busybox_pod(&PodSpec::new("client").namespace("shop"))
        .unwrap();

    // eth0 from the primary CNI, untouched; eth-fleet from fleetboard.
    let eth0 = node.exec(&web_c, &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(eth0.contains("inet 10.244.1."), "{eth0}");
    let web_ip = fleet_ip(&node, &web_c);
    assert!(web_ip.starts_with("100.96.20."), "{web_ip}");
    let routes = node.exec(&web_c, &["ip", "-4", "route"]);
    assert!(
        routes.contains("default via 10.244.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("100.96.0.0/12 via 100.96.20.1 dev eth-fleet"),
        "{routes}"
    );
    assert!(
        routes.contains("100.112.0.0/16 via 100.96.20.1 dev eth-fleet"),
        "{routes}"
    );

    // The container sees its fleet address, injected through NRI CreateContainer.
    let env = node.exec(&web_c, &["env"]);
    assert!(env.contains(&format!("FLEETBOARD_IP={web_ip}")), "{env}");

    // The node's allocations carry the pod's identity and NRI's labels.
    let att = poll_until(
        "labels from NRI on the attachment",
        Duration::from_secs(10),
        || {
            node.attachment_of(&web_sb)
                .filter(|a| a.pod.labels.get("app").map(String::as_str) == Some("web"))
        },
    )
    .unwrap();
    assert_eq!(
        (att.pod.namespace.as_str(), att.pod.name.as_str()),
        ("shop", "web")
    );
    assert_eq!(att.address.to_string(), web_ip);
    assert_eq!(att.origin, Origin::Cni);

    // Two pods on the node reach each other over eth-fleet: ICMP and TCP.
    let cli_ip = fleet_ip(&node, &cli_c);
    assert_ne!(cli_ip, web_ip);
    node.exec(
        &cli_c,
        &["ping", "-c", "1", "-W", "3", "-I", "eth-fleet", &web_ip],
    );
    node.exec(
        &web_c,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo fleet-hello > /www/index.html && httpd -p 8080 -h /www",
        ],
    );
    let page = node.exec(
        &cli_c,
        &[
            "timeout",
            "5",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{web_ip}:8080/"),
        ],
    );
    assert_eq!(page.trim(), "fleet-hello");

    // The host netns and the node's netns hold none of the fleet's links.
    let host = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&host.stdout).contains("fl6460"));
    assert_eq!(node.nri().host_veths().len(), 2);

    // Deleting a pod leaves no veth and no allocation.
    node.remove_pod(&web_sb);
    assert!(node.attachment_of(&web_sb).is_none());
    node.nri().await_host_veths(1).unwrap();
    assert!(!node.nri().host_veths().contains(&att.host_veth));
    assert!(!node.nri().data_dir().join("ipam").join(&web_ip).exists());
    node.remove_pod(&cli_sb);
    node.nri().await_host_veths(0).unwrap();
    assert_eq!(node.nri().status().unwrap().allocated, 0);
}

#[test]
fn a_pod_started_before_fleet_nri_gets_eth_fleet_when_it_starts() {
    require_root("a_pod_started_before_fleet_nri_gets_eth_fleet_when_it_starts");
    // The conflist has no fleet-cni: this pod can only get eth-fleet through NRI repair.
    let mut node = Node::new("repair", "100.96.21.0/24", false, false);
    let (sb, c) = node
        .cri()
        .run_busybox_pod(&PodSpec::new("early").label("tier", "db"))
        .unwrap();
    let before = node
        .cri()
        .exec_sync(&c, &["ip", "link", "show", "eth-fleet"], EXEC)
        .unwrap();
    assert!(!before.success(), "no eth-fleet before the daemon runs");

    node.start_nri();
    let ip = poll_until(
        "eth-fleet to appear in the running pod",
        Duration::from_secs(20),
        || {
            let out = node
                .cri()
                .exec_sync(&c, &["ip", "-4", "-o", "addr", "show", "eth-fleet"], EXEC)
                .ok()?;
            out.success().then_some(()).map(|_| fleet_ip(&node, &c))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.nri().log()));
    assert!(ip.starts_with("100.96.21."), "{ip}");
    let att = node.attachment_of(&sb).unwrap();
    assert_eq!(att.origin, Origin::NriRepair);
    assert_eq!(att.pod.labels.get("tier").map(String::as_str), Some("db"));
    let routes = node.exec(&c, &["ip", "-4", "route"]);
    assert!(
        routes.contains("100.96.0.0/12 via 100.96.21.1 dev eth-fleet"),
        "{routes}"
    );

    // Removing the pod releases the repaired attachment (NRI RemovePodSandbox).
    node.remove_pod(&sb);
    poll_until(
        "the repaired pod's release",
        Duration::from_secs(10),
        || {
            (node.nri().status().ok()?.allocated == 0 && node.nri().host_veths().is_empty())
                .then_some(())
        },
    )
    .unwrap();
}

#[test]
fn fleet_nri_registers_again_within_2s_of_a_containerd_restart() {
    require_root("fleet_nri_registers_again_within_2s_of_a_containerd_restart");
    let mut node = Node::new("restart", "100.96.22.0/24", true, true);
    let before = node.nri().status().unwrap().nri_registrations;
    node.cri = None;
    node.containerd.restart().unwrap();
    let restarted = Instant::now();
    poll_until(
        "re-registration after containerd restart",
        Duration::from_secs(2),
        || {
            node.nri()
                .status()
                .ok()
                .filter(|s| s.nri_registered && s.nri_registrations > before)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.nri().log()));
    eprintln!(
        "re-registered {:?} after containerd answered again",
        restarted.elapsed()
    );

    // And it works: a new pod's container gets its fleet IP injected.
    node.cri = Some(node.containerd.cri().unwrap());
    node.cri()
        .wait_network_ready(Duration::from_secs(15))
        .unwrap();
    let (_, c) = node.cri().run_busybox_pod(&PodSpec::new("after")).unwrap();
    let ip = fleet_ip(&node, &c);
    assert!(
        node.exec(&c, &["env"])
            .contains(&format!("FLEETBOARD_IP={ip}"))
    );
}

#[test]
fn fleet_nri_kill_9_keeps_pods_and_addresses_and_never_duplicates() {
    require_root("fleet_nri_kill_9_keeps_pods_and_addresses_and_never_duplicates");
    let mut node = Node::new("kill", "100.96.23.0/24", true, true);
    let (a_sb, a_c) = node.cri().run_busybox_pod(&PodSpec::new("a")).unwrap();
    let a_ip = fleet_ip(&node, &a_c);

    node.nri.as_mut().unwrap().kill9();
    // While the daemon is down a new pod fails cleanly (CNI 11: try again later).
    let err = node
        .cri()
        .run_pod(&PodSpec::new("while-down"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fleet-nri is not reachable") || err.contains("try again"),
        "{err}"
    );
    // The running pod keeps its link.
    assert_eq!(fleet_ip(&node, &a_c), a_ip);

    node.nri.as_mut().unwrap().spawn().unwrap();
    poll_until(
        "re-registration after kill -9",
        Duration::from_secs(10),
        || node.nri().status().ok().filter(|s| s.nri_registered),
    )
    .unwrap();
    let att = node
        .attachment_of(&a_sb)
        .expect("allocation survives kill -9");
    assert_eq!(att.address.to_string(), a_ip);
    let (_, b_c) = node.cri().run_busybox_pod(&PodSpec::new("b")).unwrap();
    let b_ip = fleet_ip(&node, &b_c);
    assert_ne!(b_ip, a_ip, "the next pod gets a fresh address");
    node.exec(
        &b_c,
        &["ping", "-c", "1", "-W", "3", "-I", "eth-fleet", &a_ip],
    );
    // Exactly the two live pods hold addresses: the failed pod left nothing.
    poll_until(
        "only live pods hold addresses",
        Duration::from_secs(10),
        || {
            (node.nri().status().ok()?.allocated == 2 && node.nri().host_veths().len() == 2)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", node.nri().client().list_attachments()));
}

#[test]
fn allocations_of_pods_that_vanished_while_fleet_nri_was_down_are_released_on_sync() {
    require_root("allocations_of_pods_that_vanished_while_fleet_nri_was_down_are_released_on_sync");
    let mut node = Node::new("vanish", "100.96.24.0/24", true, true);
    let (live_sb, live_c) = node.cri().run_busybox_pod(&PodSpec::new("live")).unwrap();
    let live_ip = fleet_ip(&node, &live_c);
    node.nri.as_mut().unwrap().stop();

    // While the daemon is down, a pod it allocated for disappears without a CNI DEL (its
    // runtime state was lost): its record and veth stay behind. Build that leftover from a
    // real record, aged past the reconcile grace period.
    let ipam = node.nri().data_dir().join("ipam");
    let mut ghost: Attachment =
        serde_json::from_slice(&std::fs::read(ipam.join(&live_ip)).unwrap()).unwrap();
    ghost.key.container_id = "ghost-sandbox".into();
    ghost.address = "100.96.24.200".parse().unwrap();
    ghost.host_veth = "fl646018c8".into();
    ghost.created_unix = 0;
    // Gone with its pod: a netns that still existed would keep the allocation (item 4).
    ghost.netns = format!("/run/netns/fe2e-gone-{}", std::process::id());
    std::fs::write(
        ipam.join("100.96.24.200"),
        serde_json::to_vec(&ghost).unwrap(),
    )
    .unwrap();
    let cnf = node.nri().cnf_netns().to_string();
    fleet_e2e::ip_in(
        &cnf,
        &[
            "link",
            "add",
            "fl646018c8",
            "type",
            "veth",
            "peer",
            "name",
            "ghost-peer",
        ],
    )
    .unwrap();

    node.nri.as_mut().unwrap().spawn().unwrap();
    poll_until(
        "the vanished pod's release on Synchronize",
        Duration::from_secs(15),
        || {
            let listed = node.nri().client().list_attachments().ok()?;
            let veths = node.nri().host_veths();
            (listed.len() == 1 && !veths.contains(&"fl646018c8".to_string())).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.nri().log()));
    // The live pod is untouched.
    assert_eq!(
        node.attachment_of(&live_sb).unwrap().address.to_string(),
        live_ip
    );
    assert_eq!(fleet_ip(&node, &live_c), live_ip);
    assert!(!ipam.join("100.96.24.200").exists());
}

/// Writes `ghost-sandbox`'s record at `address`: a pod that vanished while fleet-nri was
/// down, its netns gone, aged past any grace. Its release marks a finished Synchronize.
fn write_gone_record(node: &Node, template: &Attachment, address: &str) {
    let mut ghost = template.clone();
    ghost.key.container_id = "ghost-sandbox".into();
    ghost.address = address.parse().unwrap();
    ghost.host_veth = format!("fl{:08x}", u32::from(ghost.address));
    ghost.netns = format!("/run/netns/fe2e-gone-{}", std::process::id());
    ghost.created_unix = 0;
    let ipam = node.nri().data_dir().join("ipam");
    std::fs::write(ipam.join(address), serde_json::to_vec(&ghost).unwrap()).unwrap();
}

/// Issue 12 item 4: the runtime lost track of a sandbox (its shim stalled across a restart) or
/// has not listed it yet (its CNI chain is still running), so Synchronize leaves it out; its
/// netns is alive. Its address and link stay, however old the allocation.
#[test]
fn a_live_pod_missing_from_synchronize_keeps_its_address_and_link() {
    require_root("a_live_pod_missing_from_synchronize_keeps_its_address_and_link");
    let mut node = Node::new("unlisted", "100.96.25.0/24", true, true);
    let (_, live_c) = node.cri().run_busybox_pod(&PodSpec::new("live")).unwrap();
    let live_ip = fleet_ip(&node, &live_c);
    let unlisted_ns = TestNetns::new("unlisted-pod");
    let unlisted = node
        .nri()
        .client()
        .attach(AttachRequest {
            key: AttachmentKey {
                container_id: "unlisted-sandbox".into(),
                ifname: "eth0".into(),
            },
            network: "podnet".into(),
            netns: unlisted_ns.path().display().to_string(),
            pod: PodMeta::default(),
            primary: vec![],
        })
        .unwrap();
    node.nri.as_mut().unwrap().stop();

    // Aged far past the 60 s the old grace allowed.
    let ipam = node.nri().data_dir().join("ipam");
    let path = ipam.join(unlisted.address.to_string());
    let mut record: Attachment = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record.created_unix = 0;
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    write_gone_record(&node, &record, "100.96.25.200");

    node.nri.as_mut().unwrap().spawn().unwrap();
    poll_until(
        "Synchronize to release the gone pod",
        Duration::from_secs(15),
        || {
            let listed = node.nri().client().list_attachments().ok()?;
            (!listed.iter().any(|a| a.key.container_id == "ghost-sandbox")).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.nri().log()));
    let kept = node
        .attachment_of("unlisted-sandbox")
        .unwrap_or_else(|| panic!("the unlisted live pod was released\n{}", node.nri().log()));
    assert_eq!(kept.address, unlisted.address);
    let addrs = unlisted_ns
        .ip(&["-4", "-o", "addr", "show", "eth-fleet"])
        .unwrap();
    assert!(
        addrs.contains(&format!("{}/24", unlisted.address)),
        "eth-fleet kept: {addrs}"
    );
    assert!(node.nri().host_veths().contains(&kept.host_veth));
    assert_eq!(fleet_ip(&node, &live_c), live_ip);
    // Once its netns is gone it is reclaimed like any vanished pod.
    drop(unlisted_ns);
    poll_until(
        "the unlisted pod's release once its netns is gone",
        Duration::from_secs(15),
        || {
            node.attachment_of("unlisted-sandbox")
                .is_none()
                .then_some(())
        },
    )
    .unwrap();
}

/// Issue 12 item 5: a sandbox removed while no CNI DEL and no NRI event reached fleet-nri
/// (here: fleet-nri without NRI, and the runtime's conflist without fleet-cni by then) leaves
/// an allocation whose netns is gone. The periodic sweep reclaims it within its interval (5 s
/// by default), without a restart or a Synchronize.
#[test]
fn an_allocation_whose_sandbox_vanished_without_del_or_event_is_reclaimed_without_a_restart() {
    require_root(
        "an_allocation_whose_sandbox_vanished_without_del_or_event_is_reclaimed_without_a_restart",
    );
    let mut node = Node::new("reclaim", "100.96.26.0/24", false, false);
    let nri = FleetNri::start(&node.subnet, None).unwrap();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let plain = BridgeNetwork::new("podnet", &format!("fe2e-brr{n}"), "10.244.1.0/24");
    plain
        .clone()
        .chain(nri.cni_entry())
        .write_to(&node.containerd)
        .unwrap();
    node.nri = Some(nri);

    // Run pods until containerd has loaded the chained conflist: one with an attachment.
    let mut probe = 0;
    let (sandbox, netns) = poll_until(
        "a pod attached through the chained conflist",
        Duration::from_secs(20),
        || {
            probe += 1;
            let sb = node
                .cri()
                .run_pod(&PodSpec::new(&format!("p{probe}")))
                .ok()?;
            if node.attachment_of(&sb).is_some() {
                return Some((sb.clone(), node.cri().pod_netns_path(&sb).ok()?));
            }
            node.remove_pod(&sb);
            None
        },
    )
    .unwrap();
    // Then until it has loaded the conflist without fleet-cni: a pod without one.
    plain.write_to(&node.containerd).unwrap();
    poll_until(
        "containerd to load the conflist without fleet-cni",
        Duration::from_secs(20),
        || {
            probe += 1;
            let sb = node
                .cri()
                .run_pod(&PodSpec::new(&format!("p{probe}")))
                .ok()?;
            let plain = node.attachment_of(&sb).is_none();
            node.remove_pod(&sb);
            plain.then_some(())
        },
    )
    .unwrap();

    node.remove_pod(&sandbox);
    let removed = Instant::now();
    assert!(!netns.exists(), "the runtime removed the pod's netns");
    assert!(
        node.attachment_of(&sandbox).is_some(),
        "no DEL reached fleet-nri: the allocation is still held"
    );
    poll_until(
        "the vanished sandbox's allocation to be reclaimed",
        Duration::from_secs(12),
        || {
            (node.attachment_of(&sandbox).is_none() && node.nri().host_veths().is_empty())
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.nri().log()));
    eprintln!(
        "reclaimed {:.2} s after the sandbox was removed",
        removed.elapsed().as_secs_f64()
    );
    assert!(
        node.nri()
            .log()
            .contains("released the attachment of a pod whose netns is gone")
    );
}

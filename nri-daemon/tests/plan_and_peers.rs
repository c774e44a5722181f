//! The controller's requests against the real binary (`--no-nri`), run inside a node netns the
//! test creates: `set_plan` (before it ADD is code 11; persisted; refused with live pods) and
//! `set_peers` (validated, persisted, re-programmed after kill -9, nothing leaked). Needs root.

use fleet_e2e::{FleetNri, FleetNriOpts, TestNetns, ip_in, require_root};
use fleet_proto::node::{
    AttachRequest, AttachmentKey, DetachRequest, NodeError, PeerNode, PlanChange, PodMeta,
    SetPlanRequest, code,
};

fn plan(subnet: &str) -> SetPlanRequest {
    SetPlanRequest {
        fleet_cidr: "100.96.0.0/12".into(),
        vip_range: "100.112.0.0/16".into(),
        node_subnet: subnet.into(),
    }
}

fn peer(name: &str, ip: &str, subnet: &str, routed: &[&str]) -> PeerNode {
    PeerNode {
        name: name.into(),
        underlay_ip: ip.parse().unwrap(),
        node_subnet: subnet.into(),
        routed_cidrs: routed.iter().map(|s| s.to_string()).collect(),
    }
}

fn attach_req(id: &str, netns: &TestNetns) -> AttachRequest {
    AttachRequest {
        key: AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        },
        network: "fleet".into(),
        netns: netns.path().display().to_string(),
        pod: PodMeta::default(),
        primary: vec![],
    }
}

fn daemon_in(node: &TestNetns) -> FleetNri {
    FleetNri::start_with(FleetNriOpts {
        node_subnet: None,
        nri_socket: None,
        netns: Some(node.path()),
    })
    .unwrap()
}

fn err_code(r: Result<impl std::fmt::Debug, NodeError>) -> u32 {
    r.expect_err("expected an error").code
}

#[test]
fn the_plan_comes_from_the_controller_survives_kill_9_and_cannot_change_under_live_pods() {
    require_root(
        "the_plan_comes_from_the_controller_survives_kill_9_and_cannot_change_under_live_pods",
    );
    let node = TestNetns::new("pl-node");
    let pod = TestNetns::new("pl-pod");
    let mut d = daemon_in(&node);
    let c = d.client();

    // No plan: not ready, ADD is "try again later", peers need a plan first.
    let st = c.status().unwrap();
    assert!(
        !st.ready && st.node_subnet.is_empty() && st.capacity == 0,
        "{st:?}"
    );
    assert_eq!(c.get_plan().unwrap(), None);
    let e = c.attach(attach_req("early", &pod)).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER);
    assert!(e.msg.contains("not yet given a subnet"), "{e}");
    assert_eq!(err_code(c.set_peers(vec![])), code::TRY_AGAIN_LATER);
    // DEL of something never allocated is fine.
    c.detach(DetachRequest {
        key: attach_req("early", &pod).key,
        network: "fleet".into(),
        netns: String::new(),
    })
    .unwrap();

    // Bad plans change nothing.
    assert_eq!(
        err_code(c.set_plan(plan("10.0.0.0/24"))),
        code::INVALID_CONFIG
    );
    assert_eq!(err_code(c.set_plan(plan("nonsense"))), code::INVALID_CONFIG);
    assert_eq!(c.get_plan().unwrap(), None);

    // A plan, then a move while the node is empty: the bridge follows.
    assert_eq!(
        c.set_plan(plan("100.96.50.0/24")).unwrap(),
        PlanChange::Applied
    );
    assert_eq!(
        c.set_plan(plan("100.96.51.0/24")).unwrap(),
        PlanChange::Applied
    );
    let addrs = ip_in(d.cnf_netns(), &["-4", "-o", "addr", "show", "fleet0"]).unwrap();
    assert!(
        addrs.contains("100.96.51.1/24") && !addrs.contains("100.96.50.1"),
        "{addrs}"
    );

    let att = c.attach(attach_req("pod-1", &pod)).unwrap();
    assert!(att.address.to_string().starts_with("100.96.51."), "{att:?}");
    let e = c.set_plan(plan("100.96.52.0/24")).unwrap_err();
    assert_eq!(e.code, code::PLAN_CONFLICT);
    assert!(e.details.contains("1 live pod allocations"), "{e}");
    assert_eq!(
        c.set_plan(plan("100.96.51.0/24")).unwrap(),
        PlanChange::Unchanged
    );

    // kill -9: the plan and the allocation are back, without a plan in the config.
    d.kill9();
    d.spawn().unwrap();
    let st = d.status().unwrap();
    assert!(
        st.ready && st.node_subnet == "100.96.51.0/24" && st.allocated == 1,
        "{st:?}"
    );
    assert_eq!(c.get_plan().unwrap(), Some(plan("100.96.51.0/24")));
    assert_eq!(
        c.attach(attach_req("pod-1", &pod)).unwrap().address,
        att.address
    );

    // Drained, the node may move.
    c.detach(DetachRequest {
        key: attach_req("pod-1", &pod).key,
        network: "fleet".into(),
        netns: String::new(),
    })
    .unwrap();
    assert_eq!(
        c.set_plan(plan("100.96.52.0/24")).unwrap(),
        PlanChange::Applied
    );
}

#[test]
fn peers_are_validated_persisted_reprogrammed_after_kill_9_and_removed_without_leaks() {
    require_root(
        "peers_are_validated_persisted_reprogrammed_after_kill_9_and_removed_without_leaks",
    );
    let node = TestNetns::new("pe-node");
    let mut d = daemon_in(&node);
    let c = d.client();
    c.set_plan(plan("100.96.60.0/24")).unwrap();

    // Invalid lists are refused and program nothing.
    for bad in [
        vec![peer("b", "192.0.2.2", "100.96.60.0/24", &[])],
        vec![
            peer("b", "192.0.2.2", "100.96.61.0/24", &[]),
            peer("b", "192.0.2.3", "100.96.62.0/24", &[]),
        ],
        vec![peer("b", "0.0.0.0", "100.96.61.0/24", &[])],
        vec![peer("b", "192.0.2.2", "10.1.0.0/24", &[])],
    ] {
        assert_eq!(err_code(c.set_peers(bad)), code::INVALID_CONFIG);
    }
    assert!(c.list_peers().unwrap().is_empty());
    assert!(
        !ip_in(d.cnf_netns(), &["-o", "link"])
            .unwrap()
            .contains("fleetvx")
    );

    let routes = |d: &FleetNri| {
        ip_in(d.cnf_netns(), &["-4", "route", "show", "dev", "fleetvx"]).unwrap_or_default()
    };
    let b = peer("b", "192.0.2.2", "100.96.61.0/24", &[]);
    let gw = peer("gw", "192.0.2.3", "100.96.62.0/24", &["100.97.0.0/16"]);
    c.set_peers(vec![b.clone(), gw.clone()]).unwrap();
    let r = routes(&d);
    for want in [
        "100.96.61.0/24 via 100.96.61.0",
        "100.96.62.0/24 via 100.96.62.0",
        "100.97.0.0/16 via 100.96.62.0",
    ] {
        assert!(r.contains(want), "{want} missing: {r}");
    }
    let fdb = fleet_e2e::run_command(std::process::Command::new("bridge").args([
        "-n",
        d.cnf_netns(),
        "fdb",
        "show",
        "dev",
        "fleetvx",
    ]))
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap();
    assert!(fdb.contains("0e:fb:64:60:3d:00 dst 192.0.2.2"), "{fdb}");
    assert!(fdb.contains("0e:fb:64:60:3e:00 dst 192.0.2.3"), "{fdb}");

    // kill -9, and someone removes a route meanwhile: the restart converges.
    d.kill9();
    ip_in(d.cnf_netns(), &["route", "del", "100.97.0.0/16"]).unwrap();
    d.spawn().unwrap();
    assert_eq!(c.list_peers().unwrap(), vec![b.clone(), gw.clone()]);
    assert!(
        routes(&d).contains("100.97.0.0/16 via 100.96.62.0"),
        "{}",
        routes(&d)
    );
    let links = ip_in(d.cnf_netns(), &["-o", "link"]).unwrap();
    assert_eq!(links.matches("fleetvx").count(), 1, "{links}");

    // The next set replaces: gw goes, its routes, neighbour and FDB entry with it.
    c.set_peers(vec![b.clone()]).unwrap();
    let r = routes(&d);
    assert!(
        !r.contains("100.96.62.0") && !r.contains("100.97.0.0"),
        "{r}"
    );
    let neigh = ip_in(d.cnf_netns(), &["neigh", "show", "dev", "fleetvx"]).unwrap();
    assert!(
        !neigh.contains("100.96.62.0") && neigh.contains("100.96.61.0"),
        "{neigh}"
    );

    // None left: no device, no socket in the node netns, nothing of the fleet on the node.
    c.set_peers(vec![]).unwrap();
    assert!(
        !ip_in(d.cnf_netns(), &["-o", "link"])
            .unwrap()
            .contains("fleetvx")
    );
    let node_links = node.ip(&["-o", "link"]).unwrap();
    assert_eq!(
        node_links.lines().count(),
        1,
        "only lo on the node: {node_links}"
    );
    assert!(
        !node
            .ip(&["route", "show", "table", "all"])
            .unwrap()
            .contains("100.9")
    );
    let udp = node
        .command("cat")
        .arg("/proc/net/udp")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap();
    assert!(!udp.contains(":12B5"), "overlay socket left behind: {udp}");
    d.kill9();
    d.spawn().unwrap();
    assert!(
        !ip_in(d.cnf_netns(), &["-o", "link"])
            .unwrap()
            .contains("fleetvx")
    );
}

/// Issue 12 item 3: a plan whose fleet CIDR or VIP range overlaps the node's own networks (its
/// addresses, its routes: kops' pod routes, say) is refused, naming both; nothing is set up.
#[test]
fn a_plan_overlapping_the_nodes_own_networks_is_refused() {
    require_root("a_plan_overlapping_the_nodes_own_networks_is_refused");
    let node = TestNetns::new("ovl-node");
    let d = daemon_in(&node);
    let c = d.client();
    node.ip(&["link", "add", "cbr0", "type", "bridge"]).unwrap();
    node.ip(&["link", "set", "cbr0", "up"]).unwrap();
    node.ip(&["addr", "add", "100.96.128.1/24", "dev", "cbr0"])
        .unwrap();
    let e = c.set_plan(plan("100.96.50.0/24")).unwrap_err();
    assert_eq!(e.code, code::INVALID_CONFIG, "{e}");
    assert!(
        e.details.contains("fleet CIDR 100.96.0.0/12") && e.details.contains("100.96.128.0/24"),
        "{e}"
    );
    assert_eq!(c.get_plan().unwrap(), None);

    // A route of the node into the VIP range (another node's pods, say).
    node.ip(&["addr", "flush", "dev", "cbr0"]).unwrap();
    node.ip(&["addr", "add", "10.244.0.1/24", "dev", "cbr0"])
        .unwrap();
    node.ip(&["route", "add", "100.112.7.0/24", "via", "10.244.0.9"])
        .unwrap();
    let e = c.set_plan(plan("100.96.50.0/24")).unwrap_err();
    assert!(e.details.contains("VIP range 100.112.0.0/16"), "{e}");
    assert_eq!(c.get_plan().unwrap(), None);

    node.ip(&["route", "del", "100.112.7.0/24"]).unwrap();
    assert_eq!(
        c.set_plan(plan("100.96.50.0/24")).unwrap(),
        PlanChange::Applied
    );
}

//! The datapath against the real kernel: netns, veth, bridge, addresses, routes. Needs root.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use common::{Ns, require_root};
use fleet_core::config::{DEFAULT_FLEET_CIDR, DEFAULT_VIP_RANGE, NodeLocal, NodePlan};
use fleet_core::datapath::NodeDatapath;
use fleet_core::ipam::host_veth_name;
use fleet_proto::node::{Attachment, AttachmentKey, Origin};

fn attachment(id: &str, pod: &Ns, address: Ipv4Addr) -> Attachment {
    Attachment {
        key: AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        },
        network: "fleet".into(),
        netns: pod.path().display().to_string(),
        interface: "eth-fleet".into(),
        mac: String::new(),
        address,
        prefix_len: 24,
        host_veth: host_veth_name(address),
        pod: Default::default(),
        origin: Origin::Cni,
        created_unix: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_check_detach_in_real_namespaces() {
    require_root();
    let cnf = Ns::new("cnf");
    let (pod_a, pod_b) = (Ns::new("pa"), Ns::new("pb"));
    let plan = NodePlan::new(
        DEFAULT_FLEET_CIDR.parse().unwrap(),
        DEFAULT_VIP_RANGE.parse().unwrap(),
        "100.96.7.0/24".parse().unwrap(),
    )
    .unwrap();
    let local = NodeLocal {
        cnf_netns: cnf.0.clone(),
        ..NodeLocal::default()
    };
    let dp = NodeDatapath::new(plan, local);
    dp.ensure_cnf().await.unwrap();
    dp.ensure_cnf().await.expect("ensure_cnf is idempotent");

    let a = attachment("a", &pod_a, Ipv4Addr::new(100, 96, 7, 2));
    let b = attachment("b", &pod_b, Ipv4Addr::new(100, 96, 7, 3));
    let link = dp.attach(&pod_a.path(), &a).await.unwrap();
    assert_eq!(link.mac, "0a:58:64:60:07:02");
    dp.attach(&pod_b.path(), &b).await.unwrap();
    dp.check(&pod_a.path(), &a).await.unwrap();

    let (_, addr) = pod_a.run(&["ip", "-4", "-o", "addr", "show", "eth-fleet"]);
    assert!(addr.contains("100.96.7.2/24"), "{addr}");
    let (_, routes) = pod_a.run(&["ip", "-4", "route"]);
    assert!(
        routes.contains("100.96.0.0/12 via 100.96.7.1 dev eth-fleet"),
        "{routes}"
    );
    assert!(
        routes.contains("100.112.0.0/16 via 100.96.7.1 dev eth-fleet"),
        "{routes}"
    );
    assert!(
        !routes.contains("default"),
        "no default route via eth-fleet: {routes}"
    );
    let (ok, out) = pod_a.run(&["busybox", "ping", "-c", "1", "-W", "2", "100.96.7.3"]);
    assert!(ok, "pod a reaches pod b over the CNF bridge: {out}");

    // Re-attaching (daemon restarted mid-attach, or repair) replaces the link cleanly.
    dp.attach(&pod_a.path(), &a).await.unwrap();
    dp.check(&pod_a.path(), &a).await.unwrap();

    // CHECK notices a missing route.
    pod_a.run(&["ip", "route", "del", "100.112.0.0/16"]);
    let err = dp.check(&pod_a.path(), &a).await.unwrap_err();
    assert!(err.to_string().contains("100.112.0.0/16"), "{err}");

    dp.detach(&a).await.unwrap();
    dp.detach(&a).await.expect("detach is idempotent");
    let (_, links) = pod_a.run(&["ip", "-o", "link"]);
    assert!(!links.contains("eth-fleet"), "{links}");
    assert_eq!(dp.host_veths().await.unwrap(), vec![b.host_veth.clone()]);

    // Missing pod netns is told apart from other failures.
    let gone = attachment("c", &pod_a, Ipv4Addr::new(100, 96, 7, 4));
    let err = dp
        .attach(&PathBuf::from("/run/netns/fbt-does-not-exist"), &gone)
        .await
        .unwrap_err();
    assert!(err.is_netns_missing(), "{err}");
    assert_eq!(
        dp.host_veths().await.unwrap(),
        vec![b.host_veth.clone()],
        "nothing left behind"
    );

    // The host netns saw nothing.
    let host_links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let host_links = String::from_utf8_lossy(&host_links.stdout);
    assert!(
        !host_links.contains("fl6460") && !host_links.contains("fleet0"),
        "{host_links}"
    );
}

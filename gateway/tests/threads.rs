//! `FLEET_GATEWAY_THREADS`: a userspace device run by a multi-thread runtime. Its worker
//! threads must sit in the underlay netns (where gotatun binds and rebinds its UDP socket), not
//! in the netns of the TUN they were created in; a bulk transfer each way arrives intact; a
//! count out of range is refused with the variable's name and creates nothing. One test, one
//! process: the variable is read when a device is created, so no other test can race with it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use fleet_gateway::{BackendKind, PrivateKey, create_device};

const BULK: usize = 16 << 20;

/// The network namespace (inode) of each thread of this process named `wg-<name>`.
fn device_threads(name: &str) -> Vec<u64> {
    let comm = format!("wg-{name}");
    let comm = &comm[..comm.len().min(15)];
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .map(|e| std::fs::metadata(e.path().join("ns/net")).unwrap().ino())
        .collect()
}

fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[tokio::test]
async fn a_device_on_two_threads_keeps_its_workers_in_the_underlay_and_carries_bulk_intact() {
    require_root();
    require_unset("FLEET_GATEWAY_THREADS", "sets it itself");
    let net = Underlay::new("th");
    let (inner_a, inner_b) = (Netns::new("thai"), Netns::new("thbi"));
    let (key_a, key_b) = (PrivateKey::generate(), PrivateKey::generate());
    let name_a = wg_name("tha");
    // SAFETY: this process's only test; no other thread reads the environment now.
    for bad in ["0", "9", "two", ""] {
        unsafe { std::env::set_var("FLEET_GATEWAY_THREADS", bad) };
        let mut cfg = config(&name_a, &inner_a, key_a.clone(), "198.51.100.1/32");
        cfg.underlay_netns = Some(net.a.path());
        let err = create_device(BackendKind::Userspace, cfg)
            .await
            .expect_err(&format!("FLEET_GATEWAY_THREADS={bad:?} refused"))
            .to_string();
        assert!(err.contains("FLEET_GATEWAY_THREADS"), "{bad:?}: {err}");
        let links = inner_a.ip(&["-o", "link", "show"]);
        assert!(!links.contains(&name_a), "{bad:?} left a link: {links}");
    }

    unsafe { std::env::set_var("FLEET_GATEWAY_THREADS", "2") };
    let Pair {
        a,
        b,
        name_a,
        name_b,
    } = peered_pair(&net, (&inner_a, &inner_b), "th", (key_a, key_b)).await;
    assert!(
        eventually(Duration::from_secs(10), || inner_a.ping("198.51.100.2")),
        "no ping through the tunnel"
    );

    // The device thread and its 2 workers, all in the node (underlay) netns.
    for (name, node) in [(&name_a, &net.a), (&name_b, &net.b)] {
        let threads = device_threads(name);
        assert_eq!(threads.len(), 3, "{name}: device thread + 2 workers");
        assert!(
            threads.iter().all(|&ino| ino == netns_inode(&node.path())),
            "{name}: every thread in the underlay netns"
        );
    }
    bulk_both_ways((&inner_a, &inner_b), BULK, "2 threads per device");
    // The UDP socket is on the node, nothing of it in the inner netns.
    assert!(
        net.a.exec(&["ss", "-H", "-uan"]).contains(":51820"),
        "UDP bound on the node"
    );
    assert!(
        !inner_a.exec(&["ss", "-H", "-uan"]).contains(":51820"),
        "no UDP in the inner netns"
    );
    a.delete().await.unwrap();
    b.delete().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || device_threads(&name_a)
            .is_empty()),
        "the device's threads end with it"
    );
    assert!(!inner_a.ip(&["-o", "link", "show"]).contains(&name_a));
}

//! The userspace device's TUN offloads (`gateway/src/offload_tun.rs`): with the defaults the
//! TUN takes TCP segmentation (the kernel hands it super-packets) and a bulk transfer each way
//! arrives intact; with `FLEET_GATEWAY_OFFLOADS=none` the device is gotatun's own TUN (no
//! segmentation offload) and carries the same transfer. One test, one process: the variable
//! is read when a device is created, so no other test can race with it.

mod common;

use std::time::Duration;

use common::*;
use fleet_gateway::PrivateKey;

const BULK: usize = 32 << 20;

/// The pair of devices in `net.a` / `net.b`, once `a` pings `b` through the tunnel.
async fn pair(net: &Underlay, tag: &str) -> Pair {
    let keys = (PrivateKey::generate(), PrivateKey::generate());
    let pair = peered_pair(net, (&net.a, &net.b), tag, keys).await;
    assert!(
        eventually(Duration::from_secs(10), || net.a.ping("198.51.100.2")),
        "no ping through the tunnel ({tag})"
    );
    pair
}

#[tokio::test]
async fn offloaded_tun_segments_and_carries_bulk_intact_and_none_turns_it_off() {
    require_root();
    require_unset("FLEET_GATEWAY_OFFLOADS", "sets it itself");
    let net = Underlay::new("t5");

    let Pair {
        a,
        b,
        name_a: name,
        name_b,
    } = pair(&net, "o").await;
    assert_eq!(
        offload_feature(&net.a, &name, "tcp-segmentation-offload"),
        "on",
        "the default device's TUN takes TSO"
    );
    // Each write to the TUN counts as one received packet of the interface: while b only
    // receives the bulk (and sends ACKs), its TUN's rx bytes per packet is the size of what the
    // device writes. With write buffers that could not hold a super-packet it was at most
    // 3 segments (< 4,100 bytes; gateway/README.md, "TUN offloads").
    let before = rx_counters(&net.b, &name_b);
    let (sent, got, sent_hash, got_hash) = tcp_bulk(&net.b, &net.a, "198.51.100.2", BULK);
    assert_eq!((got, got_hash), (sent, sent_hash), "bulk transfer to b");
    let after = rx_counters(&net.b, &name_b);
    let (bytes, writes) = (after.0 - before.0, after.1 - before.1);
    println!(
        "b's TUN: {bytes} bytes in {writes} writes, {} per write",
        bytes / writes.max(1)
    );
    assert!(
        bytes / writes.max(1) > 8192,
        "decrypted segments coalesced into super-packets: {bytes} bytes in {writes} TUN writes"
    );
    bulk_both_ways((&net.a, &net.b), BULK, "offloads on");
    a.delete().await.unwrap();
    b.delete().await.unwrap();

    // SAFETY: this process's only test; no other thread reads the environment now.
    unsafe { std::env::set_var("FLEET_GATEWAY_OFFLOADS", "none") };
    let Pair {
        a, b, name_a: name, ..
    } = pair(&net, "n").await;
    assert_eq!(
        offload_feature(&net.a, &name, "tcp-segmentation-offload"),
        "off",
        "FLEET_GATEWAY_OFFLOADS=none: gotatun's own TUN, no TSO"
    );
    bulk_both_ways((&net.a, &net.b), BULK, "offloads off");
    a.delete().await.unwrap();
    b.delete().await.unwrap();
}

/// The interface's received (bytes, packets) in `ns`.
fn rx_counters(ns: &Netns, dev: &str) -> (u64, u64) {
    let read = |what: &str| {
        ns.exec(&["cat", &format!("/sys/class/net/{dev}/statistics/rx_{what}")])
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    (read("bytes"), read("packets"))
}

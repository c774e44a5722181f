//! Wire compatibility: our userspace device (with its TUN offloads) against Debian's
//! wireguard-go, both builds — bookworm's 0.0.20220316 and trixie's 0.0.20231211 (with its own
//! TUN and UDP offloads) — configured with `wg` over its UAPI socket: handshakes, ping, a TCP
//! exchange and a bulk transfer each way whose bytes must arrive intact.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use fleet_gateway::{BackendKind, PrivateKey, create_device};

#[tokio::test]
async fn userspace_device_talks_to_wireguard_go_2022() {
    talks_to(WG_GO_2022, "t3").await;
}

#[tokio::test]
async fn userspace_device_talks_to_wireguard_go_2023() {
    talks_to(&wg_go_2023(), "t4").await;
}

async fn talks_to(wireguard_go: &str, tag: &str) {
    require_root();
    let net = Underlay::new(tag);
    let dir = tempfile::tempdir().unwrap();
    let ours_key = PrivateKey::generate();
    let ours_pub = ours_key.public_key();
    let theirs_key_file = dir.path().join("go.key");
    let theirs_key = PrivateKey::load_or_generate(&theirs_key_file).unwrap();
    let theirs_pub = theirs_key.public_key();
    let go_name = wg_name(&format!("g{tag}"));
    let sock = format!("/var/run/wireguard/{go_name}.sock");

    let _go = Proc(
        Command::new("ip")
            .args(["netns", "exec", &net.b.name, wireguard_go, "-f", &go_name])
            .env("LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go (scripts/install-deps.sh installs it)"),
    );
    assert!(
        eventually(Duration::from_secs(10), || std::path::Path::new(&sock)
            .exists()),
        "wireguard-go did not open {sock}"
    );
    run(
        "wg",
        &[
            "set",
            &go_name,
            "private-key",
            theirs_key_file.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            &ours_pub.to_base64(),
            "endpoint",
            "192.0.2.1:51820",
            "allowed-ips",
            "198.51.100.1/32",
        ],
    );
    net.b
        .ip(&["addr", "add", "198.51.100.2/32", "dev", &go_name]);
    net.b.ip(&["link", "set", &go_name, "mtu", "1420", "up"]);
    net.b
        .ip(&["route", "add", "198.51.100.1/32", "dev", &go_name]);

    let ours = create_device(
        BackendKind::Userspace,
        config(
            &wg_name(&format!("h{tag}")),
            &net.a,
            ours_key,
            "198.51.100.1/32",
        ),
    )
    .await
    .unwrap();
    ours.set_peers(&[peer(theirs_pub, "192.0.2.2:51820", "198.51.100.2/32")])
        .await
        .unwrap();

    // Both directions: we initiate, then they answer and initiate TCP back.
    assert!(
        eventually(Duration::from_secs(10), || net.a.ping("198.51.100.2")),
        "no ping from our device to wireguard-go"
    );
    assert!(
        net.b.ping("198.51.100.1"),
        "no ping from wireguard-go to our device"
    );
    let (got, reply) = tcp_exchange(&net.a, &net.b, "198.51.100.1", "hello from wireguard-go");
    assert_eq!(got, "hello from wireguard-go");
    assert_eq!(reply, "ack:hello from wireguard-go");

    // Bulk both ways: super-packets split before our encryption and coalesced after our
    // decryption (and wireguard-go 2023's own offloads on the other side).
    for (server, client, addr) in [
        (&net.b, &net.a, "198.51.100.2"),
        (&net.a, &net.b, "198.51.100.1"),
    ] {
        let (sent, got, sent_hash, got_hash) = tcp_bulk(server, client, addr, 32 << 20);
        assert_eq!(
            (got, got_hash),
            (sent, sent_hash),
            "bulk transfer to {addr}"
        );
    }

    let stats = ours.stats().await.unwrap();
    assert!(
        stats[0].last_handshake.is_some() && stats[0].rx_bytes > 0,
        "{stats:?}"
    );
    let theirs = run("wg", &["show", &go_name, "latest-handshakes"]);
    assert!(theirs.contains(&ours_pub.to_base64()), "{theirs}");
    assert!(
        !theirs.trim().ends_with("\t0"),
        "wireguard-go saw no handshake: {theirs}"
    );
    ours.delete().await.unwrap();
}

//! Two userspace devices in two netns over a veth: traffic, encryption on the wire, stats,
//! peer removal, keys, a wrong key.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use fleet_gateway::{BackendKind, PrivateKey, create_device};

const SECRET: &str = "fleetboard-plaintext-marker-7f3a";

#[tokio::test]
async fn userspace_tunnel_carries_ping_and_tcp_encrypted_and_forgets_removed_peers() {
    require_root();
    let net = Underlay::new("t1");
    let keys = tempfile::tempdir().unwrap();
    let key_a = PrivateKey::load_or_generate(&keys.path().join("a.key")).unwrap();
    let key_b = PrivateKey::load_or_generate(&keys.path().join("b.key")).unwrap();
    for f in ["a.key", "b.key"] {
        let mode = std::fs::metadata(keys.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let (pub_a, pub_b) = (key_a.public_key(), key_b.public_key());
    let Pair {
        a,
        b,
        name_a,
        name_b,
    } = peered_pair(&net, (&net.a, &net.b), "", (key_a, key_b)).await;

    // Routes for the peers' allowed IPs, in the devices' netns.
    assert!(
        net.b
            .ip(&["route", "show", "dev", &name_b])
            .contains("198.51.100.1")
    );
    assert!(
        net.a
            .ip(&["route", "show", "dev", &name_a])
            .contains("198.51.100.2")
    );
    assert!(net.a.ip(&["link", "show", &name_a]).contains("mtu 1420"));

    let pcap = keys.path().join("underlay.pcap");
    let mut dump = capture(&net.b, "ul0", &pcap);
    assert!(
        eventually(Duration::from_secs(10), || net.a.ping("198.51.100.2")),
        "no ping across the tunnel:\n{}\n{}\n{}",
        run("wg", &["show", &name_a]),
        run("wg", &["show", &name_b]),
        net.a.ip(&["route"]),
    );
    let (got, reply) = tcp_exchange(&net.b, &net.a, "198.51.100.2", SECRET);
    assert_eq!(got, SECRET);
    assert_eq!(reply, format!("ack:{SECRET}"));
    dump.stop();

    // On the wire: only UDP between the WireGuard ports, nothing of the inner packets.
    let seen = run("tcpdump", &["-r", pcap.to_str().unwrap(), "-n", "ip"]);
    let lines: Vec<&str> = seen.lines().collect();
    assert!(
        !lines.is_empty(),
        "nothing captured: {} bytes, {}",
        std::fs::metadata(&pcap).map(|m| m.len()).unwrap_or(0),
        std::fs::read_to_string(pcap.with_extension("log")).unwrap_or_default()
    );
    for l in &lines {
        assert!(
            l.contains("192.0.2.1.51820 > 192.0.2.2.51820: UDP")
                || l.contains("192.0.2.2.51820 > 192.0.2.1.51820: UDP"),
            "not WireGuard UDP on the underlay: {l}"
        );
        assert!(!l.contains("198.51.100."), "inner address visible: {l}");
    }
    let raw = std::fs::read(&pcap).unwrap();
    assert!(
        !raw.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "plaintext payload visible on the underlay"
    );

    // Stats: a handshake and bytes both ways, as `wg show` sees them too.
    for (dev, other) in [(&a, pub_b), (&b, pub_a)] {
        let stats = dev.stats().await.unwrap();
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert_eq!(s.public_key, other);
        assert!(s.last_handshake.is_some(), "{s:?}");
        assert!(s.rx_bytes > 0 && s.tx_bytes > 0, "{s:?}");
    }
    let shown = run("wg", &["show", &name_a]);
    assert!(shown.contains(&pub_b.to_base64()), "{shown}");
    assert!(shown.contains("latest handshake"), "{shown}");
    assert!(
        !shown.contains(
            &PrivateKey::load(&keys.path().join("a.key"))
                .unwrap()
                .to_base64()
        )
    );

    // Changing a peer updates it in place: new allowed IP routed, same session kept.
    let before = b.stats().await.unwrap()[0].last_handshake;
    let mut grown = peer(pub_a, "192.0.2.1:51820", "198.51.100.1/32");
    grown.allowed_ips.push("203.0.113.0/24".parse().unwrap());
    grown.persistent_keepalive = Some(25);
    b.set_peers(&[grown]).await.unwrap();
    let after = b.stats().await.unwrap();
    // (Userspace handshake times are derived from "seconds ago": allow clock jitter.)
    let (t0, t1) = (
        before.unwrap(),
        after[0].last_handshake.expect("the session was dropped"),
    );
    let drift = t1.duration_since(t0).unwrap_or_else(|e| e.duration());
    assert!(
        drift < Duration::from_millis(500),
        "a new session: {t0:?} -> {t1:?}"
    );
    assert_eq!(after[0].allowed_ips.len(), 2, "{after:?}");
    assert!(
        net.b
            .ip(&["route", "show", "dev", &name_b])
            .contains("203.0.113.0/24")
    );
    assert!(net.a.ping("198.51.100.2"));

    // Removing the peer removes its routes and stops the traffic.
    b.set_peers(&[]).await.unwrap();
    assert!(
        !net.b
            .ip(&["route", "show", "dev", &name_b])
            .contains("203.0.113.0/24")
    );
    assert!(b.stats().await.unwrap().is_empty());
    assert!(
        !net.b
            .ip(&["route", "show", "dev", &name_b])
            .contains("198.51.100.1")
    );
    assert!(
        !net.a.ping("198.51.100.2"),
        "traffic still flows to a removed peer"
    );
    assert!(
        !net.b.ping("198.51.100.1"),
        "route to a removed peer remains"
    );

    a.delete().await.unwrap();
    b.delete().await.unwrap();
    assert!(
        !net.a.exec_ok(&["ip", "link", "show", &name_a]),
        "device left behind"
    );
    assert!(!std::path::Path::new(&format!("/var/run/wireguard/{name_a}.sock")).exists());
}

#[tokio::test]
async fn wrong_peer_key_means_no_handshake_and_no_traffic() {
    require_root();
    let net = Underlay::new("t2");
    let (key_a, key_b) = (PrivateKey::generate(), PrivateKey::generate());
    let pub_a = key_a.public_key();
    let impostor = PrivateKey::generate().public_key();
    let a = create_device(
        BackendKind::Userspace,
        config(&wg_name("c"), &net.a, key_a, "198.51.100.1/32"),
    )
    .await
    .unwrap();
    let b = create_device(
        BackendKind::Userspace,
        config(&wg_name("d"), &net.b, key_b, "198.51.100.2/32"),
    )
    .await
    .unwrap();
    // a believes b has another key.
    a.set_peers(&[peer(impostor, "192.0.2.2:51820", "198.51.100.2/32")])
        .await
        .unwrap();
    b.set_peers(&[peer(pub_a, "192.0.2.1:51820", "198.51.100.1/32")])
        .await
        .unwrap();
    // a's handshake initiations reach b, which cannot answer them: nothing gets through.
    for _ in 0..3 {
        assert!(!net.a.ping("198.51.100.2"), "traffic with a wrong key");
    }
    let sa = a.stats().await.unwrap();
    let sb = b.stats().await.unwrap();
    assert_eq!(sa[0].last_handshake, None, "{sa:?}");
    assert_eq!(sa[0].rx_bytes, 0, "{sa:?}");
    assert_eq!(sb[0].last_handshake, None, "{sb:?}");
    assert_eq!(sb[0].rx_bytes, 0, "{sb:?}");
}

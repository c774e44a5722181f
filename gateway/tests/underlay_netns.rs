//! `DeviceConfig::underlay_netns`: the WireGuard interface in one netns, its UDP socket in
//! another. Two "nodes" (netns A and B, joined by a veth on 192.0.2.0/24), each with an inner
//! netns whose only link (besides lo) is the WireGuard interface, as a node's CNF netns is.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use fleet_gateway::{
    BackendKind, DeviceConfig, GatewayError, PrivateKey, WireguardDevice, create_device,
};

const SECRET: &str = "fleetboard-underlay-marker-41c9";

/// A node netns (from [`Underlay`]) and its inner netns with nothing but lo.
fn inner_config(name: &str, inner: &Netns, node: &Netns, address: &str) -> DeviceConfig {
    let mut cfg = config(name, inner, PrivateKey::generate(), address);
    cfg.underlay_netns = Some(node.path());
    cfg
}

/// Link names in `ns` (`ul0@if2` -> `ul0`), sorted.
fn links(ns: &Netns) -> Vec<String> {
    let mut names: Vec<String> = ns
        .ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect();
    names.sort();
    names
}

/// `names`, sorted, to compare with [`links`].
fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    v.sort();
    v
}

/// Every UDP socket in `ns`, bound or connected, as `ss` lists them.
fn udp_sockets(ns: &Netns) -> String {
    ns.exec(&["ss", "-H", "-uan"])
}

/// `/proc/net/udp` and `/proc/net/udp6` as seen from inside `ns`.
fn proc_udp(ns: &Netns) -> String {
    ns.exec(&["cat", "/proc/net/udp", "/proc/net/udp6"])
}

/// Port 51820 as a local address in `/proc/net/udp*` (`...:CA6C`).
fn proc_has_port(table: &str, port: u16) -> bool {
    let hex = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|local| local.ends_with(&hex))
}

/// The routes of the main table (IPv4 and IPv6) in `ns`, one per line.
fn main_routes(ns: &Netns) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        out.extend(
            ns.ip(&[family, "route", "show"])
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    out
}

/// The routes of `ns`, in any table but `local` (its own addresses), that do not go through
/// `dev`.
fn routes_not_via(ns: &Netns, dev: &str) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        for l in ns.ip(&[family, "route", "show", "table", "all"]).lines() {
            let l = l.trim();
            if l.is_empty() || l.contains(" table local ") {
                continue;
            }
            if !l.contains(&format!("dev {dev} ")) && !l.ends_with(&format!("dev {dev}")) {
                out.push(l.to_string());
            }
        }
    }
    out
}

fn uapi(name: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{name}.sock"))
}

#[tokio::test]
async fn userspace_device_keeps_its_interface_inner_and_its_udp_on_the_node() {
    require_root();
    let net = Underlay::new("u1");
    let (inner_a, inner_b) = (Netns::new("u1ai"), Netns::new("u1bi"));
    let keys = (PrivateKey::generate(), PrivateKey::generate());
    let pub_b = keys.1.public_key();
    let Pair {
        a,
        b,
        name_a,
        name_b,
    } = peered_pair(&net, (&inner_a, &inner_b), "u", keys).await;

    // The interface, its address, MTU and peer routes are in the inner netns, nothing of it
    // on the node.
    assert_eq!(links(&inner_a), sorted(&["lo", &name_a]));
    assert_eq!(links(&net.a), sorted(&["lo", "ul0"]));
    let shown = inner_a.ip(&["addr", "show", "dev", &name_a]);
    assert!(
        shown.contains("198.51.100.1/32") && shown.contains("mtu 1420"),
        "{shown}"
    );
    assert!(
        inner_a
            .ip(&["route", "show", "dev", &name_a])
            .contains("198.51.100.2")
    );
    assert!(!net.a.ip(&["route", "show"]).contains("198.51.100."));
    // The inner netns has no way out except the WireGuard interface.
    for ns_dev in [(&inner_a, &name_a), (&inner_b, &name_b)] {
        let (ns, dev) = ns_dev;
        let stray = routes_not_via(ns, dev);
        assert!(stray.is_empty(), "routes not via {dev}: {stray:?}");
        assert!(!main_routes(ns).is_empty());
    }

    // The UDP socket is on the node, the inner netns has none at all.
    for (node, inner) in [(&net.a, &inner_a), (&net.b, &inner_b)] {
        let on_node = udp_sockets(node);
        assert!(
            on_node.contains(":51820"),
            "no UDP 51820 on the node: {on_node:?}"
        );
        assert!(proc_has_port(&proc_udp(node), PORT), "{}", proc_udp(node));
        let in_inner = udp_sockets(inner);
        assert!(
            in_inner.trim().is_empty(),
            "UDP in the inner netns: {in_inner}"
        );
        assert!(!proc_has_port(&proc_udp(inner), PORT));
    }

    // Traffic between the inner netns, which can only be through the tunnel over the nodes.
    assert!(
        eventually(Duration::from_secs(10), || inner_a.ping("198.51.100.2")),
        "no ping across the tunnel:\n{}\n{}",
        run("wg", &["show", &name_a]),
        run("wg", &["show", &name_b]),
    );
    let (got, reply) = tcp_exchange(&inner_b, &inner_a, "198.51.100.2", SECRET);
    assert_eq!(got, SECRET);
    assert_eq!(reply, format!("ack:{SECRET}"));
    // The peer was heard from the other node's underlay address.
    let stats = a.stats().await.unwrap();
    assert_eq!(stats[0].endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    assert!(stats[0].last_handshake.is_some() && stats[0].rx_bytes > 0);

    // The UAPI socket serves as before.
    let shown = run("wg", &["show", &name_a]);
    assert!(shown.contains("listening port: 51820"), "{shown}");
    assert!(shown.contains(&pub_b.to_base64()), "{shown}");
    assert!(shown.contains("latest handshake"), "{shown}");

    // set_peers keeps routing in the inner netns.
    let mut grown = peer(pub_b, "192.0.2.2:51820", "198.51.100.2/32");
    grown.allowed_ips.push("203.0.113.0/24".parse().unwrap());
    a.set_peers(&[grown]).await.unwrap();
    assert!(
        inner_a
            .ip(&["route", "show", "dev", &name_a])
            .contains("203.0.113.0/24")
    );
    assert!(!net.a.ip(&["route", "show"]).contains("203.0.113.0"));
    assert!(inner_a.ping("198.51.100.2"));

    // A port change over UAPI rebinds the socket: on the node again, never inner.
    run("wg", &["set", &name_a, "listen-port", "51821"]);
    assert!(
        eventually(Duration::from_secs(5), || udp_sockets(&net.a)
            .contains(":51821")),
        "no rebind on the node: {}",
        udp_sockets(&net.a)
    );
    assert!(udp_sockets(&inner_a).trim().is_empty());
    assert!(!proc_has_port(&proc_udp(&net.a), PORT));

    delete_and_check(&*a, &inner_a, &net.a).await;
    delete_and_check(&*b, &inner_b, &net.b).await;
    assert!(!inner_a.ping("198.51.100.2"));
}

/// Deletes `dev` and checks nothing of it is left: no link or route in the inner netns, no
/// UDP socket on the node, no UAPI socket, the node's links as they were.
async fn delete_and_check(dev: &dyn WireguardDevice, inner: &Netns, node: &Netns) {
    let name = dev.name().to_string();
    dev.delete().await.unwrap();
    assert_eq!(links(inner), sorted(&["lo"]));
    assert!(main_routes(inner).is_empty(), "{:?}", main_routes(inner));
    assert_eq!(links(node), sorted(&["lo", "ul0"]));
    assert!(
        !udp_sockets(node).contains(":5182"),
        "UDP socket left on the node: {}",
        udp_sockets(node)
    );
    assert!(!proc_has_port(&proc_udp(node), PORT));
    assert!(!uapi(&name).exists(), "UAPI socket left behind");
    // Deleting again is fine.
    dev.delete().await.unwrap();
}

#[tokio::test]
async fn a_missing_underlay_netns_is_named_and_nothing_is_created() {
    require_root();
    let inner = Netns::new("u2i");
    let missing = format!("/run/netns/fgw-no-underlay-{}", std::process::id());
    for (kind, tag) in [(BackendKind::Userspace, "mu"), (BackendKind::Kernel, "mk")] {
        let name = wg_name(tag);
        let mut cfg = config(&name, &inner, PrivateKey::generate(), "198.51.100.1/32");
        cfg.underlay_netns = Some(missing.clone().into());
        let err = create_device(kind, cfg).await.unwrap_err();
        assert!(matches!(err, GatewayError::Netns(_)), "{kind}: {err:?}");
        assert!(
            err.to_string().contains(&missing) && err.to_string().contains("does not exist"),
            "{kind}: {err}"
        );
        assert_eq!(links(&inner), sorted(&["lo"]), "{kind}");
        assert!(!uapi(&name).exists(), "{kind}: UAPI socket created");
    }
}

/// The kernel backend creates its link in the underlay netns and moves it. This kernel may
/// have no WireGuard: then the error says so and neither netns is changed; where it has
/// WireGuard the link must end up inner with its UDP socket on the node.
#[tokio::test]
async fn kernel_device_with_an_underlay_is_created_on_the_node_and_moved_inner() {
    require_root();
    let net = Underlay::new("u3");
    let inner = Netns::new("u3i");
    let name = wg_name("uk");
    let cfg = inner_config(&name, &inner, &net.a, "198.51.100.1/32");
    let kernel = Path::new("/sys/module/wireguard").exists()
        || net
            .b
            .exec_ok(&["ip", "link", "add", "wgprobe", "type", "wireguard"]);
    let made = create_device(BackendKind::Kernel, cfg).await;
    if !kernel {
        let err = made.unwrap_err();
        assert!(
            matches!(err, GatewayError::KernelUnavailable { .. }),
            "{err:?}"
        );
        assert_eq!(links(&inner), sorted(&["lo"]));
        assert_eq!(links(&net.a), sorted(&["lo", "ul0"]));
        return;
    }
    let dev = made.unwrap();
    assert_eq!(links(&inner), sorted(&["lo", &name]));
    assert_eq!(links(&net.a), sorted(&["lo", "ul0"]));
    assert!(
        udp_sockets(&net.a).contains(":51820"),
        "{}",
        udp_sockets(&net.a)
    );
    assert!(!udp_sockets(&inner).contains(":51820"));
    dev.set_peers(&[peer(
        PrivateKey::generate().public_key(),
        "192.0.2.2:51820",
        "198.51.100.2/32",
    )])
    .await
    .unwrap();
    assert!(inner.ip(&["route", "show"]).contains("198.51.100.2"));
    assert_eq!(dev.stats().await.unwrap().len(), 1);
    dev.delete().await.unwrap();
    assert_eq!(links(&inner), sorted(&["lo"]));
    assert!(!udp_sockets(&net.a).contains(":51820"));
}

/// The move the kernel backend relies on, on a link this kernel has (a veth end): it leaves
/// the source netns, arrives in the target, and a name taken there is refused with the link
/// left where it was.
#[tokio::test]
async fn move_to_netns_moves_a_link_and_refuses_a_taken_name() {
    require_root();
    let (from, to) = (Netns::new("mvf"), Netns::new("mvt"));
    from.ip(&["link", "add", "mv0", "type", "veth", "peer", "name", "mv1"]);
    let moved = fleet_core::netns::with_netlink(vec![from.path()], {
        let target = to.path();
        move |mut h| async move {
            fleet_gateway::link::move_to_netns(&h.remove(0), "mv0", &target).await
        }
    })
    .await
    .unwrap();
    moved.unwrap();
    assert_eq!(links(&from), sorted(&["lo", "mv1"]));
    assert_eq!(links(&to), sorted(&["lo", "mv0"]));

    // `to` now has mv0; moving another mv0 there fails and changes nothing.
    from.ip(&["link", "add", "mv0", "type", "veth", "peer", "name", "mv2"]);
    let refused = fleet_core::netns::with_netlink(vec![from.path()], {
        let target = to.path();
        move |mut h| async move {
            fleet_gateway::link::move_to_netns(&h.remove(0), "mv0", &target).await
        }
    })
    .await
    .unwrap();
    let err = refused.unwrap_err().to_string();
    assert!(err.contains("mv0") && err.contains(&to.name), "{err}");
    assert_eq!(links(&from), sorted(&["lo", "mv0", "mv1", "mv2"]));
}

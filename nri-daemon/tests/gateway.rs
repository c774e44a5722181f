//! The gateway in the node daemon, against the real binary (`--no-nri`) in a node netns the
//! test creates: `set_gateway` makes a userspace WireGuard device in the CNF netns (its UDP
//! socket in the node netns) with its peers and the own-block route; the same request again
//! changes nothing; the device, key and peers come back after `kill -9` and after SIGTERM of
//! the daemon; the private key never leaves the node; `clear_gateway` removes everything.
//! Needs root (and the `wg` tool, for the UAPI view).

use std::process::Command;

use fleet_e2e::{FleetNri, FleetNriOpts, TestNetns, ip_in, require_root};
use fleet_proto::node::{GatewayPeer, SetGatewayRequest, SetPlanRequest, WireguardBackend, code};

fn plan(subnet: &str) -> SetPlanRequest {
    SetPlanRequest {
        fleet_cidr: "100.96.0.0/12".into(),
        vip_range: "100.112.0.0/16".into(),
        node_subnet: subnet.into(),
    }
}

/// A public key of a peer nobody runs.
fn some_key() -> fleet_proto::wireguard::PublicKey {
    fleet_gateway::PrivateKey::generate().public_key()
}

fn wg(name: &str, what: &str) -> String {
    let out = Command::new("wg")
        .args(["show", name, what])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn udp_ports(netns: &str) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--", "cat", "/proc/net/udp", "/proc/net/udp6"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `:CA6C` (51820) listening in `/proc/net/udp` of that netns.
fn listens_51820(netns: &str) -> bool {
    udp_ports(netns).contains(":CA6C ")
}

#[test]
fn the_gateway_lives_in_the_daemon_and_survives_its_restarts() {
    require_root("the_gateway_lives_in_the_daemon_and_survives_its_restarts");
    let node = TestNetns::new("gw-node");
    let mut d = FleetNri::start_with(FleetNriOpts {
        node_subnet: None,
        nri_socket: None,
        netns: Some(node.path()),
    })
    .unwrap();
    let c = d.client();
    let name = format!("fgw{}", std::process::id() % 1_000_000);
    let _socket = RemoveOnDrop(format!("/var/run/wireguard/{name}.sock"));
    let relay = some_key();
    let direct = some_key();
    let req = SetGatewayRequest {
        name: name.clone(),
        listen_port: 51820,
        mtu: 1420,
        backend: Some(WireguardBackend::Userspace),
        own_block: Some("100.96.16.0/20".into()),
        relay: None,
        peers: vec![
            GatewayPeer {
                public_key: relay,
                endpoint: Some("192.0.2.200:51820".parse().unwrap()),
                allowed_ips: vec!["100.96.0.0/12".into()],
                keepalive: Some(25),
                fallback: None,
            },
            GatewayPeer {
                public_key: direct,
                endpoint: None,
                allowed_ips: vec!["100.96.32.0/20".into()],
                keepalive: None,
                fallback: None,
            },
        ],
    };

    // No plan yet: try again later; nothing made.
    assert_eq!(
        c.set_gateway(req.clone()).unwrap_err().code,
        code::TRY_AGAIN_LATER
    );
    assert_eq!(c.gateway_status().unwrap(), None);
    // A bad request is refused before anything is recorded.
    let mut bad = req.clone();
    bad.peers[0].allowed_ips = vec!["not-a-cidr".into()];
    c.set_plan(plan("100.96.16.0/24")).unwrap();
    assert_eq!(c.set_gateway(bad).unwrap_err().code, code::INVALID_CONFIG);
    assert!(!d.data_dir().join("gateway.json").exists());

    // The key exists before the device (the controller asks for it to join) and stays.
    let key = c.gateway_key().unwrap().public_key;
    assert_eq!(c.gateway_key().unwrap().public_key, key);
    let key_file = d.data_dir().join("wg.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let private = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_string();

    let r = c.set_gateway(req.clone()).unwrap();
    assert!(r.created && r.peers_changed, "{r:?}");
    assert_eq!(r.device.public_key, key);
    assert_eq!(r.device.backend, WireguardBackend::Userspace);
    let cnf = d.cnf_netns().to_string();
    let log_path = d.data_dir().join("../fleet-nri.log");
    let check_device = |what: &str| {
        let link = ip_in(&cnf, &["-o", "link", "show", "dev", &name]).unwrap_or_default();
        assert!(
            link.contains(&name) && link.contains("mtu 1420"),
            "{what}: {link}"
        );
        let routes = ip_in(&cnf, &["route", "show"]).unwrap();
        assert!(
            routes.contains("unreachable 100.96.16.0/20"),
            "{what}: {routes}"
        );
        assert!(
            routes.contains(&format!("100.96.0.0/12 dev {name}")),
            "{what}: {routes}"
        );
        assert!(
            routes.contains(&format!("100.96.32.0/20 dev {name}")),
            "{what}: {routes}"
        );
        assert!(
            listens_51820(&node.path().display().to_string()),
            "{what}: UDP in the node netns: {}\nCNF: {}\n{}",
            udp_ports(&node.path().display().to_string()),
            udp_ports(&cnf),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        assert!(
            !listens_51820(&cnf),
            "{what}: no UDP socket in the CNF netns"
        );
        assert_eq!(wg(&name, "public-key"), key.to_base64(), "{what}");
        let peers = wg(&name, "allowed-ips");
        assert!(
            peers.contains(&relay.to_base64()) && peers.contains(&direct.to_base64()),
            "{what}: {peers}"
        );
        assert!(
            wg(&name, "endpoints").contains("192.0.2.200:51820"),
            "{what}"
        );
    };
    check_device("after set_gateway");

    // The same state again: a no-op.
    let again = c.set_gateway(req.clone()).unwrap();
    assert!(!again.created && !again.peers_changed, "{again:?}");
    let st = c.gateway_status().unwrap().expect("a gateway");
    assert_eq!(st.device.name, name);
    assert_eq!(st.own_block.as_deref(), Some("100.96.16.0/20"));
    assert_eq!(st.peers.len(), 2);
    assert!(st.cnf_netns.ends_with(&cnf), "{st:?}");

    // kill -9 and SIGTERM of the daemon: the device, key, peers and route are back before
    // the node API answers (no controller involved).
    d.kill9();
    d.spawn().unwrap();
    check_device("after kill -9");
    let r = c.set_gateway(req.clone()).unwrap();
    assert!(!r.created && !r.peers_changed, "restored as desired: {r:?}");
    d.stop();
    d.spawn().unwrap();
    check_device("after SIGTERM");

    // A changed peer set is applied in place.
    let mut fewer = req.clone();
    fewer.peers.pop();
    let r = c.set_gateway(fewer).unwrap();
    assert!(!r.created && r.peers_changed, "{r:?}");
    assert!(!wg(&name, "peers").contains(&direct.to_base64()));
    let routes = ip_in(&cnf, &["route", "show"]).unwrap();
    assert!(!routes.contains("100.96.32.0/20"), "{routes}");

    // The private key never crossed the node API nor reached the log.
    let replies = serde_json::to_string(&c.gateway_status().unwrap()).unwrap();
    assert!(!replies.contains(&private));
    assert!(!d.log().contains(&private), "the private key is in the log");

    // Cleared: device, route and state gone; the key stays.
    assert!(c.clear_gateway().unwrap().removed);
    assert!(ip_in(&cnf, &["-o", "link", "show", "dev", &name]).is_err_or_empty());
    let routes = ip_in(&cnf, &["route", "show"]).unwrap();
    assert!(!routes.contains("unreachable"), "{routes}");
    assert!(!d.data_dir().join("gateway.json").exists());
    assert_eq!(c.gateway_status().unwrap(), None);
    assert!(!c.clear_gateway().unwrap().removed);
    d.kill9();
    d.spawn().unwrap();
    assert_eq!(
        c.gateway_status().unwrap(),
        None,
        "nothing restored after a clear"
    );
    assert_eq!(c.gateway_key().unwrap().public_key, key);
    assert!(!listens_51820(&node.path().display().to_string()));
}

trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl<E> ErrOrEmpty for Result<String, E> {
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, |s| s.trim().is_empty())
    }
}

/// A killed daemon's userspace device leaves its UAPI socket; a failed test must not either.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

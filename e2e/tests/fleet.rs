//! The sandbox fleet of issue 3, end to end (see `fleet_e2e::fleet` for the topology): hub
//! `cc` on the simulated internet (203.0.113.0/24), members `aa` and `bb` each behind a NAT
//! router on the *same* LAN range with two nodes running real containerd + fleet-nri +
//! fleet-cni, identical primary pod CIDRs. Each test builds its own fleet. Needs root.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet_e2e::fleet::ProbeStream;
use fleet_e2e::fleet::{HUB_API_PORT, HUB_IP, LAN_PREFIX, RELAY_PORT};
use fleet_e2e::{MemberOpts, Packet, Packets, Pod, SandboxFleet, poll_until, require_root};

const MARKER: &str = "fleet-plaintext-marker-7f3a";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that what crossed the internet was only WireGuard (UDP to/from `wg_ports` on the
/// allowed public addresses), the hub API's TLS, and ARP: no ICMP, no other TCP, no pod, LAN
/// or fleet address, and not the plaintext marker.
fn assert_only_wireguard(packets: &Packets, public: &[&str]) {
    assert!(!packets.packets.is_empty(), "nothing captured");
    for p in &packets.packets {
        if p.is_arp() {
            continue;
        }
        assert_eq!(
            p.family, "IP",
            "non-IPv4 packet on the internet: {}",
            p.line
        );
        for end in [&p.src, &p.dst] {
            let addr = Packet::addr(end);
            assert!(
                public.contains(&addr),
                "address {addr} on the internet (only {public:?} may appear): {}",
                p.line
            );
        }
        let hub_api = p.line.contains(&format!("{HUB_IP}.{HUB_API_PORT}"));
        let wg = p.is_udp()
            && (Packet::port(&p.src) == Some(RELAY_PORT)
                || Packet::port(&p.dst) == Some(RELAY_PORT));
        assert!(
            wg || (hub_api && p.line.contains(": Flags")),
            "neither WireGuard nor the hub API's TLS: {}",
            p.line
        );
    }
    for plain in ["ICMP", "100.9", "100.10", "10.244.", LAN_PREFIX] {
        assert!(
            !packets.text.contains(plain),
            "{plain} visible on the internet:\n{}",
            packets.text
        );
    }
    assert!(
        !packets.raw_contains(MARKER.as_bytes()),
        "the plaintext marker crossed the internet"
    );
    // Every UDP datagram is a well-formed WireGuard message (type 1-4, reserved zero, the
    // message type's size).
    let udp = packets.udp_datagrams();
    assert!(!udp.is_empty(), "no UDP on the internet");
    for d in &udp {
        assert!(d.is_wireguard(), "not a WireGuard message: {d:?}");
    }
}

/// Pods on non-gateway nodes: `server` in aa, `client` in bb; waits for the first ping.
fn pods(fleet: &SandboxFleet) -> (Pod, Pod) {
    let server = fleet.run_pod("aa", 1, "server").unwrap();
    let client = fleet.run_pod("bb", 1, "client").unwrap();
    for p in [&server, &client] {
        assert!(p.primary_ip.starts_with("10.244.1."), "{p:?}");
        assert!(p.fleet_ip.starts_with("100."), "{p:?}");
    }
    assert_ne!(server.fleet_ip, client.fleet_ip);
    let t0 = Instant::now();
    let took = fleet
        .time_until_ping(&client, &server, t0, Duration::from_secs(45))
        .unwrap();
    println!("first cross-cluster ping after {took:?}");
    (server, client)
}

/// TCP both ways (busybox httpd + wget, and nc upload), UDP (socat echo in the pods' netns),
/// ICMP.
/// One nc upload from `client` to `server`: listen, send a marker, read it back.
fn nc_upload(fleet: &SandboxFleet, server: &Pod, client: &Pod, attempt: u32) -> Result<(), String> {
    let marker = format!("up-{MARKER}-{attempt}");
    fleet
        .exec(
            server,
            &[
                "sh",
                "-c",
                "rm -f /tmp/up; nc -l -p 5000 > /tmp/up 2>/dev/null &",
            ],
        )
        .map_err(|e| e.to_string())?;
    poll_until("nc to listen", Duration::from_secs(5), || {
        fleet
            .exec(server, &["netstat", "-ltn"])
            .ok()
            .filter(|s| s.contains(":5000 "))
    })
    .map_err(|e| e.to_string())?;
    let upload = format!("echo {marker} | nc -w 3 {} 5000", server.fleet_ip);
    poll_until("nc upload", Duration::from_secs(10), || {
        fleet.exec_ok(client, &["sh", "-c", &upload]).then_some(())
    })
    .map_err(|e| e.to_string())?;
    poll_until("the upload to land", Duration::from_secs(5), || {
        fleet
            .exec(server, &["cat", "/tmp/up"])
            .ok()
            .filter(|s| s.trim() == marker)
    })
    .map(|_| ())
    .map_err(|e| {
        format!(
            "{e}: {:?}",
            fleet.exec(server, &["sh", "-c", "cat /tmp/up; ps"])
        )
    })
}

pub(crate) fn exchange(fleet: &SandboxFleet, server: &Pod, client: &Pod) {
    assert!(
        fleet.ping(client, &server.fleet_ip, 2),
        "ICMP bb -> aa\n{}",
        fleet.logs()
    );
    assert!(fleet.ping(server, &client.fleet_ip, 2), "ICMP aa -> bb");
    // TCP: an HTTP exchange...
    fleet
        .exec(
            server,
            &[
                "sh",
                "-c",
                &format!(
                    "mkdir -p /www && echo {MARKER} > /www/index.html && \
                     (pidof httpd || httpd -p 8080 -h /www)"
                ),
            ],
        )
        .unwrap();
    let url = format!("http://{}:8080/", server.fleet_ip);
    let got = fleet
        .exec(client, &["timeout", "5", "wget", "-q", "-O", "-", &url])
        .unwrap();
    assert_eq!(got.trim(), MARKER);
    // ...and a raw upload with nc. busybox's one-shot `nc -l` is fragile on a loaded machine (a
    // connection that the client's -w timer gives up on still consumes the listener and leaves
    // an empty file), so a try whose upload did not land re-arms the listener; every try is
    // reported, and three failed tries fail the test.
    let mut tries = Vec::new();
    for attempt in 1..=3 {
        match nc_upload(fleet, server, client, attempt) {
            Ok(()) => break,
            Err(e) => {
                eprintln!("nc upload try {attempt} failed: {e}");
                tries.push(e);
            }
        }
    }
    assert!(
        tries.len() < 3,
        "no nc upload landed in 3 tries: {tries:?}\n{}",
        fleet.logs()
    );
    // UDP: busybox's nc has no UDP mode; socat runs in the pods' network namespaces.
    let mut echo = fleet
        .pod_command(server, "socat")
        .args(["-T", "5", "UDP-LISTEN:5001", "PIPE"])
        .spawn()
        .unwrap();
    let reply = poll_until("a UDP echo", Duration::from_secs(10), || {
        let out = fleet
            .pod_command(client, "sh")
            .args([
                "-c",
                &format!(
                    "echo udp-{MARKER} | timeout 3 socat -t 2 - UDP:{}:5001",
                    server.fleet_ip
                ),
            ])
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    });
    let _ = echo.kill();
    let _ = echo.wait();
    assert_eq!(reply.unwrap(), format!("udp-{MARKER}"));
}

/// Without controllers: the topology alone. Members reach the hub API only through their
/// NAT (the internet sees the router's address, never the LAN's), the internet has no route
/// into any LAN, and both members use the same LAN range.
#[test]
fn members_reach_the_hub_only_through_their_nat() {
    require_root("members_reach_the_hub_only_through_their_nat");
    let fleet = SandboxFleet::builder()
        .member("aa", MemberOpts::nat(2))
        .member("bb", MemberOpts::nat(1))
        .relay(false)
        .start()
        .unwrap();
    let aa = fleet.member("aa");
    let bb = fleet.member("bb");
    assert_eq!(aa.nodes[1].node.underlay_ip, format!("{LAN_PREFIX}.12"));
    assert_eq!(bb.nodes[0].node.underlay_ip, format!("{LAN_PREFIX}.11"));
    // No plan until a controller speaks.
    assert!(!aa.nodes[0].ready());

    let capture = fleet.internet.capture(Duration::from_secs(60)).unwrap();
    let hub_bin = fleet_e2e::workspace_bin("fleet-hub");
    for (m, node) in [(aa, 1), (bb, 0)] {
        let out = m.nodes[node]
            .node
            .netns
            .command(hub_bin.to_str().unwrap())
            .arg("--data-dir")
            .arg(fleet.hub.data_dir())
            .args(["--hub", &fleet.hub.endpoint(), "token", "list"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{} -> hub: {}", m.id, text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("ID"),
            "{}",
            text(&out)
        );
    }
    let join = fleet.hub.create_join_string("topology test").unwrap();
    assert!(
        join.ends_with(&fleet.hub.ca_hash().unwrap()),
        "the join string pins the CA"
    );
    let packets = capture.finish().unwrap();
    let seen: Vec<&Packet> = packets.unicast_ip().collect();
    assert!(!seen.is_empty(), "{}", packets.text);
    for p in &seen {
        assert!(p.involves(HUB_IP), "{}", p.line);
        assert!(
            p.involves("203.0.113.21") || p.involves("203.0.113.22"),
            "only the routers' NAT addresses talk to the hub: {}",
            p.line
        );
    }
    assert!(seen.iter().any(|p| p.involves("203.0.113.21")));
    assert!(seen.iter().any(|p| p.involves("203.0.113.22")));
    assert!(!packets.text.contains(LAN_PREFIX), "{}", packets.text);

    // Nothing on the internet routes into a LAN; the hub cannot open anything to a member.
    let hub_ns = &fleet.hub.replicas[0].netns;
    let ping = |ip: &str| {
        hub_ns
            .command("busybox")
            .args(["ping", "-c", "1", "-W", "1", ip])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(ping("203.0.113.21"), "the router answers on the internet");
    assert!(!ping(&format!("{LAN_PREFIX}.11")), "a LAN is not routed");
    let routes = hub_ns.ip(&["-4", "route"]).unwrap();
    assert_eq!(routes.lines().count(), 1, "{routes}");
}

/// The acceptance scenario: a pod on a non-gateway node of bb talks TCP, UDP and ICMP to a
/// pod on a non-gateway node of aa through the hub's relay; the internet sees only WireGuard;
/// `fleetctl status` shows both clusters with blocks, handshakes and bytes.
#[test]
fn cross_cluster_pods_talk_through_the_relay_and_the_internet_sees_only_wireguard() {
    require_root("cross_cluster_pods_talk_through_the_relay_and_the_internet_sees_only_wireguard");
    let mut fleet = SandboxFleet::standard().unwrap();
    fleet.start_controllers(false).unwrap();
    let (server, client) = pods(&fleet);

    let capture = fleet.internet.capture(Duration::from_secs(120)).unwrap();
    exchange(&fleet, &server, &client);
    let packets = capture.finish().unwrap();
    assert_only_wireguard(&packets, &[HUB_IP, "203.0.113.21", "203.0.113.22"]);
    println!(
        "internet capture: {} packets, {} WireGuard UDP, {} hub API TLS, {} ARP",
        packets.packets.len(),
        packets.ip().filter(|p| p.is_udp()).count(),
        packets.ip().filter(|p| !p.is_udp()).count(),
        packets.packets.iter().filter(|p| p.is_arp()).count()
    );
    // Relay mode: both members' tunnels end at the hub, none goes member to member.
    let wg: Vec<&Packet> = packets.ip().filter(|p| p.is_udp()).collect();
    for m in ["203.0.113.21", "203.0.113.22"] {
        assert!(
            wg.iter().any(|p| p.involves(m) && p.involves(HUB_IP)),
            "{m}\n{}",
            packets.text
        );
    }
    assert!(
        !wg.iter()
            .any(|p| p.involves("203.0.113.21") && p.involves("203.0.113.22")),
        "{}",
        packets.text
    );

    assert_status_shows_tunnels(&fleet);

    // Any node to any node: pods on the gateway nodes too, every pair across the clusters
    // both ways.
    let aa_gw = fleet.run_pod("aa", 0, "aa-gw-pod").unwrap();
    let bb_gw = fleet.run_pod("bb", 0, "bb-gw-pod").unwrap();
    for a in [&server, &aa_gw] {
        for b in [&client, &bb_gw] {
            for (from, to) in [(a, b), (b, a)] {
                poll_until(
                    &format!("{} -> {}", from.name, to.name),
                    Duration::from_secs(10),
                    || fleet.ping(from, &to.fleet_ip, 1).then_some(()),
                )
                .unwrap();
            }
        }
    }
}

/// `fleetctl status` (text and JSON) lists both clusters with their blocks, and each
/// gateway's tunnel stats with a handshake and bytes both ways.
fn assert_status_shows_tunnels(fleet: &SandboxFleet) {
    let out = fleet.fleetctl("bb", &["status"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    println!("fleetctl status:\n{shown}");
    for id in ["aa", "bb"] {
        assert!(shown.contains(id), "{shown}");
    }
    let status = poll_until(
        "gateway records with handshakes and bytes",
        Duration::from_secs(20),
        || {
            let v = fleet.status_json("bb").ok()?;
            let s = v.to_string();
            (s.contains("\"last_handshake\":1") && tunnels_have_bytes(&v)).then_some(v)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", fleet.status_json("bb").unwrap()));
    let s = status.to_string();
    for id in ["\"aa\"", "\"bb\""] {
        assert!(s.contains(id), "{s}");
    }
    assert!(s.contains("100."), "blocks in {s}");
}

/// Whether some peer entry anywhere in the JSON has rx_bytes > 0 and tx_bytes > 0.
fn tunnels_have_bytes(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(map) => {
            let n = |k: &str| map.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            (n("rx_bytes") > 0 && n("tx_bytes") > 0) || map.values().any(tunnels_have_bytes)
        }
        serde_json::Value::Array(items) => items.iter().any(tunnels_have_bytes),
        _ => false,
    }
}

/// `cluster id -> block` from `fleetctl status --json` (any object with a string `block` and
/// an `id`/`cluster` naming it).
fn cluster_blocks(v: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    fn walk(v: &serde_json::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                let name = map
                    .get("id")
                    .or_else(|| map.get("cluster"))
                    .and_then(|x| x.as_str());
                if let (Some(name), Some(block)) = (name, map.get("block").and_then(|b| b.as_str()))
                {
                    let prev = out.insert(name.to_string(), block.to_string());
                    assert!(
                        prev.is_none() || prev.as_deref() == Some(block),
                        "cluster {name} listed with two blocks: {v}"
                    );
                }
                map.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(v, &mut out);
    out
}

/// Pings `to` from `from` (1 s timeout each, 250 ms apart) for `span`; returns
/// `(lost, sent)`.
fn ping_losses(fleet: &SandboxFleet, from: &Pod, to: &Pod, span: Duration) -> (usize, usize) {
    let end = Instant::now() + span;
    let (mut lost, mut sent) = (0, 0);
    while Instant::now() < end {
        sent += 1;
        if !fleet.ping(from, &to.fleet_ip, 1) {
            lost += 1;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    (lost, sent)
}

/// A running fleet with pods talking, and the blocks `fleetctl status` shows.
fn talking_fleet(standby: bool) -> (SandboxFleet, Pod, Pod, BTreeMap<String, String>) {
    let mut fleet = SandboxFleet::standard().unwrap();
    fleet.start_controllers(standby).unwrap();
    let (server, client) = pods(&fleet);
    let blocks = poll_until(
        "both blocks in fleetctl status",
        Duration::from_secs(20),
        || {
            let b = cluster_blocks(&fleet.status_json("bb").ok()?);
            (b.len() == 2).then_some(b)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", fleet.status_json("bb")));
    assert_ne!(blocks["aa"], blocks["bb"]);
    (fleet, server, client, blocks)
}

/// kill -9 of aa's active controller (the tunnel lives in the gateway node's fleet-nri and
/// does not notice): the standby on the other node takes the lease, cross-cluster traffic
/// flows within 5 s (at once, in fact); the killed one comes back as the standby.
#[test]
fn fault_controller_kill9_standby_resumes_within_5s() {
    require_root("fault_controller_kill9_standby_resumes_within_5s");
    let (mut fleet, server, client, blocks) = talking_fleet(true);
    let active = fleet
        .member("aa")
        .active_controller()
        .expect("an active controller in aa");
    let t0 = Instant::now();
    fleet.member_mut("aa").controllers[active].kill9();
    let took = fleet
        .time_until_ping(&client, &server, t0, Duration::from_secs(30))
        .unwrap();
    println!("RECOVERY controller kill -9 -> cross-cluster ping again after {took:?}");
    let now_active = poll_until(
        "aa's standby to hold the gateway",
        Duration::from_secs(10),
        || fleet.member("aa").active_controller(),
    )
    .unwrap();
    assert_ne!(now_active, active, "the killed controller cannot be active");
    assert!(
        took <= Duration::from_secs(5),
        "recovery took {took:?} (> 5 s)"
    );
    exchange(&fleet, &server, &client);
    // The killed one comes back as the standby; nothing moves.
    fleet.member_mut("aa").controllers[active]
        .restart()
        .unwrap();
    let (lost, sent) = ping_losses(&fleet, &client, &server, Duration::from_secs(3));
    assert_eq!(lost, 0, "{lost} of {sent} lost after the standby came back");
    assert_eq!(fleet.member("aa").active_controller(), Some(now_active));
    let after = cluster_blocks(&fleet.status_json("aa").unwrap());
    assert_eq!(after, blocks, "the block survives the fail-over");
}

/// The hub process killed: existing cross-cluster traffic keeps flowing; restarted, members
/// resync with the same blocks and no duplicate allocation.
#[test]
fn fault_hub_killed_traffic_flows_and_restart_resyncs_without_duplicates() {
    require_root("fault_hub_killed_traffic_flows_and_restart_resyncs_without_duplicates");
    let (mut fleet, server, client, blocks) = talking_fleet(false);
    let nodes_before = node_subnets(&fleet.status_json("aa").unwrap());
    assert_eq!(nodes_before.len(), 4, "{nodes_before:?}");
    fleet.hub.kill9();
    let (lost, sent) = ping_losses(&fleet, &client, &server, Duration::from_secs(4));
    println!("RECOVERY hub killed -> {lost} of {sent} pings lost");
    assert_eq!(
        lost, 0,
        "relayed traffic stopped with the hub process down ({lost} of {sent} pings lost)"
    );
    exchange(&fleet, &server, &client);

    let t0 = Instant::now();
    fleet.hub.spawn().unwrap();
    let after = poll_until(
        "fleetctl status after the hub restart",
        Duration::from_secs(30),
        || {
            let b = cluster_blocks(&fleet.status_json("aa").ok()?);
            (b.len() == 2).then_some(b)
        },
    )
    .unwrap();
    assert_eq!(after, blocks, "blocks changed across the hub restart");
    fleet
        .time_until_ping(&client, &server, t0, Duration::from_secs(30))
        .unwrap();
    let clusters = fleet.hub.cli(&["clusters"]).unwrap();
    println!("clusters after the hub restart:\n{}", text(&clusters));
    let rows: Vec<&str> = std::str::from_utf8(&clusters.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("aa ") || l.starts_with("bb "))
        .collect();
    assert_eq!(rows.len(), 2, "one entry per member: {rows:?}");
    let nodes_after = node_subnets(&fleet.status_json("aa").unwrap());
    assert_eq!(nodes_after.len(), 4, "{nodes_after:?}");
    assert_eq!(nodes_after, nodes_before, "node subnets moved");
    exchange(&fleet, &server, &client);
}

/// Issue 12 item 1: the relay process killed (`kill -9`; `fleet-hub serve` starts it again,
/// a new instance that knows no member's address nor any session). aa and bb are idle, and
/// bb then only receives (aa pings it; bb sends nothing until a request reaches it): traffic
/// reaches bb and comes back within 5 s, then flows from bb too. Before the relay carried an
/// instance that the gateways react to, bb was cut off until its next rekey (58.7 s after
/// 60 s idle, bound 120 s).
#[test]
fn fault_relay_restarted_an_idle_receiving_member_is_reached_within_5s() {
    require_root("fault_relay_restarted_an_idle_receiving_member_is_reached_within_5s");
    let (fleet, server, client, _) = talking_fleet(false);
    let relay_pid_file = fleet
        .hub
        .replicas
        .last()
        .unwrap()
        .data_dir()
        .join("relay.pid");
    let relay_pid = || -> Option<i32> {
        std::fs::read_to_string(&relay_pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let before = relay_pid().expect("relay.pid");
    // Idle: both tunnels through the relay have sessions, nobody sends.
    std::thread::sleep(Duration::from_secs(5));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    let took = fleet
        .time_until_ping(&server, &client, t0, Duration::from_secs(60))
        .unwrap();
    let restarted = relay_pid().is_some_and(|p| p != before);
    println!(
        "RECOVERY relay kill -9 -> restarted by the hub -> aa reaches idle, receive-only bb \
         after {took:?}"
    );
    assert!(restarted, "the hub did not restart the relay");
    assert!(
        took <= Duration::from_secs(5),
        "recovery took {took:?} (> 5 s)"
    );
    let back = fleet
        .time_until_ping(&client, &server, Instant::now(), Duration::from_secs(10))
        .unwrap();
    println!("... and bb reaches aa {back:?} later");
    exchange(&fleet, &server, &client);
}

/// The path (`direct` / `relay`) and since-when the gateway record in `fleetctl status --json`
/// (as `member` sees it) gives for the peer with key `peer`.
fn peer_path(fleet: &SandboxFleet, member: &str, peer: &str) -> Option<(String, Option<u64>)> {
    fn walk(v: &serde_json::Value, peer: &str) -> Option<(String, Option<u64>)> {
        match v {
            serde_json::Value::Object(map) => {
                if map.get("public_key").and_then(|k| k.as_str()) == Some(peer)
                    && let Some(path) = map.get("path").and_then(|p| p.as_str())
                {
                    return Some((
                        path.to_string(),
                        map.get("path_since").and_then(|s| s.as_u64()),
                    ));
                }
                map.values().find_map(|x| walk(x, peer))
            }
            serde_json::Value::Array(items) => items.iter().find_map(|x| walk(x, peer)),
            _ => None,
        }
    }
    walk(&fleet.status_json(member).ok()?, peer)
}

/// Applies (or with `None` removes) an nftables table `fe2e_block` in `member`'s router.
fn router_block(fleet: &SandboxFleet, member: &str, rule: Option<&str>) {
    use std::io::Write;
    let ruleset = match rule {
        Some(r) => format!(
            "table ip fe2e_block {{\n chain pre {{\n type filter hook prerouting priority -150;\n {r}\n }}\n}}\n"
        ),
        None => "delete table ip fe2e_block\n".to_string(),
    };
    let mut child = fleet
        .member(member)
        .router
        .netns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ruleset.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft {ruleset}");
}

/// Issue 12 item 2: aa public, bb behind NAT, talking directly. aa's router loses its port
/// forward (only UDP from the hub passes; aa's own packets still reach bb, so the break is
/// one-way): traffic moves to the relay within 5 s and both gateways' records say `relay`;
/// with the forward back, bb's next probe returns them to the direct path. Before: no packet
/// either way for 60-90 s, no fallback, status unchanged.
#[test]
fn fault_direct_path_broken_falls_back_to_the_relay_within_5s_and_returns() {
    require_root("fault_direct_path_broken_falls_back_to_the_relay_within_5s_and_returns");
    let mut fleet = SandboxFleet::builder()
        .member("aa", MemberOpts::public(2))
        .member("bb", MemberOpts::nat(2))
        .start()
        .unwrap();
    fleet.start_controllers(false).unwrap();
    let (server, client) = pods(&fleet);
    let aa_key = fleet.member("aa").controllers[0]
        .wg_show("public-key")
        .unwrap();
    let bb_key = fleet.member("bb").controllers[0]
        .wg_show("public-key")
        .unwrap();
    let direct = |m: &str, k: &str, want: &str| {
        poll_until(
            &format!("{m}'s record: the peer's path {want}"),
            Duration::from_secs(30),
            || peer_path(&fleet, m, k).filter(|(p, _)| p == want),
        )
        .unwrap_or_else(|e| panic!("{e}: {:?}", fleet.status_json(m)))
    };
    direct("bb", &aa_key, "direct");
    direct("aa", &bb_key, "direct");

    router_block(
        &fleet,
        "aa",
        Some(&format!(
            "iifname \"wan0\" udp dport {RELAY_PORT} ip saddr != {HUB_IP} drop"
        )),
    );
    let t0 = Instant::now();
    let took = fleet
        .time_until_ping(&client, &server, t0, Duration::from_secs(60))
        .unwrap();
    println!(
        "RECOVERY direct path broken (aa's port forward gone) -> ping through the relay after {took:?}"
    );
    let (path, since) = direct("bb", &aa_key, "relay");
    println!("bb's record: aa via {path} since {since:?}");
    assert!(since.is_some());
    direct("aa", &bb_key, "relay");
    exchange(&fleet, &server, &client);
    assert!(
        took <= Duration::from_secs(5),
        "fallback took {took:?} (> 5 s)"
    );

    router_block(&fleet, "aa", None);
    let t1 = Instant::now();
    direct("bb", &aa_key, "direct");
    direct("aa", &bb_key, "direct");
    println!(
        "the direct path works again -> records say direct after {:?}",
        t1.elapsed()
    );
    // And the traffic takes it: tunnel packets between the two members' public addresses.
    let capture = fleet.internet.capture(Duration::from_secs(60)).unwrap();
    exchange(&fleet, &server, &client);
    let packets = capture.finish().unwrap();
    assert!(
        packets
            .ip()
            .any(|p| p.is_udp() && p.involves("203.0.113.21") && p.involves("203.0.113.22")),
        "no direct tunnel packet:\n{}",
        packets.text
    );
}

/// `node name -> subnet` from `fleetctl status --json` (objects with `name` and `subnet`).
fn node_subnets(v: &serde_json::Value) -> BTreeMap<String, String> {
    fn walk(v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let (Some(n), Some(s)) = (
                    map.get("name").and_then(|x| x.as_str()),
                    map.get("subnet").and_then(|x| x.as_str()),
                ) {
                    out.insert(n.to_string(), s.to_string());
                }
                map.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(v, &mut out);
    out
}

/// bb restarted (its controller stopped with SIGTERM: exit 0; the WireGuard device stays up
/// on the gateway node and traffic keeps flowing; then started again): same block, same
/// public key, traffic.
#[test]
fn fault_member_restart_keeps_block_and_key() {
    require_root("fault_member_restart_keeps_block_and_key");
    let (mut fleet, server, client, blocks) = talking_fleet(false);
    let key_before = fleet.member("bb").controllers[0]
        .wg_show("public-key")
        .unwrap();
    let status = fleet.member_mut("bb").controllers[0].stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "a clean stop exits 0: {status:?}\n{}",
        fleet.member("bb").controllers[0].log()
    );
    // Changed with issue 7: the device is the gateway node's, a controller stop leaves it.
    assert!(
        fleet.member("bb").gateway_device_up(),
        "a clean stop leaves the WireGuard device to the gateway node"
    );
    assert!(fleet.member("bb").active_controller().is_none());
    assert!(
        fleet.ping(&client, &server.fleet_ip, 2),
        "traffic flows with no controller running"
    );
    let t0 = Instant::now();
    fleet.member_mut("bb").controllers[0].restart().unwrap();
    let took = fleet
        .time_until_ping(&client, &server, t0, Duration::from_secs(30))
        .unwrap();
    println!("RECOVERY member bb restarted -> cross-cluster ping after {took:?}");
    let key_after = fleet.member("bb").controllers[0]
        .wg_show("public-key")
        .unwrap();
    assert_eq!(key_after, key_before, "a restarted member keeps its key");
    let b = cluster_blocks(&fleet.status_json("bb").unwrap());
    assert_eq!(b, blocks, "a restarted member keeps its block");
    exchange(&fleet, &server, &client);

    // kill -9 of aa's only controller, started again at once (as a supervisor would): it
    // takes its own lease back, same key, traffic within 5 s.
    let key_before = fleet.member("aa").controllers[0]
        .wg_show("public-key")
        .unwrap();
    let t0 = Instant::now();
    fleet.member_mut("aa").controllers[0].kill9();
    fleet.member_mut("aa").controllers[0].restart().unwrap();
    let took = fleet
        .time_until_ping(&client, &server, t0, Duration::from_secs(30))
        .unwrap();
    println!("RECOVERY controller kill -9 + restart (no standby) -> ping after {took:?}");
    assert!(
        took <= Duration::from_secs(5),
        "recovery took {took:?} (> 5 s)"
    );
    let key_after = fleet.member("aa").controllers[0]
        .wg_show("public-key")
        .unwrap();
    assert_eq!(key_after, key_before);
    assert_eq!(cluster_blocks(&fleet.status_json("aa").unwrap()), blocks);
}

/// aa removed at the hub (`fleet-hub cluster remove aa`): its routes disappear from bb's
/// nodes, its peer from bb's gateway and from the relay's members, and traffic stops.
#[test]
fn fault_member_removed_its_routes_and_peers_disappear() {
    require_root("fault_member_removed_its_routes_and_peers_disappear");
    let (fleet, server, client, blocks) = talking_fleet(false);
    let aa_block = blocks["aa"].clone();
    let aa_key = fleet.member("aa").controllers[0]
        .wg_show("public-key")
        .unwrap();
    let bb = fleet.member("bb");
    // The non-gateway node routes aa's block over the overlay to the gateway node; bb's
    // gateway has aa as a peer (end to end, through the relay) with its block; the relay
    // forwards for aa.
    assert!(bb.cnf_routes(1).contains(&aa_block), "{}", bb.cnf_routes(1));
    let gw = bb.controllers[0].wg_show("allowed-ips").unwrap();
    assert!(gw.contains(&aa_key) && gw.contains(&aa_block), "{gw}");
    let members = fleet.hub.relay_members().unwrap();
    assert!(members.contains(&aa_key), "{members:?}");
    let out = fleet.hub.remove_cluster("aa").unwrap();
    println!("cluster remove aa: {out}");
    poll_until(
        "aa's routes and peers gone from bb and the relay",
        Duration::from_secs(15),
        || {
            let bb = fleet.member("bb");
            let routes_gone = (0..bb.nodes.len()).all(|n| !bb.cnf_routes(n).contains(&aa_block));
            let members = fleet.hub.relay_members().ok()?;
            let gw = bb.controllers[0].wg_show("allowed-ips").ok()?;
            (routes_gone && !members.contains(&aa_key) && !gw.contains(&aa_key)).then_some(())
        },
    )
    .unwrap_or_else(|e| {
        let bb = fleet.member("bb");
        panic!(
            "{e}\n{}\n{}\nrelay members: {:?}",
            bb.cnf_routes(0),
            bb.cnf_routes(1),
            fleet.hub.relay_members()
        )
    });
    assert!(!fleet.ping(&client, &server.fleet_ip, 1), "aa is gone");
    let status = fleet.status_json("bb").unwrap();
    assert!(!cluster_blocks(&status).contains_key("aa"), "{status}");
}

/// Direct mode: both members declare a public endpoint (their router forwards UDP 51820 to
/// the gateway node): pod traffic goes member to member, not through the hub's address;
/// with the hub killed it keeps flowing.
#[test]
fn direct_tunnels_between_public_members_bypass_the_hub() {
    require_root("direct_tunnels_between_public_members_bypass_the_hub");
    let mut fleet = SandboxFleet::builder()
        .member("aa", MemberOpts::public(2))
        .member("bb", MemberOpts::public(2))
        .start()
        .unwrap();
    fleet.start_controllers(false).unwrap();
    let (server, client) = pods(&fleet);
    assert_download_goes_direct(&fleet, &server, &client);

    fleet.hub.kill9();
    let (lost, sent) = ping_losses(&fleet, &client, &server, Duration::from_secs(3));
    assert_eq!(
        lost, 0,
        "direct tunnels do not need the hub ({lost} of {sent} lost)"
    );
    assert_status_ok_after_hub_restart(&mut fleet);

    // bb's gateway peers with aa directly (aa's key, aa's block, aa's public endpoint); aa
    // removed, that peer goes.
    let aa_key = fleet.member("aa").controllers[0]
        .wg_show("public-key")
        .unwrap();
    let peers = fleet.member("bb").controllers[0]
        .wg_show("endpoints")
        .unwrap();
    assert!(
        peers.contains(&aa_key) && peers.contains("203.0.113.21:51820"),
        "{peers}"
    );
    fleet.hub.remove_cluster("aa").unwrap();
    poll_until(
        "aa's direct peer gone from bb",
        Duration::from_secs(15),
        || {
            let gw = fleet.member("bb").controllers[0].wg_show("peers").ok()?;
            (!gw.contains(&aa_key)).then_some(())
        },
    )
    .unwrap();
    assert!(!fleet.ping(&client, &server.fleet_ip, 1), "aa is gone");
}

fn assert_status_ok_after_hub_restart(fleet: &mut SandboxFleet) {
    fleet.hub.spawn().unwrap();
    poll_until(
        "fleetctl status after the hub restart",
        Duration::from_secs(30),
        || (cluster_blocks(&fleet.status_json("aa").ok()?).len() == 2).then_some(()),
    )
    .unwrap();
}

/// Two hub replicas on a real etcd (etcd on the hub's private network; the relay on the
/// second replica). The first replica — the one members try first — is killed: members keep
/// working against the other: traffic flows, `fleetctl status` answers with the same blocks,
/// and a controller fail-over (kill -9 of aa's active controller) completes through the
/// survivor.
#[test]
fn hub_replicas_on_etcd_one_killed_members_keep_working() {
    require_root("hub_replicas_on_etcd_one_killed_members_keep_working");
    let mut fleet = SandboxFleet::builder()
        .member("aa", MemberOpts::nat(2))
        .member("bb", MemberOpts::nat(2))
        .hub_replicas_on_etcd(2)
        .start()
        .unwrap();
    fleet.start_controllers(true).unwrap();
    let (server, client) = pods(&fleet);
    let blocks = poll_until("both blocks", Duration::from_secs(20), || {
        let b = cluster_blocks(&fleet.status_json("bb").ok()?);
        (b.len() == 2).then_some(b)
    })
    .unwrap();

    fleet.hub.replicas[0].kill9();
    let (lost, sent) = ping_losses(&fleet, &client, &server, Duration::from_secs(2));
    assert_eq!(lost, 0, "{lost} of {sent} lost with one replica down");
    let after = cluster_blocks(&fleet.status_json("aa").unwrap());
    assert_eq!(after, blocks);

    let active = fleet.member("aa").active_controller().unwrap();
    let t0 = Instant::now();
    fleet.member_mut("aa").controllers[active].kill9();
    let took = fleet
        .time_until_ping(&client, &server, t0, Duration::from_secs(30))
        .unwrap();
    println!("RECOVERY controller kill -9 with one hub replica down -> ping after {took:?}");
    let now_active = poll_until("aa's standby active", Duration::from_secs(10), || {
        fleet.member("aa").active_controller()
    })
    .unwrap();
    assert_ne!(now_active, active);
    assert!(
        took <= Duration::from_secs(5),
        "recovery took {took:?} (> 5 s)"
    );
    exchange(&fleet, &server, &client);
    assert_eq!(cluster_blocks(&fleet.status_json("bb").unwrap()), blocks);
}

/// A 512 KiB download from `server` (aa) to `client` (bb), plus the exchange, under a capture
/// of the internet: the WireGuard bytes go between aa's and bb's routers, (almost) none
/// through the hub's address.
fn assert_download_goes_direct(fleet: &SandboxFleet, server: &Pod, client: &Pod) {
    fleet
        .exec(
            server,
            &[
                "sh",
                "-c",
                "mkdir -p /www && dd if=/dev/zero of=/www/blob bs=1024 count=512 2>/dev/null \
                 && httpd -p 8080 -h /www",
            ],
        )
        .unwrap();
    let capture = fleet.internet.capture(Duration::from_secs(120)).unwrap();
    let url = format!("http://{}:8080/blob", server.fleet_ip);
    let got = fleet
        .exec(
            client,
            &[
                "sh",
                "-c",
                &format!("timeout 10 wget -q -O - {url} | wc -c"),
            ],
        )
        .unwrap();
    assert_eq!(got.trim(), "524288");
    exchange(fleet, server, client);
    let packets = capture.finish().unwrap();
    assert_only_wireguard(&packets, &[HUB_IP, "203.0.113.21", "203.0.113.22"]);
    let bytes = |pred: &dyn Fn(&Packet) -> bool| -> usize {
        packets
            .ip()
            .filter(|p| p.is_udp() && pred(p))
            .filter_map(|p| {
                p.line
                    .rsplit("length ")
                    .next()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .sum()
    };
    let direct = bytes(&|p| p.involves("203.0.113.21") && p.involves("203.0.113.22"));
    let via_hub = bytes(&|p| p.involves(HUB_IP));
    println!("direct: {direct} UDP bytes member to member, {via_hub} to/from the hub");
    // The download itself is checked above (524288 bytes arrived). tcpdump on a loaded
    // machine may miss some packets, so the capture need only show most of it going direct;
    // the check against the hub below is what shows the bypass.
    assert!(
        direct > 524_288 / 2,
        "the download went member to member: {direct}"
    );
    assert!(
        via_hub < direct / 20,
        "little goes via the hub: {via_hub} vs {direct}"
    );
}

/// Mixed: aa public (port forward + `--endpoint`), bb behind plain NAT. bb dials aa directly
/// (its keepalives hold its NAT mapping open), so their traffic bypasses the hub too.
#[test]
fn a_natted_member_tunnels_directly_to_a_public_one() {
    require_root("a_natted_member_tunnels_directly_to_a_public_one");
    let mut fleet = SandboxFleet::builder()
        .member("aa", MemberOpts::public(2))
        .member("bb", MemberOpts::nat(2))
        .start()
        .unwrap();
    fleet.start_controllers(false).unwrap();
    let (server, client) = pods(&fleet);
    assert_download_goes_direct(&fleet, &server, &client);
}

/// How long after a restart the stream is watched before the stall is read: long enough for a
/// late re-handshake (WireGuard's 5 s rekey timeout) to show up in it.
const SETTLE: Duration = Duration::from_secs(6);

/// Waits until `member`'s controller `k` holds the lease again (its `n`-th activation).
fn await_active(fleet: &SandboxFleet, member: &str, k: usize, n: usize) {
    poll_until(
        &format!("{member}'s controller {k} active again"),
        Duration::from_secs(30),
        || {
            let c = &fleet.member(member).controllers[k];
            (c.activations() >= n && c.holds_lease()).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
}

/// The stall `case` caused in `stream` (the longest gap between echoes since `t0`, after the
/// stream has flowed on for [`SETTLE`]): printed as `stall <case> <ms>`.
fn stall(stream: &ProbeStream, case: &str, t0: Instant) -> Duration {
    stream
        .await_flowing(
            (SETTLE.as_millis() / ProbeStream::INTERVAL.as_millis()) as usize,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let gap = stream.longest_gap_since(t0);
    println!("stall {case} {}", gap.as_millis());
    gap
}

/// Issue 7's acceptance, the controllers: while a TCP stream crosses from bb to aa, the active
/// controllers of both clusters — running on non-gateway nodes, the gateway device is the
/// gateway node's — are stopped (SIGTERM) and started again, then kill -9'd with no standby
/// and started again. The stream completes without a reset; the stalls are printed (the
/// data plane does not depend on a controller: they are the probe interval).
#[test]
fn controller_restarts_do_not_interrupt_a_cross_cluster_stream() {
    require_root("controller_restarts_do_not_interrupt_a_cross_cluster_stream");
    let mut fleet = SandboxFleet::standard().unwrap();
    fleet.start_controllers_on(1, false).unwrap();
    let (server, client) = pods(&fleet);
    for m in ["aa", "bb"] {
        assert_eq!(fleet.member(m).active_controller(), Some(0), "{m}");
    }
    let stream = ProbeStream::start(&client, &server, 6100).unwrap();
    stream.await_flowing(20, Duration::from_secs(20)).unwrap();
    println!(
        "stall baseline {}",
        stream
            .longest_gap_since(Instant::now() - Duration::from_secs(1))
            .as_millis()
    );

    let t0 = Instant::now();
    for m in ["aa", "bb"] {
        let c = &mut fleet.member_mut(m).controllers[0];
        let status = c.stop();
        assert!(status.is_some_and(|s| s.success()), "{m}: {status:?}");
    }
    for m in ["aa", "bb"] {
        assert!(fleet.member(m).gateway_device_up(), "{m}: the device stays");
        fleet.member_mut(m).controllers[0].restart().unwrap();
    }
    for m in ["aa", "bb"] {
        await_active(&fleet, m, 0, 2);
    }
    let sigterm = stall(&stream, "controller-sigterm-restart", t0);

    let t0 = Instant::now();
    for m in ["aa", "bb"] {
        fleet.member_mut(m).controllers[0].kill9();
    }
    for m in ["aa", "bb"] {
        fleet.member_mut(m).controllers[0].restart().unwrap();
    }
    for m in ["aa", "bb"] {
        await_active(&fleet, m, 0, 3);
    }
    let kill9 = stall(&stream, "controller-kill9-restart", t0);

    let (sent, back) = stream
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_eq!(back, sent, "every byte came back");
    println!("stream: {sent} bytes each way, one connection");
    for (case, gap) in [("sigterm", sigterm), ("kill -9", kill9)] {
        assert!(
            gap < Duration::from_secs(1),
            "controller {case}: a {gap:?} stall; the data plane should not notice"
        );
    }
    exchange(&fleet, &server, &client);
}

/// Issue 7's acceptance, the gateway node's daemon: while a TCP stream crosses from bb to aa,
/// the gateway nodes' fleet-nri of both clusters are stopped (SIGTERM) and started again,
/// then kill -9'd and started again. The userspace device dies with its process; the
/// restarted daemon re-creates it from its data dir (same key, same peers) before any
/// controller speaks. The stream completes without a reset; the stalls are printed.
#[test]
fn gateway_daemon_restarts_do_not_reset_a_cross_cluster_stream() {
    require_root("gateway_daemon_restarts_do_not_reset_a_cross_cluster_stream");
    let mut fleet = SandboxFleet::standard().unwrap();
    fleet.start_controllers(false).unwrap();
    let (server, client) = pods(&fleet);
    let keys: Vec<String> = ["aa", "bb"]
        .iter()
        .map(|m| {
            fleet.member(m).controllers[0]
                .wg_show("public-key")
                .unwrap()
        })
        .collect();
    let stream = ProbeStream::start(&client, &server, 6101).unwrap();
    stream.await_flowing(20, Duration::from_secs(20)).unwrap();

    let mut stalls = Vec::new();
    for (case, kill) in [
        ("fleet-nri-sigterm-restart", false),
        ("fleet-nri-kill9-restart", true),
    ] {
        let t0 = Instant::now();
        for m in ["aa", "bb"] {
            let nri = &mut fleet.member_mut(m).nodes[0].node.nri;
            if kill {
                nri.kill9();
            } else {
                nri.stop();
            }
        }
        for m in ["aa", "bb"] {
            fleet.member_mut(m).nodes[0].node.nri.spawn().unwrap();
            // Back as soon as the node API answers: restored before it serves.
            assert!(fleet.member(m).gateway_device_up(), "{m}: {case}");
        }
        stalls.push((case, stall(&stream, case, t0)));
        for (m, key) in ["aa", "bb"].iter().zip(&keys) {
            assert_eq!(
                &fleet.member(m).controllers[0]
                    .wg_show("public-key")
                    .unwrap(),
                key,
                "{m}: same key after {case}"
            );
        }
    }
    let (sent, back) = stream
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_eq!(back, sent, "every byte came back");
    println!("stream: {sent} bytes each way, one connection");
    for (case, gap) in stalls {
        assert!(gap < Duration::from_secs(10), "{case}: a {gap:?} stall");
    }
    exchange(&fleet, &server, &client);
}

//! A 1400-byte path MTU on the simulated internet must not black-hole TCP across the fleet
//! (issue 10, item 4), with and without ICMP "fragmentation needed".
//!
//! The sandbox fleet (see `fleet_e2e::fleet`) with every internet link — the bridge's ports,
//! the NAT routers' and the hub's `wan0` — at MTU 1400, while the LANs stay at 1500. Pods send
//! up to 1370-byte packets (`local.mtu`), which the gateways' WireGuard turns into 1430-byte
//! datagrams (+ IPv4 20, UDP 8, WireGuard 32): larger than the path. A router that must drop
//! them (don't-fragment) and whose ICMP is filtered makes a black hole; the gateways therefore
//! send their datagrams without DF, like kernel WireGuard (`fleet_gateway::userspace::
//! allow_fragmentation`), and the routers fragment them.
//!
//! Two cases in one fleet: first with the routers' "fragmentation needed" dropped (nftables in
//! their output hook), then with ICMP allowed again, every learnt path MTU flushed, and then
//! the path MTU to the hub learnt by both gateway nodes from that ICMP (as any packet with DF
//! from a node to the hub's address — the controller's API calls — teaches it): the
//! gateways' datagrams to the relay are then larger than their own route's MTU, so the
//! kernel refuses to send them with UDP GSO (`EMSGSIZE`), which used to drop them and stall
//! TCP (`gateway/src/udp_gso.rs`). In each case, an iperf3 transfer of 8 MiB from P3 (bb) to
//! P1 (aa) and one back (`-R`) must complete.

use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_e2e::fleet::HUB_IP;
use fleet_e2e::{Pod, SandboxFleet, TestNetns, poll_until, require_root};
use nix::libc;

const PATH_MTU: &str = "1400";
const BYTES: &str = "8M";

/// Every interface of `ns` but `lo` to `mtu`.
fn set_all_mtu(ns: &TestNetns, mtu: &str) {
    let out = ns.ip(&["-j", "link", "show"]).expect("ip link show");
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j link");
    for l in links.as_array().expect("a list of links") {
        let name = l["ifname"].as_str().expect("a link name");
        if name != "lo" {
            ns.ip(&["link", "set", name, "mtu", mtu])
                .unwrap_or_else(|e| panic!("mtu {mtu} on {name}: {e}"));
        }
    }
}

fn nft(ns: &TestNetns, args: &[&str]) {
    let out = ns.command("nft").args(args).output().expect("run nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// iperf3 from `client` to `server` (`reverse`: the server sends), `BYTES` bytes; Ok with
/// iperf3's summary, Err with its output when it did not complete within 60 s.
fn transfer(
    fleet: &SandboxFleet,
    server: &Pod,
    client: &Pod,
    reverse: bool,
) -> Result<String, String> {
    let mut srv = fleet
        .pod_command(server, "iperf3")
        .args(["-s", "-1", "-B", &server.fleet_ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 -s");
    poll_until("iperf3 -s listening", Duration::from_secs(10), || {
        let out = fleet.pod_command(server, "ss").arg("-ltn").output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains(":5201")
            .then_some(())
    })
    .expect("iperf3 -s listens");
    let mut args = vec!["60", "iperf3", "-c", &server.fleet_ip, "-n", BYTES];
    if reverse {
        args.push("-R");
    }
    let out = fleet
        .pod_command(client, "timeout")
        .args(&args)
        .output()
        .expect("run iperf3 -c");
    let _ = srv.kill();
    let _ = srv.wait();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text
            .lines()
            .filter(|l| l.contains("receiver") || l.contains("sender"))
            .collect::<Vec<_>>()
            .join("\n"))
    } else {
        Err(text)
    }
}

/// Sends one UDP datagram of `bytes` with DF set from `ns` to `target` (port 9, discard);
/// a send refused because the learnt path MTU is already smaller is fine.
fn send_df_datagram(ns: &TestNetns, target: &str, bytes: usize) {
    let file = std::fs::File::open(ns.path()).expect("open the netns");
    let target = format!("{target}:9");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        let value: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: a valid socket fd and a c_int option of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "IP_MTU_DISCOVER: {}",
            std::io::Error::last_os_error()
        );
        let _ = sock.send_to(&vec![0u8; bytes], &target);
    })
    .join()
    .expect("the DF sender thread");
}

/// `ns` learns the path MTU to the hub (1400) from the router's ICMP "fragmentation needed":
/// a DF datagram larger than the path, sent until the route shows the learnt MTU.
fn learn_path_mtu_to_hub(ns: &TestNetns) {
    poll_until(
        "the path MTU to the hub learnt",
        Duration::from_secs(10),
        || {
            send_df_datagram(ns, HUB_IP, 1450);
            let route = ns.ip(&["route", "get", HUB_IP]).ok()?;
            route.contains(&format!("mtu {PATH_MTU}")).then_some(())
        },
    )
    .expect("the gateway node learns the path MTU from the router's ICMP");
}

fn flush_path_mtus(fleet: &SandboxFleet) {
    let mut spaces: Vec<&TestNetns> = vec![&fleet.internet.netns];
    for r in &fleet.hub.replicas {
        spaces.push(&r.netns);
    }
    for m in ["aa", "bb"] {
        let m = fleet.member(m);
        spaces.push(&m.router.netns);
        spaces.push(&m.gateway().node.netns);
    }
    for ns in spaces {
        let _ = ns.ip(&["route", "flush", "cache"]);
    }
}

#[test]
fn tcp_crosses_a_1400_byte_path_with_and_without_icmp_fragmentation_needed() {
    require_root("path_mtu");
    let mut fleet = SandboxFleet::standard().expect("start the sandbox fleet");
    fleet
        .start_controllers(false)
        .expect("start the controllers");
    let p1 = fleet.run_pod("aa", 1, "p1").expect("pod p1 in aa");
    let p3 = fleet.run_pod("bb", 1, "p3").expect("pod p3 in bb");
    fleet
        .time_until_ping(&p3, &p1, Instant::now(), Duration::from_secs(60))
        .expect("P3 reaches P1 before the MTU changes");

    // The internet at 1400: the bridge's ports, and the wan0 of the routers and the hub.
    set_all_mtu(&fleet.internet.netns, PATH_MTU);
    for r in &fleet.hub.replicas {
        r.netns
            .ip(&["link", "set", "wan0", "mtu", PATH_MTU])
            .expect("hub wan0 mtu");
    }
    for m in ["aa", "bb"] {
        let router = &fleet.member(m).router.netns;
        router
            .ip(&["link", "set", "wan0", "mtu", PATH_MTU])
            .expect("router wan0 mtu");
        let lan = router.ip(&["link", "show", "lan0"]).expect("router lan0");
        assert!(lan.contains("mtu 1500"), "{m}'s LAN stays at 1500: {lan}");
    }

    // No ICMP "fragmentation needed" from the routers: a DF datagram too big for wan0 dies.
    for m in ["aa", "bb"] {
        nft(
            &fleet.member(m).router.netns,
            &[
                "add table ip fe2e_pmtu { chain output { type filter hook output priority 0; \
                 icmp type destination-unreachable icmp code frag-needed counter drop; }; }",
            ],
        );
    }
    flush_path_mtus(&fleet);
    let mut failures = Vec::new();
    for (case, reverse) in [("bb->aa, no ICMP", false), ("aa->bb, no ICMP", true)] {
        match transfer(&fleet, &p1, &p3, reverse) {
            Ok(summary) => println!("{case}: {summary}"),
            Err(out) => failures.push(format!("{case}: {out}")),
        }
    }

    // ICMP allowed again, learnt path MTUs flushed.
    for m in ["aa", "bb"] {
        nft(
            &fleet.member(m).router.netns,
            &["delete table ip fe2e_pmtu"],
        );
    }
    flush_path_mtus(&fleet);
    for (case, reverse) in [("bb->aa, with ICMP", false), ("aa->bb, with ICMP", true)] {
        match transfer(&fleet, &p1, &p3, reverse) {
            Ok(summary) => println!("{case}: {summary}"),
            Err(out) => failures.push(format!("{case}: {out}")),
        }
    }

    // The gateway nodes learn the 1400-byte path MTU to the hub (where the relay is): their
    // gateways' 1430-byte datagrams no longer fit their own route.
    for m in ["aa", "bb"] {
        learn_path_mtu_to_hub(&fleet.member(m).gateway().node.netns);
    }
    for (case, reverse) in [
        ("bb->aa, path MTU learnt", false),
        ("aa->bb, path MTU learnt", true),
    ] {
        match transfer(&fleet, &p1, &p3, reverse) {
            Ok(summary) => println!("{case}: {summary}"),
            Err(out) => failures.push(format!("{case}: {out}")),
        }
    }
    assert!(
        failures.is_empty(),
        "TCP black-holed on a 1400-byte path:\n{}",
        failures.join("\n")
    );
    // The datagrams were larger than the path: the routers fragmented them (not a path
    // that happened to fit).
    let created = snmp(&fleet.member("bb").router.netns, "Ip:", "FragCreates");
    assert!(created > 0, "bb's router fragmented nothing");
    // The hub reassembles the gateways' fragmented datagrams. UDP GSO without DF gives
    // consecutive sends overlapping IPv4 IDs (gateway/README.md): shown, not asserted.
    let hub = &fleet.hub.replicas[0].netns;
    println!(
        "hub: reassembled {} datagrams, {} reassembly failures, {} UDP checksum errors",
        snmp(hub, "Ip:", "ReasmOKs"),
        snmp(hub, "Ip:", "ReasmFails"),
        snmp(hub, "Udp:", "InCsumErrors"),
    );
}

/// One counter of `/proc/net/snmp` in `ns` (`section` such as `Ip:`, `field` its name).
fn snmp(ns: &TestNetns, section: &str, field: &str) -> u64 {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["--", "cat", "/proc/net/snmp"])
        .output()
        .expect("read /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(section)).collect();
    assert_eq!(rows.len(), 2, "{section} in /proc/net/snmp: {text}");
    rows[0]
        .split_whitespace()
        .zip(rows[1].split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {section} {field} in /proc/net/snmp: {text}"))
}

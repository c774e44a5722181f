//! ClusterSetIP VIPs against the real binary (`--no-nri`) in a node netns the test creates,
//! with real nftables and real TCP/UDP traffic between pod netns: `set_services` balances a
//! VIP over its backends, pins a client under affinity, refuses what has no backend (fast: a
//! reset or an ICMP error, not a timeout), masquerades a backend on the client's own bridge
//! (hairpin) and only then, keeps established connections through changes and restarts, keeps
//! the rules across a restart, refuses bad tables without changing anything, and follows the
//! plan. Needs root.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleet_e2e::{FleetNri, FleetNriOpts, TestNetns, require_root};
use fleet_proto::node::{
    AttachRequest, AttachmentKey, NodeClient, NodeError, PodMeta, SetPlanRequest,
    SetServicesRequest, VipPort, VipProtocol, VipService, code,
};
use nix::sched::{CloneFlags, setns};

const TABLE: &str = "fleetboard-vip";

fn plan(subnet: &str, vip_range: &str) -> SetPlanRequest {
    SetPlanRequest {
        fleet_cidr: "100.96.0.0/12".into(),
        vip_range: vip_range.into(),
        node_subnet: subnet.into(),
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

/// Runs `f` on a thread inside the netns `ns`; sockets made there stay in that netns.
fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(ns).unwrap();
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// A pod: a netns attached by the daemon (eth-fleet, routes to the fleet CIDR and VIPs).
struct Pod {
    ns: TestNetns,
    ip: Ipv4Addr,
}

fn pod(c: &NodeClient, tag: &str) -> Pod {
    let ns = TestNetns::new(tag);
    let att = c
        .attach(AttachRequest {
            key: AttachmentKey {
                container_id: ns.name().into(),
                ifname: "eth0".into(),
            },
            network: "fleet".into(),
            netns: ns.path().display().to_string(),
            pod: PodMeta::default(),
            primary: Vec::new(),
        })
        .unwrap();
    Pod {
        ns,
        ip: att.address,
    }
}

/// A TCP server in a netns: greets each connection with `<tag> <peer ip>`, then echoes each
/// line as `<tag> <line>`. A UDP server on the same port answers `<tag> <peer ip>`.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Path, addr: SocketAddrV4, tag: &str) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for udp in [false, true] {
            let file = File::open(ns).unwrap();
            let (stop, tag, ready) = (stop.clone(), tag.to_string(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
                if udp {
                    serve_udp(addr, &tag, &stop, ready)
                } else {
                    serve_tcp(addr, &tag, &stop, ready)
                }
            }));
        }
        for _ in 0..2 {
            ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        Server { stop, threads }
    }
}

fn serve_tcp(addr: SocketAddrV4, tag: &str, stop: &AtomicBool, ready: std::sync::mpsc::Sender<()>) {
    let l = TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    ready.send(()).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, peer)) => {
                let tag = tag.to_string();
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    if writeln!(s, "{tag} {}", peer.ip()).is_err() {
                        return;
                    }
                    let r = BufReader::new(s.try_clone().unwrap());
                    for line in r.lines() {
                        let Ok(line) = line else { break };
                        if writeln!(s, "{tag} {line}").is_err() {
                            break;
                        }
                    }
                });
            }
            // Polls the stop flag between connections.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn serve_udp(addr: SocketAddrV4, tag: &str, stop: &AtomicBool, ready: std::sync::mpsc::Sender<()>) {
    let s = UdpSocket::bind(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    ready.send(()).unwrap();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = s.recv_from(&mut buf) {
            let _ = s.send_to(format!("{tag} {}", peer.ip()).as_bytes(), peer);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One client connection: the greeting says which backend answered and whom it saw.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The backend's tag.
    backend: String,
    /// The source address the backend saw.
    seen_as: String,
}

impl Conn {
    fn echo(&mut self, msg: &str) -> std::io::Result<String> {
        writeln!(self.writer, "{msg}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }
}

fn dial(from: &Pod, to: SocketAddrV4) -> std::io::Result<Conn> {
    in_netns(&from.ns.path(), move || {
        let s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut words = line.split_whitespace().map(str::to_string);
        let (backend, seen_as) = (
            words.next().unwrap_or_default(),
            words.next().unwrap_or_default(),
        );
        Ok(Conn {
            reader,
            writer: s,
            backend,
            seen_as,
        })
    })
}

fn udp_ask(from: &Pod, to: SocketAddrV4) -> std::io::Result<String> {
    in_netns(&from.ns.path(), move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send(b"hi")?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// Connecting is refused at once (a reset or ICMP error), not left to time out.
fn assert_refused_fast(from: &Pod, to: SocketAddrV4) {
    let t = Instant::now();
    let err = dial(from, to)
        .err()
        .unwrap_or_else(|| panic!("{to} answered"));
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{to}: {err}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "{to}: {:?}",
        t.elapsed()
    );
}

fn nft_in(netns: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["--", "nft"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our table's rules without set contents (`-t`): what must not change across restarts.
fn rules(d: &FleetNri) -> String {
    nft_in(d.cnf_netns(), &["-t", "list", "table", "ip", TABLE])
}

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn vip(name: &str, vip: &str, ports: Vec<VipPort>, affinity: Option<u32>) -> VipService {
    VipService {
        name: name.into(),
        vip: vip.parse().unwrap(),
        ports,
        affinity_timeout_seconds: affinity,
    }
}

fn port(protocol: VipProtocol, port: u16, backends: &[SocketAddrV4]) -> VipPort {
    VipPort {
        protocol,
        port,
        backends: backends.to_vec(),
    }
}

fn set(c: &NodeClient, services: Vec<VipService>) -> Result<bool, NodeError> {
    c.set_services(SetServicesRequest { services })
        .map(|r| r.changed)
}

/// A netns behind a veth from the CNF netns, with an address of another node's subnet: a
/// backend that is not on the node's bridge.
struct Remote {
    ns: TestNetns,
    ip: Ipv4Addr,
}

fn remote(d: &FleetNri) -> Remote {
    let ns = TestNetns::new("vip-remote");
    let cnf = d.cnf_netns();
    let ip = |netns: &str, args: &[&str]| fleet_e2e::ip_in(netns, args).unwrap();
    ip(
        cnf,
        &[
            "link",
            "add",
            "fbremote",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ],
    );
    ip(cnf, &["addr", "add", "100.96.99.1/24", "dev", "fbremote"]);
    ip(cnf, &["link", "set", "fbremote", "up"]);
    ns.ip(&["addr", "add", "100.96.99.2/24", "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns.ip(&["route", "add", "default", "via", "100.96.99.1"])
        .unwrap();
    Remote {
        ns,
        ip: "100.96.99.2".parse().unwrap(),
    }
}

#[test]
fn a_vip_balances_pins_refuses_and_hairpins_in_the_cnf_netns_only() {
    require_root("a_vip_balances_pins_refuses_and_hairpins_in_the_cnf_netns_only");
    let node = TestNetns::new("vip-node");
    let d = daemon_in(&node);
    let c = d.client();
    c.set_plan(plan("100.96.70.0/24", "100.112.0.0/16"))
        .unwrap();
    let gateway = "100.96.70.1";
    let (client, a, b) = (pod(&c, "vip-client"), pod(&c, "vip-a"), pod(&c, "vip-b"));
    let far = remote(&d);
    let _sa = Server::start(&a.ns.path(), SocketAddrV4::new(a.ip, 8080), "a");
    let _sb = Server::start(&b.ns.path(), SocketAddrV4::new(b.ip, 8080), "b");
    let _sc = Server::start(
        &client.ns.path(),
        SocketAddrV4::new(client.ip, 8080),
        "self",
    );
    let _sr = Server::start(&far.ns.path(), SocketAddrV4::new(far.ip, 8080), "far");
    let on = |ip: Ipv4Addr| SocketAddrV4::new(ip, 8080);

    let web = vip(
        "shop/web",
        "100.112.0.10",
        vec![
            port(VipProtocol::Tcp, 80, &[on(a.ip), on(b.ip)]),
            port(VipProtocol::Tcp, 81, &[]),
            port(VipProtocol::Udp, 53, &[on(a.ip)]),
            port(VipProtocol::Udp, 54, &[]),
        ],
        None,
    );
    let sticky = vip(
        "shop/sticky",
        "100.112.0.11",
        vec![port(VipProtocol::Tcp, 80, &[on(a.ip), on(b.ip)])],
        Some(60),
    );
    let itself = vip(
        "shop/self",
        "100.112.0.12",
        vec![port(VipProtocol::Tcp, 80, &[on(client.ip)])],
        None,
    );
    let far_vip = vip(
        "shop/far",
        "100.112.0.13",
        vec![port(VipProtocol::Tcp, 80, &[on(far.ip)])],
        None,
    );
    let table = vec![web, sticky, itself, far_vip];
    assert!(set(&c, table.clone()).unwrap());
    // Stored in canonical order; the same table again (in any order) is no transaction.
    let listed = c.list_services().unwrap();
    assert_eq!(listed.len(), 4);
    let mut reversed = table.clone();
    reversed.reverse();
    assert!(!set(&c, reversed).unwrap());

    // The rules live in the CNF netns, never in the node's own netns.
    let program = rules(&d);
    assert!(program.contains("svc-100.112.0.10-tcp-80"), "{program}");
    assert!(program.contains("numgen random mod 2"), "{program}");
    assert!(!nft_in(node.name(), &["list", "tables"]).contains(TABLE));
    assert!(!nft_in(node.name(), &["list", "ruleset"]).contains("100.112.0.10"));

    // Both backends answer over a run of connections; both see a masqueraded source (they
    // share the client's bridge: the reply must come back through the CNF netns).
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let conn = dial(&client, sa("100.112.0.10:80")).unwrap();
        assert_eq!(conn.seen_as, gateway, "hairpin not masqueraded");
        *seen.entry(conn.backend).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["a", "b"],
        "{seen:?}"
    );

    // UDP too, and a backend outside the bridge sees the client's own address.
    assert_eq!(
        udp_ask(&client, sa("100.112.0.10:53")).unwrap(),
        format!("a {gateway}")
    );
    let conn = dial(&client, sa("100.112.0.13:80")).unwrap();
    assert_eq!(
        (conn.backend.as_str(), conn.seen_as.clone()),
        ("far", client.ip.to_string())
    );

    // A pod reaching itself through its VIP (the reply would never leave the pod otherwise).
    let mut me = dial(&client, sa("100.112.0.12:80")).unwrap();
    assert_eq!(me.backend, "self");
    assert_eq!(me.echo("ping").unwrap(), "self ping");

    // Affinity: one client keeps its backend connection after connection.
    let first = dial(&client, sa("100.112.0.11:80")).unwrap().backend;
    for _ in 0..20 {
        assert_eq!(dial(&client, sa("100.112.0.11:80")).unwrap().backend, first);
    }
    let aff = nft_in(d.cnf_netns(), &["list", "table", "ip", TABLE]);
    assert!(
        aff.contains(&format!("elements = {{ {}", client.ip)),
        "{aff}"
    );

    // Refused at once: a port without backends, a port not listed, a VIP nobody has.
    assert_refused_fast(&client, sa("100.112.0.10:81"));
    assert_refused_fast(&client, sa("100.112.0.10:82"));
    assert_refused_fast(&client, sa("100.112.9.9:80"));
    for udp in ["100.112.0.10:54", "100.112.0.10:55", "100.112.9.9:53"] {
        let e = udp_ask(&client, sa(udp)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{udp}: {e}");
    }
}

#[test]
fn established_connections_survive_changes_and_restarts_and_bad_tables_change_nothing() {
    require_root(
        "established_connections_survive_changes_and_restarts_and_bad_tables_change_nothing",
    );
    let node = TestNetns::new("vip-node");
    let mut d = daemon_in(&node);
    let c = d.client();
    c.set_plan(plan("100.96.71.0/24", "100.112.0.0/16"))
        .unwrap();
    let (client, a, b, x) = (
        pod(&c, "vip-client"),
        pod(&c, "vip-a"),
        pod(&c, "vip-b"),
        pod(&c, "vip-x"),
    );
    let on = |p: &Pod| SocketAddrV4::new(p.ip, 8080);
    let _servers =
        [(&a, "a"), (&b, "b"), (&x, "x")].map(|(p, tag)| Server::start(&p.ns.path(), on(p), tag));
    let web = |backends: &[SocketAddrV4]| {
        vip(
            "shop/web",
            "100.112.0.20",
            vec![port(VipProtocol::Tcp, 80, backends)],
            None,
        )
    };
    let other = vip(
        "shop/other",
        "100.112.0.21",
        vec![port(VipProtocol::Tcp, 80, &[on(&x)])],
        Some(30),
    );
    assert!(set(&c, vec![web(&[on(&a), on(&b)]), other.clone()]).unwrap());

    let mut conn = dial(&client, sa("100.112.0.20:80")).unwrap();
    let kept = if conn.backend == "a" { on(&a) } else { on(&b) };
    let tag = conn.backend.clone();
    assert_eq!(conn.echo("1").unwrap(), format!("{tag} 1"));

    // Add a backend and remove the other one, drop an unrelated service: same connection.
    assert!(set(&c, vec![web(&[kept, on(&x)])]).unwrap());
    assert_eq!(conn.echo("2").unwrap(), format!("{tag} 2"));
    assert!(set(&c, vec![web(&[kept, on(&x)]), other.clone()]).unwrap());
    assert_eq!(conn.echo("3").unwrap(), format!("{tag} 3"));
    // The removed backend gets no new connections.
    let removed = if tag == "a" { "b" } else { "a" };
    for _ in 0..20 {
        assert_ne!(
            dial(&client, sa("100.112.0.20:80")).unwrap().backend,
            removed
        );
    }

    // Bad tables are refused with what to fix, and change nothing.
    let before = (c.list_services().unwrap(), rules(&d));
    let good = web(&[kept]);
    let mut bad_tables = Vec::new();
    let mut outside = good.clone();
    outside.vip = "100.113.0.1".parse().unwrap();
    bad_tables.push(vec![outside]);
    let mut twin = other.clone();
    twin.vip = good.vip;
    bad_tables.push(vec![good.clone(), twin]);
    let mut dup_port = good.clone();
    dup_port.ports.push(port(VipProtocol::Tcp, 80, &[]));
    bad_tables.push(vec![dup_port]);
    let mut zero = good.clone();
    zero.ports[0].port = 0;
    bad_tables.push(vec![zero]);
    bad_tables.push(vec![web(&[sa("10.1.2.3:80")])]);
    let many: Vec<_> = (0..1025u32)
        .map(|i| SocketAddrV4::new(Ipv4Addr::from(0x6460_0000 + i), 80))
        .collect();
    bad_tables.push(vec![web(&many)]);
    for t in [0, 86_401] {
        let mut aff = good.clone();
        aff.affinity_timeout_seconds = Some(t);
        bad_tables.push(vec![aff]);
    }
    for bad in bad_tables {
        let e = c
            .set_services(SetServicesRequest {
                services: bad.clone(),
            })
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG, "{bad:?}: {e}");
        assert!(e.msg.contains("invalid service table"), "{e}");
        assert!(!e.details.is_empty(), "{e}");
    }
    assert_eq!((c.list_services().unwrap(), rules(&d)), before);
    assert_eq!(conn.echo("4").unwrap(), format!("{tag} 4"));

    // kill -9 and SIGTERM: the table comes back from the data dir with the same rules, the
    // connection carries on, and the same table again is no change.
    for stop in [FleetNri::kill9 as fn(&mut FleetNri), FleetNri::stop] {
        stop(&mut d);
        assert_eq!(conn.echo("down").unwrap(), format!("{tag} down"));
        d.spawn().unwrap();
        assert_eq!(c.list_services().unwrap(), before.0);
        assert_eq!(rules(&d), before.1);
        assert_eq!(conn.echo("up").unwrap(), format!("{tag} up"));
        assert!(!set(&c, before.0.clone()).unwrap());
    }
    // Someone deletes our table behind the daemon's back: the next change resyncs it whole.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", d.cnf_netns()))
        .args(["--", "nft", "delete", "table", "ip", TABLE])
        .status()
        .unwrap();
    assert!(out.success());
    assert!(set(&c, vec![web(&[kept])]).unwrap());
    assert!(rules(&d).contains("svc-100.112.0.20-tcp-80"));
    assert!(set(&c, before.0.clone()).unwrap());
    assert_eq!(rules(&d), before.1);
    assert_eq!(conn.echo("resynced").unwrap(), format!("{tag} resynced"));
    // Affinity clients survive a change of something else.
    let pinned = dial(&client, sa("100.112.0.21:80")).unwrap().backend;
    assert_eq!(pinned, "x");
    assert!(set(&c, vec![web(&[kept]), other]).unwrap());
    let aff = nft_in(d.cnf_netns(), &["list", "table", "ip", TABLE]);
    assert!(
        aff.contains(&format!("elements = {{ {}", client.ip)),
        "{aff}"
    );
    assert_eq!(conn.echo("5").unwrap(), format!("{tag} 5"));
}

#[test]
fn the_vip_table_needs_a_plan_and_follows_it() {
    require_root("the_vip_table_needs_a_plan_and_follows_it");
    let node = TestNetns::new("vip-node");
    let d = daemon_in(&node);
    let c = d.client();
    let one = vip(
        "shop/web",
        "100.112.0.30",
        vec![port(VipProtocol::Tcp, 80, &[sa("100.96.72.5:80")])],
        None,
    );
    // No plan: try again later (as for set_peers and ADD); nothing recorded.
    let e = c
        .set_services(SetServicesRequest {
            services: vec![one.clone()],
        })
        .unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    assert!(c.list_services().unwrap().is_empty());

    c.set_plan(plan("100.96.72.0/24", "100.112.0.0/16"))
        .unwrap();
    assert!(set(&c, vec![one.clone()]).unwrap());
    // A new node subnet, same VIP range: the table stays, its hairpin follows the subnet.
    c.set_plan(plan("100.96.73.0/24", "100.112.0.0/16"))
        .unwrap();
    assert_eq!(c.list_services().unwrap(), vec![one.clone()]);
    let r = rules(&d);
    assert!(
        r.contains("ip saddr 100.96.73.0/24 ip daddr 100.96.73.0/24 masquerade"),
        "{r}"
    );
    assert!(r.contains("svc-100.112.0.30-tcp-80"), "{r}");
    // A new VIP range: the table no longer fits and goes; the range refused is the new one.
    c.set_plan(plan("100.96.73.0/24", "100.113.0.0/16"))
        .unwrap();
    assert!(c.list_services().unwrap().is_empty());
    let r = rules(&d);
    assert!(!r.contains("svc-100.112.0.30"), "{r}");
    assert!(r.contains("ip daddr 100.113.0.0/16 reject"), "{r}");
    let persisted: Vec<VipService> =
        serde_json::from_slice(&std::fs::read(d.data_dir().join("services.json")).unwrap())
            .unwrap();
    assert!(persisted.is_empty());
}

/// A 1,000-VIP table (3 backends each): one transaction to program, a small one for a change
/// to one backend, a full resync (same rules) at restart. Prints the times (the service
/// discovery convergence target is < 1 s at p99).
#[test]
fn a_large_table_is_one_transaction() {
    require_root("a_large_table_is_one_transaction");
    let node = TestNetns::new("vip-node");
    let mut d = daemon_in(&node);
    let c = d.client();
    c.set_plan(plan("100.96.74.0/24", "100.112.0.0/16"))
        .unwrap();
    let table = |extra: u32| -> Vec<VipService> {
        (0..1000u32)
            .map(|i| {
                let backends: Vec<_> = (0..3 + u32::from(i == 0) * extra)
                    .map(|b| SocketAddrV4::new(Ipv4Addr::from(0x6461_0000 + i * 8 + b), 8080))
                    .collect();
                vip(
                    &format!("ns/svc-{i}"),
                    &Ipv4Addr::from(0x6470_0100 + i).to_string(),
                    vec![port(VipProtocol::Tcp, 80, &backends)],
                    (i % 2 == 0).then_some(600),
                )
            })
            .collect()
    };
    let timed = |t: Vec<VipService>| {
        let start = Instant::now();
        let changed = set(&c, t).unwrap();
        (changed, start.elapsed())
    };
    let (changed, first) = timed(table(0));
    assert!(changed);
    let (changed, same) = timed(table(0));
    assert!(!changed);
    let (changed, one_more) = timed(table(1));
    assert!(changed);
    let program = rules(&d);
    assert_eq!(program.matches("chain svc-").count(), 1000);
    assert_eq!(program.matches("chain ep-").count(), 3001);
    // A restart resyncs the whole table (listed first) before serving: same rules.
    d.kill9();
    let start = Instant::now();
    d.spawn().unwrap();
    let restart = start.elapsed();
    assert_eq!(rules(&d), program);
    eprintln!(
        "vip table 1000 services x 3 backends: first {first:?}, same again {same:?}, one backend added {one_more:?}, restart to serving {restart:?}"
    );
    assert!(one_more < Duration::from_secs(10), "{one_more:?}");
}

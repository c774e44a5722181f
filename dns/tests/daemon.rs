//! The `fleet-dns` binary against a real `fleet-hub serve` (embedded store, 127.0.0.1): the
//! test joins cluster `cc`, publishes `import/*` records as `cc` the way its controller does,
//! and asks the daemon with `dig`. Names appear within a bound after publishing and disappear
//! after deletion; a `live: false` cluster's endpoints are not answered; an unreadable record
//! is logged and the rest served; with the hub killed the last table keeps being served, and
//! with the hub back the daemon follows again; SIGTERM stops it cleanly. One test binds its
//! sockets in a netns of its own (`--netns`, root).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_e2e::{TestNetns, poll_until, require_root, workspace_bin};
use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::credential::store_credential;
use fleet_hub_api::model::{ClusterId, JoinRequest, PublicKey};
use fleet_hub_api::records::{EndpointRecord, Protocol, import_record_name};
use fleet_hub_api::wire::{CaHash, JoinString};
use fleet_services::aggregate::ImportPort;
use fleet_services::import::import_record;
use fleet_services::{ServiceImport, ServiceKey, ServiceType};

/// How long a change at the hub may take to show in the answers (the spec's conformance
/// suite allows 20 s; we expect well under one).
const PROPAGATION: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(30);
const ZONE: &str = "svc.clusterset.local.";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn free_port() -> u16 {
    // UDP and TCP both free on the same port (the daemon binds both).
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A real `fleet-hub serve` on a free port of 127.0.0.1; killed on drop.
struct Hub {
    child: Option<Child>,
    dir: tempfile::TempDir,
    addr: String,
}

impl Hub {
    fn start() -> Hub {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut hub = Hub {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            addr: format!("127.0.0.1:{port}"),
        };
        hub.restart();
        hub
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hub.log"))
            .unwrap();
        let child = Command::new(workspace_bin("fleet-hub"))
            .arg("--data-dir")
            .arg(self.data())
            .args(["serve", "--listen", &self.addr])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        poll_until("the hub to serve", WAIT, || {
            (self.data().join("admin.credential").exists()
                && std::net::TcpStream::connect(&self.addr).is_ok())
            .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    fn ca(&self) -> CaHash {
        CaHash::of_pem(&std::fs::read_to_string(self.data().join("ca.pem")).unwrap()).unwrap()
    }

    /// Joins `cluster` and writes its credential file (0600) as its controller would.
    fn join(&self, cluster: &str, credential_file: &Path) -> HubClient {
        let out = Command::new(workspace_bin("fleet-hub"))
            .args(["--hub", &self.addr, "--data-dir"])
            .arg(self.data())
            .args(["token", "create", "--ttl", "1h"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let join = JoinString::parse(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        let client =
            HubClient::new([self.addr.clone()], self.ca(), ClientOptions::default()).unwrap();
        let joined = rt()
            .block_on(client.join(
                &join,
                JoinRequest {
                    cluster: ClusterId::new(cluster).unwrap(),
                    public_key: PublicKey::from_bytes([7; 32]),
                    endpoint: None,
                },
            ))
            .unwrap();
        store_credential(credential_file, &joined.credential).unwrap();
        client.with_credential(joined.credential)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `fleet-dns` binary; SIGKILLed on drop unless stopped.
struct FleetDns {
    child: Child,
    server: SocketAddr,
    log: PathBuf,
}

impl FleetDns {
    fn start(hub: &Hub, credential: &Path, port: u16, extra: &[&str]) -> FleetDns {
        let log = hub.dir.path().join(format!("fleet-dns-{port}.log"));
        let child = Command::new(workspace_bin("fleet-dns"))
            .args(["--hub", &hub.addr, "--ca", &hub.ca().to_string()])
            .arg("--credential-file")
            .arg(credential)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--threads", "1"])
            .args(extra)
            .env("FLEET_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        FleetDns {
            child,
            server: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status within `WAIT`.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        poll_until("fleet-dns to exit after SIGTERM", WAIT, || {
            self.child.try_wait().unwrap()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }
}

impl Drop for FleetDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dig +short` run by `prefix` (e.g. nsenter into a netns), one try; `None` when no answer.
fn dig_with(prefix: &[&str], server: SocketAddr, name: &str, rtype: &str) -> Option<Answer> {
    let mut command = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg("dig");
            c
        }
        None => Command::new("dig"),
    };
    let output = command
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=1", "+tries=1"])
        .args([name, rtype])
        .output()
        .expect("dig is needed for this test: apt-get install -y dnsutils");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)?
        .split(',')
        .next()?
        .to_string();
    let mut records: Vec<String> = text
        .split(";; ANSWER SECTION:")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| {
                    l.split_whitespace()
                        .nth(4)
                        .map(|_| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
                })
                .collect()
        })
        .unwrap_or_default();
    records.sort();
    Some(Answer { status, records })
}

fn dig(server: SocketAddr, name: &str, rtype: &str) -> Option<Answer> {
    dig_with(&[], server, name, rtype)
}

#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: String,
    records: Vec<String>,
}

fn noerror(records: &[&str]) -> Answer {
    Answer {
        status: "NOERROR".into(),
        records: records.iter().map(|r| r.to_string()).collect(),
    }
}

fn nxdomain() -> Answer {
    Answer {
        status: "NXDOMAIN".into(),
        records: Vec::new(),
    }
}

/// Polls until `name`/`rtype` is answered as `want`; returns how long it took.
fn until_answer(
    server: SocketAddr,
    name: &str,
    rtype: &str,
    want: &Answer,
    log: &dyn Fn() -> String,
) -> Duration {
    let start = Instant::now();
    let mut last = None;
    poll_until(
        &format!("{name} {rtype} to be {want:?}"),
        PROPAGATION,
        || {
            last = dig(server, name, rtype);
            (last.as_ref() == Some(want)).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; last answer {last:?}\n{}", log()));
    start.elapsed()
}

fn cluster(id: &str) -> ClusterId {
    ClusterId::new(id).unwrap()
}

fn endpoint(ip: [u8; 4], hostname: &str) -> EndpointRecord {
    EndpointRecord {
        ip: Ipv4Addr::from(ip),
        hostname: Some(hostname.into()),
        ready: true,
        serving: true,
        terminating: false,
        node_name: None,
    }
}

fn service(
    name: &str,
    service_type: ServiceType,
    clusters: Vec<(&str, Vec<EndpointRecord>)>,
) -> ServiceImport {
    ServiceImport {
        service: ServiceKey::new("shop", name),
        service_type,
        ports: vec![ImportPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            app_protocol: None,
            backends: clusters.iter().map(|(c, _)| (cluster(c), 8080)).collect(),
        }],
        session_affinity: Default::default(),
        internal_traffic_policy: Default::default(),
        traffic_distribution: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        clusters: clusters.into_iter().map(|(c, e)| (cluster(c), e)).collect(),
    }
}

/// Publishes `import` as cluster `cc` (owner) with `vip` and the `live` clusters.
fn publish(client: &HubClient, import: &ServiceImport, vip: Option<Ipv4Addr>, live: &[&str]) {
    let live: BTreeSet<ClusterId> = live.iter().map(|c| cluster(c)).collect();
    let record = import_record(import, vip, &live);
    let name = import_record_name(&import.service.namespace, &import.service.name);
    rt().block_on(client.publish(&cluster("cc"), &name, &serde_json::to_vec(&record).unwrap()))
        .unwrap();
}

#[test]
fn fleet_dns_follows_its_clusters_imports_at_the_hub() {
    let mut hub = Hub::start();
    let credential = hub.dir.path().join("cc.credential");
    let cc = hub.join("cc", &credential);
    // Another cluster's import records are not ours to serve.
    let dd = hub.join("dd", &hub.dir.path().join("dd.credential"));
    let port = free_port();
    let mut dns = FleetDns::start(&hub, &credential, port, &["--cluster", "cc"]);
    let server = dns.server;
    let log = || dns.log();
    let log = &log;
    until_answer(
        server,
        "dns-version.clusterset.local.",
        "TXT",
        &noerror(&["\"1.0.0\""]),
        log,
    );

    let vip = Ipv4Addr::new(100, 112, 0, 7);
    let web = service(
        "web",
        ServiceType::ClusterSetIP,
        vec![("aa", vec![endpoint([100, 96, 0, 5], "web-0")])],
    );
    let web_name = format!("web.shop.{ZONE}");
    publish(&cc, &web, Some(vip), &["aa"]);
    let took = until_answer(server, &web_name, "A", &noerror(&["100.112.0.7"]), log);
    eprintln!("published → resolvable in {took:?}");
    assert_eq!(
        dig(server, &format!("_http._tcp.web.shop.{ZONE}"), "SRV"),
        Some(noerror(&[&format!("0 100 80 {web_name}")]))
    );

    // Headless with aa live and bb withdrawn: only aa's endpoint is answered.
    let db = service(
        "db",
        ServiceType::Headless,
        vec![
            ("aa", vec![endpoint([100, 96, 0, 10], "db-0")]),
            ("bb", vec![endpoint([100, 96, 16, 10], "db-0")]),
        ],
    );
    publish(&cc, &db, None, &["aa"]);
    let db_name = format!("db.shop.{ZONE}");
    until_answer(server, &db_name, "A", &noerror(&["100.96.0.10"]), log);
    assert_eq!(
        dig(server, &format!("db-0.bb.{db_name}"), "A"),
        Some(nxdomain())
    );
    assert_eq!(
        dig(server, &format!("db-0.aa.{db_name}"), "A"),
        Some(noerror(&["100.96.0.10"]))
    );
    // bb comes back: its endpoint is answered too.
    publish(&cc, &db, None, &["aa", "bb"]);
    until_answer(
        server,
        &db_name,
        "A",
        &noerror(&["100.96.0.10", "100.96.16.10"]),
        log,
    );
    until_answer(
        server,
        &format!("db-0.bb.{db_name}"),
        "A",
        &noerror(&["100.96.16.10"]),
        log,
    );

    // Another cluster's import of the same name and an unreadable record of ours: the first is
    // ignored, the second logged and left out, the rest still served.
    let other = service("other", ServiceType::ClusterSetIP, vec![("aa", vec![])]);
    let other_record = import_record(
        &other,
        Some(Ipv4Addr::new(100, 112, 0, 9)),
        &BTreeSet::from([cluster("aa")]),
    );
    rt().block_on(dd.publish(
        &cluster("dd"),
        "import/shop/other",
        &serde_json::to_vec(&other_record).unwrap(),
    ))
    .unwrap();
    rt().block_on(cc.publish(&cluster("cc"), "import/shop/broken", b"{not json"))
        .unwrap();
    poll_until("the unreadable record to be logged", PROPAGATION, || {
        log().contains("import/shop/broken").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    assert_eq!(
        dig(server, &format!("other.shop.{ZONE}"), "A"),
        Some(nxdomain())
    );
    assert_eq!(dig(server, &web_name, "A"), Some(noerror(&["100.112.0.7"])));

    // Deleted: NXDOMAIN.
    rt().block_on(cc.unpublish(&cluster("cc"), "import/shop/web"))
        .unwrap();
    let took = until_answer(server, &web_name, "A", &nxdomain(), log);
    eprintln!("deleted → NXDOMAIN in {took:?}");

    // The hub dies: the last table keeps being served, for longer than the client's backoff.
    hub.kill9();
    assert!(std::net::TcpStream::connect(&hub.addr).is_err());
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            dig(server, &db_name, "A"),
            Some(noerror(&["100.96.0.10", "100.96.16.10"])),
            "{}",
            log()
        );
    }
    assert_eq!(dig(server, &web_name, "A"), Some(nxdomain()));

    // The hub is back: the daemon follows again.
    hub.restart();
    publish(&cc, &web, Some(vip), &["aa"]);
    let took = until_answer(server, &web_name, "A", &noerror(&["100.112.0.7"]), log);
    eprintln!("hub back, published → resolvable in {took:?}");

    let status = dns.terminate();
    assert!(
        status.success(),
        "fleet-dns exited with {status}\n{}",
        dns.log()
    );
}

#[test]
fn a_credential_of_another_cluster_is_refused_at_start() {
    let hub = Hub::start();
    let credential = hub.dir.path().join("cc.credential");
    let _cc = hub.join("cc", &credential);
    let mut dns = FleetDns::start(&hub, &credential, free_port(), &["--cluster", "ee"]);
    let status = poll_until("fleet-dns to refuse", WAIT, || {
        dns.child.try_wait().unwrap()
    })
    .unwrap();
    assert!(!status.success());
    let text = dns.log();
    assert!(
        text.contains("belongs to cluster cc, not --cluster ee"),
        "{text}"
    );
}

#[test]
fn fleet_dns_binds_in_the_named_netns() {
    require_root("fleet_dns_binds_in_the_named_netns");
    let hub = Hub::start();
    let credential = hub.dir.path().join("cc.credential");
    let cc = hub.join("cc", &credential);
    let netns = TestNetns::new("dns");
    let port = free_port();
    // The hub is reached from the test's netns; the sockets live in `netns` only.
    let mut dns = FleetDns::start(&hub, &credential, port, &["--netns", netns.name()]);
    let server = dns.server;
    let inside = [
        "nsenter".to_string(),
        format!("--net={}", netns.path().display()),
        "--".into(),
    ];
    let inside: Vec<&str> = inside.iter().map(String::as_str).collect();
    let web = service("web", ServiceType::ClusterSetIP, vec![("aa", vec![])]);
    publish(&cc, &web, Some(Ipv4Addr::new(100, 112, 0, 7)), &["aa"]);
    let name = format!("web.shop.{ZONE}");
    poll_until("web to resolve inside the netns", WAIT, || {
        (dig_with(&inside, server, &name, "A") == Some(noerror(&["100.112.0.7"]))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dns.log()));
    // Not in the test's own netns.
    assert_eq!(dig(server, &name, "A"), None);
    let status = dns.terminate();
    assert!(status.success(), "{status}\n{}", dns.log());
}

/// `--metrics-address`: the daemon's `/metrics`, parsed with a Prometheus text parser; the
/// query counters move with `dig`s, by type and rcode.
#[test]
fn fleet_dns_serves_metrics() {
    use prometheus_parse::{Scrape, Value};
    let hub = Hub::start();
    let credential = hub.dir.path().join("cc.credential");
    let _cc = hub.join("cc", &credential);
    let metrics: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dns = FleetDns::start(
        &hub,
        &credential,
        free_port(),
        &["--metrics-address", &metrics.to_string()],
    );
    let log = || dns.log();
    until_answer(
        dns.server,
        "dns-version.clusterset.local.",
        "TXT",
        &noerror(&["\"1.0.0\""]),
        &log,
    );
    let scrape = || {
        let body = fleet_metrics::scrape(metrics).expect("scrape /metrics");
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
    };
    let value = |s: &Scrape, name: &str, labels: &[(&str, &str)]| -> f64 {
        let sample = s
            .samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)));
        match sample.map(|x| &x.value) {
            None => 0.0,
            Some(Value::Counter(v) | Value::Gauge(v)) => *v,
            Some(Value::Histogram(b)) => b.last().map_or(0.0, |b| b.count),
            other => panic!("{name}: {other:?}"),
        }
    };
    let before = scrape();
    assert_eq!(
        value(
            &before,
            "fleetboard_build_info",
            &[("component", "fleet-dns")]
        ),
        1.0
    );
    let txt = [("qtype", "TXT"), ("rcode", "NOERROR")];
    assert!(value(&before, "fleetboard_dns_queries_total", &txt) >= 1.0);
    let nx = [("qtype", "A"), ("rcode", "NXDOMAIN")];
    let nx_before = value(&before, "fleetboard_dns_queries_total", &nx);
    let refused = [("qtype", "A"), ("rcode", "REFUSED")];
    let refused_before = value(&before, "fleetboard_dns_queries_total", &refused);
    assert_eq!(
        dig(dns.server, &format!("nothing.shop.{ZONE}"), "A"),
        Some(nxdomain())
    );
    dig(dns.server, "example.com.", "A");
    let after = scrape();
    assert_eq!(
        value(&after, "fleetboard_dns_queries_total", &nx),
        nx_before + 1.0
    );
    assert_eq!(
        value(&after, "fleetboard_dns_queries_total", &refused),
        refused_before + 1.0
    );
    let answered: f64 = after
        .samples
        .iter()
        .filter(|x| x.metric == "fleetboard_dns_queries_total")
        .map(|x| match x.value {
            Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(
        value(&after, "fleetboard_dns_answer_duration_seconds", &[]),
        answered,
        "every answered query has its latency observed"
    );
    assert!(value(&after, "fleetboard_dns_table_builds_total", &[]) >= 1.0);
    assert_eq!(value(&after, "fleetboard_dns_hub_reachable", &[]), 1.0);
}

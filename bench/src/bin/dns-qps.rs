//! `dns-qps`: queries per second of `fleet-dns` against Knot DNS (the baseline: the fastest
//! authoritative server packaged here) and BIND 9, in one run, all serving the same
//! 1,000-service `clusterset.local` and answering the same query mix, driven by `dnsperf`.
//!
//! - The data: one [`DnsTable`] built from generated imports (4 in 5 ClusterSetIP with a VIP,
//!   1 in 5 headless with three ready endpoints, every service a named `http` port, every
//!   other one a `grpc` port too). fleet-dns serves that table; its records are written as the
//!   zone file Knot and BIND load (plus the NS and its address, which they require).
//! - The mix (`dnsperf -d`): 60 % A of ClusterSetIP names, 10 % A of headless names, 15 % SRV,
//!   15 % NXDOMAIN. Before measuring, sample queries are compared across the three servers.
//! - Fairness: one worker each, and each server pinned to CPU 1 with `taskset` (dnsperf to
//!   CPU 0): Knot `udp-workers: 1`, `tcp-workers: 1`, `background-workers: 1`; BIND `-n 1`;
//!   fleet-dns on a current-thread tokio runtime (its UDP loop is one task; this binary's
//!   `serve` mode runs `fleet_dns::serve` exactly as `fleet-dns --threads 1` does, with the
//!   table built in-process instead of from the hub).
//! - Everything runs on the loopback of a netns this benchmark creates; the servers are
//!   processes it started, stopped by PID.
//! - Memory: a second fleet-dns (and Knot, for scale) serving 100,000 services; VmRSS of the
//!   serving process after it answered.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use fleet_bench::Proc;
use fleet_bench::daemon::proc_status_kib;
use fleet_bench::stats::last_line;
use fleet_dns::{DnsConfig, DnsTable, ServerConfig};
use fleet_e2e::TestNetns;
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::records::{EndpointRecord, Protocol};
use fleet_services::aggregate::ImportPort;
use fleet_services::{ServiceImport, ServiceKey, ServiceType, VipTable};
use hickory_proto::rr::RData;

#[derive(Debug, Parser)]
struct Flags {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Services in the zone under load.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Rounds; each round runs dnsperf once against every server (the order rotates).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds of dnsperf per server per round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queries dnsperf keeps in flight.
    #[arg(long, default_value_t = 100)]
    outstanding: u32,
    /// Services for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 100_000)]
    rss_services: usize,
    /// CPU the servers are pinned to; dnsperf gets another.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    #[arg(long, default_value_t = 0)]
    client_cpu: usize,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Serve the generated zone with fleet-dns's server on one thread (the benchmark starts
    /// this itself, pinned, inside its netns).
    Serve {
        #[arg(long)]
        services: usize,
        #[arg(long)]
        listen: SocketAddr,
    },
}

const ZONE: &str = "clusterset.local";
const TTL: u32 = 5;
const NAMESPACES: usize = 50;
const TARGET: f64 = 1.0;

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    if let Some(Mode::Serve { services, listen }) = flags.mode {
        return serve(services, listen);
    }
    fleet_bench::require_root("dns-qps")?;
    for tool in ["knotd", "named", "dnsperf", "dig", "taskset", "nsenter"] {
        ensure!(
            which(tool),
            "{tool} is missing: run scripts/install-bench-deps.sh (knot, bind9, dnsperf)"
        );
    }
    println!("dns-qps: {}", fleet_bench::load_line());
    let dir = tempfile::Builder::new()
        .prefix("fleet-dns-qps-")
        .tempdir()?;
    let netns = TestNetns::try_new("dnsqps")?;
    let pin = |cpu: usize| vec!["taskset".to_string(), "-c".into(), cpu.to_string()];

    // The same data for all three.
    let table = table(flags.services)?;
    let zone_file = dir.path().join("clusterset.local.zone");
    std::fs::write(&zone_file, zone_text(&table))?;
    let queries = dir.path().join("queries.txt");
    std::fs::write(&queries, query_mix(flags.services, 20_000))?;
    println!(
        "zone: {} services, {} names, {} records; {} queries in the mix",
        flags.services,
        table.len(),
        table.records().count(),
        20_000
    );

    let fleet_addr: SocketAddr = "127.0.0.1:5301".parse()?;
    let knot_addr: SocketAddr = "127.0.0.1:5302".parse()?;
    let bind_addr: SocketAddr = "127.0.0.1:5303".parse()?;
    let servers = [
        (
            "fleet-dns",
            start_fleet_dns(
                &netns,
                &pin(flags.server_cpu),
                flags.services,
                fleet_addr,
                dir.path(),
            )?,
            fleet_addr,
        ),
        (
            "knot",
            start_knot(
                &netns,
                &pin(flags.server_cpu),
                &zone_file,
                knot_addr,
                &dir.path().join("knot"),
            )?,
            knot_addr,
        ),
        (
            "bind",
            start_bind(
                &netns,
                &pin(flags.server_cpu),
                &zone_file,
                bind_addr,
                &dir.path().join("bind"),
            )?,
            bind_addr,
        ),
    ];
    for (name, proc, addr) in &servers {
        wait_serving(&netns, *addr, name, proc)?;
    }
    same_answers(
        &netns,
        &servers.iter().map(|(n, _, a)| (*n, *a)).collect::<Vec<_>>(),
    )?;

    let mut qps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..flags.runs {
        fleet_bench::check_interrupted()?;
        for i in 0..servers.len() {
            let (name, _, addr) = &servers[(i + round) % servers.len()];
            let result = dnsperf(&netns, &pin(flags.client_cpu), *addr, &queries, &flags)?;
            println!(
                "round {} {name:9}: {:>9.0} qps, lost {}, avg latency {:.3} ms",
                round + 1,
                result.qps,
                result.lost,
                result.latency_ms
            );
            qps.entry(name).or_default().push(result.qps);
        }
    }
    let medians: BTreeMap<&str, f64> = qps.iter().map(|(n, v)| (*n, median(v))).collect();
    for (name, m) in &medians {
        println!(
            "median {name:9}: {m:>9.0} qps over {} runs",
            qps[name].len()
        );
    }
    drop(servers);

    if flags.rss_services > 0 {
        rss(
            &netns,
            &pin(flags.server_cpu),
            flags.rss_services,
            dir.path(),
        )?;
    }

    let ours = medians["fleet-dns"];
    let knot = medians["knot"];
    let ratio = ours / knot;
    println!(
        "fleet-dns / bind: {:.3}; target fleet-dns >= {TARGET} x knot: {}",
        ours / medians["bind"],
        if ratio >= TARGET { "met" } else { "MISSED" }
    );
    println!("dns-qps: {}", fleet_bench::load_line());
    println!(
        "{}",
        last_line(
            "dns-qps",
            &format!("{ours:.0}"),
            &format!("{knot:.0}"),
            ratio,
            &format!("{TARGET}")
        )
    );
    Ok(())
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn cluster(id: &str) -> ClusterId {
    ClusterId::new(id).expect("a valid cluster id")
}

fn service_key(i: usize) -> ServiceKey {
    ServiceKey::new(format!("ns-{}", i % NAMESPACES), format!("svc-{i}"))
}

fn is_headless(i: usize) -> bool {
    i % 5 == 4
}

/// The generated fleet: `n` imports and their VIPs.
fn fleet(n: usize) -> (BTreeMap<ServiceKey, ServiceImport>, VipTable) {
    let mut imports = BTreeMap::new();
    let mut vips = BTreeMap::new();
    let base = u32::from(Ipv4Addr::new(100, 112, 0, 1));
    for i in 0..n {
        let key = service_key(i);
        let port = |name: &str, port: u16| ImportPort {
            name: name.into(),
            protocol: Protocol::Tcp,
            port,
            app_protocol: None,
            backends: BTreeMap::from([(cluster("aa"), port), (cluster("bb"), port)]),
        };
        let mut ports = vec![port("http", 80)];
        if i % 2 == 0 {
            ports.push(port("grpc", 9000));
        }
        let endpoint = |cluster_index: u32, k: u32| EndpointRecord {
            ip: Ipv4Addr::from(
                u32::from(Ipv4Addr::new(100, 96, 0, 0))
                    + cluster_index * (1 << 16)
                    + (i as u32) * 4
                    + k,
            ),
            hostname: Some(format!("ep-{k}")),
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
        };
        let (service_type, clusters) = if is_headless(i) {
            (
                ServiceType::Headless,
                BTreeMap::from([
                    (cluster("aa"), vec![endpoint(0, 0), endpoint(0, 1)]),
                    (cluster("bb"), vec![endpoint(1, 2)]),
                ]),
            )
        } else {
            vips.insert(key.clone(), Ipv4Addr::from(base + i as u32));
            (
                ServiceType::ClusterSetIP,
                BTreeMap::from([(cluster("aa"), vec![endpoint(0, 0)])]),
            )
        };
        imports.insert(
            key.clone(),
            ServiceImport {
                service: key,
                service_type,
                ports,
                session_affinity: Default::default(),
                internal_traffic_policy: Default::default(),
                traffic_distribution: None,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                clusters,
            },
        );
    }
    (imports, VipTable(vips))
}

fn table(n: usize) -> anyhow::Result<DnsTable> {
    let (imports, vips) = fleet(n);
    let config = DnsConfig {
        zones: vec![ZONE.into()],
        ttl: TTL,
    };
    Ok(DnsTable::build(&config, &imports, &vips)?)
}

/// The table as a zone file, plus the NS (and its address) Knot and BIND require at the apex.
fn zone_text(table: &DnsTable) -> String {
    let mut text = String::new();
    let mut records: Vec<String> = table
        .records()
        .map(|r| match &r.data {
            // hickory prints TXT strings unquoted.
            RData::TXT(txt) => {
                let strings: Vec<String> = txt
                    .txt_data
                    .iter()
                    .map(|s| format!("\"{}\"", String::from_utf8_lossy(s)))
                    .collect();
                format!("{} {} IN TXT {}", r.name, r.ttl, strings.join(" "))
            }
            _ => r.to_string(),
        })
        .collect();
    // The SOA first.
    records.sort_by_key(|l| !l.contains(" SOA "));
    for line in records {
        let _ = writeln!(text, "{line}");
    }
    let _ = writeln!(text, "{ZONE}. {TTL} IN NS ns.dns.{ZONE}.");
    let _ = writeln!(text, "ns.dns.{ZONE}. {TTL} IN A 127.0.0.1");
    text
}

/// `count` dnsperf lines: 60 % A ClusterSetIP, 10 % A headless, 15 % SRV, 15 % NXDOMAIN.
fn query_mix(services: usize, count: usize) -> String {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let name = |i: usize| {
        let key = service_key(i);
        format!("{}.{}.svc.{ZONE}.", key.name, key.namespace)
    };
    let mut text = String::new();
    for _ in 0..count {
        let roll = next() % 100;
        let mut i = next() as usize % services;
        let line = match roll {
            0..60 => {
                if is_headless(i) {
                    i = (i + 1) % services;
                }
                format!("{} A", name(i))
            }
            60..70 => {
                i = i - i % 5 + 4;
                if i >= services {
                    i = 4;
                }
                format!("{} A", name(i))
            }
            70..85 => format!("_http._tcp.{} SRV", name(i)),
            _ => format!("nope-{i}.ns-{}.svc.{ZONE}. A", i % NAMESPACES),
        };
        let _ = writeln!(text, "{line}");
    }
    text
}

/// `serve` mode: the generated table on fleet-dns's server, one thread, until SIGTERM.
fn serve(services: usize, listen: SocketAddr) -> anyhow::Result<()> {
    let table = Arc::new(table(services)?);
    // As the daemon does after every rebuild: what building took is given back.
    fleet_dns::run::release_free_memory();
    let runtime = fleet_dns::run::runtime(1)?;
    runtime.block_on(async move {
        let (udp, tcp) = fleet_dns::run::bind(listen, None)?;
        let (_tables_tx, tables) = tokio::sync::watch::channel(table);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            term.recv().await;
            let _ = stop_tx.send(true);
            Ok::<_, std::io::Error>(())
        });
        fleet_dns::serve(udp, tcp, tables, ServerConfig::default(), stop).await?;
        Ok(())
    })
}

/// `argv` run inside `netns` (nsenter, which leaves /sys alone), behind `prefix` (taskset).
fn in_netns(netns: &TestNetns, prefix: &[String], argv: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns.path().display()))
        .arg("--")
        .args(prefix)
        .args(argv);
    command
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("create {}", path.display()))
}

fn start_fleet_dns(
    netns: &TestNetns,
    pin: &[String],
    services: usize,
    addr: SocketAddr,
    dir: &Path,
) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy();
    let services = services.to_string();
    let listen = addr.to_string();
    let argv = [&*exe, "serve", "--services", &services, "--listen", &listen];
    Proc::spawn(
        in_netns(netns, pin, &argv)
            .stdout(Stdio::null())
            .stderr(log_file(
                &dir.join(format!("fleet-dns-{}.log", addr.port())),
            )?),
        "fleet-dns (dns-qps serve)",
    )
}

fn start_knot(
    netns: &TestNetns,
    pin: &[String],
    zone_file: &Path,
    addr: SocketAddr,
    dir: &Path,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir.join("db"))?;
    let conf = dir.join("knot.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n    rundir: \"{dir}\"\n    listen: {ip}@{port}\n    udp-workers: 1\n    \
             tcp-workers: 1\n    background-workers: 1\n\
             log:\n  - target: stderr\n    any: warning\n\
             database:\n    storage: \"{dir}/db\"\n\
             zone:\n  - domain: {ZONE}\n    file: \"{zone}\"\n    journal-content: none\n    \
             zonefile-sync: -1\n",
            dir = dir.display(),
            ip = addr.ip(),
            port = addr.port(),
            zone = zone_file.display(),
        ),
    )?;
    let conf = conf.to_string_lossy();
    Proc::spawn(
        in_netns(netns, pin, &["knotd", "-c", &conf])
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join("knotd.log"))?),
        "knotd",
    )
}

fn start_bind(
    netns: &TestNetns,
    pin: &[String],
    zone_file: &Path,
    addr: SocketAddr,
    dir: &Path,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let conf = dir.join("named.conf");
    std::fs::write(
        &conf,
        format!(
            "options {{\n  directory \"{dir}\";\n  pid-file \"{dir}/named.pid\";\n  \
             session-keyfile \"{dir}/session.key\";\n  managed-keys-directory \"{dir}\";\n  \
             listen-on port {port} {{ {ip}; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  \
             minimal-responses yes;\n  dnssec-validation no;\n}};\ncontrols {{ }};\n\
             zone \"{ZONE}\" {{ type primary; file \"{zone}\"; }};\n",
            dir = dir.display(),
            ip = addr.ip(),
            port = addr.port(),
            zone = zone_file.display(),
        ),
    )?;
    let conf = conf.to_string_lossy();
    Proc::spawn(
        in_netns(netns, pin, &["named", "-g", "-n", "1", "-c", &conf])
            .stdout(Stdio::null())
            .stderr(log_file(&dir.join("named.log"))?),
        "named",
    )
}

/// One `dig` inside the netns: (status, sorted answer data without owner/TTL).
fn dig(
    netns: &TestNetns,
    addr: SocketAddr,
    name: &str,
    rtype: &str,
) -> Option<(String, Vec<String>)> {
    let port = addr.port().to_string();
    let server = format!("@{}", addr.ip());
    let out = in_netns(
        netns,
        &[],
        &[
            "dig",
            &server,
            "-p",
            &port,
            "+time=1",
            "+tries=1",
            "+noall",
            "+comments",
            "+answer",
            name,
            rtype,
        ],
    )
    .output()
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .split("status: ")
        .nth(1)?
        .split(',')
        .next()?
        .to_string();
    let mut answers: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase()
        })
        .collect();
    answers.sort();
    Some((status, answers))
}

fn wait_serving(
    netns: &TestNetns,
    addr: SocketAddr,
    name: &str,
    proc: &Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let probe = format!("dns-version.{ZONE}.");
    while Instant::now() < deadline {
        fleet_bench::check_interrupted()?;
        if dig(netns, addr, &probe, "TXT").is_some_and(|(s, _)| s == "NOERROR") {
            return Ok(());
        }
        if let Ok(status) = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(proc.0.id() as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) && !matches!(status, nix::sys::wait::WaitStatus::StillAlive)
        {
            bail!("{name} exited ({status:?}) before serving; see its log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{name} did not answer on {addr} within 120 s")
}

/// The three servers answer sample queries of every kind in the mix alike.
fn same_answers(netns: &TestNetns, servers: &[(&str, SocketAddr)]) -> anyhow::Result<()> {
    let samples = [
        (format!("svc-0.ns-0.svc.{ZONE}."), "A"),
        (format!("svc-4.ns-4.svc.{ZONE}."), "A"),
        (format!("ep-2.bb.svc-4.ns-4.svc.{ZONE}."), "A"),
        (format!("_http._tcp.svc-1.ns-1.svc.{ZONE}."), "SRV"),
        (format!("nope-1.ns-1.svc.{ZONE}."), "A"),
        (format!("svc-0.ns-0.svc.{ZONE}."), "AAAA"),
    ];
    for (name, rtype) in &samples {
        let answers: Vec<_> = servers
            .iter()
            .map(|(server, addr)| (*server, dig(netns, *addr, name, rtype)))
            .collect();
        let first = &answers[0].1;
        ensure!(
            first.is_some(),
            "{} did not answer {name} {rtype}",
            answers[0].0
        );
        for (server, answer) in &answers[1..] {
            ensure!(
                answer == first,
                "{name} {rtype}: {server} answers {answer:?}, {} answers {first:?}",
                answers[0].0
            );
        }
    }
    println!(
        "sample answers agree across {} servers ({} queries)",
        servers.len(),
        samples.len()
    );
    Ok(())
}

struct PerfResult {
    qps: f64,
    lost: u64,
    latency_ms: f64,
}

fn dnsperf(
    netns: &TestNetns,
    pin: &[String],
    addr: SocketAddr,
    queries: &Path,
    flags: &Flags,
) -> anyhow::Result<PerfResult> {
    let port = addr.port().to_string();
    let server = addr.ip().to_string();
    let seconds = flags.seconds.to_string();
    let outstanding = flags.outstanding.to_string();
    let queries = queries.to_string_lossy();
    let out = in_netns(
        netns,
        pin,
        &[
            "dnsperf",
            "-s",
            &server,
            "-p",
            &port,
            "-d",
            &queries,
            "-l",
            &seconds,
            "-q",
            &outstanding,
            "-c",
            "1",
        ],
    )
    .output()
    .context("run dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "dnsperf failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |label: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::trim)
    };
    let qps = field("Queries per second:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no 'Queries per second' in dnsperf's output:\n{text}"))?;
    let lost = field("Queries lost:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let latency_ms = field("Average Latency (s):")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |s| s * 1000.0);
    Ok(PerfResult {
        qps,
        lost,
        latency_ms,
    })
}

/// VmRSS of fleet-dns (and Knot, for scale) serving `services` services, after answering.
fn rss(netns: &TestNetns, pin: &[String], services: usize, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let (imports, vips) = fleet(services);
    let config = DnsConfig {
        zones: vec![ZONE.into()],
        ttl: TTL,
    };
    let build_started = Instant::now();
    let table = DnsTable::build(&config, &imports, &vips)?;
    println!(
        "DnsTable::build of {services} services (what fleet-dns does on every change of its import records): {:.2} s",
        build_started.elapsed().as_secs_f64()
    );
    drop((imports, vips));
    let (names, records) = (table.len(), table.records().count());
    let zone_file: PathBuf = dir.join("rss.zone");
    std::fs::write(&zone_file, zone_text(&table))?;
    drop(table);
    let fleet_addr: SocketAddr = "127.0.0.1:5304".parse()?;
    let knot_addr: SocketAddr = "127.0.0.1:5305".parse()?;
    let fleet = start_fleet_dns(netns, pin, services, fleet_addr, dir)?;
    let knot = start_knot(netns, pin, &zone_file, knot_addr, &dir.join("knot-rss"))?;
    for (name, proc, addr) in [
        ("fleet-dns", &fleet, fleet_addr),
        ("knot", &knot, knot_addr),
    ] {
        wait_serving(netns, addr, name, proc)?;
        let probe = format!(
            "svc-{}.ns-{}.svc.{ZONE}.",
            services - 2,
            (services - 2) % NAMESPACES
        );
        let answer = dig(netns, addr, &probe, "A");
        ensure!(
            answer
                .as_ref()
                .is_some_and(|(s, a)| s == "NOERROR" && a.len() == 1),
            "{name} with {services} services answers {probe} with {answer:?}"
        );
        // The process under nsenter/taskset: both exec, so the PID is the server's.
        let pid = proc.0.id();
        let rss = proc_status_kib(pid, "VmRSS")? as f64 / 1024.0;
        let hwm = proc_status_kib(pid, "VmHWM")? as f64 / 1024.0;
        println!(
            "memory {name:9}: {services} services ({names} names, {records} records): VmRSS {rss:.1} MiB, VmHWM {hwm:.1} MiB"
        );
    }
    println!(
        "memory measured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

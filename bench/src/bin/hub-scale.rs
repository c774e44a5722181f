//! hub-scale: the hub's TLS API under many lightweight simulated members (no netns).
//!
//! N clusters join with one token, each publishes R records (`export/…`: what members share),
//! then every member watches with the product's member scope while every member makes the
//! product's steady traffic (a lease renewal every TTL/3, its `gateway` record every status
//! interval), and one member at a time publishes a change: the fan-out time is from the
//! publish call until the last of the N watchers has the change. Reports join time (total, per-join p50/p99),
//! fan-out p50/p99 and the hub's RSS. The hub is this same binary re-executed as
//! `hub-scale --serve-hub ...` (the library's `serve_until_signal` on an embedded store), so
//! its memory is its own; it is stopped by PID.
//!
//! There is no peer hub to compare with here: the baseline on the last line is the target
//! itself (p99 fan-out 1,000 ms at 1,000 clusters), so ratio < 1.0 meets it.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fleet_bench::stats::{Samples, last_line};
use fleet_hub::registry::FleetLayout;
use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::model::{ClusterId, JoinRequest, PublicKey, RegistryEvent};
use fleet_hub_api::records::{GATEWAY_RECORD, GatewayPeerRecord, GatewayRecord};
use fleet_hub_api::wire::{CaHash, Credential};
use futures::StreamExt;

#[derive(Parser, Debug)]
#[command(
    name = "hub-scale",
    about = "fleet-hub API at scale: joins, records, watch fan-out, memory"
)]
struct Flags {
    /// Simulated member clusters.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Records each member publishes.
    #[arg(long, default_value_t = 100)]
    records: usize,
    /// Changes whose fan-out is timed.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Calls in flight at once during the join and publish phases.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Block prefix of the bench's hub (the default /20 holds only 256 clusters; /22: 1,024).
    #[arg(long, default_value_t = 22)]
    block_prefix: u8,
    /// Lease TTL of every simulated controller (the product's default, 3 s); each renews
    /// every third of it on its own connection, as `fleet-controller` does. 0: no leases.
    #[arg(long, default_value_t = 3000)]
    lease_ttl_ms: u64,
    /// How often each member republishes its `gateway` record (the controller's default
    /// `--status-interval`, 5 s). 0: no republishing.
    #[arg(long, default_value_t = 5000)]
    status_interval_ms: u64,
    /// Seconds of steady background traffic (leases + gateway records) measured before the
    /// timed changes: the hub's CPU over it is reported.
    #[arg(long, default_value_t = 20)]
    steady_seconds: u64,
    /// The whole run must finish within this many seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
    /// Internal: run as the bench's hub (data dir) on --listen.
    #[arg(long, hide = true)]
    serve_hub: Option<PathBuf>,
    #[arg(long, hide = true)]
    listen: Option<std::net::SocketAddr>,
}

fn layout(block_prefix: u8) -> anyhow::Result<FleetLayout> {
    Ok(FleetLayout::new(
        fleet_core::config::DEFAULT_FLEET_CIDR.parse()?,
        block_prefix,
    )?)
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    // The bench holds ~3 connections per simulated member and the hub as many descriptors:
    // 10,000 clusters need ~30,000 each. Root may raise the hard limit; the hub (a child)
    // inherits it and raises its soft limit to it as `fleet-hub serve` does.
    let want = 262_144;
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    if hard < want {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want);
    }
    fleet_hub::limits::raise_nofile_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(dir) = &flags.serve_hub {
        let listen = flags.listen.context("--serve-hub needs --listen")?;
        return runtime.block_on(serve_hub(dir, listen, flags.block_prefix));
    }
    let limit = Duration::from_secs(flags.max_seconds);
    runtime.block_on(async {
        match tokio::time::timeout(limit, run(&flags)).await {
            Ok(result) => result,
            Err(_) => bail!(
                "hub-scale did not finish within {} s (--max-seconds)",
                flags.max_seconds
            ),
        }
    })
}

async fn serve_hub(
    dir: &Path,
    listen: std::net::SocketAddr,
    block_prefix: u8,
) -> anyhow::Result<()> {
    let location = fleet_hub::admin::StoreLocation::Embedded(dir.to_path_buf());
    let registry = fleet_hub::admin::open_registry(&location, layout(block_prefix)?).await?;
    let mut options = fleet_hub::api::server::ServerOptions::new(listen, dir);
    // As `fleet-hub serve` does.
    options.max_connections =
        fleet_hub::limits::connection_budget(fleet_hub::limits::raise_nofile_limit()?);
    fleet_hub::api::server::serve_until_signal(registry, options).await
}

/// The bench's hub process and its data dir; stopped by PID and removed on drop.
struct HubGuard {
    child: Child,
    dir: tempfile::TempDir,
    endpoint: String,
}

impl HubGuard {
    fn start(block_prefix: u8) -> anyhow::Result<HubGuard> {
        let dir = tempfile::Builder::new().prefix("hub-scale-").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let endpoint = format!("127.0.0.1:{port}");
        let mut command = Command::new(std::env::current_exe()?);
        // SAFETY: only an async-signal-safe prctl between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let log = std::fs::File::create(dir.path().join("hub.log"))?;
        let child = command
            .arg("--serve-hub")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg(&endpoint)
            .arg("--block-prefix")
            .arg(block_prefix.to_string())
            .env("FLEET_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting the bench's hub")?;
        Ok(HubGuard {
            child,
            dir,
            endpoint,
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// VmRSS and VmHWM of the hub in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU seconds (user + system) the hub process has used so far.
    fn cpu_seconds(&self) -> f64 {
        fleet_bench::wg_go::cpu_times(self.child.id()).total()
    }

    /// Open file descriptors of the hub.
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    async fn admin(&self) -> anyhow::Result<HubClient> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = async {
                let pem = std::fs::read_to_string(self.data_dir().join("ca.pem")).ok()?;
                let cred =
                    std::fs::read_to_string(self.data_dir().join("admin.credential")).ok()?;
                let admin = HubClient::new(
                    [self.endpoint.clone()],
                    CaHash::of_pem(&pem).ok()?,
                    ClientOptions::default(),
                )
                .ok()?
                .with_credential(Credential::parse(&cred)?);
                admin.list_tokens().await.ok()?;
                Some(admin)
            };
            if let Some(admin) = ready.await {
                return Ok(admin);
            }
            if Instant::now() > deadline {
                bail!(
                    "the bench's hub did not serve within 30 s; log: {}",
                    std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for HubGuard {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The product's member client settings (the controller's and fleet-dns's): default
/// timeouts, and the member scope, so a member's watch carries the fleet's shape, the exports
/// and its own records, not every other member's `gateway` record.
fn options() -> ClientOptions {
    ClientOptions {
        scope: fleet_hub_api::model::FleetScope::Member,
        ..ClientOptions::default()
    }
}

fn cluster_name(i: usize) -> String {
    format!("sim-{i:05}")
}

async fn run(flags: &Flags) -> anyhow::Result<()> {
    let n = flags.clusters;
    let capacity = layout(flags.block_prefix)?.block_count() as usize;
    if n > capacity {
        bail!(
            "{n} clusters do not fit {capacity} blocks of /{}: use a longer --block-prefix",
            flags.block_prefix
        );
    }
    println!(
        "hub-scale: {n} simulated clusters, {} records each, {} timed changes; hub on an embedded store, blocks of /{}",
        flags.records, flags.changes, flags.block_prefix
    );
    let hub = HubGuard::start(flags.block_prefix)?;
    let admin = hub.admin().await?;
    let (join, _) = admin
        .create_token(Duration::from_secs(3600), "hub-scale")
        .await?;
    let endpoint = hub.endpoint.clone();
    let (rss0, _) = hub.memory_mib();

    // Joins.
    let lease_ttl = Duration::from_millis(flags.lease_ttl_ms);
    let background = Background::new();
    let background = &background;
    let started = Instant::now();
    let results: Vec<anyhow::Result<(HubClient, Duration)>> = futures::stream::iter(0..n)
        .map(|i| {
            let join = join.clone();
            let endpoint = endpoint.clone();
            async move {
                let client = HubClient::new([endpoint], join.ca_hash, options())?;
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let t = Instant::now();
                let request = JoinRequest {
                    cluster: ClusterId::new(cluster_name(i))?,
                    public_key: PublicKey::from_bytes(key),
                    endpoint: None,
                };
                // Retried only when the hub was not reached (nothing was sent): a join whose
                // answer was lost cannot be repeated with a token alone.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match client.join(&join, request.clone()).await {
                        Err(fleet_hub_api::client::HubError::Unreachable { .. })
                            if Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => {
                            other.with_context(|| format!("join of {}", cluster_name(i)))?;
                            break;
                        }
                    }
                }
                let took = t.elapsed();
                // The cluster's controller takes its lease as it starts (the cluster becomes
                // live: one fleet-wide event, seen by the watchers of the members before it).
                if lease_ttl > Duration::ZERO {
                    retried(|| client.acquire_lease("controller-0", lease_ttl))
                        .await
                        .with_context(|| format!("first lease of {}", cluster_name(i)))?;
                    background.renew(&client, lease_ttl);
                }
                Ok((client, took))
            }
        })
        .buffer_unordered(flags.concurrency)
        .collect()
        .await;
    let join_total = started.elapsed();
    let mut members = Vec::with_capacity(n);
    let mut joins = Samples::new("join (per call)");
    for r in results {
        let (client, took) = r?;
        joins.push(took);
        members.push(client);
    }
    members.sort_by_key(|c| match c.credential() {
        Some(Credential::Member { cluster, .. }) => cluster.to_string(),
        _ => String::new(),
    });
    println!(
        "joins: {n} in {:.2} s (each followed by its controller's first lease); per join p50={:.1} ms p99={:.1} ms",
        join_total.as_secs_f64(),
        joins.quantile(0.5),
        joins.quantile(0.99)
    );

    // Records.
    let started = Instant::now();
    let value = vec![b'x'; 128];
    let calls = futures::stream::iter((0..n).flat_map(|m| (0..flags.records).map(move |r| (m, r))))
        .map(|(m, r)| {
            let client = members[m].clone();
            let value = value.clone();
            async move {
                let owner = ClusterId::new(cluster_name(m))?;
                let name = format!("export/bench/svc-{r:03}");
                retried(|| client.publish(&owner, &name, &value)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(flags.concurrency)
        .collect::<Vec<_>>()
        .await;
    for c in calls {
        c?;
    }
    let publish_total = started.elapsed();
    let total_records = n * flags.records;
    println!(
        "records: {total_records} published in {:.2} s ({:.0}/s)",
        publish_total.as_secs_f64(),
        total_records as f64 / publish_total.as_secs_f64()
    );
    let (rss_records, _) = hub.memory_mib();

    // Watchers: every member watches from the current revision.
    let revision = retried(|| admin.list()).await?.revision;
    let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut watchers = tokio::task::JoinSet::new();
    // Clusters the hub marked not live while they renewed (seen by the first watcher): a
    // renewal lost often enough to let a lease lapse flaps the cluster for every member.
    let lapses = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (w, client) in members.iter().enumerate() {
        let tx = arrivals_tx.clone();
        let lapses = lapses.clone();
        let mut watch = Box::pin(client.watch(revision));
        // Members come up over time, not in one instant: at most CONNECTS_PER_SECOND new
        // TLS connections per second (the bench's own clients share the hub's 2 cores).
        let start = connect_slot(w);
        watchers.spawn(async move {
            tokio::time::sleep(start).await;
            while let Some(event) = watch.next().await {
                match event {
                    Ok(RegistryEvent::ClusterUpserted { record, .. })
                        if w == 0 && !record.controller_live =>
                    {
                        lapses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(RegistryEvent::RecordPut { name, .. })
                        if name.starts_with("export/bench/change-") =>
                    {
                        if tx.send((name, Instant::now())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("a watcher failed: {e}");
                        return;
                    }
                }
            }
        });
    }
    drop(arrivals_tx);

    // The members' steady traffic, as the product makes it: every controller renews its
    // lease every TTL/3 (since its join) and republishes its `gateway` record every status
    // interval.
    background.publish_gateways(&members, flags);
    let steady = Duration::from_secs(flags.steady_seconds);
    let cpu0 = hub.cpu_seconds();
    let t_steady = Instant::now();
    tokio::time::sleep(steady).await;
    let steady_cpu = (hub.cpu_seconds() - cpu0) / t_steady.elapsed().as_secs_f64();
    let fds = hub.open_fds();
    let (rss_steady, _) = hub.memory_mib();
    // Drain what the watchers got during the steady phase (gateway records are not counted).
    while arrivals.try_recv().is_ok() {}

    // One change reaches all N watchers; the first ("warm-up") also proves they are all open.
    let mut fanout = Samples::new("fan-out to all watchers");
    let mut pending: HashMap<String, usize> = HashMap::new();
    for i in 0..=flags.changes {
        let name = format!("export/bench/change-{i:04}");
        let owner = ClusterId::new(cluster_name(i % n))?;
        let t0 = Instant::now();
        retried(|| members[i % n].publish(&owner, &name, b"changed")).await?;
        let deadline = t0 + Duration::from_secs(if i == 0 { 120 } else { 30 });
        let mut last = t0;
        while pending.get(&name).copied().unwrap_or(0) < n {
            let (got, at) = tokio::time::timeout_at(deadline.into(), arrivals.recv())
                .await
                .with_context(|| {
                    format!(
                        "{name} reached {} of {n} watchers in time",
                        pending.get(&name).copied().unwrap_or(0)
                    )
                })?
                .context("all watchers ended")?;
            *pending.entry(got.clone()).or_default() += 1;
            if got == name {
                last = last.max(at);
            }
        }
        if i == 0 {
            println!(
                "watchers: all {n} open (warm-up change reached them in {:.1} ms)",
                (last - t0).as_secs_f64() * 1e3
            );
        } else {
            fanout.push(last - t0);
        }
    }
    let (rss, hwm) = hub.memory_mib();
    let report = background.stop().await;
    watchers.abort_all();

    let p50 = fanout.quantile(0.5);
    let p99 = fanout.quantile(0.99);
    println!("{}", joins.summary());
    println!("{}", fanout.summary());
    println!(
        "fan-out (publish -> last of {n} watchers): p50={p50:.1} ms p99={p99:.1} ms over {} changes",
        fanout.len()
    );
    println!(
        "hub memory: RSS {rss0:.1} MiB idle, {rss_records:.1} MiB after {total_records} records, {rss_steady:.1} MiB in steady traffic, {rss:.1} MiB with {n} watchers (peak {hwm:.1} MiB)"
    );
    println!(
        "steady traffic: {} lease renewals/s + {} gateway records/s; hub CPU {:.2} cores (of 2, shared with the simulated members); {fds} open files",
        report.renewal_rate(flags, n),
        report.publish_rate(flags, n),
        steady_cpu
    );
    println!(
        "liveness: {} clusters marked not live by the hub while their controllers renewed",
        lapses.load(std::sync::atomic::Ordering::Relaxed)
    );
    for (kind, count) in &report.renewal_errors {
        println!("lease renewal error x{count}: {kind}");
    }
    println!("{}", report.renewals.summary());
    println!("{}", report.publishes.summary());
    println!(
        "lease renewals: {} failed or refused of {}, {} slower than the TTL (a standby could take over); gateway publishes: {} failed",
        report.renewal_failures,
        report.renewals.len() + report.renewal_failures,
        report.renewals_past_ttl,
        report.publish_failures
    );
    println!(
        "baseline: there is no peer hub to run side by side here; the baseline is the target itself (p99 fan-out 1000 ms at 1,000 clusters), ratio = ours / 1000, below 1.0 meets it"
    );
    println!(
        "{}",
        last_line(
            "hub-scale",
            &format!("{p99:.1}"),
            "1000",
            p99 / 1000.0,
            "1.0"
        )
    );
    drop(hub);
    Ok(())
}

/// What the background traffic measured.
struct BackgroundReport {
    renewals: Samples,
    publishes: Samples,
    renewal_failures: usize,
    renewals_past_ttl: usize,
    publish_failures: usize,
    renewal_errors: std::collections::BTreeMap<String, usize>,
}

impl BackgroundReport {
    fn renewal_rate(&self, flags: &Flags, n: usize) -> String {
        if flags.lease_ttl_ms == 0 {
            return "0".into();
        }
        format!("{:.0}", n as f64 / (flags.lease_ttl_ms as f64 / 3000.0))
    }

    fn publish_rate(&self, flags: &Flags, n: usize) -> String {
        if flags.status_interval_ms == 0 {
            return "0".into();
        }
        format!(
            "{:.0}",
            n as f64 / (flags.status_interval_ms as f64 / 1000.0)
        )
    }
}

#[derive(Default)]
struct Tally {
    renewal_errors: std::collections::BTreeMap<String, usize>,
    renewals: Vec<Duration>,
    publishes: Vec<Duration>,
    renewal_failures: usize,
    renewals_past_ttl: usize,
    publish_failures: usize,
}

/// Every member's lease renewals and gateway republishing, spread evenly over the interval.
struct Background {
    tasks: std::sync::Mutex<tokio::task::JoinSet<()>>,
    tally: std::sync::Arc<std::sync::Mutex<Tally>>,
}

impl Background {
    fn new() -> Background {
        Background {
            tasks: std::sync::Mutex::new(tokio::task::JoinSet::new()),
            tally: std::sync::Arc::default(),
        }
    }

    /// Member `client`'s controller renews the lease it just took every TTL/3, from now on
    /// (as `fleet-controller` does from its start).
    fn renew(&self, client: &HubClient, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let client = client.clone();
        let tally = self.tally.clone();
        self.tasks.lock().expect("tasks").spawn(async move {
            let period = ttl / 3;
            let mut tick = tokio::time::interval_at((Instant::now() + period).into(), period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let t = Instant::now();
                let result = client.acquire_lease("controller-0", ttl).await;
                let took = t.elapsed();
                let mut tally = tally.lock().expect("tally");
                match result {
                    Ok(lease) if lease.granted => {
                        tally.renewals.push(took);
                        if took > ttl {
                            tally.renewals_past_ttl += 1;
                        }
                    }
                    Ok(_) => {
                        tally.renewal_failures += 1;
                        *tally.renewal_errors.entry("refused".into()).or_default() += 1;
                    }
                    Err(e) => {
                        tally.renewal_failures += 1;
                        let kind: String = e.to_string().chars().take(60).collect();
                        *tally.renewal_errors.entry(kind).or_default() += 1;
                    }
                }
            }
        });
    }

    /// Every member republishes its `gateway` record every status interval, spread evenly.
    fn publish_gateways(&self, members: &[HubClient], flags: &Flags) {
        let owner = |c: &HubClient| match c.credential() {
            Some(Credential::Member { cluster, .. }) => Some(cluster.clone()),
            _ => None,
        };
        let n = members.len().max(1) as u32;
        let status = Duration::from_millis(flags.status_interval_ms);
        let mut tasks = self.tasks.lock().expect("tasks");
        for (i, client) in members.iter().enumerate() {
            let i = i as u32;
            if let (false, Some(own)) = (status.is_zero(), owner(client)) {
                let client = client.clone();
                let tally = self.tally.clone();
                tasks.spawn(async move {
                    tokio::time::sleep(connect_slot(i as usize).max(status * i / n)).await;
                    let mut tick = tokio::time::interval(status);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut beat = 0u64;
                    loop {
                        tick.tick().await;
                        beat += 1;
                        let value = gateway_record(i, beat);
                        let t = Instant::now();
                        let result = client
                            .publish(&own, GATEWAY_RECORD, &value)
                            .await
                            .map(|_| ());
                        let took = t.elapsed();
                        let mut tally = tally.lock().expect("tally");
                        match result {
                            Ok(()) => tally.publishes.push(took),
                            Err(_) => tally.publish_failures += 1,
                        }
                    }
                });
            }
        }
    }

    async fn stop(&self) -> BackgroundReport {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks"));
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let tally = std::mem::take(&mut *self.tally.lock().expect("tally"));
        let mut renewals = Samples::new("lease renewal (per call)");
        tally.renewals.into_iter().for_each(|d| renewals.push(d));
        let mut publishes = Samples::new("gateway record publish (per call)");
        tally.publishes.into_iter().for_each(|d| publishes.push(d));
        BackgroundReport {
            renewals,
            publishes,
            renewal_failures: tally.renewal_failures,
            renewals_past_ttl: tally.renewals_past_ttl,
            publish_failures: tally.publish_failures,
            renewal_errors: tally.renewal_errors,
        }
    }
}

/// A `gateway` record as a relay-mode controller publishes it (one peer: the relay).
fn gateway_record(i: u32, beat: u64) -> Vec<u8> {
    let record = GatewayRecord {
        node: format!("sim-{i:05}-1"),
        holder: "controller-0".into(),
        backend: "userspace".into(),
        public_key: "6NR1f2LgUEM0eTfsz4kMBZ5Zj7o8k1GQqG0Xb8pUqW8=".into(),
        listen_port: 51820,
        updated_at: beat,
        peers: vec![GatewayPeerRecord {
            public_key: "x6y1tWn8pWwJc3C1jgqf8bqvC3dYzXo2a6C1Y9P2Gk0=".into(),
            endpoint: Some("203.0.113.1:51820".parse().expect("address")),
            last_handshake: Some(beat),
            rx_bytes: beat * 1000,
            tx_bytes: beat * 1000,
            path: None,
            path_since: None,
        }],
    };
    serde_json::to_vec(&record).expect("records serialise")
}

/// Retries a call that failed as unavailable for up to 30 s, as the product's controllers do
/// (a hub busy with a thousand TLS handshakes may time a connect out).
async fn retried<T, F, Fut>(mut call: F) -> Result<T, fleet_hub_api::client::HubError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, fleet_hub_api::client::HubError>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Err(
                e @ (fleet_hub_api::client::HubError::Unreachable { .. }
                | fleet_hub_api::client::HubError::Transport { .. }
                | fleet_hub_api::client::HubError::Timeout { .. }),
            ) if Instant::now() < deadline => {
                eprintln!("retrying a call: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// New TLS connections the simulated members open per second at most.
const CONNECTS_PER_SECOND: u32 = 1000;

/// When member `i` may open its first connection of a kind.
fn connect_slot(i: usize) -> Duration {
    Duration::from_secs(1) * u32::try_from(i).unwrap_or(u32::MAX) / CONNECTS_PER_SECOND
}

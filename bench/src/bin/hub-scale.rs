//! hub-scale: the hub's TLS API under many lightweight simulated members (no netns).
//!
//! N clusters join with one token, each publishes R records, then every member watches and
//! one member at a time publishes a change: the fan-out time is from the publish call until
//! the last of the N watchers has the change. Reports join time (total, per-join p50/p99),
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
    options.request_timeout = Duration::from_secs(60);
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
                    options(),
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

fn options() -> ClientOptions {
    ClientOptions {
        call_timeout: Duration::from_secs(60),
        watch_idle_timeout: Duration::from_secs(30),
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
                client
                    .join(
                        &join,
                        JoinRequest {
                            cluster: ClusterId::new(cluster_name(i))?,
                            public_key: PublicKey::from_bytes(key),
                            endpoint: None,
                        },
                    )
                    .await
                    .with_context(|| format!("join of {}", cluster_name(i)))?;
                Ok((client, t.elapsed()))
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
        "joins: {n} in {:.2} s; per join p50={:.1} ms p99={:.1} ms",
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
                client
                    .publish(&owner, &format!("svc-{r:03}"), &value)
                    .await?;
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
    let revision = admin.list().await?.revision;
    let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut watchers = tokio::task::JoinSet::new();
    for client in &members {
        let tx = arrivals_tx.clone();
        let mut watch = Box::pin(client.watch(revision));
        watchers.spawn(async move {
            while let Some(event) = watch.next().await {
                match event {
                    Ok(RegistryEvent::RecordPut { name, .. }) if name.starts_with("change-") => {
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

    // One change reaches all N watchers; the first ("warm-up") also proves they are all open.
    let mut fanout = Samples::new("fan-out to all watchers");
    let mut pending: HashMap<String, usize> = HashMap::new();
    for i in 0..=flags.changes {
        let name = format!("change-{i:04}");
        let owner = ClusterId::new(cluster_name(i % n))?;
        let t0 = Instant::now();
        members[i % n].publish(&owner, &name, b"changed").await?;
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
        "hub memory: RSS {rss0:.1} MiB idle, {rss_records:.1} MiB after {total_records} records, {rss:.1} MiB with {n} watchers (peak {hwm:.1} MiB)"
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

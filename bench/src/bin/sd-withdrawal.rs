//! `sd-withdrawal`: from an exporting cluster's gateway dying to its endpoints gone from
//! another cluster's DNS answers and VIP, end to end in fleet-e2e's sandbox fleet.
//!
//! `aa` exports `web` (ClusterSetIP) and `db` (headless), both one pod of aa, no standby
//! gateway. Each round kills aa's gateway (`kill -9` of the gateway node's fleet-nri, which
//! holds the userspace WireGuard device) and measures, from bb's client pod (probe in its
//! netns every 10 ms), the time until `db.default.svc.clusterset.local` is NXDOMAIN **and**
//! the VIP of `web` refuses; then restarts it and measures the return (both usable again).
//!
//! The controllers run with `--status-interval 500ms` and `--liveness-hold-down 0s` (no
//! damping, so rounds do not wait on it; damping is unit-tested in `fleet-services`). aa's
//! controller reads its gateway device every status interval and reports the gateway down
//! after two failed reads (so detection takes 0.5-1 s), one hub write that every member sees.
//! The baseline printed is the detection floor of the heartbeat rule this replaced (a
//! `gateway` record republished every status interval, judged dead after three: 1.5 s), so
//! the ratio compares the two designs at the same interval. Target: p99 < 3 s.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use fleet_bench::sd::{Resolved, SdFleet, http_get, resolve, time_until};
use fleet_bench::stats::{Samples, last_line};

const NAME: &str = "sd-withdrawal";
const TARGET_P99_MS: f64 = 3000.0;
const STATUS_INTERVAL: &str = "500ms";
const LIVENESS_TIMEOUT_MS: f64 = 1500.0;

#[derive(Debug, Parser)]
#[command(
    about = "exporting cluster's gateway killed → its endpoints gone from the other cluster's DNS and VIP"
)]
struct Flags {
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Give up on one withdrawal or return after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

fn usable(vip: Ipv4Addr) -> bool {
    matches!(
        resolve("db.default.svc.clusterset.local"),
        Resolved::Addresses(_)
    ) && http_get(vip).is_ok_and(|b| b == "web-1")
}

fn withdrawn(vip: Ipv4Addr) -> bool {
    resolve("db.default.svc.clusterset.local") == Resolved::NxDomain && http_get(vip).is_err()
}

fn main() -> Result<()> {
    let flags = Flags::parse();
    if flags.rounds == 0 {
        bail!("{NAME}: --rounds must be positive");
    }
    fleet_bench::require_root(NAME)?;
    println!("{NAME}: {}", fleet_bench::load_line());
    let mut sd = SdFleet::start(
        NAME,
        &[
            "--status-interval",
            STATUS_INTERVAL,
            "--liveness-hold-down",
            "0s",
        ],
    )?;
    let netns = sd.client_netns();
    let timeout = Duration::from_secs(flags.timeout);
    let _web = sd.web_pod("aa", 1, "web-1", "web")?;
    sd.fleetctl(
        "aa",
        &[
            "export",
            "web",
            "--selector",
            "app=web",
            "--port",
            "http:tcp:80",
        ],
    )?;
    sd.fleetctl(
        "aa",
        &["export", "db", "--selector", "app=web", "--headless"],
    )?;
    let vip = time_until(&netns, Instant::now(), timeout, || {
        match resolve("web.default.svc.clusterset.local") {
            Resolved::Addresses(ips) if usable(ips[0]) => Some(ips[0]),
            _ => None,
        }
    })?
    .map(|(_, v)| v)
    .ok_or_else(|| anyhow::anyhow!("{NAME}: web never became usable\n{}", sd.fleet.logs()))?;
    println!("{NAME}: web's VIP in bb is {vip}");

    let mut gone = Samples::new("gateway killed -> aa gone from bb's DNS and VIP");
    let mut back = Samples::new("gateway restarted -> aa back in bb's DNS and VIP");
    let mut missed = 0usize;
    for round in 0..flags.rounds {
        fleet_bench::check_interrupted()?;
        let t0 = Instant::now();
        sd.fleet.member_mut("aa").nodes[0].node.nri.kill9();
        match time_until(&netns, t0, timeout, move || withdrawn(vip).then_some(()))? {
            Some((d, ())) => gone.push(d),
            None => {
                missed += 1;
                gone.push(timeout);
                println!(
                    "{NAME}: round {round}: not withdrawn within {}s",
                    flags.timeout
                );
            }
        }
        let t1 = Instant::now();
        sd.fleet.member_mut("aa").nodes[0].node.nri.spawn()?;
        match time_until(&netns, t1, timeout, move || usable(vip).then_some(()))? {
            Some((d, ())) => back.push(d),
            None => bail!(
                "{NAME}: round {round}: aa did not come back within {}s\n{}",
                flags.timeout,
                sd.fleet.logs()
            ),
        }
    }
    for s in [&gone, &back] {
        println!("{} p99={:>8.3}ms", s.summary(), s.quantile(0.99));
    }
    let p99 = gone.quantile(0.99);
    println!(
        "{NAME}: {} withdrawals, {missed} missed; p50 {:.1}ms p99 {p99:.1}ms; target p99 < {TARGET_P99_MS}ms: {}",
        gone.len(),
        gone.median(),
        if p99 < TARGET_P99_MS { "met" } else { "MISSED" }
    );
    println!(
        "{NAME}: baseline = the detection floor of the former heartbeat rule ({LIVENESS_TIMEOUT_MS}ms: three --status-interval {STATUS_INTERVAL}); now the gateway is reported down after two failed reads"
    );
    println!("{NAME}: {} after the runs", fleet_bench::load_line());
    drop(sd);
    println!(
        "{}",
        last_line(
            NAME,
            &format!("{p99:.1}ms"),
            &format!("{LIVENESS_TIMEOUT_MS:.0}ms"),
            p99 / LIVENESS_TIMEOUT_MS,
            &format!("p99<{TARGET_P99_MS:.0}ms"),
        )
    );
    Ok(())
}

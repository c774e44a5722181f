//! `cross-cluster-latency`: the round-trip latency a pod pays to reach a pod of another cluster
//! through the hub's relay, against reaching a pod of its own cluster on another node.
//!
//! In fleet-e2e's sandbox fleet (see `fleet_bench::xcluster`): ICMP echo RTTs measured by
//! busybox `ping` run in the pods' network namespaces, over eth-fleet:
//! - baseline, intra-cluster: P1 (aa node 2) → P2 (aa node 1), one VXLAN hop;
//! - ours, cross-cluster: P3 (bb node 2) → P1 (aa node 2): VXLAN → bb's gateway (WireGuard)
//!   → bb's NAT → hub relay (decrypt, route, encrypt) → aa's NAT → aa's gateway → VXLAN.
//!
//! Rounds alternate which path goes first; warm-up pings are not counted. The last line
//! reports the two medians; the target is on their difference (added latency ≤ 1 ms), see
//! bench/README.md.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use fleet_bench::stats::{Samples, last_line};
use fleet_bench::xcluster::CrossClusterPods;

const NAME: &str = "cross-cluster-latency";
/// Target: the cross-cluster median may exceed the intra-cluster median by this much.
const ADDED_TARGET_MS: f64 = 1.0;

#[derive(Debug, Parser)]
#[command(about = "ICMP RTT pod to pod: across clusters through the hub relay vs within a cluster")]
struct Flags {
    /// Rounds; each round pings both paths, alternating which goes first.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Echos per path per round.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Milliseconds between echos.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Unmeasured echos per path first (handshakes, ARP, caches).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Stop measuring after this many seconds even if rounds remain.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

fn main() -> Result<()> {
    let flags = Flags::parse();
    if flags.rounds == 0 || flags.count == 0 || flags.interval_ms == 0 {
        bail!("{NAME}: --rounds, --count and --interval-ms must be positive");
    }
    fleet_bench::require_root(NAME)?;
    println!("{NAME}: {}", fleet_bench::load_line());
    let x = CrossClusterPods::start(NAME)?;
    fleet_bench::check_interrupted()?;
    let interval = Duration::from_millis(flags.interval_ms);
    let paths = [
        ("intra P1->P2 (aa-2 -> aa-1)", &x.p1, x.p2.fleet_ip.clone()),
        (
            "cross P3->P1 (bb-2 -> relay -> aa-2)",
            &x.p3,
            x.p1.fleet_ip.clone(),
        ),
    ];
    for (_, from, to) in &paths {
        x.ping(from, to, flags.warmup.max(1), interval)?;
    }
    let mut samples = [Samples::new(paths[0].0), Samples::new(paths[1].0)];
    let mut lost = [0usize; 2];
    let start = Instant::now();
    for round in 0..flags.rounds {
        fleet_bench::check_interrupted()?;
        if start.elapsed() > Duration::from_secs(flags.max_seconds) {
            println!("{NAME}: --max-seconds reached after {round} rounds");
            break;
        }
        for k in 0..2 {
            let i = (k + round) % 2;
            let (_, from, to) = &paths[i];
            let (rtts, l) = x.ping(from, to, flags.count, interval)?;
            rtts.into_iter().for_each(|d| samples[i].push(d));
            lost[i] += l;
        }
    }
    for (s, l) in samples.iter().zip(lost) {
        println!("{} p99={:>8.3}ms lost={l}", s.summary(), s.quantile(0.99));
    }
    let (intra, cross) = (&samples[0], &samples[1]);
    let added = cross.median() - intra.median();
    let added_p99 = cross.quantile(0.99) - intra.quantile(0.99);
    println!(
        "{NAME}: added latency (cross - intra): median {added:.3}ms, p99 {added_p99:.3}ms; target <= {ADDED_TARGET_MS:.3}ms: {}",
        if added <= ADDED_TARGET_MS {
            "met"
        } else {
            "MISSED"
        }
    );
    for m in ["aa", "bb"] {
        println!(
            "{NAME}: {m} gateway transfer (relay peer): {}",
            x.gateway_wg(m, "transfer")?.trim()
        );
    }
    println!("{NAME}: {} after the runs", fleet_bench::load_line());
    drop(x);
    println!(
        "{}",
        last_line(
            NAME,
            &format!("{:.3}ms", cross.median()),
            &format!("{:.3}ms", intra.median()),
            cross.median() / intra.median(),
            &format!("+{ADDED_TARGET_MS}ms"),
        )
    );
    Ok(())
}

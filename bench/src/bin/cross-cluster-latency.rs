//! `cross-cluster-latency`: the round-trip latency a pod pays to reach a pod of another cluster
//! through the hub's relay, with fleetboard's tunnels against the same path with
//! `wireguard-go` as the tunnel (trixie's 0.0.20231211, the baseline, and bookworm's
//! 0.0.20220316), each as the latency it adds to reaching a pod of its own cluster.
//!
//! In fleet-e2e's sandbox fleet (see `fleet_bench::xcluster`): ICMP echo RTTs measured by
//! busybox `ping` run in the pods' network namespaces, over eth-fleet:
//! - intra-cluster: P1 (aa node 2) → P2 (aa node 1), one VXLAN hop;
//! - cross-cluster: P3 (bb node 2) → P1 (aa node 2): VXLAN → bb's gateway (WireGuard)
//!   → bb's NAT → the hub's address (ours: the forwarding relay; wireguard-go: a relay that
//!   decrypts and re-encrypts) → aa's NAT → aa's gateway → VXLAN, once per datapath of
//!   `fleet_bench::tunnel_modes` (ours, each wireguard-go build, plain routing), the gateways'
//!   CNF netns switching between them.
//!
//! Rounds rotate which path goes first; warm-up pings are not counted. Added latency of a
//! datapath = its cross median − the intra median. The last line compares ours with trixie's
//! wireguard-go (the target: ratio ≤ 1.0); the absolute budget (ours adds ≤ 1 ms) is
//! printed before it. See bench/README.md.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use fleet_bench::stats::{Samples, last_line};
use fleet_bench::tunnel_modes::{Mode, TunnelModes};
use fleet_bench::xcluster::CrossClusterPods;

const NAME: &str = "cross-cluster-latency";
/// Absolute budget: the cross-cluster median may exceed the intra-cluster median by this much.
const ADDED_TARGET_MS: f64 = 1.0;

#[derive(Debug, Parser)]
#[command(about = "ICMP RTT pod to pod: across clusters through the hub relay vs within a cluster")]
struct Flags {
    /// Rounds; each round pings every path, rotating which goes first.
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
    let builds = fleet_bench::wg_go::builds()?;
    println!("{NAME}: {}", fleet_bench::load_line());
    let x = CrossClusterPods::start(NAME)?;
    fleet_bench::check_interrupted()?;
    let modes = TunnelModes::build(&x, &builds)?;
    let interval = Duration::from_millis(flags.interval_ms);
    // Path 0 is intra-cluster; the others are the cross-cluster path over each datapath.
    let mut paths: Vec<(String, Option<Mode>)> =
        vec![("intra P1->P2 (aa-2 -> aa-1)".to_string(), None)];
    for m in modes.modes() {
        paths.push((format!("cross P3->P1 {}", modes.label(m)), Some(m)));
    }
    let ping = |path: &(String, Option<Mode>), count: usize| match path.1 {
        None => x.ping(&x.p1, &x.p2.fleet_ip, count, interval),
        Some(m) => {
            modes.select(m)?;
            x.ping(&x.p3, &x.p1.fleet_ip, count, interval)
        }
    };
    for p in &paths {
        // The first echos of a twin may go while its handshake completes.
        let t = Instant::now();
        while ping(p, 1).is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{NAME}: {} gets no reply", p.0);
            }
        }
        ping(p, flags.warmup.max(1))?;
    }
    let mut samples: Vec<Samples> = paths.iter().map(|p| Samples::new(&p.0)).collect();
    let mut lost = vec![0usize; paths.len()];
    let start = Instant::now();
    for round in 0..flags.rounds {
        fleet_bench::check_interrupted()?;
        if start.elapsed() > Duration::from_secs(flags.max_seconds) {
            println!("{NAME}: --max-seconds reached after {round} rounds");
            break;
        }
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let (rtts, l) = ping(&paths[i], flags.count)?;
            rtts.into_iter().for_each(|d| samples[i].push(d));
            lost[i] += l;
        }
    }
    modes.select(Mode::Ours)?;
    for (s, l) in samples.iter().zip(&lost) {
        println!("{} p99={:>8.3}ms lost={l}", s.summary(), s.quantile(0.99));
    }
    let intra = &samples[0];
    let at = |mode: Mode| {
        let i = paths.iter().position(|p| p.1 == Some(mode)).unwrap_or(0);
        &samples[i]
    };
    let added = |mode: Mode| at(mode).median() - intra.median();
    for (i, p) in paths.iter().enumerate().skip(1) {
        println!(
            "{NAME}: added latency (cross - intra) {}: median {:.3}ms, p99 {:.3}ms",
            p.0,
            samples[i].median() - intra.median(),
            samples[i].quantile(0.99) - intra.quantile(0.99)
        );
    }
    let (ours, go, go_old) = (
        added(Mode::Ours),
        added(Mode::WireguardGo(0)),
        added(Mode::WireguardGo(1)),
    );
    println!(
        "{NAME}: ours adds {ours:.3}ms; budget <= {ADDED_TARGET_MS:.3}ms: {}",
        if ours <= ADDED_TARGET_MS {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "{NAME} second column: {} adds {go_old:.3}ms (ours/it {:.3})",
        builds[1].label,
        ours / go_old
    );
    for m in ["aa", "bb"] {
        println!(
            "{NAME}: {m} gateway transfer (the relay's session, the other member): {}",
            x.gateway_wg(m, "transfer")?.trim()
        );
    }
    println!("{NAME}: {} after the runs", fleet_bench::load_line());
    drop(modes);
    drop(x);
    println!(
        "{}",
        last_line(
            NAME,
            &format!("+{ours:.3}ms"),
            &format!("+{go:.3}ms"),
            ours / go,
            "<=1.0"
        )
    );
    Ok(())
}

//! `nri-memory`: fleet-nri's resident memory (VmRSS from /proc/PID/status) with 200 pods on
//! the node, against the same daemon idle before the pods. The pods are real: pause-only
//! sandboxes run through containerd's CRI with fleet-cni chained after bridge + host-local and
//! fleet-nri registered over NRI, so the daemon holds 200 attachments and has seen 200 NRI
//! pod events. The target is absolute: VmRSS < 30 MiB with the pods.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use fleet_bench::node::Node;
use fleet_bench::stats::last_line;
use fleet_e2e::PodSpec;

#[derive(Debug, Parser)]
struct Flags {
    /// Pods to run.
    #[arg(long, default_value_t = 200)]
    pods: usize,
    /// Give up starting pods after this many seconds (the result then says how many ran).
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

const TARGET_MIB: f64 = 30.0;

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    fleet_bench::require_root("nri-memory")?;
    println!("nri-memory: {}", fleet_bench::load_line());
    let node = Node::start("fbm-fleet", true)?;
    let daemon = node.daemon.as_ref().context("fleet node has a daemon")?;
    // Let the registration's Synchronize and the runtime's first calls settle.
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = daemon.status_kib("VmRSS")?;
    println!(
        "idle fleet-nri (pid {}): VmRSS {:.2} MiB, VmHWM {:.2} MiB",
        daemon.pid().unwrap_or(0),
        mib(idle_rss),
        mib(daemon.status_kib("VmHWM")?)
    );

    let started = Instant::now();
    let limit = Duration::from_secs(flags.max_seconds);
    let mut ran = 0;
    for i in 0..flags.pods {
        if started.elapsed() > limit {
            println!("stopping after {:?} (--max-seconds)", started.elapsed());
            break;
        }
        fleet_bench::check_interrupted()?;
        let pod = PodSpec::new(&format!("mem-{i}")).namespace("bench");
        node.cri().run_pod(&pod)?;
        ran += 1;
        if ran % 50 == 0 {
            println!(
                "{ran} pods after {:.1}s: fleet-nri VmRSS {:.2} MiB; {}",
                started.elapsed().as_secs_f64(),
                mib(daemon.status_kib("VmRSS")?),
                fleet_bench::load_line()
            );
        }
    }
    let status = daemon.client().status().context("fleet-nri status")?;
    ensure!(
        status.allocated == ran,
        "fleet-nri holds {} attachments with {ran} pods running",
        status.allocated
    );
    // Settle: nothing is in flight any more once every RunPodSandbox has returned.
    std::thread::sleep(Duration::from_secs(2));
    let rss = daemon.status_kib("VmRSS")?;
    let hwm = daemon.status_kib("VmHWM")?;
    let anon = daemon.status_kib("RssAnon")?;
    let file = daemon.status_kib("RssFile")?;
    let threads = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid().unwrap_or(0)))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Threads:"))
        .map(|l| l.trim_start_matches("Threads:").trim().to_string())
        .unwrap_or_default();
    println!(
        "with {ran} pods (real CRI sandboxes, {} attachments): VmRSS {:.2} MiB (RssAnon {:.2}, RssFile {:.2}), VmHWM {:.2} MiB, threads {threads}",
        status.allocated,
        mib(rss),
        mib(anon),
        mib(file),
        mib(hwm)
    );
    let t = Instant::now();
    let removed = node.remove_all_pods()?;
    println!(
        "removed {removed} pods in {:.1}s; fleet-nri VmRSS after {:.2} MiB, attachments {}",
        t.elapsed().as_secs_f64(),
        mib(daemon.status_kib("VmRSS")?),
        daemon
            .client()
            .status()
            .map(|s| s.allocated)
            .unwrap_or(usize::MAX)
    );
    println!(
        "target: VmRSS with {ran} pods < {TARGET_MIB} MiB, absolute (baseline = the same daemon idle, before the pods) ({})",
        if mib(rss) < TARGET_MIB {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "{}",
        last_line(
            "nri-memory",
            &format!("{:.2}MiB", mib(rss)),
            &format!("{:.2}MiB", mib(idle_rss)),
            rss as f64 / idle_rss as f64,
            "30MiB"
        )
    );
    Ok(())
}

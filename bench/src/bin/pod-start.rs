//! `pod-start`: RunPodSandbox → CreateContainer → StartContainer returned, on a containerd with
//! fleetboard chained (bridge + host-local + fleet-cni, fleet-nri registered over NRI) against
//! one without (bridge + host-local only, no fleet-nri). Two containerd instances run side by
//! side, each in its own netns; the two sides alternate who goes first each iteration. Pods are
//! stopped and removed after each start, outside the timing.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use fleet_bench::node::Node;
use fleet_bench::stats::{Samples, last_line};
use fleet_e2e::{ContainerSpec, PodSpec};

#[derive(Debug, Parser)]
struct Flags {
    /// Measured pod starts per side.
    #[arg(long, default_value_t = 40)]
    iterations: usize,
    /// Unmeasured starts per side first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Stop measuring after this many seconds even if iterations remain.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

struct Side {
    label: &'static str,
    node: Node,
    total: Samples,
    sandbox: Samples,
}

impl Side {
    /// Starts one pod with a busybox container; returns after StartContainer, then removes it.
    fn one(&mut self, i: usize, record: bool) -> anyhow::Result<()> {
        let pod = PodSpec::new(&format!("{}-{i}", self.label)).namespace("bench");
        let cri = self.node.cri();
        let t = Instant::now();
        let sandbox = cri.run_pod(&pod)?;
        let sandbox_done = t.elapsed();
        let container = cri.create_container(&sandbox, &pod, &ContainerSpec::busybox("main"))?;
        cri.start_container(&container)?;
        let total = t.elapsed();
        if let Some(d) = &self.node.daemon {
            let allocated = d.client().status().context("fleet-nri status")?.allocated;
            ensure!(
                allocated == 1,
                "fleet-nri holds {allocated} attachments with one pod running: fleet-cni did not run"
            );
        }
        cri.stop_pod(&sandbox)?;
        cri.remove_pod(&sandbox)?;
        if record {
            self.total.push(total);
            self.sandbox.push(sandbox_done);
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    fleet_bench::require_root("pod-start")?;
    println!("pod-start: {}", fleet_bench::load_line());
    let mut ours = Side {
        label: "fleet",
        node: Node::start("fbs-fleet", true)?,
        total: Samples::new("pod start, fleet chained"),
        sandbox: Samples::new("  RunPodSandbox, fleet"),
    };
    let mut base = Side {
        label: "plain",
        node: Node::start("fbs-plain", false)?,
        total: Samples::new("pod start, bridge only"),
        sandbox: Samples::new("  RunPodSandbox, bridge only"),
    };
    let started = Instant::now();
    let limit = Duration::from_secs(flags.max_seconds);
    for i in 0..flags.warmup + flags.iterations {
        if started.elapsed() > limit {
            println!("stopping after {:?} (--max-seconds)", started.elapsed());
            break;
        }
        fleet_bench::check_interrupted()?;
        let record = i >= flags.warmup;
        if i % 2 == 0 {
            ours.one(i, record)?;
            base.one(i, record)?;
        } else {
            base.one(i, record)?;
            ours.one(i, record)?;
        }
    }
    println!(
        "{} starts per side in {:.1}s; {}",
        ours.total.len(),
        started.elapsed().as_secs_f64(),
        fleet_bench::load_line()
    );
    for s in [&ours.total, &base.total, &ours.sandbox, &base.sandbox] {
        println!("{}", s.summary());
    }
    let ratio = ours.total.median() / base.total.median();
    println!(
        "target: pod start median with fleet <= 1.10 x without ({})",
        if ratio <= 1.10 { "met" } else { "MISSED" }
    );
    println!(
        "{}",
        last_line(
            "pod-start",
            &format!("{:.1}ms", ours.total.median()),
            &format!("{:.1}ms", base.total.median()),
            ratio,
            "1.10"
        )
    );
    Ok(())
}

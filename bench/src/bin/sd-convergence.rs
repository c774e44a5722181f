//! `sd-convergence`: how fast a service change in one cluster is usable in another, end to end
//! in fleet-e2e's sandbox fleet (real containerd pods, controllers, hub, fleet-dns, nftables VIPs):
//! - **export**: from `fleetctl export s<i>` in `aa` (a running pod selected) to a pod of `bb`
//!   resolving `s<i>.default.svc.clusterset.local` through its DNS VIP and fetching the page
//!   through the VIP it got;
//! - **endpoint**: from a new pod of an exported service running (httpd up) in `aa` to a
//!   fetch through `bb`'s VIP reaching that pod.
//!
//! The probe runs inside the client pod's netns (UDP DNS query, TCP GET, every 10 ms).
//! There is no other implementation to run here (Submariner, Cilium and Liqo need
//! Kubernetes), so the baseline printed is the MCS conformance suite's allowance (20 s); the
//! target is p99 < 1 s. Last line: p99 over all changes.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use fleet_bench::sd::{Resolved, SdFleet, http_get, resolve, time_until};
use fleet_bench::stats::{Samples, last_line};

const NAME: &str = "sd-convergence";
const TARGET_P99_MS: f64 = 1000.0;
const CONFORMANCE_MS: f64 = 20_000.0;

#[derive(Debug, Parser)]
#[command(about = "export / endpoint change in aa → usable by name and VIP in bb")]
struct Flags {
    /// Export changes to measure.
    #[arg(long, default_value_t = 50)]
    exports: usize,
    /// Endpoint changes (new pods) to measure.
    #[arg(long, default_value_t = 50)]
    endpoints: usize,
    /// Give up on one change after this many seconds (counted as that long).
    #[arg(long, default_value_t = 20)]
    timeout: u64,
}

fn main() -> Result<()> {
    let flags = Flags::parse();
    if flags.exports + flags.endpoints == 0 {
        bail!("{NAME}: nothing to measure");
    }
    fleet_bench::require_root(NAME)?;
    println!("{NAME}: {}", fleet_bench::load_line());
    let sd = SdFleet::start(NAME, &[])?;
    let netns = sd.client_netns();
    let timeout = Duration::from_secs(flags.timeout);
    let mut exports = Samples::new("export -> name + VIP usable in bb");
    let mut endpoints = Samples::new("new endpoint -> reached through bb's VIP");
    let mut missed = 0usize;

    let _stable = sd.web_pod("aa", 1, "stable", "stable")?;
    for i in 0..flags.exports {
        fleet_bench::check_interrupted()?;
        let svc = format!("s{i}");
        let name = format!("{svc}.default.svc.clusterset.local");
        let t0 = Instant::now();
        sd.fleetctl(
            "aa",
            &[
                "export",
                &svc,
                "--selector",
                "app=stable",
                "--port",
                "http:tcp:80",
            ],
        )?;
        let got = time_until(&netns, t0, timeout, move || match resolve(&name) {
            Resolved::Addresses(ips) => http_get(ips[0]).ok().filter(|b| b == "stable"),
            _ => None,
        })?;
        match got {
            Some((d, _)) => exports.push(d),
            None => {
                missed += 1;
                exports.push(timeout);
            }
        }
        sd.fleetctl("aa", &["unexport", &svc])?;
    }

    if flags.endpoints > 0 {
        let mut previous = sd.web_pod("aa", 0, "ep-0", "ep")?;
        sd.fleetctl(
            "aa",
            &[
                "export",
                "ep",
                "--selector",
                "app=ep",
                "--port",
                "http:tcp:80",
            ],
        )?;
        let vip = time_until(&netns, Instant::now(), timeout, || {
            match resolve("ep.default.svc.clusterset.local") {
                Resolved::Addresses(ips) => http_get(ips[0]).ok().map(|_| ips[0]),
                _ => None,
            }
        })?
        .map(|(_, vip)| vip)
        .ok_or_else(|| anyhow::anyhow!("{NAME}: ep never became usable\n{}", sd.fleet.logs()))?;
        for i in 1..=flags.endpoints {
            fleet_bench::check_interrupted()?;
            let pod_name = format!("ep-{i}");
            let pod = sd.web_pod("aa", i % 2, &pod_name, "ep")?;
            let t0 = Instant::now();
            let want = pod_name.clone();
            let got = time_until(&netns, t0, timeout, move || {
                http_get(vip).ok().filter(|b| *b == want)
            })?;
            match got {
                Some((d, _)) => endpoints.push(d),
                None => {
                    missed += 1;
                    endpoints.push(timeout);
                }
            }
            sd.fleet.delete_pod(&previous)?;
            previous = pod;
        }
    }

    for s in [&exports, &endpoints] {
        if !s.is_empty() {
            println!("{} p99={:>8.3}ms", s.summary(), s.quantile(0.99));
        }
    }
    let all = Samples::merged("all changes", &[&exports, &endpoints]);
    let p99 = all.quantile(0.99);
    println!(
        "{NAME}: {} changes, {missed} not usable within {}s; p50 {:.1}ms p99 {p99:.1}ms; target p99 < {TARGET_P99_MS}ms: {}",
        all.len(),
        flags.timeout,
        all.median(),
        if p99 < TARGET_P99_MS { "met" } else { "MISSED" }
    );
    println!(
        "{NAME}: baseline = the MCS conformance suite's allowance (no other implementation runs here)"
    );
    println!("{NAME}: {} after the runs", fleet_bench::load_line());
    drop(sd);
    println!(
        "{}",
        last_line(
            NAME,
            &format!("{p99:.1}ms"),
            &format!("{CONFORMANCE_MS:.0}ms"),
            p99 / CONFORMANCE_MS,
            &format!("p99<{TARGET_P99_MS:.0}ms"),
        )
    );
    Ok(())
}

//! `cross-cluster-throughput`: pod-to-pod TCP throughput across clusters (iperf3 in sandbox
//! pods) through fleetboard's tunnels and the hub's forwarding relay, against what
//! wireguard-go users run on the same underlay path: wireguard-go gateways and a wireguard-go
//! relay at the hub's address that decrypts and re-encrypts (trixie's 0.0.20231211, the
//! baseline, and bookworm's 0.0.20220316), and against plain routing without a tunnel.
//!
//! One sandbox fleet (see `fleet_bench::xcluster`: hub cc + relay, aa and bb behind NAT, real
//! containerd nodes, a controller per member); iperf3 runs in the pods' network namespaces
//! (`nsenter --net=<netns from CRI>`): server in P1 (aa node 2), client in P3 (bb node 2).
//! The datapaths exist side by side (`fleet_bench::tunnel_modes`) and the gateways' CNF
//! netns pick one per run. Each run checks that the mode's interface in aa's gateway CNF
//! netns carried the bytes, and prints the CPU seconds per GB of each tunnel process with its
//! user share; runs of ours also the machine's busy CPU per GB and the ceiling of userspace
//! gateways (`fleet_bench::ceiling`), whose median is printed before the last line.
//! Last line: `bench cross-cluster-throughput ours=<Gbit/s> baseline=<wireguard-go
//! 0.0.20231211 Gbit/s> ratio=.. target=2.0`; the lines before it have the 2022 build and
//! plain.

use fleet_bench::Proc;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fleet_bench::ceiling::{self, AeadCost, Ceiling, RunCost, busy_cpu_seconds};
use fleet_bench::stats::{last_line, median_of};
use fleet_bench::tunnel_modes::{Mode, TunnelModes};
use fleet_bench::wg_go::CpuTimes;
use fleet_bench::xcluster::CrossClusterPods;

const NAME: &str = "cross-cluster-throughput";
/// The target: ours ≥ 2 × trixie's wireguard-go (the relay no longer decrypts).
const TARGET: f64 = 2.0;

#[derive(Debug, Parser)]
#[command(about = "iperf3 pod to pod across clusters: fleet tunnels vs wireguard-go vs plain")]
struct Flags {
    /// Measured runs per mode (interleaved, the order rotating each run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Stop measuring after this many seconds even if runs remain.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

fn main() -> Result<()> {
    let flags = Flags::parse();
    if flags.runs == 0 || flags.seconds == 0 {
        bail!("{NAME}: --runs and --seconds must be positive");
    }
    fleet_bench::require_root(NAME)?;
    for tool in ["iperf3", "wg", "ip", "nsenter", "ss"] {
        if which(tool).is_none() {
            bail!("{NAME}: {tool} is missing; run scripts/install-deps.sh");
        }
    }
    let builds = fleet_bench::wg_go::builds()?;
    println!("{NAME}: {}", fleet_bench::load_line());
    let x = CrossClusterPods::start(NAME)?;
    fleet_bench::check_interrupted()?;
    let bench = TunnelModes::build(&x, &builds)?;
    let result = measure(&bench, &x, &flags);
    let modes = bench.modes();
    let labels: Vec<String> = modes.iter().map(|m| bench.label(*m)).collect();
    drop(bench);
    let (med, ceilings, aead) = result?;
    println!("{NAME}: {} after the runs", fleet_bench::load_line());
    drop(x);
    let at = |mode: Mode| {
        modes
            .iter()
            .position(|m| *m == mode)
            .map_or(0.0, |i| med[i])
    };
    let (ours, go, go_old, plain) = (
        at(Mode::Ours),
        at(Mode::WireguardGo(0)),
        at(Mode::WireguardGo(1)),
        at(Mode::Plain),
    );
    for (l, g) in labels.iter().zip(&med) {
        println!(
            "{NAME} {l:<44} median {g:.3} Gbit/s (ours/this {:.3})",
            ours / g
        );
    }
    println!(
        "{NAME} the 2022 build: {} {go_old:.3} Gbit/s (ours/it {:.3}); plain {plain:.3} Gbit/s (ours/plain {:.3})",
        labels[2],
        ours / go_old,
        ours / plain
    );
    let (seal, open) = aead.seconds_per_gb();
    let ceiling = median_of(&ceilings.iter().map(|c| c.gbps).collect::<Vec<_>>());
    println!(
        "{NAME} ceiling of userspace gateways that spent no CPU but ChaCha20-Poly1305 (seal \
         {seal:.2}, open {open:.2} cpu-s per GB of {aead_packet}-byte packets here; \
         bench/README.md \"Ceiling\"): median {ceiling:.3} Gbit/s, ratio {:.3} to {}; {}",
        ceiling / go,
        labels[1],
        ceiling::verdict(ceiling / go, TARGET),
        aead_packet = aead.packet,
    );
    println!(
        "{}",
        last_line(
            NAME,
            &format!("{ours:.3}"),
            &format!("{go:.3}"),
            ours / go,
            &format!("{TARGET:.1}")
        )
    );
    Ok(())
}

/// Interleaved iperf3 runs: the median Gbit/s of each of `modes()`, in that order; the
/// ceiling of each run of ours; and the AEAD cost those were computed with.
fn measure(
    b: &TunnelModes,
    x: &CrossClusterPods,
    flags: &Flags,
) -> Result<(Vec<f64>, Vec<Ceiling>, AeadCost)> {
    let modes = b.modes();
    let aead = AeadCost::measure(b.ours_mtu() as usize)?;
    let mut ceilings = Vec::new();
    let server = Proc::spawn(
        x.in_pod(&x.p1, "iperf3")
            .args(["-s", "-B", &x.p1.fleet_ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "iperf3 -s in P1",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = x.in_pod(&x.p1, "ss").arg("-ltn").output()?;
        if String::from_utf8_lossy(&out.stdout).contains(":5201") {
            break;
        }
        if Instant::now() > deadline {
            bail!("iperf3 -s did not listen in P1's netns");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Warm-up: each path once (handshakes, caches), checking it reaches P1.
    for &mode in &modes {
        b.select(mode)?;
        let t = Instant::now();
        while !x.fleet.ping(&x.p3, &x.p1.fleet_ip, 1) {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{}: P3 does not reach P1", b.label(mode));
            }
        }
        let (gbps, _, _) = iperf(b, x, mode, 1, &aead)?;
        println!("{NAME}: warm-up {:<32} {gbps:.3} Gbit/s", b.label(mode));
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let start = Instant::now();
    for run in 0..flags.runs {
        fleet_bench::check_interrupted()?;
        if start.elapsed() > Duration::from_secs(flags.max_seconds) {
            println!("{NAME}: --max-seconds reached after {run} runs");
            break;
        }
        for k in 0..modes.len() {
            let i = (k + run) % modes.len();
            let (gbps, carried, ceiling) = iperf(b, x, modes[i], flags.seconds, &aead)?;
            ceilings.extend(ceiling);
            println!(
                "run {run} {:<32} {gbps:.3} Gbit/s  ({carried})",
                b.label(modes[i])
            );
            results[i].push(gbps);
        }
    }
    b.select(Mode::Ours)?;
    drop(server);
    let med: Vec<f64> = results.iter().map(|r| median_of(r)).collect();
    for (i, mode) in modes.iter().enumerate() {
        println!(
            "{NAME} {:<32} median {:.3} Gbit/s (runs {})",
            b.label(*mode),
            med[i],
            results[i]
                .iter()
                .map(|g| format!("{g:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok((med, ceilings, aead))
}

/// One iperf3 run P3 -> P1 in `mode`: received Gbit/s; what it cost and the bytes each
/// mode's interface in aa's gateway CNF netns carried (the mode's own must carry them), as
/// text; for ours, the run's ceiling with `aead` (fleet_bench::ceiling).
fn iperf(
    b: &TunnelModes,
    x: &CrossClusterPods,
    mode: Mode,
    seconds: u32,
    aead: &AeadCost,
) -> Result<(f64, String, Option<Ceiling>)> {
    b.select(mode)?;
    let before = b.aa_bytes()?;
    let cpu_before = b.tunnel_cpu(mode);
    let busy_before = busy_cpu_seconds()?;
    let udp_drops_before = b.udp_rcvbuf_errors();
    let relayed_before = x.relay_forwarded_data()?;
    let out = x
        .in_pod(&x.p3, "timeout")
        .args([
            &(seconds + 30).to_string(),
            "iperf3",
            "-c",
            &x.p1.fleet_ip,
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()
        .context("iperf3 -c in P3")?;
    let busy = busy_cpu_seconds()? - busy_before;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: iperf3 -J output: {text}", b.label(mode)))?;
    let received = &v["end"]["sum_received"];
    let gbps = received["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("{}: iperf3 reported no throughput: {text}", b.label(mode)))?;
    let bytes = received["bytes"].as_f64().unwrap_or(0.0);
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let cpu = &v["end"]["cpu_utilization_percent"];
    let (cpu_client, cpu_server) = (
        cpu["host_total"].as_f64().unwrap_or(0.0),
        cpu["remote_total"].as_f64().unwrap_or(0.0),
    );
    let after = b.aa_bytes()?;
    let relayed = x.relay_forwarded_data()?.saturating_sub(relayed_before);
    let gb = (bytes / 1e9).max(1e-9);
    let per_process: Vec<(String, CpuTimes)> = b
        .tunnel_cpu(mode)
        .into_iter()
        .zip(&cpu_before)
        .map(|((name, after), (_, before))| (name, after - *before))
        .collect();
    let tunnel_cpu: f64 = per_process.iter().map(|(_, c)| c.total()).sum();
    // The gateways run the WireGuard devices; the hub's relay forwards ciphertext.
    let devices_user: f64 = per_process
        .iter()
        .filter(|(n, _)| n.ends_with("gateway"))
        .map(|(_, c)| c.user)
        .sum();
    let per_process = per_process
        .iter()
        .map(|(n, c)| format!("{n} {:.1} ({:.0}% user)", c.total() / gb, c.user_percent()))
        .collect::<Vec<_>>()
        .join(", ");
    let ceiling = (mode == Mode::Ours)
        .then(|| {
            let run = RunCost {
                busy,
                devices_user,
                payload_bytes: bytes,
                mtu: b.ours_mtu() as usize,
            };
            Ceiling::of(&run, aead, ceiling::cpus())
        })
        .flatten();
    let ceiling_text = ceiling.map_or(String::new(), |c| format!(", ceiling {:.3} Gbit/s", c.gbps));
    let udp_drops = b
        .udp_rcvbuf_errors()
        .iter()
        .zip(&udp_drops_before)
        .zip(["hub", "aa", "bb"])
        .map(|((a, b), at)| format!("{at} {}", a.saturating_sub(*b)))
        .collect::<Vec<_>>()
        .join("/");
    let deltas: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let devices = b.aa_devices();
    let own = devices
        .iter()
        .position(|(m, _)| *m == mode)
        .map_or(0, |i| deltas[i]);
    let total: u64 = deltas.iter().sum();
    if (own as f64) < bytes || (own as f64) < 0.95 * total as f64 {
        bail!(
            "{}: the bytes did not take this mode's interface in aa's gateway CNF netns \
                 (iperf3 moved {bytes} bytes; per interface {:?})",
            b.label(mode),
            devices
                .iter()
                .map(|(_, d)| d)
                .zip(&deltas)
                .collect::<Vec<_>>()
        );
    }
    // Ours must have gone through the hub's forwarding relay (a full-size TCP segment is one
    // datagram or more); the other modes bypass it.
    if mode == Mode::Ours && (relayed as f64) < bytes / 1500.0 {
        bail!(
            "{}: the hub relay forwarded {relayed} data datagrams for {bytes} bytes: not the relayed path",
            b.label(mode)
        );
    }
    let carried = devices
        .iter()
        .zip(&deltas)
        .map(|((m, _), d)| format!("{}={d}", b.short(*m)))
        .collect::<Vec<_>>()
        .join(" ");
    Ok((
        gbps,
        format!(
            "tunnel processes {tunnel_cpu:.2} cpu-s ({:.2} cpu-s/GB; per process cpu-s/GB: {per_process}), machine busy {:.1} cpu-s/GB{ceiling_text}, retransmits {retransmits}, UDP rcvbuf drops {udp_drops}, hub relay forwarded {relayed} data datagrams, iperf3 cpu client {cpu_client:.0}% server {cpu_server:.0}%; aa gateway CNF bytes: {carried}",
            tunnel_cpu / gb,
            busy / gb
        ),
        ceiling,
    ))
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    })
}

//! fleetboard's benchmarks: our code and its baseline measured in the same run, interleaved,
//! each binary ending with one `bench <name> ours=.. baseline=.. ratio=.. target=..` line.
//!
//! What it owns:
//! - [`stats`]: samples, medians and the summary lines;
//! - [`cni_bench`]: the `cni-add` / `cni-del` benchmark;
//! - [`cni`]: invoking a CNI plugin binary from inside a chosen netns, timed;
//! - [`daemon`]: a `fleet-nri` process with its own dirs and CNF netns, stopped by PID;
//! - [`node`]: a private containerd with or without fleetboard chained (`pod-start`, `nri-memory`);
//! - [`bins`]: the release binaries under test.
//!
//! Everything runs in network namespaces the benchmark creates; guards delete them, stop the
//! processes it started (by PID) and remove its directories, also when a run fails or panics.

pub mod bins;
pub mod cni;
pub mod cni_bench;
pub mod daemon;
pub mod node;
pub mod stats;

/// Fails with what to do when not root (netns, mounts and containerd need it).
pub fn require_root(bench: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("{bench}: needs root (network namespaces, containerd); run it as root");
    }
    Ok(())
}

/// The 1-minute load average and the CPU count, for the record next to the numbers.
pub fn load_line() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "load average {} (cpus {cpus})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

//! fleetboard's benchmarks: our code and its baseline measured in the same run, interleaved,
//! each binary ending with one `bench <name> ours=.. baseline=.. ratio=.. target=..` line.
//!
//! What it owns:
//! - [`stats`]: samples, medians and the summary lines;
//! - [`cni_bench`]: the `cni-add` / `cni-del` benchmark;
//! - [`cni`]: invoking a CNI plugin binary from inside a chosen netns, timed;
//! - [`daemon`]: a `fleet-nri` process with its own dirs and CNF netns, stopped by PID;
//! - [`node`]: a private containerd with or without fleetboard chained (`pod-start`, `nri-memory`);
//! - [`bins`]: the release binaries under test;
//! - [`ceiling`]: the most a userspace WireGuard device could reach here, from a run's costs;
//! - [`xcluster`]: the sandbox fleet and pods of the cross-cluster benchmarks;
//! - [`tunnel_modes`]: their datapaths side by side (ours, each wireguard-go build, plain);
//! - [`wg_go`]: the wireguard-go builds compared against, per-process CPU time;
//! - [`sd`]: the sandbox fleet, client pod and in-netns probe of the service-discovery benchmarks.
//!
//! Everything runs in network namespaces the benchmark creates; guards delete them, stop the
//! processes it started (by PID) and remove its directories, also when a run fails or panics.

pub mod bins;
pub mod ceiling;
pub mod cni;
pub mod cni_bench;
pub mod daemon;
pub mod node;
pub mod sd;
pub mod stats;
pub mod tunnel_modes;
pub mod wg_go;
pub mod xcluster;

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Fails with what to do when not root (netns, mounts and containerd need it).
/// Also installs the interrupt handler: every benchmark calls this first.
pub fn require_root(bench: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("{bench}: needs root (network namespaces, containerd); run it as root");
    }
    install_interrupt_handler()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT/SIGTERM into a flag the measuring loops check between iterations, so an
/// interrupted run still unwinds through its guards (netns, daemons, containerd) instead of
/// dying with them in place. A second signal while cleaning up is ignored the same way.
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

/// Fails once SIGINT/SIGTERM arrived (see [`install_interrupt_handler`]).
pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted; cleaning up what this run created");
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

/// A child process, stopped by its PID on drop: SIGTERM, then SIGKILL after 5 s.
pub struct Proc(pub std::process::Child);

impl Proc {
    pub fn spawn(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<Proc> {
        use anyhow::Context;
        Ok(Proc(cmd.spawn().with_context(|| format!("start {what}"))?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

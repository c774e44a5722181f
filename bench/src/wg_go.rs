//! The wireguard-go builds the tunnel benchmarks compare against, and per-process CPU time.
//!
//! - **baseline**: Debian trixie's `wireguard-go` 0.0.20231211 (TUN TSO/GRO through
//!   `IFF_VNET_HDR`, UDP GSO/GRO, batched I/O), unpacked by `scripts/install-bench-deps.sh`
//!   into [`TRIXIE_DEFAULT`] (or `$FLEET_BENCH_WG_GO_TRIXIE`); its binary prints v0.0.20230223.
//! - **second column**: bookworm's `/usr/bin/wireguard-go` 0.0.20220316, from before that work.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Where `scripts/install-bench-deps.sh` unpacks trixie's wireguard-go.
pub const TRIXIE_DEFAULT: &str = "/opt/fleetboard-bench/wireguard-go-trixie/usr/bin/wireguard-go";

/// One wireguard-go build.
#[derive(Debug, Clone)]
pub struct GoBuild {
    /// Short tag used in names and output: `go2023` or `go2022`.
    pub tag: &'static str,
    /// For the output.
    pub label: &'static str,
    pub path: PathBuf,
}

/// The two builds, the baseline (trixie's) first. Fails with what to run when one is missing.
pub fn builds() -> Result<[GoBuild; 2]> {
    let trixie = std::env::var_os("FLEET_BENCH_WG_GO_TRIXIE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(TRIXIE_DEFAULT));
    let bookworm = PathBuf::from("/usr/bin/wireguard-go");
    if !trixie.is_file() {
        bail!(
            "trixie's wireguard-go (the baseline) is not at {}: run scripts/install-bench-deps.sh",
            trixie.display()
        );
    }
    if !bookworm.is_file() {
        bail!(
            "bookworm's wireguard-go is not at /usr/bin/wireguard-go: run scripts/install-deps.sh"
        );
    }
    Ok([
        GoBuild {
            tag: "go2023",
            label: "wireguard-go 0.0.20231211",
            path: trixie,
        },
        GoBuild {
            tag: "go2022",
            label: "wireguard-go 0.0.20220316",
            path: bookworm,
        },
    ])
}

/// utime + stime of a process (or, with `/proc/<pid>/task/<tid>`, a thread) in seconds; 0
/// when it is gone.
pub fn cpu_seconds_at(stat_dir: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("{stat_dir}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// utime + stime of process `pid` in seconds (0 when it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_at(&format!("/proc/{pid}"))
}

/// CPU seconds of this process's threads whose name starts with `prefix`, per thread name.
pub fn own_threads_cpu(prefix: &str) -> Vec<(String, f64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut v: Vec<(String, f64)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            let comm = comm.trim().to_string();
            comm.starts_with(prefix)
                .then(|| (comm, cpu_seconds_at(&path.display().to_string())))
        })
        .collect();
    // A device on several threads (`FLEET_GATEWAY_THREADS`) names them all alike: one sum each.
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.dedup_by(|later, first| {
        let same = later.0 == first.0;
        if same {
            first.1 += later.1;
        }
        same
    });
    v
}

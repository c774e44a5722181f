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

/// CPU time of a process or thread, from `stat(5)` fields 14 (`utime`) and 15 (`stime`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// Seconds in user mode.
    pub user: f64,
    /// Seconds in the kernel on its behalf (system calls, and the forwarding a TUN write or
    /// a UDP send runs in the caller's context).
    pub system: f64,
}

impl CpuTimes {
    /// user + system, in seconds.
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// The user share of the total, in percent (0 when there is no time at all).
    pub fn user_percent(&self) -> f64 {
        if self.total() > 0.0 {
            100.0 * self.user / self.total()
        } else {
            0.0
        }
    }
}

impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;
    fn sub(self, before: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user - before.user,
            system: self.system - before.system,
        }
    }
}

impl std::ops::AddAssign for CpuTimes {
    fn add_assign(&mut self, other: CpuTimes) {
        self.user += other.user;
        self.system += other.system;
    }
}

/// [`CpuTimes`] of a process (`/proc/<pid>`) or a thread (`/proc/<pid>/task/<tid>`); zero
/// when it is gone.
pub fn cpu_times_at(stat_dir: &str) -> CpuTimes {
    std::fs::read_to_string(format!("{stat_dir}/stat"))
        .ok()
        .and_then(|stat| parse_stat_times(&stat, clock_ticks_per_second()))
        .unwrap_or_default()
}

/// utime and stime of one `stat(5)` line, `hz` ticks per second; `None` when it is malformed.
fn parse_stat_times(stat: &str, hz: f64) -> Option<CpuTimes> {
    // Fields after the command (which may hold spaces) start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(CpuTimes {
        user: tick(11)? as f64 / hz,
        system: tick(12)? as f64 / hz,
    })
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc` CPU times (100 when it cannot be read).
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// [`CpuTimes`] of process `pid` (zero when it is gone).
pub fn cpu_times(pid: u32) -> CpuTimes {
    cpu_times_at(&format!("/proc/{pid}"))
}

/// CPU time of this process's threads whose name starts with `prefix`, per thread name.
pub fn own_threads_cpu(prefix: &str) -> Vec<(String, CpuTimes)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut v: Vec<(String, CpuTimes)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            let comm = comm.trim().to_string();
            comm.starts_with(prefix)
                .then(|| (comm, cpu_times_at(&path.display().to_string())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_fields_14_and_15_after_a_command_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let stat = "4242 (wg-a b) c) S 1 1 1 0 -1 4194560 10 0 0 0 250 75 0 0 20 0 3 0";
        let t = parse_stat_times(stat, 100.0).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 2.5,
                system: 0.75
            }
        );
        assert_eq!(t.total(), 3.25);
        assert!((t.user_percent() - 100.0 * 2.5 / 3.25).abs() < 1e-9);
        assert_eq!(CpuTimes::default().user_percent(), 0.0);
        assert!(parse_stat_times("4242 (x) S 1 2", 100.0).is_none());
        assert!(parse_stat_times("no parenthesis here", 100.0).is_none());
    }

    #[test]
    fn own_threads_of_one_name_are_summed() {
        let name = "wg-ownthr-test";
        let spin = |ms| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_millis(ms) {
                        std::hint::black_box(0u64);
                    }
                })
                .unwrap()
        };
        let (a, b) = (spin(300), spin(300));
        std::thread::sleep(std::time::Duration::from_millis(200));
        let seen = own_threads_cpu("wg-ownthr");
        a.join().unwrap();
        b.join().unwrap();
        // Two threads, one line, with the CPU time they spun.
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, name);
        assert!(seen[0].1.user > 0.0, "{seen:?}");
    }
}

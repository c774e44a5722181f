//! One `fleet-nri` process for a benchmark: its own config, data dir, socket and CNF netns;
//! run inside a benchmark netns; stopped by PID (SIGTERM, then SIGKILL) and its CNF netns
//! deleted when dropped.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleet_proto::node::{NodeClient, StatusResult};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    pub binary: PathBuf,
    /// The node's pod subnet inside the fleet CIDR, e.g. `100.96.3.0/24`.
    pub node_subnet: String,
    /// The runtime's NRI socket; `None` runs with `--no-nri`.
    pub nri_socket: Option<PathBuf>,
    /// The netns the daemon process runs in.
    pub netns: PathBuf,
    /// Unique name of the CNF netns it creates.
    pub cnf_netns: String,
}

#[derive(Debug)]
pub struct FleetNri {
    dir: tempfile::TempDir,
    cnf_netns: String,
    child: Option<Child>,
}

impl FleetNri {
    /// Starts the daemon and waits (up to 15 s) until its node API answers.
    pub fn start(opts: &DaemonOpts) -> anyhow::Result<FleetNri> {
        let dir = tempfile::Builder::new()
            .prefix("fbench-nri-")
            .tempdir()
            .context("creating the fleet-nri dir")?;
        let socket = dir.path().join("node.sock");
        let mut cfg = serde_json::json!({
            "plan": {"node_subnet": opts.node_subnet},
            "local": {"cnf_netns": opts.cnf_netns, "data_dir": dir.path().join("data")},
            "socket": socket,
        });
        if let Some(nri) = &opts.nri_socket {
            cfg["nri_socket"] = serde_json::json!(nri);
        }
        let config = dir.path().join("node.json");
        std::fs::write(&config, cfg.to_string())
            .with_context(|| format!("writing {}", config.display()))?;
        let log = File::create(dir.path().join("daemon.log"))?;
        let netns = File::open(&opts.netns)
            .with_context(|| format!("opening netns {}", opts.netns.display()))?;
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("--config").arg(&config);
        if opts.nri_socket.is_none() {
            cmd.arg("--no-nri");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let fd = netns.as_raw_fd();
        // SAFETY: setns and setsid are raw syscalls, async-signal-safe; the fd outlives spawn.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(BorrowedFd::borrow_raw(fd), CloneFlags::CLONE_NEWNET)?;
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", opts.binary.display()))?;
        drop(netns);
        let mut d = FleetNri {
            dir,
            cnf_netns: opts.cnf_netns.clone(),
            child: Some(child),
        };
        d.wait_until("its node API answers", Duration::from_secs(15), |s| {
            s.is_some()
        })?;
        Ok(d)
    }

    /// Polls status until `ok` holds, failing with the daemon's log after `timeout`.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(Option<&StatusResult>) -> bool,
    ) -> anyhow::Result<StatusResult> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                bail!("fleet-nri exited ({status}) before {what}:\n{}", self.log());
            }
            let s = self.client().status().ok();
            if ok(s.as_ref())
                && let Some(s) = s
            {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "fleet-nri: timed out after {timeout:?} waiting until {what}; last status {s:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("node.sock")
    }

    pub fn client(&self) -> NodeClient {
        NodeClient::new(self.socket(), Duration::from_secs(10))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, `RssAnon`, ...) in KiB.
    pub fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let pid = self.pid().context("fleet-nri is not running")?;
        proc_status_kib(pid, field)
    }

    /// SIGTERM to the PID, SIGKILL after 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        if child.try_wait().ok().flatten().is_none() {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for FleetNri {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.cnf_netns])
            .stderr(Stdio::null())
            .status();
    }
}

/// A `kB` field of `/proc/<pid>/status` in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .with_context(|| format!("{path} has no {field} line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_vmrss() {
        let kib = proc_status_kib(std::process::id(), "VmRSS").unwrap();
        assert!(kib > 0);
        assert!(proc_status_kib(std::process::id(), "NoSuchField").is_err());
    }
}

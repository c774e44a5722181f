//! A real `fleet-nri` process for tests: its own config, data dir, node socket and CNF netns
//! (named `fe2e-cnf-<pid>-<n>` so the reaper cleans up after a killed test). Stopped by PID;
//! Drop kills it, deletes its CNF netns and removes its dir.
//!
//! [`FleetNriOpts`] starts it inside a node's netns (as a DaemonSet pod with the host network
//! runs) and/or without a plan, for the controller-driven tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleet_proto::node::{NodeClient, StatusResult};

use crate::error::{Error, Result};
use crate::{poll_until, workspace_bin};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct FleetNri {
    dir: PathBuf,
    cnf: String,
    nri_socket: Option<PathBuf>,
    netns: Option<PathBuf>,
    /// Flags added to every start (e.g. `--node-api-listen`).
    extra_args: Vec<String>,
    child: Option<Child>,
}

/// How to start a [`FleetNri`].
#[derive(Debug, Clone, Default)]
pub struct FleetNriOpts {
    /// The config's plan; `None` leaves it to `set_plan` (the controller's request).
    pub node_subnet: Option<String>,
    /// The runtime's NRI socket; `None` runs with `--no-nri`.
    pub nri_socket: Option<PathBuf>,
    /// Run inside this netns (`nsenter --net=`): the node's own network, where the overlay's
    /// UDP socket is opened. `None`: the test process's netns.
    pub netns: Option<PathBuf>,
}

impl FleetNri {
    /// Starts fleet-nri as `opts` says.
    pub fn start_with(opts: FleetNriOpts) -> Result<FleetNri> {
        Self::start_with_args(opts, Vec::new())
    }

    /// [`FleetNri::start_with`], with `args` added to the command line of every start.
    pub fn start_with_args(opts: FleetNriOpts, args: Vec<String>) -> Result<FleetNri> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("fe2e-nri-{id}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let cnf = format!("fe2e-cnf-{id}");
        let mut cfg = serde_json::json!({
            "local": {"cnf_netns": cnf, "data_dir": dir.join("data")},
            "socket": dir.join("node.sock"),
        });
        if let Some(subnet) = &opts.node_subnet {
            cfg["plan"] = serde_json::json!({"node_subnet": subnet});
        }
        if let Some(s) = &opts.nri_socket {
            cfg["nri_socket"] = serde_json::json!(s);
        }
        let cfg_path = dir.join("node.json");
        std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| Error::io("write", &cfg_path, e))?;
        let mut d = FleetNri {
            dir,
            cnf,
            nri_socket: opts.nri_socket,
            netns: opts.netns,
            extra_args: args,
            child: None,
        };
        d.spawn()?;
        Ok(d)
    }

    /// Replaces the added flags for the next [`FleetNri::spawn`].
    pub fn set_extra_args(&mut self, args: Vec<String>) {
        self.extra_args = args;
    }

    /// Starts fleet-nri for `node_subnet` (a block of 100.96.0.0/12). With `nri_socket` it
    /// registers with that runtime; without, it serves only the node API (`--no-nri`).
    pub fn start(node_subnet: &str, nri_socket: Option<&Path>) -> Result<FleetNri> {
        Self::start_with(FleetNriOpts {
            node_subnet: Some(node_subnet.to_string()),
            nri_socket: nri_socket.map(Path::to_owned),
            netns: None,
        })
    }

    /// Starts the process again with the same config and data (after `kill9` or `stop`).
    pub fn spawn(&mut self) -> Result<()> {
        let log_path = self.dir.join("fleet-nri.log");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io("open", &log_path, e))?;
        let mut cmd = match &self.netns {
            // nsenter execs fleet-nri in place: the child's PID is fleet-nri's.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(workspace_bin("fleet-nri"));
                c
            }
            None => Command::new(workspace_bin("fleet-nri")),
        };
        cmd.arg("--config").arg(self.dir.join("node.json"));
        if self.nri_socket.is_none() {
            cmd.arg("--no-nri");
        }
        cmd.args(&self.extra_args);
        cmd.env("FLEET_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| Error::io("spawn", workspace_bin("fleet-nri"), e))?;
        self.child = Some(child);
        let client = self.client();
        poll_until(
            "fleet-nri to serve its node API",
            Duration::from_secs(15),
            || client.status().ok(),
        )
        .map_err(|e| Error::Invalid(format!("{e}; fleet-nri log:\n{}", self.log())))?;
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait, as a rolling update would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn client(&self) -> NodeClient {
        NodeClient::new(self.socket(), Duration::from_secs(10))
    }

    pub fn status(&self) -> Result<StatusResult> {
        self.client()
            .status()
            .map_err(|e| Error::Invalid(format!("fleet-nri status: {e}")))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("node.sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Name of the CNF netns (`/run/netns/<name>`).
    pub fn cnf_netns(&self) -> &str {
        &self.cnf
    }

    /// The conflist entry that chains fleet-cni to this daemon.
    pub fn cni_entry(&self) -> serde_json::Value {
        serde_json::json!({"type": "fleet-cni", "socket": self.socket()})
    }

    /// Runs `ip -n <CNF netns> <args>` and returns its stdout (empty on failure).
    pub fn ip_cnf(&self, args: &[&str]) -> String {
        Command::new("ip")
            .args(["-n", &self.cnf])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Pod veth ends present in the CNF netns.
    pub fn host_veths(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.cnf, "-o", "link", "show"])
            .output();
        let Ok(out) = out else { return Vec::new() };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("fl6"))
            .collect()
    }

    /// Waits until exactly `n` pod veths remain in the CNF netns: a released pod's link is
    /// deleted in the background (the kernel's veth teardown is off CNI DEL's path).
    pub fn await_host_veths(&self, n: usize) -> Result<()> {
        poll_until(
            "pod veths in the CNF netns",
            Duration::from_secs(10),
            || (self.host_veths().len() == n).then_some(()),
        )
        .map_err(|e| Error::Invalid(format!("{e}: {:?}", self.host_veths())))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("fleet-nri.log")).unwrap_or_default()
    }

    /// Resident memory of the process in KiB (VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for FleetNri {
    fn drop(&mut self) {
        self.kill9();
        // Without a plan the daemon never made its CNF netns.
        if std::path::Path::new("/run/netns").join(&self.cnf).exists() {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.cnf])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

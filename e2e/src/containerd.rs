//! A private containerd per [`Containerd::start`] call: its own root, state, gRPC socket, NRI
//! socket, CNI bin/conf dirs, host-local IPAM dir, runc root and cgroup parent, all under one
//! directory in `$TMPDIR`. By default it runs inside a fresh [`TestNetns`] it owns, so the CNI
//! bridge and veths never touch the machine's network.
//!
//! Lifecycle: started with `setsid` (via `pre_exec`) and `nsenter --net=...`, its PID kept;
//! readiness is polled (gRPC answers, CRI initialised, NRI socket present); `stop()` signals
//! that PID only. Drop removes its pods through CRI, stops it, kills what is left of its
//! containers (`runc --root <its root>`) and shims (found by its unique socket path), unmounts
//! everything under its directory, removes its cgroups and its directory.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cri::{Cri, CriClient, CriConfig};
use crate::error::{Error, Result};
use crate::images::{self, PAUSE_IMAGE};
use crate::mounts;
use crate::netns::TestNetns;
use crate::reap;
use crate::util::{describe, poll_until};

/// Debian's CNI plugin directory, always searched after the caller's extra dirs.
pub const SYSTEM_CNI_BIN_DIR: &str = "/usr/lib/cni";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where and how to run an instance. `ContainerdOpts::new("node-a")` runs it in a fresh netns.
#[derive(Debug, Clone)]
pub struct ContainerdOpts {
    /// Short label used in directory, netns and cgroup names.
    pub name: String,
    pub netns: NetnsChoice,
    /// Extra CNI plugin dirs; their plugins win over `/usr/lib/cni`.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Single plugin binaries (e.g. `workspace_bin("fleet-cni")`), linked under their file
    /// name; they win over the dirs.
    pub cni_plugins: Vec<PathBuf>,
    /// Import the pause and busybox images at first start (default true).
    pub import_images: bool,
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    pub nri_registration_timeout: Duration,
    pub nri_request_timeout: Duration,
}

/// Which network namespace containerd (and so the CNI bridge) lives in.
#[derive(Debug, Clone)]
pub enum NetnsChoice {
    /// A fresh [`TestNetns`] owned by the instance, deleted with it (the default).
    Own,
    /// An existing netns by path, e.g. `TestNetns::path()`; the caller owns it.
    Path(PathBuf),
    /// The machine's netns. The bridge plugin would then create links on the host: avoid.
    Host,
}

impl ContainerdOpts {
    pub fn new(name: &str) -> Self {
        ContainerdOpts {
            name: name.to_string(),
            netns: NetnsChoice::Own,
            cni_bin_dirs: Vec::new(),
            cni_plugins: Vec::new(),
            import_images: true,
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            nri_registration_timeout: Duration::from_secs(5),
            nri_request_timeout: Duration::from_secs(2),
        }
    }

    /// Run inside `netns` (owned by the caller, who must keep it alive longer than this).
    pub fn netns(mut self, netns: &TestNetns) -> Self {
        self.netns = NetnsChoice::Path(netns.path());
        self
    }

    /// Add a CNI plugin directory searched before `/usr/lib/cni`.
    pub fn cni_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cni_bin_dirs.push(dir.into());
        self
    }

    /// Add one CNI plugin binary, e.g. `.cni_plugin(workspace_bin("fleet-cni"))`.
    pub fn cni_plugin(mut self, binary: impl Into<PathBuf>) -> Self {
        self.cni_plugins.push(binary.into());
        self
    }
}

/// A running private containerd. See the module docs for what Drop cleans up.
#[derive(Debug)]
pub struct Containerd {
    opts: ContainerdOpts,
    dir: PathBuf,
    netns_path: Option<PathBuf>,
    child: Option<Child>,
    cgroup_parent: String,
    // Declared last: dropped after Drop::drop has cleaned everything that lives in it.
    own_netns: Option<TestNetns>,
}

impl Containerd {
    /// Creates the instance's directories and config, starts containerd, waits until it
    /// serves gRPC, CRI and NRI, and imports the test images.
    pub fn start(opts: ContainerdOpts) -> Result<Containerd> {
        crate::require_root("Containerd::start");
        reap::reap_stale_instances_once();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let label: String = opts
            .name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(12)
            .collect();
        let id = format!("{label}-{}-{n}", std::process::id());
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = reap::instance_dir(&id);
        if dir.exists() {
            let _ = mounts::unmount_all_under(&dir);
            fs::remove_dir_all(&dir)
                .map_err(|e| Error::io("removing stale instance dir", &dir, e))?;
        }
        let own_netns = match opts.netns {
            NetnsChoice::Own => Some(TestNetns::try_new(&label)?),
            _ => None,
        };
        let netns_path = match (&opts.netns, &own_netns) {
            (_, Some(ns)) => Some(ns.path()),
            (NetnsChoice::Path(p), None) => Some(p.clone()),
            _ => None,
        };
        let mut c = Containerd {
            opts,
            dir,
            netns_path,
            child: None,
            cgroup_parent: reap::cgroup_parent(&id),
            own_netns,
        };
        c.prepare()?;
        c.spawn()?;
        if c.opts.import_images {
            images::import_into(&c.grpc_socket())?;
        }
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn grpc_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    pub fn nri_socket(&self) -> PathBuf {
        self.dir.join("nri.sock")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni-conf")
    }
    /// The single dir containerd 1.7 takes as CNI `bin_dir`: symlinks to every plugin of the
    /// extra dirs and `/usr/lib/cni` (first one wins), refreshed at each (re)start.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }
    /// Data dir for host-local IPAM in this instance's conflists.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }
    pub fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
    pub fn pod_log_dir(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }
    /// cgroupfs parent set on every pod this harness's CRI client runs.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }
    /// Netns containerd runs in (None: the host's).
    pub fn netns_path(&self) -> Option<&Path> {
        self.netns_path.as_deref()
    }
    /// Name of the netns containerd runs in, if it is a named one under /run/netns.
    pub fn netns_name(&self) -> Option<String> {
        self.netns_path
            .as_ref()
            .filter(|p| p.starts_with("/run/netns"))
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    }
    /// The netns this instance created for itself (with `NetnsChoice::Own`).
    pub fn own_netns(&self) -> Option<&TestNetns> {
        self.own_netns.as_ref()
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A blocking CRI client for this instance (owns a tokio runtime; not for async code).
    pub fn cri(&self) -> Result<Cri> {
        Cri::connect(self.cri_config())
    }

    /// An async CRI client for this instance; connect from inside your runtime.
    pub async fn cri_async(&self) -> Result<CriClient> {
        CriClient::connect(self.cri_config()).await
    }

    /// Socket, cgroup parent and pod log dir for building a CRI client on any thread.
    pub fn cri_config(&self) -> CriConfig {
        CriConfig {
            socket: self.grpc_socket(),
            cgroup_parent: Some(self.cgroup_parent.clone()),
            log_dir: Some(self.pod_log_dir()),
        }
    }

    /// The last `lines` lines of containerd's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.log_file()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM to containerd's PID, SIGKILL if it has not exited within `stop_timeout`.
    /// Containers and shims keep running (as with a real node's containerd restart).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        if child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        let _ = kill(pid, Signal::SIGTERM);
        let exited = poll_until(
            "containerd to exit after SIGTERM",
            self.opts.stop_timeout,
            || child.try_wait().ok().flatten(),
        );
        if exited.is_err() {
            let _ = kill(pid, Signal::SIGKILL);
            child
                .wait()
                .map_err(|e| Error::io("waiting for containerd pid", format!("{pid}"), e))?;
        }
        Ok(())
    }

    /// Stops and starts containerd again with the same dirs and config (state kept).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    fn prepare(&self) -> Result<()> {
        for d in [
            self.dir.clone(),
            self.root_dir(),
            self.state_dir(),
            self.cni_conf_dir(),
            self.cni_bin_dir(),
            self.ipam_dir(),
            self.runc_root(),
            self.pod_log_dir(),
            self.dir.join("nri-conf.d"),
            self.dir.join("nri-plugins"),
            self.dir.join("opt"),
        ] {
            fs::create_dir_all(&d).map_err(|e| Error::io("creating instance dir", &d, e))?;
        }
        let config = self.dir.join("config.toml");
        fs::write(&config, self.config_toml()).map_err(|e| Error::io("writing", &config, e))
    }

    fn link_cni_plugins(&self) -> Result<()> {
        let bin = self.cni_bin_dir();
        for entry in fs::read_dir(&bin).map_err(|e| Error::io("listing", &bin, e))? {
            let path = entry.map_err(|e| Error::io("listing", &bin, e))?.path();
            let _ = fs::remove_file(&path);
        }
        for plugin in &self.opts.cni_plugins {
            let name = plugin.file_name().ok_or_else(|| {
                Error::Invalid(format!(
                    "CNI plugin path {} has no file name",
                    plugin.display()
                ))
            })?;
            if !plugin.is_file() {
                return Err(Error::Invalid(format!(
                    "CNI plugin {} does not exist (build it first with cargo build --workspace --bins)",
                    plugin.display()
                )));
            }
            let dst = bin.join(name);
            if !dst.exists() {
                std::os::unix::fs::symlink(plugin, &dst)
                    .map_err(|e| Error::io("linking CNI plugin", &dst, e))?;
            }
        }
        let mut dirs = self.opts.cni_bin_dirs.clone();
        dirs.push(PathBuf::from(SYSTEM_CNI_BIN_DIR));
        for dir in dirs {
            let entries =
                fs::read_dir(&dir).map_err(|e| Error::io("listing CNI plugin dir", &dir, e))?;
            for entry in entries.flatten() {
                let src = entry.path();
                if !src.is_file() {
                    continue;
                }
                let dst = bin.join(entry.file_name());
                if !dst.exists() {
                    std::os::unix::fs::symlink(&src, &dst)
                        .map_err(|e| Error::io("linking CNI plugin", &dst, e))?;
                }
            }
        }
        Ok(())
    }

    fn config_toml(&self) -> String {
        let p = |p: PathBuf| p.display().to_string();
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{grpc}"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_unprivileged_icmp = true
  enable_unprivileged_ports = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins."io.containerd.nri.v1.nri"]
  disable = false
  disable_connections = false
  plugin_config_path = "{nri_conf}"
  plugin_path = "{nri_plugins}"
  plugin_registration_timeout = "{reg}ms"
  plugin_request_timeout = "{req}ms"
  socket_path = "{nri_sock}"
"#,
            root = p(self.root_dir()),
            state = p(self.state_dir()),
            grpc = p(self.grpc_socket()),
            opt = p(self.dir.join("opt")),
            pause = PAUSE_IMAGE,
            runc = p(self.runc_root()),
            cni_bin = p(self.cni_bin_dir()),
            cni_conf = p(self.cni_conf_dir()),
            nri_conf = p(self.dir.join("nri-conf.d")),
            nri_plugins = p(self.dir.join("nri-plugins")),
            reg = self.opts.nri_registration_timeout.as_millis(),
            req = self.opts.nri_request_timeout.as_millis(),
            nri_sock = p(self.nri_socket()),
        )
    }

    fn spawn(&mut self) -> Result<()> {
        self.link_cni_plugins()?;
        let log_path = self.log_file();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io("opening containerd log", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("duplicating", &log_path, e))?;
        // Stale sockets from a previous run would make readiness checks pass too early.
        let _ = fs::remove_file(self.grpc_socket());
        let _ = fs::remove_file(self.nri_socket());

        let config = self.dir.join("config.toml");
        let mut cmd = match &self.netns_path {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg("containerd");
                c
            }
            None => Command::new("containerd"),
        };
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Own session: a terminal's signals to the test process group do not reach it.
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let command = describe(&cmd);
        let child = cmd.spawn().map_err(|e| Error::Command {
            command: command.clone(),
            status: "could not start".into(),
            stderr: e.to_string(),
        })?;
        self.child = Some(child);
        self.wait_ready(&command)
    }

    fn wait_ready(&mut self, command: &str) -> Result<()> {
        let timeout = self.opts.start_timeout;
        let sock = self.grpc_socket();
        let nri = self.nri_socket();
        let mut exited = None;
        let child = self.child.as_mut().expect("spawned");
        let ready = poll_until("containerd gRPC socket and NRI socket", timeout, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return Some(false);
            }
            // `ctr` blocks while it retries a missing socket: only ask once the socket exists.
            if !sock.exists() {
                return None;
            }
            let answers = Command::new("ctr")
                .args(["--connect-timeout", "2s", "-a"])
                .arg(&sock)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            (answers && nri.exists()).then_some(true)
        });
        let fail = |this: &Self, what: String| Error::Timeout {
            what,
            timeout,
            detail: format!(
                " (`{command}`; log {}):\n{}",
                this.log_file().display(),
                this.log_tail(30)
            ),
        };
        match ready {
            Ok(true) => {}
            Ok(false) => {
                self.child = None;
                let status = exited.map(|s| s.to_string()).unwrap_or_default();
                return Err(fail(
                    self,
                    format!("containerd to start, but it exited with {status}"),
                ));
            }
            Err(_) => return Err(fail(self, "containerd gRPC and NRI sockets".into())),
        }
        // CRI answers "server is not initialized yet" until its plugin has finished starting.
        // On its own thread so start() also works from inside an async test.
        let config = self.cri_config();
        let cri_ready = std::thread::spawn(move || -> Result<String> {
            let cri = Cri::connect(config)?;
            poll_until("CRI to answer Version", timeout, || cri.version().ok())
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Invalid("CRI readiness thread panicked".into())));
        match cri_ready {
            Ok(_) => Ok(()),
            Err(e) => Err(fail(self, format!("CRI to answer Version ({e})"))),
        }
    }

    /// Best-effort removal of every pod through CRI, bounded in time, on its own thread so
    /// it works from any context (sync test, async test, Drop).
    fn remove_pods_via_cri(&self) {
        let config = self.cri_config();
        let handle = std::thread::spawn(move || -> Result<()> {
            let cri = Cri::connect(config)?;
            for pod in cri.list_pods()? {
                let _ = cri.stop_pod(&pod.id);
                let _ = cri.remove_pod(&pod.id);
            }
            Ok(())
        });
        if let Ok(Err(e)) = handle.join() {
            eprintln!("fleet-e2e: removing pods of {}: {e}", self.dir.display());
        }
    }

    /// Shims of this instance: processes whose argv has `-address <our grpc socket>`.
    pub fn shim_pids(&self) -> Vec<i32> {
        reap::shim_pids(&self.grpc_socket())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_pods_via_cri();
        }
        if let Err(e) = self.stop() {
            eprintln!(
                "fleet-e2e: stopping containerd in {}: {e}",
                self.dir.display()
            );
        }
        reap::tear_down_instance_dir(&self.dir, &self.cgroup_parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_opts_run_in_own_netns_with_nri_timeouts() {
        let o = ContainerdOpts::new("n").cni_bin_dir("/x");
        assert!(matches!(o.netns, NetnsChoice::Own));
        assert_eq!(o.cni_bin_dirs, vec![PathBuf::from("/x")]);
        assert_eq!(o.nri_registration_timeout, Duration::from_secs(5));
    }
}

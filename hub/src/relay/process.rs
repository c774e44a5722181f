//! The relay as its own process, so relayed traffic outlives the API process.
//!
//! `fleet-hub --hub ADDR relay --relay-listen ...` ([`run_until_signal`]) runs a [`Relay`]
//! with the admin credential and CA of its data dir. `<data dir>/relay.pid` names the running
//! relay: a second relay on the same data dir refuses to start, and a relay whose `relay.pid`
//! is gone or names another process stops (cleanly) within 2 s — so removing a data dir also
//! ends its relay.
//!
//! `fleet-hub serve --relay-listen ...` ([`RelayProcess`]) adopts the relay `relay.pid` names
//! if it runs (a hub that was killed and restarted), else starts one (its own session: signals
//! to the hub's process group do not reach it), starts it again if it dies, and on SIGTERM
//! stops it. A `kill -9` of the hub leaves it running: traffic keeps flowing and the relay's
//! watch resumes once the hub is back. An adopted relay keeps the flags it was started with.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Relay, RelayError, RelayOptions};
use fleet_hub_api::client::HubClient;

pub const RELAY_PID_FILE: &str = "relay.pid";
/// How often a relay checks that `relay.pid` still names it.
const PID_CHECK: Duration = Duration::from_secs(2);

fn pid_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RELAY_PID_FILE)
}

fn read_pid(data_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_path(data_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Is `pid` a `fleet-hub ... relay` process on `data_dir`?
fn is_relay_of(pid: i32, data_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let dir = data_dir.as_os_str().as_encoded_bytes();
    args.iter().any(|a| *a == b"relay")
        && args
            .windows(2)
            .any(|w| w[0] == b"--data-dir" && w[1] == dir)
}

/// The relay's claim on `relay.pid`.
pub struct PidFile {
    data_dir: PathBuf,
    pid: i32,
}

impl PidFile {
    /// Writes this process's PID, unless another live relay holds the data dir.
    pub fn claim(data_dir: &Path) -> Result<PidFile, RelayError> {
        let pid = std::process::id() as i32;
        if let Some(other) = read_pid(data_dir)
            && other != pid
            && is_relay_of(other, data_dir)
        {
            return Err(RelayError::Process(format!(
                "a relay already runs for {} (pid {other}); stop it first",
                data_dir.display()
            )));
        }
        let path = pid_path(data_dir);
        let tmp = data_dir.join(format!(".{RELAY_PID_FILE}.{pid}"));
        std::fs::write(&tmp, format!("{pid}\n"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| RelayError::Process(format!("writing {}: {e}", path.display())))?;
        Ok(PidFile {
            data_dir: data_dir.to_path_buf(),
            pid,
        })
    }

    pub fn still_ours(&self) -> bool {
        read_pid(&self.data_dir) == Some(self.pid)
    }

    /// Removes `relay.pid` if it still names this process.
    pub fn release(self) {
        if self.still_ours() {
            let _ = std::fs::remove_file(pid_path(&self.data_dir));
        }
    }
}

/// What `fleet-hub relay` runs: the relay until SIGTERM/SIGINT, or until `relay.pid` stops
/// naming this process.
pub async fn run_until_signal(
    client: HubClient,
    options: RelayOptions,
    data_dir: &Path,
) -> Result<(), RelayError> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = |kind| signal(kind).map_err(|e| RelayError::Process(format!("signals: {e}")));
    let mut term = signals(SignalKind::terminate())?;
    let mut int = signals(SignalKind::interrupt())?;
    let pid_file = PidFile::claim(data_dir)?;
    let relay = match Relay::start(client, options).await {
        Ok(relay) => relay,
        Err(e) => {
            pid_file.release();
            return Err(e);
        }
    };
    let mut check = tokio::time::interval(PID_CHECK);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => if !pid_file.still_ours() {
                tracing::warn!(dir = %data_dir.display(), "relay.pid no longer names this relay; stopping");
                break;
            },
        }
    }
    relay.stop().await;
    pid_file.release();
    Ok(())
}

/// Where a relay on this host reaches an API listening on `listen`.
fn local_api(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The `fleet-hub` arguments of a relay process for `options`, following the API at `api`.
pub fn relay_args(options: &RelayOptions, data_dir: &Path, api: SocketAddr) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--data-dir".into(),
        data_dir.into(),
        "--hub".into(),
        local_api(api).to_string().into(),
        "relay".into(),
        "--relay-listen".into(),
        options.listen.to_string().into(),
        "--relay-endpoint".into(),
        options.endpoint.to_string().into(),
        "--relay-ttl".into(),
        format!("{}ms", options.ttl.as_millis()).into(),
    ];
    if let Some(addr) = options.metrics_address {
        args.push("--relay-metrics-address".into());
        args.push(addr.to_string().into());
    }
    args
}

/// The serving hub's handle on its relay process.
pub struct RelayProcess {
    data_dir: PathBuf,
    args: Vec<OsString>,
    /// Set when this hub started it (else it was adopted).
    child: Option<Child>,
    pid: Pid,
}

impl RelayProcess {
    /// Adopts the data dir's running relay, or starts one with `args`.
    pub fn ensure(data_dir: &Path, args: Vec<OsString>) -> Result<RelayProcess, RelayError> {
        if let Some(pid) = read_pid(data_dir)
            && is_relay_of(pid, data_dir)
        {
            tracing::info!(pid, "adopted the running relay");
            return Ok(RelayProcess {
                data_dir: data_dir.to_path_buf(),
                args,
                child: None,
                pid: Pid::from_raw(pid),
            });
        }
        let child = spawn(&args)?;
        let pid = Pid::from_raw(child.id() as i32);
        tracing::info!(pid = pid.as_raw(), "started the relay process");
        Ok(RelayProcess {
            data_dir: data_dir.to_path_buf(),
            args,
            child: Some(child),
            pid,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => kill(self.pid, None).is_ok() && is_relay_of(self.pid.as_raw(), &self.data_dir),
        }
    }

    /// Starts the relay again if it has died.
    pub fn keep_alive(&mut self) {
        if self.alive() {
            return;
        }
        tracing::warn!(
            pid = self.pid.as_raw(),
            "the relay process is gone; starting it again"
        );
        match spawn(&self.args) {
            Ok(child) => {
                self.pid = Pid::from_raw(child.id() as i32);
                self.child = Some(child);
            }
            Err(e) => tracing::error!(error = %e, "could not start the relay process"),
        }
    }

    /// SIGTERM (the relay withdraws its record and closes its socket), SIGKILL after 10 s.
    pub async fn stop(mut self) {
        if !self.alive() {
            return;
        }
        let _ = kill(self.pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(
            pid = self.pid.as_raw(),
            "the relay did not stop within 10 s; killing it"
        );
        let _ = kill(self.pid, Signal::SIGKILL);
        if let Some(child) = &mut self.child {
            let _ = child.wait();
        }
    }
}

fn spawn(args: &[OsString]) -> Result<Child, RelayError> {
    let exe = std::env::current_exe()
        .map_err(|e| RelayError::Process(format!("finding the fleet-hub binary: {e}")))?;
    let mut command = Command::new(exe);
    command.args(args).stdin(Stdio::null());
    // SAFETY: only setsid (a plain syscall) between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    command
        .spawn()
        .map_err(|e| RelayError::Process(format!("starting the relay process: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_dials_the_api_on_loopback_when_it_listens_everywhere() {
        assert_eq!(
            local_api("0.0.0.0:7443".parse().unwrap()).to_string(),
            "127.0.0.1:7443"
        );
        assert_eq!(
            local_api("203.0.113.10:7443".parse().unwrap()).to_string(),
            "203.0.113.10:7443"
        );
    }

    #[test]
    fn relay_args_carry_every_option() {
        let options = RelayOptions::new("192.0.2.1:51820".parse().unwrap(), Path::new("/tmp/d"));
        let args = relay_args(
            &options,
            Path::new("/tmp/d"),
            "0.0.0.0:7443".parse().unwrap(),
        );
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            text.join(" "),
            "--data-dir /tmp/d --hub 127.0.0.1:7443 relay --relay-listen 192.0.2.1:51820 \
             --relay-endpoint 192.0.2.1:51820 --relay-ttl 6000ms"
        );
    }

    #[test]
    fn a_second_claim_by_this_process_is_allowed_and_release_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = PidFile::claim(dir.path()).unwrap();
        assert!(first.still_ours());
        let again = PidFile::claim(dir.path()).unwrap();
        again.release();
        assert!(!first.still_ours());
        assert!(!dir.path().join(RELAY_PID_FILE).exists());
    }
}

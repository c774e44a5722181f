//! A long-running program of the fleet (hub, controller) inside a netns: started with
//! `nsenter --net=<netns> -- <argv>` (nsenter execs in place, so the child's PID is the
//! program's), SIGKILLed if the test process dies (`PR_SET_PDEATHSIG`), stdout and stderr
//! appended to a log file, stopped by PID only.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::util::poll_until;

#[derive(Debug)]
pub struct ManagedProcess {
    label: String,
    program: PathBuf,
    args: Vec<OsString>,
    netns: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ManagedProcess {
    /// Describes (does not start) `program args...` run in `netns`, logging to `log`.
    pub fn new(
        label: &str,
        program: impl Into<PathBuf>,
        args: Vec<OsString>,
        netns: &Path,
        log: PathBuf,
    ) -> ManagedProcess {
        ManagedProcess {
            label: label.to_string(),
            program: program.into(),
            args,
            netns: netns.to_path_buf(),
            log,
            env: vec![("NO_COLOR".into(), "1".into())],
            child: None,
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    pub fn set_args(&mut self, args: Vec<OsString>) {
        self.args = args;
    }

    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Starts the program (again). Its log is appended to, with a marker line per start.
    pub fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(Error::Invalid(format!("{} is already running", self.label)));
        }
        let mut log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io("open", &self.log, e))?;
        {
            use std::io::Write;
            let _ = writeln!(log, "==== fleet-e2e: starting {}", self.label);
        }
        let err_log = log
            .try_clone()
            .map_err(|e| Error::io("dup", &self.log, e))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // SAFETY: only async-signal-safe calls between fork and exec: the death signal, and
        // an empty signal mask (a caller such as fleet-sandbox blocks SIGINT/SIGTERM in its
        // threads; the program must still stop on SIGTERM).
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&nix::sys::signal::SigSet::empty()),
                    None,
                )
                .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io("spawn", &self.program, e))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is running; reaps it (and forgets it) if it has exited.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// The exit status if it has exited (and reaps it), `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL by PID, as a crash would; waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// SIGTERM by PID and waits up to `timeout` (then SIGKILL). Returns how it exited
    /// (`None` if it had to be killed or was not running).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        match poll_until(&format!("{} to exit", self.label), timeout, || {
            c.try_wait().ok().flatten()
        }) {
            Ok(status) => Some(status),
            Err(_) => {
                let _ = c.kill();
                let _ = c.wait();
                None
            }
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log written since the last start.
    pub fn current_log(&self) -> String {
        let log = self.log();
        let marker = format!("==== fleet-e2e: starting {}", self.label);
        match log.rfind(&marker) {
            Some(i) => log[i..].to_string(),
            None => log,
        }
    }

    /// Waits until the current run's log contains `needle`; fails early (with the log) if
    /// the process exits.
    pub fn await_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let label = self.label.clone();
        let res = poll_until(&format!("{label} to log {needle:?}"), timeout, || {
            if self.current_log().contains(needle) {
                return Some(Ok(()));
            }
            if let Some(status) = self.exited() {
                return Some(Err(status));
            }
            None
        });
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => Err(Error::Invalid(format!(
                "{label} exited ({status}) before logging {needle:?}:\n{}",
                self.current_log()
            ))),
            Err(e) => Err(Error::Invalid(format!("{e}:\n{}", self.current_log()))),
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

//! Small helpers: running commands with useful errors, polling with a deadline, root checks.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Runs `cmd` to completion; a non-zero exit becomes [`Error::Command`] with its stderr.
pub fn run_command(cmd: &mut Command) -> Result<Output> {
    let command = describe(cmd);
    let output = cmd.output().map_err(|e| Error::Command {
        command: command.clone(),
        status: "could not start".into(),
        stderr: e.to_string(),
    })?;
    if !output.status.success() {
        return Err(Error::Command {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output)
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Calls `check` until it returns `Some`, every 20–200 ms, failing after `timeout`.
/// The sleeps here only pace the polling; the condition is what synchronises.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                timeout,
                detail: String::new(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Whether `pid` is a live process (exists and is not a zombie awaiting its reaper).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Fails loudly (panics) when not running as root: these tests must not skip silently.
pub fn require_root(test: &str) {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "{test}: needs root (network namespaces, mounts, containerd); run the tests as root, \
             as CI does"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_command_and_stderr() {
        let err = run_command(Command::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .expect_err("exit 3 must fail");
        let msg = err.to_string();
        assert!(msg.contains("sh -c echo boom"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn poll_until_times_out_with_what() {
        let err = poll_until("nothing", Duration::from_millis(50), || None::<()>).unwrap_err();
        assert!(err.to_string().contains("waiting for nothing"));
    }

    #[test]
    fn own_process_is_alive_and_unused_pid_is_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 1));
    }

    #[test]
    fn poll_until_returns_value() {
        let mut n = 0;
        let v = poll_until("n reaches 3", Duration::from_secs(5), || {
            n += 1;
            (n >= 3).then_some(n)
        })
        .unwrap();
        assert_eq!(v, 3);
    }
}

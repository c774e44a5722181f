//! Shared test support: the store and registry suites and a real etcd.
#![allow(dead_code)]

pub mod browser;
pub mod etcd;
pub mod hub;
pub mod registry_suite;
pub mod store_suite;

/// Stops `child` by its PID: SIGTERM, then SIGKILL after `grace`; reaps it.
pub fn terminate(
    mut child: std::process::Child,
    grace: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

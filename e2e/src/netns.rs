//! Named network namespaces for tests: created with `ip netns add`, deleted on drop.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::Result;
use crate::util::run_command;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A uniquely named netns (`/run/netns/fe2e-<prefix>-<pid>-<n>`) with `lo` up.
/// Dropping it deletes the netns; links inside it go with it once no process holds it.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates the netns; panics with the `ip` error if it cannot (tests want that).
    pub fn new(prefix: &str) -> TestNetns {
        Self::try_new(prefix).unwrap_or_else(|e| panic!("creating test netns {prefix}: {e}"))
    }

    pub fn try_new(prefix: &str) -> Result<TestNetns> {
        // Always `fe2e-...-<pid>-<n>`: unique, and reapable if this process dies without Drop.
        let prefix = prefix.strip_prefix("fe2e-").unwrap_or(prefix);
        let name = format!(
            "fe2e-{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_command(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = TestNetns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=` or `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <name> <args>` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ip_in(&self.name, args)
    }

    /// A `Command` for `program` running inside this netns (`nsenter --net=...`, which
    /// unlike `ip netns exec` leaves /sys and the cgroup mounts alone).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = run_command(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("fleet-e2e: deleting netns {}: {e}", self.name);
        }
    }
}

/// Runs `ip -n <netns> <args>` and returns its stdout.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let out = run_command(Command::new("ip").arg("-n").arg(netns).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_is_created_with_lo_up_and_deleted_on_drop() {
        crate::require_root("netns_is_created_with_lo_up_and_deleted_on_drop");
        let ns = TestNetns::new("fe2e-unit");
        let path = ns.path();
        assert!(path.exists(), "{} missing", path.display());
        let lo = ns.ip(&["-o", "link", "show", "lo"]).unwrap();
        assert!(lo.contains("UP"), "lo not up: {lo}");
        drop(ns);
        assert!(!path.exists(), "{} still there after drop", path.display());
    }

    #[test]
    fn ip_in_missing_netns_names_it() {
        let err = ip_in("fe2e-does-not-exist", &["link"]).unwrap_err();
        assert!(err.to_string().contains("fe2e-does-not-exist"), "{err}");
    }
}

//! Tearing down a containerd instance's leftovers, by what is unique to it (its directory,
//! socket path and runc root), never by process name. Also reaps instances and netns left by
//! test processes that died without running Drop (SIGKILL, abort).
//!
//! Instance dirs are `$TMPDIR/fe2e-<label>-<pid>-<n>`, netns `fe2e-<label>-<pid>-<n>`; `<pid>`
//! is the test process that made them, so a dead `<pid>` marks them as stale.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::mounts;
use crate::util::{poll_until, process_alive, run_command};

const DIR_PREFIX: &str = "fe2e-";

pub(crate) fn instance_dir(id: &str) -> PathBuf {
    // Short path: unix socket paths are limited to 108 bytes.
    std::env::temp_dir().join(format!("{DIR_PREFIX}{id}"))
}

pub(crate) fn cgroup_parent(id: &str) -> String {
    format!("/fleet-e2e-{id}")
}

/// The owning PID encoded in `fe2e-<label>-<pid>-<n>`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(DIR_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let _n: u32 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

/// Processes whose argv (NUL-split) satisfies `matches`.
fn pids_where(matches: impl Fn(&[&[u8]]) -> bool) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return pids;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if matches(&args) {
            pids.push(pid);
        }
    }
    pids
}

/// containerd-shim processes serving the containerd at `grpc_socket` (`-address <socket>`).
pub fn shim_pids(grpc_socket: &Path) -> Vec<i32> {
    let sock = grpc_socket.as_os_str().as_encoded_bytes().to_vec();
    pids_where(|args| {
        args.windows(2)
            .any(|w| w[0] == b"-address" && w[1] == sock.as_slice())
    })
}

/// containerd processes started with `--config <dir>/config.toml`.
pub fn containerd_pids(dir: &Path) -> Vec<i32> {
    let config = dir
        .join("config.toml")
        .as_os_str()
        .as_encoded_bytes()
        .to_vec();
    pids_where(|args| {
        args.windows(2)
            .any(|w| w[0] == b"--config" && w[1] == config.as_slice())
    })
}

/// Kills and deletes every runc container under `<runc_root>/<namespace>`.
fn kill_runc_containers(runc_root: &Path) {
    let Ok(namespaces) = fs::read_dir(runc_root) else {
        return;
    };
    for ns in namespaces.flatten() {
        let root = ns.path();
        let runc =
            |args: &[&str]| run_command(Command::new("runc").arg("--root").arg(&root).args(args));
        let Ok(out) = runc(&["list", "-q"]) else {
            continue;
        };
        for id in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
        {
            let _ = runc(&["kill", "--all", id, "KILL"]);
            let _ = runc(&["delete", "--force", id]);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes the cgroup `parent` (and children) from every mounted hierarchy.
fn remove_cgroup_parent(parent: &str) {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let rel = parent.trim_start_matches('/');
    for h in hierarchies.flatten() {
        let top = h.path().join(rel);
        if top.is_dir() {
            remove_cgroup_tree(&top);
        }
    }
}

fn kill_and_wait(pids: impl Fn() -> Vec<i32>, what: &str) {
    for pid in pids() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = poll_until(what, Duration::from_secs(5), || {
        pids()
            .into_iter()
            .all(|p| !process_alive(p as u32))
            .then_some(())
    });
}

/// With containerd already stopped: kills the instance's containers and shims, unmounts
/// everything under `dir`, removes its cgroups and then `dir` (kept if mounts remain).
pub(crate) fn tear_down_instance_dir(dir: &Path, cgroup_parent: &str) {
    kill_runc_containers(&dir.join("runc"));
    let sock = dir.join("containerd.sock");
    kill_and_wait(|| shim_pids(&sock), "shims to exit");
    let failed = mounts::unmount_all_under(dir);
    remove_cgroup_parent(cgroup_parent);
    if failed.is_empty() {
        if let Err(e) = fs::remove_dir_all(dir) {
            eprintln!("fleet-e2e: removing {}: {e}", dir.display());
        }
    } else {
        eprintln!(
            "fleet-e2e: leaving {} in place, mounts remain: {failed:?}",
            dir.display()
        );
    }
}

static REAP: Once = Once::new();

/// Once per process: tears down instances and netns whose owning test process is dead.
pub(crate) fn reap_stale_instances_once() {
    REAP.call_once(reap_stale_instances);
}

/// Tears down instance dirs and `fe2e-*` netns left by dead test processes.
pub fn reap_stale_instances() {
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = owner_pid(&name) else {
                continue;
            };
            if process_alive(pid) {
                continue;
            }
            if !e.path().join("config.toml").exists() {
                // The sandbox fleet's dirs (hub, member, etcd): removing a hub's data dir
                // also ends the relay process it left running (it watches `relay.pid`).
                if ["fe2e-hub-", "fe2e-mem-", "fe2e-etcd-"]
                    .iter()
                    .any(|p| name.starts_with(p))
                {
                    eprintln!(
                        "fleet-e2e: removing stale {} (pid {pid} is gone)",
                        e.path().display()
                    );
                    let _ = fs::remove_dir_all(e.path());
                }
                continue;
            }
            let dir = e.path();
            eprintln!(
                "fleet-e2e: reaping stale instance {} (pid {pid} is gone)",
                dir.display()
            );
            kill_and_wait(|| containerd_pids(&dir), "stale containerd to exit");
            let id = &name[DIR_PREFIX.len()..];
            tear_down_instance_dir(&dir, &cgroup_parent(id));
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|pid| !process_alive(pid)) {
                let _ = run_command(Command::new("ip").args(["netns", "delete", &name]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_read_from_instance_and_netns_names() {
        assert_eq!(owner_pid("fe2e-node-a-1234-0"), Some(1234));
        assert_eq!(owner_pid("fe2e-harness-99-12"), Some(99));
        assert_eq!(owner_pid("fe2e-x-notapid-1"), None);
        assert_eq!(owner_pid("other-1234-0"), None);
        assert_eq!(owner_pid("fe2e-1234"), None);
    }

    #[test]
    fn cgroup_parent_and_dir_share_the_id() {
        assert_eq!(cgroup_parent("n-1-0"), "/fleet-e2e-n-1-0");
        assert!(instance_dir("n-1-0").ends_with("fe2e-n-1-0"));
    }
}

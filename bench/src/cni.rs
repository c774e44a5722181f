//! Invoking a CNI plugin binary the way a runtime does (exec with the CNI env, config on stdin,
//! result on stdout), with the plugin process itself inside a chosen netns.
//!
//! The netns is entered with `setns` in `pre_exec` (after fork, before exec), so the bridge
//! plugin builds its bridge in a benchmark netns rather than on the machine, and every plugin
//! pays exactly the same process start-up. The timer spans spawn → exit.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sched::CloneFlags;
use serde_json::Value;

/// One plugin binary and where it runs.
#[derive(Debug)]
pub struct Plugin {
    pub binary: PathBuf,
    /// `CNI_PATH`: where the plugin finds delegated plugins (host-local for bridge).
    pub cni_path: String,
    /// The netns the plugin process runs in (its "host" side).
    host_netns: File,
}

/// The CNI parameters of one call.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    /// `CNI_ARGS`, e.g. `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..`.
    pub args: &'a str,
    pub config: &'a Value,
}

/// A successful call: how long it took and what it printed.
#[derive(Debug)]
pub struct Reply {
    pub elapsed: Duration,
    pub stdout: Value,
}

impl Plugin {
    /// `binary` run inside the netns at `host_netns`.
    pub fn new(binary: PathBuf, cni_path: &str, host_netns: &Path) -> anyhow::Result<Plugin> {
        let host = File::open(host_netns)
            .with_context(|| format!("opening netns {}", host_netns.display()))?;
        Ok(Plugin {
            binary,
            cni_path: cni_path.to_string(),
            host_netns: host,
        })
    }

    pub fn name(&self) -> String {
        self.binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Runs the plugin once; a non-zero exit is an error carrying the plugin's output.
    pub fn call(&self, call: &Call) -> anyhow::Result<Reply> {
        let stdin = serde_json::to_vec(call.config)?;
        let mut cmd = Command::new(&self.binary);
        cmd.env("CNI_COMMAND", call.command)
            .env("CNI_CONTAINERID", call.container_id)
            .env("CNI_NETNS", call.netns)
            .env("CNI_IFNAME", call.ifname)
            .env("CNI_ARGS", call.args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let host = self.host_netns.as_raw_fd();
        // SAFETY: only setns (a raw syscall, async-signal-safe) runs between fork and exec; the
        // fd stays open in the parent for the whole call.
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(host);
                nix::sched::setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(&stdin).with_context(|| {
                format!("writing the config to {} {}", self.name(), call.command)
            })?;
        }
        let out = child.wait_with_output()?;
        let elapsed = started.elapsed();
        if !out.status.success() {
            bail!(
                "`CNI_COMMAND={} CNI_CONTAINERID={} CNI_NETNS={} {}` failed ({}): stdout {} stderr {}\nstdin: {}",
                call.command,
                call.container_id,
                call.netns.display(),
                self.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&stdin),
            );
        }
        let stdout = if out.stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "{} {} printed no JSON: {}",
                    self.name(),
                    call.command,
                    String::from_utf8_lossy(&out.stdout)
                )
            })?
        };
        Ok(Reply { elapsed, stdout })
    }
}

/// A chained plugin's stdin: its conflist entry plus the list's `cniVersion` and `name`, and
/// the previous plugin's result when there is one (libcni passes it on ADD and DEL).
pub fn plugin_config(
    entry: &Value,
    cni_version: &str,
    name: &str,
    prev_result: Option<&Value>,
) -> Value {
    let mut conf = entry.clone();
    if let Value::Object(map) = &mut conf {
        map.insert("cniVersion".into(), cni_version.into());
        map.insert("name".into(), name.into());
        if let Some(prev) = prev_result {
            map.insert("prevResult".into(), prev.clone());
        }
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plugin_config_adds_version_name_and_prev_result() {
        let entry = json!({"type": "fleet-cni", "socket": "/s"});
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let c = plugin_config(&entry, "1.0.0", "net", Some(&prev));
        assert_eq!(c["type"], "fleet-cni");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["name"], "net");
        assert_eq!(c["prevResult"], prev);
        assert!(plugin_config(&entry, "1.0.0", "net", None)["prevResult"].is_null());
    }
}

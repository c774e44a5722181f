//! One node of a cluster: a netns (the node's own network, given by the caller) running its
//! own containerd (bridge + host-local primary CNI, fleet-cni chained) and its own fleet-nri
//! inside that netns, started without a plan (the controller hands it one).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::cni::BridgeNetwork;
use crate::containerd::{Containerd, ContainerdOpts};
use crate::cri::{Cri, ExecOutput};
use crate::error::{Error, Result};
use crate::fleet_nri::{FleetNri, FleetNriOpts};
use crate::netns::TestNetns;
use crate::util::poll_until;
use crate::workspace_bin;

/// The primary pod CIDR of every node (identical on purpose: the fleet never routes it).
pub const PRIMARY_POD_CIDR: &str = "10.244.1.0/24";
const EXEC: Duration = Duration::from_secs(10);
static SEQ: AtomicU32 = AtomicU32::new(0);

/// One node. Field order is drop order: pods first (CNI DEL reaches a live fleet-nri), then
/// containerd, fleet-nri (its CNF netns with it), the node's netns last.
pub struct ClusterNode {
    cri: Option<Cri>,
    pub containerd: Containerd,
    pub nri: FleetNri,
    pub underlay_ip: String,
    pub netns: TestNetns,
}

impl ClusterNode {
    /// Starts containerd and fleet-nri (no plan) inside `netns`; waits until the CRI network
    /// is ready and fleet-nri is registered over NRI.
    pub fn start(tag: &str, netns: TestNetns, underlay_ip: &str) -> Result<ClusterNode> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let containerd = Containerd::start(
            ContainerdOpts::new(tag)
                .netns(&netns)
                .cni_plugin(workspace_bin("fleet-cni")),
        )?;
        let nri = FleetNri::start_with(FleetNriOpts {
            node_subnet: None,
            nri_socket: Some(containerd.nri_socket()),
            netns: Some(netns.path()),
        })?;
        BridgeNetwork::new("podnet", &format!("fe2e-mbr{n}"), PRIMARY_POD_CIDR)
            .chain(nri.cni_entry())
            .write_to(&containerd)?;
        let cri = containerd.cri()?;
        cri.wait_network_ready(Duration::from_secs(15))?;
        poll_until(
            "fleet-nri to register over NRI",
            Duration::from_secs(15),
            || nri.status().ok().filter(|s| s.nri_registered),
        )
        .map_err(|e| Error::Invalid(format!("{e}\n{}", nri.log())))?;
        Ok(ClusterNode {
            cri: Some(cri),
            containerd,
            nri,
            underlay_ip: underlay_ip.to_string(),
            netns,
        })
    }

    pub fn cri(&self) -> &Cri {
        self.cri.as_ref().expect("cri connected until drop")
    }

    /// Runs `cmd` in `container`; a failure (or non-zero exit) is an error with the output.
    pub fn exec(&self, container: &str, cmd: &[&str]) -> Result<String> {
        let out = self.exec_output(container, cmd, EXEC)?;
        if !out.success() {
            return Err(Error::Invalid(format!("{cmd:?} in {container}: {out:?}")));
        }
        Ok(out.stdout)
    }

    pub fn exec_output(
        &self,
        container: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        self.cri().exec_sync(container, cmd, timeout)
    }

    /// Whether `cmd` exits 0 in `container`.
    pub fn exec_ok(&self, container: &str, cmd: &[&str]) -> bool {
        self.exec_output(container, cmd, EXEC)
            .map(|o| o.success())
            .unwrap_or(false)
    }

    /// Runs a command in the node's own netns and returns its stdout (empty on failure).
    pub fn in_node(&self, program: &str, args: &[&str]) -> String {
        self.netns
            .command(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Local ports of the UDP sockets in the netns `/run/netns/<netns>`.
    pub fn udp_ports(netns: &str) -> Vec<u16> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["--", "cat", "/proc/net/udp"])
            .output();
        let Ok(out) = out else { return Vec::new() };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|local| local.split(':').nth(1))
            .filter_map(|port| u16::from_str_radix(port, 16).ok())
            .collect()
    }

    /// Stops and removes every pod on the node (CNI DEL runs while fleet-nri is up).
    pub fn remove_all_pods(&self) {
        let Some(cri) = &self.cri else { return };
        for pod in cri.list_pods().unwrap_or_default() {
            let _ = cri.stop_pod(&pod.id);
            let _ = cri.remove_pod(&pod.id);
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.remove_all_pods();
        self.cri = None;
    }
}

/// The fleet IP on `eth-fleet` in `ip -4 -o addr show eth-fleet` output.
pub fn inet_of(ip_output: &str) -> Option<String> {
    ip_output
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
}

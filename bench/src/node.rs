//! A benchmark "node": a private containerd (fleet-e2e's harness, in a netns of its own) with
//! bridge + host-local, and optionally fleetboard chained: fleet-cni after bridge in the
//! conflist and a fleet-nri serving the node API and registered over NRI with that containerd.

use std::time::Duration;

use anyhow::Context;
use fleet_e2e::{BridgeNetwork, Containerd, ContainerdOpts, Cri};
use serde_json::json;

use crate::bins::release_bin;
use crate::daemon::{DaemonOpts, FleetNri};

pub const NETWORK: &str = "benchnet";
/// host-local's range: room for hundreds of pods.
pub const POD_SUBNET: &str = "10.244.0.0/16";
/// fleet-nri's node subnet (a /24: 253 pods).
pub const NODE_SUBNET: &str = "100.96.3.0/24";

/// Field order is drop order: containerd goes first (its Drop removes pods through CRI, which
/// runs fleet-cni DEL and so needs fleet-nri still up), then the daemon.
pub struct Node {
    pub containerd: Containerd,
    pub daemon: Option<FleetNri>,
    cri: Option<Cri>,
}

impl Node {
    /// `with_fleet`: chain fleet-cni and run fleet-nri with NRI against this containerd.
    pub fn start(label: &str, with_fleet: bool) -> anyhow::Result<Node> {
        let mut opts = ContainerdOpts::new(label);
        if with_fleet {
            opts = opts.cni_plugin(release_bin("fleet-cni")?);
        }
        let containerd = Containerd::start(opts).with_context(|| format!("starting {label}"))?;
        let mut node = Node {
            containerd,
            daemon: None,
            cri: None,
        };
        let mut net = BridgeNetwork::new(NETWORK, "fbbr0", POD_SUBNET);
        if with_fleet {
            let netns = node
                .containerd
                .netns_path()
                .context("containerd runs in no netns")?
                .to_path_buf();
            let mut daemon = FleetNri::start(&DaemonOpts {
                binary: release_bin("fleet-nri")?,
                node_subnet: NODE_SUBNET.into(),
                nri_socket: Some(node.containerd.nri_socket()),
                netns,
                cnf_netns: format!("fbench-cnf-{label}-{}", std::process::id()),
            })?;
            daemon.wait_until("it is registered over NRI", Duration::from_secs(20), |s| {
                s.is_some_and(|s| s.nri_registered)
            })?;
            net = net.chain(json!({"type": "fleet-cni", "socket": daemon.socket()}));
            node.daemon = Some(daemon);
        }
        net.write_to(&node.containerd)?;
        let cri = node.containerd.cri()?;
        cri.wait_network_ready(Duration::from_secs(20))?;
        node.cri = Some(cri);
        Ok(node)
    }

    pub fn cri(&self) -> &Cri {
        self.cri.as_ref().expect("connected in start")
    }

    /// Stops and removes every pod (CNI DEL runs), bounded by the CRI calls' own timeouts.
    pub fn remove_all_pods(&self) -> anyhow::Result<usize> {
        let pods = self.cri().list_pods()?;
        for p in &pods {
            self.cri().stop_pod(&p.id)?;
            self.cri().remove_pod(&p.id)?;
        }
        Ok(pods.len())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The blocking CRI client owns a runtime; drop it before the harness tears down.
        self.cri = None;
    }
}

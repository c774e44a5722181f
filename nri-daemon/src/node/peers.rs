//! The node's overlay peers: the other nodes of the cluster, persisted, then programmed on
//! the VXLAN device in the CNF netns (`fleet_core::overlay`).

use fleet_core::overlay::{Overlay, parse_peers};
use fleet_proto::node::PeerNode;

use super::{Failure, Node, Planned};

impl Node {
    /// The persisted peers become the desired set (programmed by the caller once a plan is
    /// in place).
    pub(super) fn restore_peers(&self) -> anyhow::Result<()> {
        let peers = self.store.load_peers()?;
        if !peers.is_empty() && self.planned_now().is_none() {
            tracing::warn!(
                peers = peers.len(),
                "peers persisted but no plan: the overlay waits for set_plan"
            );
        }
        *self.peers.lock().expect("peers") = peers;
        Ok(())
    }

    /// `set_peers`: the complete set of other nodes of the cluster; replaces the previous
    /// set. Persisted before it is programmed, so a failure or a crash is retried at start.
    pub async fn set_peers(&self, peers: Vec<PeerNode>) -> Result<(), Failure> {
        let planned = self.planned()?;
        parse_peers(planned.datapath.plan(), &peers)
            .map_err(|e| Failure::InvalidPeers(e.to_string()))?;
        let _control = self.control.lock().await;
        self.store
            .save_peers(&peers)
            .map_err(|e| Failure::Persist {
                what: "peers",
                reason: e.to_string(),
            })?;
        *self.peers.lock().expect("peers") = peers.clone();
        self.program_peers(&planned, &peers).await
    }

    pub fn peers(&self) -> Vec<PeerNode> {
        self.peers.lock().expect("peers").clone()
    }

    pub(super) async fn program_peers(
        &self,
        planned: &Planned,
        peers: &[PeerNode],
    ) -> Result<(), Failure> {
        let plan = planned.datapath.plan();
        let parsed = parse_peers(plan, peers).map_err(|e| Failure::InvalidPeers(e.to_string()))?;
        let overlay = Overlay {
            cnf: planned.datapath.cnf_path(),
            underlay: self.underlay_netns.clone(),
            vni: self.local.overlay_vni,
            port: self.local.overlay_port,
            mtu: self.local.mtu,
            node_subnet: plan.node_subnet,
        };
        let changes = overlay.apply(&parsed).await.map_err(Failure::Overlay)?;
        tracing::info!(
            peers = parsed.len(),
            changed = !changes.is_empty(),
            "overlay in line with the peers"
        );
        Ok(())
    }
}

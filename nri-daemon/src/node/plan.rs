//! The node's plan: validated, checked against live allocations, its CNF netns and IPAM
//! built, persisted.

use std::sync::Arc;

use fleet_core::config::NodePlan;
use fleet_core::datapath::NodeDatapath;
use fleet_core::ipam::NodeIpam;
use fleet_core::state::check_plan_change;
use fleet_proto::node::{NodeError, PlanChange, SetPlanRequest};

use super::{Failure, Node, Planned};

fn parse_cidr(what: &'static str, v: &str) -> Result<ipnetwork::Ipv4Network, Failure> {
    v.parse()
        .map_err(|e: ipnetwork::IpNetworkError| Failure::NotACidr {
            what,
            value: v.to_owned(),
            reason: e.to_string(),
        })
}

impl Node {
    /// Builds the CNF netns and IPAM for `plan` and makes it current.
    pub(super) async fn install_plan(&self, plan: NodePlan) -> Result<Arc<Planned>, Failure> {
        let datapath = NodeDatapath::new(plan.clone(), self.local.clone());
        datapath.ensure_cnf().await.map_err(Failure::Cnf)?;
        let ipam_dir = self.local.data_dir.join("ipam");
        let ipam = NodeIpam::open(&ipam_dir, plan.clone()).map_err(Failure::IpamOpen)?;
        let planned = Arc::new(Planned { ipam, datapath });
        *self.planned.write().expect("plan lock") = Some(planned.clone());
        tracing::info!(node_subnet = %plan.node_subnet, fleet_cidr = %plan.fleet_cidr, vip_range = %plan.vip_range, "node plan in effect");
        Ok(planned)
    }

    /// `set_plan`: the controller hands the node its plan. Idempotent; any change is refused
    /// while pods hold addresses (drain the node first).
    pub async fn set_plan(&self, req: SetPlanRequest) -> Result<PlanChange, Failure> {
        let plan = NodePlan::new(
            parse_cidr("fleet_cidr", &req.fleet_cidr)?,
            parse_cidr("vip_range", &req.vip_range)?,
            parse_cidr("node_subnet", &req.node_subnet)?,
        )
        .map_err(|e| Failure::InvalidPlan(e.to_string()))?;
        let _control = self.control.lock().await;
        let _gate = self.plan_gate.write().await;
        let current = self.planned_now();
        let allocated = current.as_ref().map_or(0, |p| p.ipam.allocated());
        let change = check_plan_change(
            current.as_ref().map(|p| p.datapath.plan()),
            &plan,
            allocated,
        )
        .map_err(|e| Failure::PlanConflict(e.to_string()))?;
        if change == PlanChange::Unchanged {
            return Ok(change);
        }
        let planned = self.install_plan(plan.clone()).await?;
        self.store.save_plan(&plan).map_err(|e| Failure::Persist {
            what: "plan",
            reason: e.to_string(),
        })?;
        // The overlay's own VTEP MAC and the peers' validity follow the node subnet.
        let peers = self.peers();
        if !peers.is_empty()
            && let Err(e) = self.program_peers(&planned, &peers).await
        {
            tracing::error!(error = %NodeError::from(e), "overlay not in line with the new plan; resend set_peers");
        }
        // The VIP table's hairpin and refusal rules follow the node subnet and VIP range.
        self.services_follow_plan(&planned).await;
        Ok(change)
    }

    pub fn plan(&self) -> Option<SetPlanRequest> {
        self.planned_now().map(|p| {
            let plan = p.datapath.plan();
            SetPlanRequest {
                fleet_cidr: plan.fleet_cidr.to_string(),
                vip_range: plan.vip_range.to_string(),
                node_subnet: plan.node_subnet.to_string(),
            }
        })
    }
}

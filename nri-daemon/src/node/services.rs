//! The node's ClusterSetIP VIPs (`set_services`): the whole VIP table, validated against the
//! plan, persisted (`services.json`, fsync + rename), then programmed in the CNF netns as one
//! nftables transaction (`fleet_core::vip`). The same table again is a no-op: no transaction.
//!
//! The table follows the plan: at start it is programmed once the plan is in place, and after
//! a plan change it is programmed again for the new plan (node subnet, VIP range) — or, if it
//! no longer fits (its VIPs outside the new VIP range, backends outside the new fleet CIDR),
//! cleared until the controller sends one that does.

use fleet_core::vip;
use fleet_proto::node::{SetServicesRequest, SetServicesResult, VipService};

use super::{Failure, Node, Planned};
use crate::metrics::{ResultLabels, ok_or_error};

/// What was accepted and whether the kernel holds it.
#[derive(Debug, Default)]
pub(super) struct ServicesState {
    /// The table as last accepted (normalized); `None` until the first `set_services`.
    table: Option<Vec<VipService>>,
    /// The CNF netns holds exactly `table`, for the current plan.
    in_sync: bool,
}

impl Node {
    /// `set_services`: the node's whole VIP table; replaces the previous one. A refused table
    /// changes nothing; an accepted one is persisted before it is programmed, so a failure or
    /// a crash is retried by the next request or at start.
    pub async fn set_services(
        &self,
        req: SetServicesRequest,
    ) -> Result<SetServicesResult, Failure> {
        let _control = self.control.lock().await;
        let planned = self.planned()?;
        let table = vip::normalize(&req.services);
        vip::validate(planned.datapath.plan(), &table)
            .map_err(|e| Failure::InvalidServices(e.0))?;
        {
            let st = self.services.lock().expect("services");
            if st.in_sync && st.table.as_ref() == Some(&table) {
                return Ok(SetServicesResult { changed: false });
            }
        }
        self.store
            .save_services(&table)
            .map_err(|e| Failure::Persist {
                what: "VIP table",
                reason: e.to_string(),
            })?;
        {
            let mut st = self.services.lock().expect("services");
            st.table = Some(table.clone());
            st.in_sync = false;
        }
        self.program_services(&planned, &table).await?;
        Ok(SetServicesResult { changed: true })
    }

    /// `list_services`: the table as last accepted (empty before the first).
    pub fn services(&self) -> Vec<VipService> {
        self.services
            .lock()
            .expect("services")
            .table
            .clone()
            .unwrap_or_default()
    }

    async fn program_services(
        &self,
        planned: &Planned,
        table: &[VipService],
    ) -> Result<(), Failure> {
        let result = self
            .vips
            .lock()
            .await
            .apply(&planned.datapath.cnf_path(), planned.datapath.plan(), table)
            .await;
        self.services.lock().expect("services").in_sync = result.is_ok();
        self.metrics
            .vip_programs
            .get_or_create(&ResultLabels {
                result: ok_or_error(result.is_ok()),
            })
            .inc();
        result.map_err(|e| Failure::Services(e.to_string()))?;
        tracing::info!(vips = table.len(), "VIP table programmed");
        Ok(())
    }

    /// Start-up: the persisted table, programmed if the node has a plan.
    pub(super) async fn restore_services(&self) -> anyhow::Result<()> {
        let Some(table) = self.store.load_services()? else {
            return Ok(());
        };
        let vips = table.len();
        self.services.lock().expect("services").table = Some(table);
        match self.planned_now() {
            Some(p) => self.services_follow_plan(&p).await,
            None => tracing::warn!(
                vips,
                "VIP table persisted but no plan: it is programmed once set_plan comes"
            ),
        }
        Ok(())
    }

    /// Programs the accepted table for `planned`'s plan (at start, after a plan change). A
    /// table that no longer fits the plan is cleared. Failures are logged and recorded; the
    /// next `set_services` retries.
    pub(super) async fn services_follow_plan(&self, planned: &Planned) {
        let Some(mut table) = self.services.lock().expect("services").table.clone() else {
            return;
        };
        if let Err(e) = vip::validate(planned.datapath.plan(), &table) {
            tracing::warn!(error = %e, "the VIP table does not fit the node's plan; cleared until the controller sends one that does");
            table.clear();
            if let Err(e) = self.store.save_services(&table) {
                tracing::error!(error = %e, "cannot persist the cleared VIP table");
            }
            self.services.lock().expect("services").table = Some(table.clone());
        }
        if let Err(e) = self.program_services(planned, &table).await {
            tracing::error!(error = %fleet_proto::node::NodeError::from(e), "cannot program the VIP table; the next set_services retries");
        }
    }
}

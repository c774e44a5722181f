//! The checks over liveness and services: controllers that hold no lease, imports routed to
//! withdrawn clusters, exports without endpoints, export conflicts.

use fleet_hub_api::model::FleetView;

use super::{CheckOutcome, finding, human};
use crate::services::services_view;

/// An export this long without an endpoint is more likely a selector typo than pods starting.
pub const EMPTY_EXPORT_SECS: u64 = 60;

/// Every cluster's controller holds its lease (`controller_live`): without one, nobody keeps
/// the cluster's records current and the hub withdraws its services from every other cluster.
pub fn check_controllers(view: &FleetView) -> CheckOutcome {
    let findings = view
        .clusters
        .iter()
        .filter(|c| !c.controller_live)
        .map(|c| {
            let id = c.id.to_string();
            finding(
                format!("cluster {id}"),
                format!(
                    "no controller holds cluster {id}'s lease: its services are withdrawn from \
                     every other cluster"
                ),
                format!(
                    "start/restart fleet-controller for {id} (its log says why it stopped \
                     renewing: hub unreachable, credential refused)"
                ),
            )
        })
        .collect();
    CheckOutcome::new(
        "controllers",
        format!(
            "{} clusters' controllers hold their leases",
            view.clusters.len()
        ),
        findings,
    )
}

/// Imports whose exporting clusters are withdrawn, exports without endpoints more than
/// [`EMPTY_EXPORT_SECS`] after they were made (the records keep no time of the last endpoint),
/// and exports in conflict, over the records the caller can read.
pub fn check_services(view: &FleetView, now: u64) -> CheckOutcome {
    let s = services_view(view);
    let mut findings = Vec::new();
    for i in &s.imports {
        for c in i.clusters.iter().filter(|c| !c.live) {
            findings.push(finding(
                format!("cluster {}'s import {}/{}", i.cluster, i.namespace, i.name),
                format!(
                    "exporting cluster {} is withdrawn (not live): its endpoints are neither \
                     resolved nor routed to",
                    c.cluster
                ),
                format!(
                    "check cluster {}'s fleet-controller and gateway (`fleetctl status`); it \
                     comes back once its controller holds its lease and its gateway is up",
                    c.cluster
                ),
            ));
        }
    }
    for e in &s.exports {
        let subject = format!("cluster {}'s export {}/{}", e.cluster, e.namespace, e.name);
        let age = export_age(view, &e.cluster, &e.namespace, &e.name, now);
        if e.endpoints == 0
            && let Some(age) = age.filter(|a| *a > EMPTY_EXPORT_SECS)
        {
            findings.push(finding(
                subject.clone(),
                format!(
                    "it has 0 endpoints, {} after it was exported",
                    human(age as i64)
                ),
                "check the export's selector (`fleetctl export ... --selector`) or the Service's \
                 selector against the pods' labels, and that those pods run",
            ));
        }
        for c in e
            .conditions
            .iter()
            .filter(|c| c.type_ == "Conflict" && c.status == "True")
        {
            findings.push(finding(
                subject.clone(),
                format!("export conflict: {} ({})", c.message, c.reason),
                "make the clusters' exports of this service agree (type, ports, affinity); \
                 the oldest export's spec wins until they do",
            ));
        }
    }
    for p in &s.problems {
        findings.push(finding(
            "service records",
            p.clone(),
            "the publishing controller wrote a record this fleetctl cannot read: check that \
             both run the same version",
        ));
    }
    CheckOutcome::new(
        "services",
        format!(
            "{} exports and {} imports are live and consistent",
            s.exports.len(),
            s.imports.len()
        ),
        findings,
    )
}

/// Seconds since the export was made (`created_at_ms`), when its record is readable.
fn export_age(
    view: &FleetView,
    cluster: &str,
    namespace: &str,
    name: &str,
    now: u64,
) -> Option<u64> {
    let record = fleet_hub_api::records::export_record_name(namespace, name);
    let r = view
        .records
        .iter()
        .find(|r| r.owner.as_str() == cluster && r.name == record)?;
    let e: fleet_hub_api::records::ExportRecord = serde_json::from_slice(&r.value).ok()?;
    Some(now.saturating_sub(e.created_at_ms / 1000))
}

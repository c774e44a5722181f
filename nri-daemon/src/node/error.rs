//! Every failure of a node operation, and the one place that maps it to the node API's
//! [`NodeError`] (a CNI error code, a message saying what failed, the cause as details).

use fleet_core::config::PlanError;
use fleet_core::datapath::DatapathError;
use fleet_core::ipam::IpamError;
use fleet_proto::node::{NodeError, code};

/// A failed node operation. `From<Failure> for NodeError` is the only mapping to the wire.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("node not yet given a subnet")]
    NoPlan,
    #[error("{what} is not an IPv4 CIDR: {value:?}: {reason}")]
    NotACidr {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("plan change refused: {0}")]
    PlanConflict(String),
    #[error("cannot set up the CNF netns for the plan: {0}")]
    Cnf(DatapathError),
    #[error("cannot open the IPAM store: {0}")]
    IpamOpen(IpamError),
    /// Writing the node's state (`what`: "plan", "peers", ...) to the data dir failed.
    #[error("cannot persist the {what}: {reason}")]
    Persist { what: &'static str, reason: String },
    #[error("invalid peer list: {0}")]
    InvalidPeers(String),
    #[error("cannot program the overlay: {0}")]
    Overlay(DatapathError),
    #[error("attach needs a container id and a netns path: {0}")]
    AttachArgs(String),
    #[error("the pod's network namespace does not exist: {0}")]
    PodNetnsMissing(String),
    /// The pod's primary network (prevResult, or its netns) overlaps the fleet CIDR or the VIP
    /// range: attaching would route part of it over eth-fleet.
    #[error("the pod's primary network overlaps the fleet's ranges: {0}")]
    PrimaryOverlap(PlanError),
    /// The pod's primary network could not be read (its netns, or a malformed `primary`).
    #[error("cannot read the pod's primary network: {0}")]
    PrimaryUnreadable(String),
    #[error("cannot reserve an address: {0}")]
    Reserve(IpamError),
    #[error("cannot attach eth-fleet to the pod: {0}")]
    Attach(DatapathError),
    #[error("cannot look up the pod's eth-fleet link: {0}")]
    LinkLookup(DatapathError),
    #[error("cannot release the pod's fleet address: {0}")]
    Release(IpamError),
    #[error("this pod holds no fleet address: {0}")]
    NoAttachment(String),
    #[error("the pod's address was allocated for another netns: {0}")]
    OtherNetns(String),
    #[error("eth-fleet is not as allocated: {0}")]
    Check(DatapathError),
    /// A gateway request that cannot be carried out as given.
    #[error("invalid gateway request: {0}")]
    InvalidGateway(String),
    /// A `set_services` table that cannot be programmed as given.
    #[error("invalid service table: {0}")]
    InvalidServices(String),
    /// Programming the VIP table in the CNF netns failed (the table is recorded).
    #[error("cannot program the service VIPs: {0}")]
    Services(String),
    /// The WireGuard device, its key or its own-block route failed.
    #[error("cannot {op}: {reason}")]
    Gateway { op: &'static str, reason: String },
}

impl From<Failure> for NodeError {
    fn from(f: Failure) -> NodeError {
        let netns_code = |e: &DatapathError, otherwise| {
            if e.is_netns_missing() {
                code::CONTAINER_UNKNOWN
            } else {
                otherwise
            }
        };
        let (code, msg, details): (u32, String, String) = match f {
            Failure::NoPlan => (
                code::TRY_AGAIN_LATER,
                "node not yet given a subnet: the cluster controller has not sent this node its plan"
                    .into(),
                "retry once fleet-nri status reports ready".into(),
            ),
            Failure::NotACidr {
                what,
                value,
                reason,
            } => (
                code::INVALID_CONFIG,
                format!("{what} is not an IPv4 CIDR"),
                format!("{value:?}: {reason}"),
            ),
            Failure::InvalidPlan(e) => (code::INVALID_CONFIG, "invalid plan".into(), e),
            Failure::PlanConflict(e) => (code::PLAN_CONFLICT, "plan change refused".into(), e),
            Failure::Cnf(e) => (
                code::IO_FAILURE,
                "cannot set up the CNF netns for the plan".into(),
                e.to_string(),
            ),
            Failure::IpamOpen(e) => (
                code::IO_FAILURE,
                "cannot open the IPAM store".into(),
                e.to_string(),
            ),
            Failure::Persist { what, reason } => (
                code::IO_FAILURE,
                format!("cannot persist the {what}; retry"),
                reason,
            ),
            Failure::InvalidPeers(e) => (code::INVALID_CONFIG, "invalid peer list".into(), e),
            Failure::Overlay(e) => (
                code::OVERLAY_FAILED,
                "cannot program the intra-cluster overlay; the peers are recorded, resend to retry"
                    .into(),
                e.to_string(),
            ),
            Failure::AttachArgs(key) => (
                code::INVALID_ENV,
                "attach needs a container id and a netns path".into(),
                key,
            ),
            Failure::PodNetnsMissing(e) => (
                code::CONTAINER_UNKNOWN,
                "the pod's network namespace does not exist".into(),
                e,
            ),
            Failure::PrimaryOverlap(e) => {
                let msg = match &e {
                    PlanError::OverlapsUsed {
                        range_name,
                        range,
                        used,
                        ..
                    } => format!(
                        "the pod's primary network {used} overlaps the {range_name} {range}; no fleet address was allocated"
                    ),
                    other => other.to_string(),
                };
                (code::INVALID_CONFIG, msg, e.to_string())
            }
            Failure::PrimaryUnreadable(e) => (
                code::INVALID_CONFIG,
                "cannot read the pod's primary network to check it against the fleet's ranges"
                    .into(),
                e,
            ),
            Failure::Reserve(e) => match e {
                IpamError::Exhausted { .. } => (
                    code::POOL_EXHAUSTED,
                    "no free fleet address on this node".into(),
                    e.to_string(),
                ),
                IpamError::Io { .. } => (
                    code::IO_FAILURE,
                    "cannot persist the address reservation".into(),
                    e.to_string(),
                ),
            },
            Failure::Attach(e) => (
                netns_code(&e, code::ATTACH_FAILED),
                "cannot attach eth-fleet to the pod".into(),
                e.to_string(),
            ),
            Failure::LinkLookup(e) => (
                code::IO_FAILURE,
                "cannot look up the pod's eth-fleet link; retry".into(),
                e.to_string(),
            ),
            Failure::Release(e) => (
                code::IO_FAILURE,
                "cannot release the pod's fleet address; retry".into(),
                e.to_string(),
            ),
            Failure::NoAttachment(what) => (
                code::CHECK_FAILED,
                "this pod holds no fleet address".into(),
                what,
            ),
            Failure::OtherNetns(what) => (
                code::CHECK_FAILED,
                "the pod's address was allocated for another netns".into(),
                what,
            ),
            Failure::Check(e) => (
                netns_code(&e, code::CHECK_FAILED),
                "eth-fleet is not as allocated".into(),
                e.to_string(),
            ),
            Failure::InvalidGateway(e) => {
                (code::INVALID_CONFIG, "invalid gateway request".into(), e)
            }
            Failure::InvalidServices(e) => {
                (code::INVALID_CONFIG, "invalid service table".into(), e)
            }
            Failure::Services(e) => (
                code::SERVICES_FAILED,
                "cannot program the service VIPs; the table is recorded, resend to retry".into(),
                e,
            ),
            Failure::Gateway { op, reason } => (
                code::GATEWAY_FAILED,
                format!("cannot {op}; resend to retry"),
                reason,
            ),
        };
        NodeError::new(code, msg, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_the_cni_codes() {
        let e = NodeError::from(Failure::NoPlan);
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("not yet given a subnet"));
        let e = NodeError::from(Failure::Persist {
            what: "plan",
            reason: "disk full".into(),
        });
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (
                code::IO_FAILURE,
                "cannot persist the plan; retry",
                "disk full"
            )
        );
        let e = NodeError::from(Failure::Reserve(IpamError::Exhausted {
            subnet: "100.96.3.0/30".into(),
            capacity: 1,
        }));
        assert_eq!(e.code, code::POOL_EXHAUSTED);
        assert_eq!(
            NodeError::from(Failure::PlanConflict("x".into())).code,
            code::PLAN_CONFLICT
        );
        let e = NodeError::from(Failure::InvalidServices("VIP 1.2.3.4 ...".into()));
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (
                code::INVALID_CONFIG,
                "invalid service table",
                "VIP 1.2.3.4 ..."
            )
        );
        let e = NodeError::from(Failure::Services("nft: ...".into()));
        assert_eq!(e.code, code::SERVICES_FAILED);
        assert!(e.msg.contains("resend to retry"), "{e}");
    }
}

//! fleet-nri's Prometheus metrics: counters the node updates as it works ([`NodeMetrics`],
//! plain atomics behind `prometheus-client` types) and gauges read from the [`Node`] at scrape
//! time ([`NodeGauges`]: allocations, capacity, peers, VIPs, NRI registration), so no gauge can
//! drift from the state it reports. `nri-daemon/README.md` lists every series.

use std::sync::Arc;

use fleet_metrics::{LatencyFamily, latency_family};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::node::Node;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The node's counters; cloning shares them.
#[derive(Clone)]
pub struct NodeMetrics {
    /// Node API requests by op (`attach`/`detach` are fleet-cni's ADD/DEL) and result.
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: LatencyFamily<OpLabels>,
    pub nri_events: Family<EventLabels, Counter>,
    /// Pods NRI attached because they had no attachment (they predate the daemon).
    pub repairs: Family<ResultLabels, Counter>,
    /// Attachments released without a CNI DEL.
    pub reclaims: Family<ReasonLabels, Counter>,
    pub vip_programs: Family<ResultLabels, Counter>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            requests: Family::default(),
            request_duration: latency_family(),
            nri_events: Family::default(),
            repairs: Family::default(),
            reclaims: Family::default(),
            vip_programs: Family::default(),
        }
    }
}

pub fn ok_or_error(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

/// Registers the node's counters and its scrape-time gauges.
pub fn register(registry: &mut Registry, node: Arc<Node>) {
    let m = node.metrics().clone();
    registry.register(
        "fleetboard_node_api_requests",
        "Node API requests answered, by op and result (attach/detach are fleet-cni's ADD/DEL)",
        m.requests,
    );
    registry.register(
        "fleetboard_node_api_request_duration_seconds",
        "Time from a node API request decoded to its reply ready, by op",
        m.request_duration,
    );
    registry.register(
        "fleetboard_nri_events",
        "NRI events received from the container runtime, by event",
        m.nri_events,
    );
    registry.register(
        "fleetboard_nri_repairs",
        "Pods without an attachment that NRI attached (they predate the daemon), by result",
        m.repairs,
    );
    registry.register(
        "fleetboard_nri_reclaims",
        "Attachments released without a CNI DEL, by reason (netns_gone, pod_removed)",
        m.reclaims,
    );
    registry.register(
        "fleetboard_nri_vip_transactions",
        "nftables transactions programming the VIP table, by result",
        m.vip_programs,
    );
    registry.register_collector(Box::new(NodeGauges(node)));
}

/// Gauges read from the node at each scrape.
struct NodeGauges(Arc<Node>);

impl std::fmt::Debug for NodeGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeGauges")
    }
}

impl Collector for NodeGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.0.status();
        let gauges: [(&str, &str, i64); 6] = [
            (
                "fleetboard_nri_allocations",
                "Fleet addresses allocated to pods on this node",
                status.allocated as i64,
            ),
            (
                "fleetboard_nri_allocation_capacity",
                "Pod addresses the node subnet holds (0 before the node has a plan)",
                status.capacity as i64,
            ),
            (
                "fleetboard_nri_plan_ready",
                "1 once the node has a plan from the controller (or its config)",
                status.ready as i64,
            ),
            (
                "fleetboard_nri_registered",
                "1 while the container runtime has fleet-nri registered as an NRI plugin",
                status.nri_registered as i64,
            ),
            (
                "fleetboard_nri_overlay_peers",
                "Other nodes of the cluster on the VXLAN overlay (as last handed over)",
                self.0.peers().len() as i64,
            ),
            (
                "fleetboard_nri_vip_services",
                "ClusterSetIP VIPs in the node's VIP table (as last accepted)",
                self.0.services().len() as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

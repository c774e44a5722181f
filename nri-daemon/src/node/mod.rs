//! The node: one place that attaches, checks and releases pods, whoever asks — `fleet-cni`
//! over the node API or NRI repairing a pod that predates the daemon; and the node's share of
//! the cluster the controller hands it: its plan (`set_plan`) and its peers (`set_peers`).
//!
//! Until the node has a plan it has no IPAM and no CNF bridge: ADD answers code 11 (try again
//! later) and STATUS is not ready. The plan and the peers are persisted in the data dir and
//! restored at start.
//!
//! One file per concern: [`plan`] (the plan and its CNF netns), [`pods`] (attach, detach,
//! check, gc), [`peers`] (the intra-cluster overlay), [`repair`] (NRI: synchronize and pod
//! events), [`gateway`] (the cluster's WireGuard gateway on the gateway node, with
//! [`own_block`]), [`services`] (the ClusterSetIP VIPs: nftables in the CNF netns); [`error`] maps every failure to the node API's error codes, in one place. This file
//! holds the [`Node`] and the request dispatch.

mod error;
mod gateway;
mod own_block;
mod paths;
mod peers;
mod plan;
mod pods;
mod repair;
mod services;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use fleet_core::config::{NodeLocal, NodePlan};
use fleet_core::datapath::NodeDatapath;
use fleet_core::ipam::NodeIpam;
use fleet_core::netns;
use fleet_core::state::NodeStateStore;
use fleet_proto::node::{
    Attachment, NodeError, NodeReply, NodeRequest, Origin, PeerNode, StatusResult,
};
use serde::Serialize;

use crate::nri::NriStatus;

pub use error::Failure;
pub use repair::{ANNOTATION_FLEET_IP, ENV_FLEET_IP, NodeEvents};

pub struct Node {
    local: NodeLocal,
    /// The netns whose routing carries the overlay's UDP: the daemon's own (the node's).
    underlay_netns: PathBuf,
    store: NodeStateStore,
    /// IPAM and datapath of the current plan; `None` until the node has a plan.
    planned: std::sync::RwLock<Option<Arc<Planned>>>,
    /// The peers last handed over (the desired set, even if programming them failed).
    peers: Mutex<Vec<PeerNode>>,
    /// Serializes plan and peer changes.
    control: tokio::sync::Mutex<()>,
    /// ADD holds it shared, `set_plan` exclusively: a plan cannot change between its check
    /// for live allocations and its swap while an ADD reserves an address.
    plan_gate: tokio::sync::RwLock<()>,
    /// Network name recorded for NRI repairs.
    network: String,
    nri: NriStatus,
    /// Serializes work on one pod sandbox (ADD vs DEL vs repair).
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The WireGuard gateway, on the node the controller made the gateway.
    gateway: Arc<tokio::sync::Mutex<gateway::GatewayState>>,
    /// The gateway's private key once loaded or made (never logged, never sent).
    gateway_key: Mutex<Option<fleet_gateway::PrivateKey>>,
    /// The VIP table (`set_services`) and whether the CNF netns holds it.
    services: Mutex<services::ServicesState>,
    /// What the CNF netns' VIP table holds, so a change programs only what differs.
    vips: tokio::sync::Mutex<fleet_core::vip::VipProgrammer>,
    /// Counters for `/metrics` (see `crate::metrics`).
    metrics: crate::metrics::NodeMetrics,
}

/// What exists once the node has a plan.
pub struct Planned {
    pub ipam: NodeIpam,
    pub datapath: NodeDatapath,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Node {
    /// A node without a plan yet; [`Node::restore`] loads what was persisted.
    pub fn new(local: NodeLocal, network: String, nri: NriStatus) -> Self {
        Node {
            store: NodeStateStore::new(&local.data_dir),
            local,
            underlay_netns: PathBuf::from("/proc/self/ns/net"),
            planned: std::sync::RwLock::new(None),
            peers: Mutex::new(Vec::new()),
            control: tokio::sync::Mutex::new(()),
            plan_gate: tokio::sync::RwLock::new(()),
            network,
            nri,
            pod_locks: Mutex::new(HashMap::new()),
            gateway: Arc::default(),
            gateway_key: Mutex::new(None),
            services: Mutex::default(),
            vips: Default::default(),
            metrics: Default::default(),
        }
    }

    /// Start-up: the persisted plan (the controller's latest word) or else the config's, then
    /// the persisted peers, then the persisted gateway, then the VIP table. A plan that cannot be set up is fatal;
    /// peers, a gateway or VIPs that cannot be programmed are logged and retried at the controller's
    /// next request.
    pub async fn restore(&self, config_plan: Option<NodePlan>) -> anyhow::Result<()> {
        use anyhow::Context;
        let persisted = self.store.load_plan()?;
        if let (Some(p), Some(c)) = (&persisted, &config_plan)
            && p != c
        {
            tracing::warn!(persisted = %p.node_subnet, config = %c.node_subnet, "the plan from the controller (data dir) overrides the config's plan");
        }
        if let Some(plan) = persisted.or(config_plan) {
            self.install_plan(plan)
                .await
                .map_err(|e| anyhow::anyhow!("{}", NodeError::from(e)))
                .context("cannot set up the node's plan")?;
        }
        self.restore_peers()?;
        if let Some(p) = self.planned_now() {
            let peers = self.peers();
            if !peers.is_empty()
                && let Err(e) = self.program_peers(&p, &peers).await
            {
                tracing::error!(error = %NodeError::from(e), "cannot restore the overlay; the next set_peers retries");
            }
        }
        self.restore_gateway().await?;
        self.restore_services().await
    }

    fn planned_now(&self) -> Option<Arc<Planned>> {
        self.planned.read().expect("plan lock").clone()
    }

    fn planned(&self) -> Result<Arc<Planned>, Failure> {
        self.planned_now().ok_or(Failure::NoPlan)
    }

    /// Without a plan: not ready, empty CIDRs, zero capacity.
    pub fn status(&self) -> StatusResult {
        let p = self.planned_now();
        let plan = p.as_ref().map(|p| p.datapath.plan());
        let show = |f: fn(&NodePlan) -> String| plan.map(f).unwrap_or_default();
        StatusResult {
            ready: p.is_some(),
            node_subnet: show(|p| p.node_subnet.to_string()),
            fleet_cidr: show(|p| p.fleet_cidr.to_string()),
            vip_range: show(|p| p.vip_range.to_string()),
            allocated: p.as_ref().map_or(0, |p| p.ipam.allocated()),
            capacity: plan.map_or(0, NodePlan::pod_capacity),
            nri_registered: self.nri.registered(),
            nri_registrations: self.nri.registrations(),
            cnf_netns: netns::named_path(&self.local.cnf_netns)
                .display()
                .to_string(),
        }
    }

    pub fn list(&self) -> Vec<Attachment> {
        self.planned_now()
            .map(|p| p.ipam.list())
            .unwrap_or_default()
    }

    pub fn metrics(&self) -> &crate::metrics::NodeMetrics {
        &self.metrics
    }

    /// Answers one node API request: the reply line (`{"ok":..}` or `{"error":..}`, newline).
    pub async fn dispatch(&self, req: NodeRequest) -> String {
        match req {
            NodeRequest::Attach(r) => reply_line(self.attach(r, Origin::Cni).await),
            NodeRequest::Detach(r) => reply_line(self.detach(r).await),
            NodeRequest::Check(r) => reply_line(self.check(r).await),
            NodeRequest::Gc(r) => reply_line(self.gc(r).await),
            NodeRequest::Status => reply_line::<_, Failure>(Ok(self.status())),
            NodeRequest::ListAttachments => reply_line::<_, Failure>(Ok(self.list())),
            NodeRequest::SetPlan(r) => reply_line(self.set_plan(r).await),
            NodeRequest::GetPlan => reply_line::<_, Failure>(Ok(self.plan())),
            NodeRequest::SetPeers(r) => reply_line(self.set_peers(r.peers).await),
            NodeRequest::ListPeers => reply_line::<_, Failure>(Ok(self.peers())),
            NodeRequest::SetGateway(r) => reply_line(self.set_gateway(r).await),
            NodeRequest::GatewayStatus => reply_line(self.gateway_status().await),
            NodeRequest::GatewayKey => reply_line(self.gateway_key()),
            NodeRequest::ClearGateway => reply_line(self.clear_gateway().await),
            NodeRequest::SetServices(r) => reply_line(self.set_services(r).await),
            NodeRequest::ListServices => reply_line::<_, Failure>(Ok(self.services())),
        }
    }
}

/// One reply line; the error (a [`Failure`], or a transport-level [`NodeError`]) becomes the
/// wire error.
pub fn reply_line<T: Serialize, E: Into<NodeError>>(result: Result<T, E>) -> String {
    let reply = match result {
        Ok(v) => NodeReply::Ok(v),
        Err(e) => NodeReply::Error(e.into()),
    };
    let mut s = serde_json::to_string(&reply).expect("replies serialize");
    s.push('\n');
    s
}

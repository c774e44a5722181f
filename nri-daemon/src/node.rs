//! The node: one place that attaches, checks and releases pods, whoever asks — `fleet-cni`
//! over the node API or NRI repairing a pod that predates the daemon; and the node's share of
//! the cluster the controller hands it: its plan (`set_plan`) and its peers (`set_peers`).
//!
//! Until the node has a plan it has no IPAM and no CNF bridge: ADD answers code 11 (try again
//! later) and STATUS is not ready. The plan and the peers are persisted in the data dir and
//! restored at start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_core::config::{NodeLocal, NodePlan, POD_INTERFACE};
use fleet_core::datapath::NodeDatapath;
use fleet_core::ipam::{IpamError, NodeIpam};
use fleet_core::netns;
use fleet_core::overlay::{Overlay, parse_peers};
use fleet_core::state::{NodeStateStore, check_plan_change};
use fleet_proto::node::{
    AttachRequest, AttachResult, Attachment, AttachmentKey, CheckRequest, DetachRequest, GcRequest,
    GcResult, NodeError, Origin, PeerNode, PlanChange, PodMeta, SetPlanRequest, StatusResult, code,
};

use crate::nri::NriStatus;
use crate::nri::handler::{ContainerAdjust, ContainerInfo, NriHandler, PodSandboxInfo};

/// Env var carrying the pod's fleet IP into every container (NRI CreateContainer).
pub const ENV_FLEET_IP: &str = "FLEETBOARD_IP";
/// Annotation carrying the pod's fleet IP on every container.
pub const ANNOTATION_FLEET_IP: &str = "fleetboard.io/ip";
/// CNI_IFNAME recorded for NRI repairs: what the runtime's later DEL of the chain will carry.
const REPAIR_IFNAME: &str = "eth0";
/// Attachments younger than this are never treated as stale by Synchronize: their pod may be
/// mid-creation and not yet in the runtime's list.
const STALE_GRACE: Duration = Duration::from_secs(60);

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
}

/// What exists once the node has a plan.
pub struct Planned {
    pub ipam: NodeIpam,
    pub datapath: NodeDatapath,
}

fn no_plan() -> NodeError {
    NodeError::new(
        code::TRY_AGAIN_LATER,
        "node not yet given a subnet: the cluster controller has not sent this node its plan",
        "retry once fleet-nri status reports ready",
    )
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
        }
    }

    /// Start-up: the persisted plan (the controller's latest word) or else the config's, then
    /// the persisted peers. A plan that cannot be set up is fatal; peers that cannot be
    /// programmed are logged and retried at the next `set_peers`.
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
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("cannot set up the node's plan")?;
        }
        let peers = self.store.load_peers()?;
        *self.peers.lock().expect("peers") = peers.clone();
        if !peers.is_empty() {
            match self.planned_now() {
                Some(p) => {
                    if let Err(e) = self.program_peers(&p, &peers).await {
                        tracing::error!(error = %e, "cannot restore the overlay; the next set_peers retries");
                    }
                }
                None => tracing::warn!(
                    peers = peers.len(),
                    "peers persisted but no plan: the overlay waits for set_plan"
                ),
            }
        }
        Ok(())
    }

    fn planned_now(&self) -> Option<Arc<Planned>> {
        self.planned.read().expect("plan lock").clone()
    }

    fn planned(&self) -> Result<Arc<Planned>, NodeError> {
        self.planned_now().ok_or_else(no_plan)
    }

    /// Builds the CNF netns and IPAM for `plan` and makes it current.
    async fn install_plan(&self, plan: NodePlan) -> Result<Arc<Planned>, NodeError> {
        let datapath = NodeDatapath::new(plan.clone(), self.local.clone());
        datapath.ensure_cnf().await.map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot set up the CNF netns for the plan",
                e.to_string(),
            )
        })?;
        let ipam_dir = self.local.data_dir.join("ipam");
        let ipam = NodeIpam::open(&ipam_dir, plan.clone()).map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot open the IPAM store",
                e.to_string(),
            )
        })?;
        let planned = Arc::new(Planned { ipam, datapath });
        *self.planned.write().expect("plan lock") = Some(planned.clone());
        tracing::info!(node_subnet = %plan.node_subnet, fleet_cidr = %plan.fleet_cidr, vip_range = %plan.vip_range, "node plan in effect");
        Ok(planned)
    }

    /// `set_plan`: the controller hands the node its plan. Idempotent; any change is refused
    /// while pods hold addresses (drain the node first).
    pub async fn set_plan(&self, req: SetPlanRequest) -> Result<PlanChange, NodeError> {
        let parse = |what: &str, v: &str| {
            v.parse().map_err(|e| {
                NodeError::new(
                    code::INVALID_CONFIG,
                    format!("{what} is not an IPv4 CIDR"),
                    format!("{v:?}: {e}"),
                )
            })
        };
        let plan = NodePlan::new(
            parse("fleet_cidr", &req.fleet_cidr)?,
            parse("vip_range", &req.vip_range)?,
            parse("node_subnet", &req.node_subnet)?,
        )
        .map_err(|e| NodeError::new(code::INVALID_CONFIG, "invalid plan", e.to_string()))?;
        let _control = self.control.lock().await;
        let _gate = self.plan_gate.write().await;
        let current = self.planned_now();
        let allocated = current.as_ref().map_or(0, |p| p.ipam.allocated());
        let change = check_plan_change(
            current.as_ref().map(|p| p.datapath.plan()),
            &plan,
            allocated,
        )
        .map_err(|e| NodeError::new(code::PLAN_CONFLICT, "plan change refused", e.to_string()))?;
        if change == PlanChange::Unchanged {
            return Ok(change);
        }
        let planned = self.install_plan(plan.clone()).await?;
        self.store.save_plan(&plan).map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot persist the plan; retry",
                e.to_string(),
            )
        })?;
        // The overlay's own VTEP MAC and the peers' validity follow the node subnet.
        let peers = self.peers.lock().expect("peers").clone();
        if !peers.is_empty()
            && let Err(e) = self.program_peers(&planned, &peers).await
        {
            tracing::error!(error = %e, "overlay not in line with the new plan; resend set_peers");
        }
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

    /// `set_peers`: the complete set of other nodes of the cluster; replaces the previous
    /// set. Persisted before it is programmed, so a failure or a crash is retried at start.
    pub async fn set_peers(&self, peers: Vec<PeerNode>) -> Result<(), NodeError> {
        let planned = self.planned()?;
        parse_peers(planned.datapath.plan(), &peers).map_err(|e| {
            NodeError::new(code::INVALID_CONFIG, "invalid peer list", e.to_string())
        })?;
        let _control = self.control.lock().await;
        self.store.save_peers(&peers).map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot persist the peers; retry",
                e.to_string(),
            )
        })?;
        *self.peers.lock().expect("peers") = peers.clone();
        self.program_peers(&planned, &peers).await
    }

    pub fn peers(&self) -> Vec<PeerNode> {
        self.peers.lock().expect("peers").clone()
    }

    async fn program_peers(&self, planned: &Planned, peers: &[PeerNode]) -> Result<(), NodeError> {
        let plan = planned.datapath.plan();
        let parsed = parse_peers(plan, peers).map_err(|e| {
            NodeError::new(code::INVALID_CONFIG, "invalid peer list", e.to_string())
        })?;
        let overlay = Overlay {
            cnf: planned.datapath.cnf_path(),
            underlay: self.underlay_netns.clone(),
            vni: self.local.overlay_vni,
            port: self.local.overlay_port,
            mtu: self.local.mtu,
            node_subnet: plan.node_subnet,
        };
        let changes = overlay.apply(&parsed).await.map_err(|e| {
            NodeError::new(
                code::OVERLAY_FAILED,
                "cannot program the intra-cluster overlay; the peers are recorded, resend to retry",
                e.to_string(),
            )
        })?;
        tracing::info!(
            peers = parsed.len(),
            changed = !changes.is_empty(),
            "overlay in line with the peers"
        );
        Ok(())
    }

    async fn lock_pod(&self, container_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.pod_locks.lock().expect("pod locks");
            // Drop idle entries so the map does not grow with every pod the node ever ran.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(container_id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn result_of(p: &Planned, att: &Attachment) -> AttachResult {
        AttachResult {
            interface: att.interface.clone(),
            mac: att.mac.clone(),
            address: att.address,
            prefix_len: att.prefix_len,
            gateway: p.datapath.plan().gateway(),
            routes: p.datapath.pod_routes(),
            mtu: p.datapath.mtu(),
        }
    }

    /// CNI ADD (and NRI repair): reserve, then build the link; on any failure release again.
    pub async fn attach(
        &self,
        req: AttachRequest,
        origin: Origin,
    ) -> Result<AttachResult, NodeError> {
        if req.key.container_id.is_empty() || req.netns.is_empty() {
            return Err(NodeError::new(
                code::INVALID_ENV,
                "attach needs a container id and a netns path",
                format!("{:?}", req.key),
            ));
        }
        let _gate = self.plan_gate.read().await;
        let p = self.planned()?;
        let _guard = self.lock_pod(&req.key.container_id).await;
        let netns_path = Path::new(&req.netns);
        if let Err(e) = netns::open(netns_path) {
            return Err(NodeError::new(
                code::CONTAINER_UNKNOWN,
                "the pod's network namespace does not exist",
                e.to_string(),
            ));
        }
        let template = Attachment {
            key: req.key.clone(),
            network: req.network.clone(),
            netns: req.netns.clone(),
            interface: POD_INTERFACE.into(),
            mac: String::new(),
            address: std::net::Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            host_veth: String::new(),
            pod: req.pod.clone(),
            origin,
            created_unix: now_unix(),
        };
        let (mut att, new) = p.ipam.reserve(template).map_err(|e| match e {
            IpamError::Exhausted { .. } => NodeError::new(
                code::POOL_EXHAUSTED,
                "no free fleet address on this node",
                e.to_string(),
            ),
            IpamError::Io { .. } => NodeError::new(
                code::IO_FAILURE,
                "cannot persist the address reservation",
                e.to_string(),
            ),
        })?;
        if !new && att.netns == req.netns && p.datapath.check(netns_path, &att).await.is_ok() {
            return Ok(Self::result_of(&p, &att));
        }
        match p.datapath.attach(netns_path, &att).await {
            Ok(link) => {
                let changed = att.mac != link.mac || att.netns != req.netns;
                att.mac = link.mac;
                att.netns = req.netns.clone();
                if changed && let Err(e) = p.ipam.update(&att) {
                    tracing::warn!(error = %e, address = %att.address, "cannot record the pod's link; the allocation stands");
                }
                tracing::info!(container = %att.key.container_id, pod = %att.pod.name, namespace = %att.pod.namespace, address = %att.address, ?origin, "pod attached");
                Ok(Self::result_of(&p, &att))
            }
            Err(e) => {
                if new && let Err(re) = p.ipam.release(&att.key, &att.network) {
                    tracing::error!(error = %re, address = %att.address, "cannot release after a failed attach");
                }
                let code = if e.is_netns_missing() {
                    code::CONTAINER_UNKNOWN
                } else {
                    code::ATTACH_FAILED
                };
                Err(NodeError::new(
                    code,
                    "cannot attach eth-fleet to the pod",
                    e.to_string(),
                ))
            }
        }
    }

    /// CNI DEL: idempotent. Releases the attachment of (key, network), and a repair-made one of
    /// the same sandbox (the runtime's DEL is the first time it names that pod to us).
    pub async fn detach(&self, req: DetachRequest) -> Result<(), NodeError> {
        // Without a plan nothing can be allocated: DEL has nothing to do.
        let Some(p) = self.planned_now() else {
            return Ok(());
        };
        let _guard = self.lock_pod(&req.key.container_id).await;
        let targets: Vec<Attachment> = p
            .ipam
            .find_by_container(&req.key.container_id)
            .into_iter()
            .filter(|a| {
                (a.key == req.key && a.network == req.network) || a.origin == Origin::NriRepair
            })
            .collect();
        for att in targets {
            Self::release(&p, &att).await?;
        }
        Ok(())
    }

    /// Releases the address, then deletes the pod's link in the background: the kernel's
    /// veth teardown waits an RCU grace period that CNI DEL need not wait for. The link is
    /// found by index first, so the background delete can never hit a newer link of a pod
    /// that re-used the address; a daemon killed before it runs leaves a veth that the next
    /// Synchronize deletes (no owner).
    async fn release(p: &Planned, att: &Attachment) -> Result<(), NodeError> {
        let index = p.datapath.host_veth_index(att).await.map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot look up the pod's eth-fleet link; retry",
                e.to_string(),
            )
        })?;
        p.ipam.release(&att.key, &att.network).map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot release the pod's fleet address; retry",
                e.to_string(),
            )
        })?;
        if let Some(index) = index {
            let datapath = p.datapath.clone();
            let name = att.host_veth.clone();
            tokio::spawn(async move {
                if let Err(e) = datapath.delete_link_index(index).await {
                    tracing::warn!(link = %name, error = %e, "cannot delete a released pod's veth; Synchronize will retry");
                }
            });
        }
        tracing::info!(container = %att.key.container_id, address = %att.address, "pod released");
        Ok(())
    }

    pub async fn check(&self, req: CheckRequest) -> Result<(), NodeError> {
        let p = self.planned()?;
        let Some(att) = p.ipam.find(&req.key, &req.network) else {
            return Err(NodeError::new(
                code::CHECK_FAILED,
                "this pod holds no fleet address",
                format!("{:?} on network {}", req.key, req.network),
            ));
        };
        if att.netns != req.netns {
            return Err(NodeError::new(
                code::CHECK_FAILED,
                "the pod's address was allocated for another netns",
                format!("allocated in {}, asked about {}", att.netns, req.netns),
            ));
        }
        p.datapath
            .check(Path::new(&req.netns), &att)
            .await
            .map_err(|e| {
                let code = if e.is_netns_missing() {
                    code::CONTAINER_UNKNOWN
                } else {
                    code::CHECK_FAILED
                };
                NodeError::new(code, "eth-fleet is not as allocated", e.to_string())
            })
    }

    /// CNI GC: releases this network's attachments that the runtime no longer lists.
    pub async fn gc(&self, req: GcRequest) -> Result<GcResult, NodeError> {
        let Some(p) = self.planned_now() else {
            return Ok(GcResult { released: vec![] });
        };
        let valid: HashSet<&AttachmentKey> = req.valid.iter().collect();
        let valid_ids: HashSet<&str> = req.valid.iter().map(|k| k.container_id.as_str()).collect();
        let mut released = Vec::new();
        for att in p.ipam.list() {
            let listed = match att.origin {
                Origin::Cni => att.network != req.network || valid.contains(&att.key),
                Origin::NriRepair => valid_ids.contains(att.key.container_id.as_str()),
            };
            if !listed {
                let _guard = self.lock_pod(&att.key.container_id).await;
                Self::release(&p, &att).await?;
                released.push(att.key.clone());
            }
        }
        Ok(GcResult { released })
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

    fn find_by_container(&self, id: &str) -> Vec<Attachment> {
        self.planned_now()
            .map(|p| p.ipam.find_by_container(id))
            .unwrap_or_default()
    }

    /// Brings the node in line with the runtime's pods: attaches pods that lack `eth-fleet`
    /// (they predate the daemon, or lost their link), releases attachments of pods that are
    /// gone, and deletes veth ends nobody owns.
    pub async fn reconcile(&self, pods: Vec<PodSandboxInfo>) {
        let Some(p) = self.planned_now() else {
            tracing::info!(
                pods = pods.len(),
                "no plan yet: pods are attached once the node has one and NRI synchronizes again"
            );
            return;
        };
        let live: HashSet<&str> = pods.iter().map(|p| p.id.as_str()).collect();
        let now = now_unix();
        for att in p.ipam.list() {
            let young = now.saturating_sub(att.created_unix) < STALE_GRACE.as_secs();
            if !live.contains(att.key.container_id.as_str()) && !young {
                let _guard = self.lock_pod(&att.key.container_id).await;
                match Self::release(&p, &att).await {
                    Ok(()) => {
                        tracing::info!(container = %att.key.container_id, address = %att.address, "released attachment of a pod that is gone")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot release stale attachment"),
                }
            }
        }
        for pod in &pods {
            let Some(netns) = pod.netns.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let existing = p.ipam.find_by_container(&pod.id);
            let req = match existing.first() {
                Some(att) => AttachRequest {
                    key: att.key.clone(),
                    network: att.network.clone(),
                    netns: netns.to_owned(),
                    pod: att.pod.clone(),
                },
                None => AttachRequest {
                    key: AttachmentKey {
                        container_id: pod.id.clone(),
                        ifname: REPAIR_IFNAME.into(),
                    },
                    network: self.network.clone(),
                    netns: netns.to_owned(),
                    pod: meta_of(pod),
                },
            };
            let origin = existing
                .first()
                .map(|a| a.origin)
                .unwrap_or(Origin::NriRepair);
            // attach() is a no-op for a pod whose link checks out.
            match self.attach(req, origin).await {
                Ok(r) => tracing::debug!(pod = %pod.name, address = %r.address, "pod in sync"),
                Err(e) => {
                    tracing::warn!(pod = %pod.name, namespace = %pod.namespace, error = %e, "cannot repair pod")
                }
            }
            self.record_meta(pod);
        }
        let owned: HashSet<String> = p.ipam.list().into_iter().map(|a| a.host_veth).collect();
        match p.datapath.host_veths().await {
            Ok(links) => {
                for name in links.into_iter().filter(|n| !owned.contains(n)) {
                    tracing::info!(link = %name, "deleting a veth no pod owns");
                    if let Err(e) = p.datapath.delete_host_veth(&name).await {
                        tracing::warn!(link = %name, error = %e, "cannot delete leaked veth");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list CNF veths"),
        }
    }

    /// Adds NRI's view of the pod (labels, annotations, names) to its attachment records.
    fn record_meta(&self, pod: &PodSandboxInfo) {
        let Some(p) = self.planned_now() else {
            return;
        };
        let meta = meta_of(pod);
        for mut att in p.ipam.find_by_container(&pod.id) {
            if att.pod != meta {
                att.pod = meta.clone();
                if let Err(e) = p.ipam.update(&att) {
                    tracing::warn!(error = %e, "cannot record pod metadata");
                }
            }
        }
    }
}

fn meta_of(pod: &PodSandboxInfo) -> PodMeta {
    PodMeta {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        labels: pod.labels.clone(),
        annotations: pod.annotations.clone(),
    }
}

/// NRI events, delivered by the transport. Long work is spawned so replies stay prompt.
pub struct NodeEvents(pub Arc<Node>);

#[async_trait::async_trait]
impl NriHandler for NodeEvents {
    async fn synchronize(&self, pods: Vec<PodSandboxInfo>, _containers: Vec<ContainerInfo>) {
        let node = self.0.clone();
        tracing::info!(pods = pods.len(), "NRI synchronize: reconciling pods");
        tokio::spawn(async move { node.reconcile(pods).await });
    }

    async fn pod_started(&self, pod: PodSandboxInfo) {
        self.0.record_meta(&pod);
    }

    async fn pod_stopped(&self, _pod: PodSandboxInfo) {}

    async fn pod_removed(&self, pod: PodSandboxInfo) {
        // Safety net for a runtime whose CNI DEL never reached us (e.g. daemon was down).
        let node = self.0.clone();
        tokio::spawn(async move {
            let Some(p) = node.planned_now() else {
                return;
            };
            let _guard = node.lock_pod(&pod.id).await;
            for att in p.ipam.find_by_container(&pod.id) {
                if let Err(e) = Node::release(&p, &att).await {
                    tracing::warn!(pod = %pod.name, error = %e, "cannot release removed pod");
                }
            }
        });
    }

    async fn create_container(
        &self,
        pod: PodSandboxInfo,
        _container: ContainerInfo,
    ) -> ContainerAdjust {
        let Some(att) = self.0.find_by_container(&pod.id).into_iter().next() else {
            return ContainerAdjust::default();
        };
        let ip = att.address.to_string();
        ContainerAdjust {
            env: vec![(ENV_FLEET_IP.into(), ip.clone())],
            annotations: BTreeMap::from([(ANNOTATION_FLEET_IP.into(), ip)]),
        }
    }
}

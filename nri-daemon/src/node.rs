//! The node: one place that attaches, checks and releases pods, whoever asks — `fleet-cni`
//! over the node API or NRI repairing a pod that predates the daemon.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_core::config::POD_INTERFACE;
use fleet_core::datapath::NodeDatapath;
use fleet_core::ipam::{IpamError, NodeIpam};
use fleet_core::netns;
use fleet_proto::node::{
    AttachRequest, AttachResult, Attachment, AttachmentKey, CheckRequest, DetachRequest, GcRequest,
    GcResult, NodeError, Origin, PodMeta, StatusResult, code,
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
    ipam: NodeIpam,
    datapath: NodeDatapath,
    /// Network name recorded for NRI repairs.
    network: String,
    nri: NriStatus,
    /// Serializes work on one pod sandbox (ADD vs DEL vs repair).
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Node {
    pub fn new(ipam: NodeIpam, datapath: NodeDatapath, network: String, nri: NriStatus) -> Self {
        Node {
            ipam,
            datapath,
            network,
            nri,
            pod_locks: Mutex::new(HashMap::new()),
        }
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

    fn result_of(&self, att: &Attachment) -> AttachResult {
        AttachResult {
            interface: att.interface.clone(),
            mac: att.mac.clone(),
            address: att.address,
            prefix_len: att.prefix_len,
            gateway: self.datapath.plan().gateway(),
            routes: self.datapath.pod_routes(),
            mtu: self.datapath.mtu(),
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
        let (mut att, new) = self.ipam.reserve(template).map_err(|e| match e {
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
        if !new && att.netns == req.netns && self.datapath.check(netns_path, &att).await.is_ok() {
            return Ok(self.result_of(&att));
        }
        match self.datapath.attach(netns_path, &att).await {
            Ok(link) => {
                let changed = att.mac != link.mac || att.netns != req.netns;
                att.mac = link.mac;
                att.netns = req.netns.clone();
                if changed && let Err(e) = self.ipam.update(&att) {
                    tracing::warn!(error = %e, address = %att.address, "cannot record the pod's link; the allocation stands");
                }
                tracing::info!(container = %att.key.container_id, pod = %att.pod.name, namespace = %att.pod.namespace, address = %att.address, ?origin, "pod attached");
                Ok(self.result_of(&att))
            }
            Err(e) => {
                if new && let Err(re) = self.ipam.release(&att.key, &att.network) {
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
        let _guard = self.lock_pod(&req.key.container_id).await;
        let targets: Vec<Attachment> = self
            .ipam
            .find_by_container(&req.key.container_id)
            .into_iter()
            .filter(|a| {
                (a.key == req.key && a.network == req.network) || a.origin == Origin::NriRepair
            })
            .collect();
        for att in targets {
            self.release(&att).await?;
        }
        Ok(())
    }

    /// Releases the address, then deletes the pod's link in the background: the kernel's
    /// veth teardown waits an RCU grace period that CNI DEL need not wait for. The link is
    /// found by index first, so the background delete can never hit a newer link of a pod
    /// that re-used the address; a daemon killed before it runs leaves a veth that the next
    /// Synchronize deletes (no owner).
    async fn release(&self, att: &Attachment) -> Result<(), NodeError> {
        let index = self.datapath.host_veth_index(att).await.map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot look up the pod's eth-fleet link; retry",
                e.to_string(),
            )
        })?;
        self.ipam.release(&att.key, &att.network).map_err(|e| {
            NodeError::new(
                code::IO_FAILURE,
                "cannot release the pod's fleet address; retry",
                e.to_string(),
            )
        })?;
        if let Some(index) = index {
            let datapath = self.datapath.clone();
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
        let Some(att) = self.ipam.find(&req.key, &req.network) else {
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
        self.datapath
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
        let valid: HashSet<&AttachmentKey> = req.valid.iter().collect();
        let valid_ids: HashSet<&str> = req.valid.iter().map(|k| k.container_id.as_str()).collect();
        let mut released = Vec::new();
        for att in self.ipam.list() {
            let listed = match att.origin {
                Origin::Cni => att.network != req.network || valid.contains(&att.key),
                Origin::NriRepair => valid_ids.contains(att.key.container_id.as_str()),
            };
            if !listed {
                let _guard = self.lock_pod(&att.key.container_id).await;
                self.release(&att).await?;
                released.push(att.key.clone());
            }
        }
        Ok(GcResult { released })
    }

    pub fn status(&self) -> StatusResult {
        let plan = self.datapath.plan();
        StatusResult {
            ready: true,
            node_subnet: plan.node_subnet.to_string(),
            fleet_cidr: plan.fleet_cidr.to_string(),
            vip_range: plan.vip_range.to_string(),
            allocated: self.ipam.allocated(),
            capacity: plan.pod_capacity(),
            nri_registered: self.nri.registered(),
            nri_registrations: self.nri.registrations(),
        }
    }

    pub fn list(&self) -> Vec<Attachment> {
        self.ipam.list()
    }

    /// Brings the node in line with the runtime's pods: attaches pods that lack `eth-fleet`
    /// (they predate the daemon, or lost their link), releases attachments of pods that are
    /// gone, and deletes veth ends nobody owns.
    pub async fn reconcile(&self, pods: Vec<PodSandboxInfo>) {
        let live: HashSet<&str> = pods.iter().map(|p| p.id.as_str()).collect();
        let now = now_unix();
        for att in self.ipam.list() {
            let young = now.saturating_sub(att.created_unix) < STALE_GRACE.as_secs();
            if !live.contains(att.key.container_id.as_str()) && !young {
                let _guard = self.lock_pod(&att.key.container_id).await;
                match self.release(&att).await {
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
            let existing = self.ipam.find_by_container(&pod.id);
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
        let owned: HashSet<String> = self.ipam.list().into_iter().map(|a| a.host_veth).collect();
        match self.datapath.host_veths().await {
            Ok(links) => {
                for name in links.into_iter().filter(|n| !owned.contains(n)) {
                    tracing::info!(link = %name, "deleting a veth no pod owns");
                    if let Err(e) = self.datapath.delete_host_veth(&name).await {
                        tracing::warn!(link = %name, error = %e, "cannot delete leaked veth");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list CNF veths"),
        }
    }

    /// Adds NRI's view of the pod (labels, annotations, names) to its attachment records.
    fn record_meta(&self, pod: &PodSandboxInfo) {
        let meta = meta_of(pod);
        for mut att in self.ipam.find_by_container(&pod.id) {
            if att.pod != meta {
                att.pod = meta.clone();
                if let Err(e) = self.ipam.update(&att) {
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
            let _guard = node.lock_pod(&pod.id).await;
            for att in node.ipam.find_by_container(&pod.id) {
                if let Err(e) = node.release(&att).await {
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
        let Some(att) = self.0.ipam.find_by_container(&pod.id).into_iter().next() else {
            return ContainerAdjust::default();
        };
        let ip = att.address.to_string();
        ContainerAdjust {
            env: vec![(ENV_FLEET_IP.into(), ip.clone())],
            annotations: BTreeMap::from([(ANNOTATION_FLEET_IP.into(), ip)]),
        }
    }
}

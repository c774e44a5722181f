//! NRI's side of the node: Synchronize reconciles the node with the runtime's pods (repairs
//! pods without `eth-fleet`, releases pods that are gone, deletes veths nobody owns); pod
//! events record metadata and release removed pods; CreateContainer injects the fleet IP.
//! Beside NRI, a periodic sweep reclaims allocations whose pod is gone when no event said so.
//!
//! **What "gone" means**: the pod's network namespace no longer exists. That alone decides,
//! never the runtime's list: a runtime that lost track of a sandbox (its shim stalled across a
//! restart) leaves it out of Synchronize while its netns and containers live on, and a sandbox
//! whose CNI chain is still running is not listed yet. The runtime removes a sandbox's netns
//! when it stops it, so an allocation whose DEL and RemovePodSandbox never reached us is
//! reclaimed within the config's `reclaim_interval_secs` (5 s by default). A netns the runtime leaked (never unmounted) keeps
//! its address until it is removed.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::node::{AttachRequest, AttachmentKey, NodeError, Origin, PodMeta};

use super::Node;
use crate::metrics::{EventLabels, ReasonLabels, ResultLabels, ok_or_error};
use crate::nri::handler::{ContainerAdjust, ContainerInfo, NriHandler, PodSandboxInfo};

/// Env var carrying the pod's fleet IP into every container (NRI CreateContainer).
pub const ENV_FLEET_IP: &str = "FLEETBOARD_IP";
/// Annotation carrying the pod's fleet IP on every container.
pub const ANNOTATION_FLEET_IP: &str = "fleetboard.io/ip";
/// CNI_IFNAME recorded for NRI repairs: what the runtime's later DEL of the chain will carry.
const REPAIR_IFNAME: &str = "eth0";
/// Whether the pod netns at `path` still exists: a mounted (or `/proc`) netns, not a leftover
/// file. When it cannot be told (a permission error, say) it counts as existing.
fn pod_netns_exists(path: &str) -> bool {
    use nix::errno::Errno;
    use nix::sys::statfs::{NSFS_MAGIC, statfs};
    if path.is_empty() {
        return false;
    }
    match statfs(Path::new(path)) {
        Ok(fs) => fs.filesystem_type() == NSFS_MAGIC,
        Err(Errno::ENOENT | Errno::ENOTDIR) => false,
        Err(_) => true,
    }
}

impl Node {
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
        // Pods whose netns is gone are released (listed or not); pods the runtime does not
        // list but whose netns exists are kept: the runtime may have lost track of a live
        // sandbox, or may not list one whose CNI chain is still running.
        self.reclaim_gone().await;
        let live: HashSet<&str> = pods.iter().map(|p| p.id.as_str()).collect();
        for att in p.ipam.list() {
            if !live.contains(att.key.container_id.as_str()) {
                tracing::warn!(container = %att.key.container_id, address = %att.address, netns = %att.netns, "the runtime does not list this sandbox but its netns exists; keeping its address and link");
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
                    primary: vec![],
                },
                None => AttachRequest {
                    key: AttachmentKey {
                        container_id: pod.id.clone(),
                        ifname: REPAIR_IFNAME.into(),
                    },
                    network: self.network.clone(),
                    netns: netns.to_owned(),
                    pod: meta_of(pod),
                    primary: vec![],
                },
            };
            let origin = existing
                .first()
                .map(|a| a.origin)
                .unwrap_or(Origin::NriRepair);
            let repairing = existing.is_empty();
            // attach() is a no-op for a pod whose link checks out.
            let attached = self.attach(req, origin).await;
            if repairing {
                self.metrics
                    .repairs
                    .get_or_create(&ResultLabels {
                        result: ok_or_error(attached.is_ok()),
                    })
                    .inc();
            }
            match attached {
                Ok(r) => tracing::debug!(pod = %pod.name, address = %r.address, "pod in sync"),
                Err(e) => {
                    tracing::warn!(pod = %pod.name, namespace = %pod.namespace, error = %NodeError::from(e), "cannot repair pod")
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

    /// Releases every allocation whose pod netns is gone; returns how many. Re-checked under
    /// the pod's lock, so an ADD that re-attached the sandbox meanwhile is never undone.
    pub async fn reclaim_gone(&self) -> usize {
        let Some(p) = self.planned_now() else {
            return 0;
        };
        let mut released = 0;
        for att in p.ipam.list() {
            if pod_netns_exists(&att.netns) {
                continue;
            }
            let _guard = self.lock_pod(&att.key.container_id).await;
            let Some(current) = p.ipam.find(&att.key, &att.network) else {
                continue;
            };
            if pod_netns_exists(&current.netns) {
                continue;
            }
            match Self::release(&p, &current).await {
                Ok(()) => {
                    released += 1;
                    self.metrics
                        .reclaims
                        .get_or_create(&ReasonLabels {
                            reason: "netns_gone",
                        })
                        .inc();
                    tracing::info!(container = %current.key.container_id, address = %current.address, netns = %current.netns, "released the attachment of a pod whose netns is gone")
                }
                Err(e) => {
                    tracing::warn!(error = %NodeError::from(e), "cannot release the attachment of a gone pod")
                }
            }
        }
        released
    }

    /// Runs [`Node::reclaim_gone`] every `every` until `shutdown`.
    pub async fn reclaim_periodically(
        self: Arc<Self>,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {
                    self.reclaim_gone().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Adds NRI's view of the pod (labels, annotations, names) to its attachment records.
    fn record_meta(&self, pod: &PodSandboxInfo) {
        let Some(p) = self.planned_now() else {
            return;
        };
        let meta = meta_of(pod);
        // Without the pod lock: `modify` checks under the store's lock that the attachment
        // still holds its address, so a DEL racing this never sees its address come back.
        for att in p.ipam.find_by_container(&pod.id) {
            if att.pod != meta
                && let Err(e) = p
                    .ipam
                    .modify(&att.key, &att.network, |r| r.pod = meta.clone())
            {
                tracing::warn!(error = %e, "cannot record pod metadata");
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

impl NodeEvents {
    fn event(&self, event: &'static str) {
        self.0
            .metrics
            .nri_events
            .get_or_create(&EventLabels { event })
            .inc();
    }
}

#[async_trait::async_trait]
impl NriHandler for NodeEvents {
    async fn synchronize(&self, pods: Vec<PodSandboxInfo>, _containers: Vec<ContainerInfo>) {
        self.event("synchronize");
        let node = self.0.clone();
        tracing::info!(pods = pods.len(), "NRI synchronize: reconciling pods");
        tokio::spawn(async move { node.reconcile(pods).await });
    }

    async fn pod_started(&self, pod: PodSandboxInfo) {
        self.event("pod_started");
        self.0.record_meta(&pod);
    }

    async fn pod_stopped(&self, _pod: PodSandboxInfo) {
        self.event("pod_stopped");
    }

    async fn pod_removed(&self, pod: PodSandboxInfo) {
        self.event("pod_removed");
        // Safety net for a runtime whose CNI DEL never reached us (e.g. daemon was down).
        let node = self.0.clone();
        tokio::spawn(async move {
            let Some(p) = node.planned_now() else {
                return;
            };
            let _guard = node.lock_pod(&pod.id).await;
            for att in p.ipam.find_by_container(&pod.id) {
                match Node::release(&p, &att).await {
                    Ok(()) => {
                        node.metrics
                            .reclaims
                            .get_or_create(&ReasonLabels {
                                reason: "pod_removed",
                            })
                            .inc();
                    }
                    Err(e) => {
                        tracing::warn!(pod = %pod.name, error = %NodeError::from(e), "cannot release removed pod")
                    }
                }
            }
        });
    }

    async fn create_container(
        &self,
        pod: PodSandboxInfo,
        _container: ContainerInfo,
    ) -> ContainerAdjust {
        self.event("create_container");
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

//! Pods: CNI ADD (and NRI repair), DEL, CHECK and GC. One lock per pod sandbox; an address
//! is reserved before its link is built and released again if the link fails.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use fleet_core::config::POD_INTERFACE;
use fleet_core::netns;
use fleet_proto::node::{
    AttachRequest, AttachResult, Attachment, AttachmentKey, CheckRequest, DetachRequest, GcRequest,
    GcResult, Origin,
};

use super::plan::{networks_in, primary_of};
use super::{Failure, Node, Planned, now_unix};

impl Node {
    pub(super) async fn lock_pod(&self, container_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
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
    ) -> Result<AttachResult, Failure> {
        if req.key.container_id.is_empty() || req.netns.is_empty() {
            return Err(Failure::AttachArgs(format!("{:?}", req.key)));
        }
        let _gate = self.plan_gate.read().await;
        let p = self.planned()?;
        let _guard = self.lock_pod(&req.key.container_id).await;
        let netns_path = Path::new(&req.netns);
        if let Err(e) = netns::open(netns_path) {
            return Err(Failure::PodNetnsMissing(e.to_string()));
        }
        // Before anything is reserved: a pod whose primary network overlaps the fleet's ranges
        // is refused with nothing left behind.
        let used = if req.primary.is_empty() {
            networks_in(netns_path, Some(POD_INTERFACE), "the pod's")
                .await
                .map_err(Failure::PrimaryUnreadable)?
        } else {
            primary_of(&req.primary)?
        };
        p.datapath
            .plan()
            .check_disjoint(&used)
            .map_err(Failure::PrimaryOverlap)?;
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
        let (mut att, new) = p.ipam.reserve(template).map_err(Failure::Reserve)?;
        if !new && att.netns == req.netns && p.datapath.check(netns_path, &att).await.is_ok() {
            return Ok(Self::result_of(&p, &att));
        }
        match p.datapath.attach(netns_path, &att).await {
            Ok(link) => {
                att.mac = link.mac;
                att.netns = req.netns.clone();
                let recorded = p.ipam.modify(&att.key, &att.network, |r| {
                    r.mac = att.mac.clone();
                    r.netns = att.netns.clone();
                });
                if let Err(e) = recorded {
                    tracing::warn!(error = %e, address = %att.address, "cannot record the pod's link; the allocation stands");
                }
                tracing::info!(container = %att.key.container_id, pod = %att.pod.name, namespace = %att.pod.namespace, address = %att.address, ?origin, "pod attached");
                Ok(Self::result_of(&p, &att))
            }
            Err(e) => {
                if new && let Err(re) = p.ipam.release(&att.key, &att.network) {
                    tracing::error!(error = %re, address = %att.address, "cannot release after a failed attach");
                }
                Err(Failure::Attach(e))
            }
        }
    }

    /// CNI DEL: idempotent. Releases the attachment of (key, network), and a repair-made one of
    /// the same sandbox (the runtime's DEL is the first time it names that pod to us).
    pub async fn detach(&self, req: DetachRequest) -> Result<(), Failure> {
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
    pub(super) async fn release(p: &Planned, att: &Attachment) -> Result<(), Failure> {
        let index = p
            .datapath
            .host_veth_index(att)
            .await
            .map_err(Failure::LinkLookup)?;
        p.ipam
            .release(&att.key, &att.network)
            .map_err(Failure::Release)?;
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

    pub async fn check(&self, req: CheckRequest) -> Result<(), Failure> {
        let p = self.planned()?;
        let Some(att) = p.ipam.find(&req.key, &req.network) else {
            return Err(Failure::NoAttachment(format!(
                "{:?} on network {}",
                req.key, req.network
            )));
        };
        if att.netns != req.netns {
            return Err(Failure::OtherNetns(format!(
                "allocated in {}, asked about {}",
                att.netns, req.netns
            )));
        }
        p.datapath
            .check(Path::new(&req.netns), &att)
            .await
            .map_err(Failure::Check)
    }

    /// CNI GC: releases this network's attachments that the runtime no longer lists.
    pub async fn gc(&self, req: GcRequest) -> Result<GcResult, Failure> {
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

    pub(super) fn find_by_container(&self, id: &str) -> Vec<Attachment> {
        self.planned_now()
            .map(|p| p.ipam.find_by_container(id))
            .unwrap_or_default()
    }
}

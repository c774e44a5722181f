//! One pass of the active controller over its nodes: read what each node has, decide subnets
//! and peers ([`crate::plan`]), hand them out (`set_plan`, `set_peers`) and publish the
//! `node/<name>` records. Failures are collected, never fatal: the next pass retries.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use fleet_hub_api::model::ClusterId;
use fleet_proto::node::SetPlanRequest;
use ipnetwork::Ipv4Network;

use crate::hub::{FleetSnapshot, Hub, is_removed};
use crate::nodes::NodeApi;
use crate::plan::{NodeSpec, SubnetHints, allocate_subnets, node_peers};
use fleet_hub_api::records::{NODE_RECORD_PREFIX, NodeRecord, node_record_name};

/// A node and the handle to its API.
#[derive(Clone)]
pub struct ClusterNode {
    pub spec: NodeSpec,
    pub api: Arc<dyn NodeApi>,
}

/// What is fixed for a controller's life.
#[derive(Debug, Clone)]
pub struct NodePlanConfig {
    pub cluster: ClusterId,
    pub gateway_node: String,
    pub node_prefix: u8,
    pub vip_range: Ipv4Network,
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Each node's subnet (those that have one).
    pub subnets: BTreeMap<String, Ipv4Network>,
    /// The gateway node's CNF netns, if the gateway node answered and has its plan.
    pub gateway_cnf_netns: Option<PathBuf>,
    /// Everything that failed, one line each; empty when the pass converged.
    pub problems: Vec<String>,
    /// The hub said this cluster's credential is no longer valid.
    pub removed: bool,
}

/// Runs one pass.
pub async fn reconcile_nodes(
    cfg: &NodePlanConfig,
    snapshot: &FleetSnapshot,
    nodes: &[ClusterNode],
    hub: &dyn Hub,
) -> PassReport {
    let mut report = PassReport::default();
    let Some(own) = snapshot.fleet.clusters.get(&cfg.cluster) else {
        report.problems.push(format!(
            "cluster {} is not in the fleet listing",
            cfg.cluster
        ));
        return report;
    };
    let block = own.block;

    // What each node has now.
    let mut reachable: BTreeMap<String, (Option<SetPlanRequest>, String)> = BTreeMap::new();
    for n in nodes {
        let answer = async {
            let status = n.api.status().await?;
            let plan = n.api.get_plan().await?;
            Ok::<_, fleet_proto::node::NodeError>((plan, status.cnf_netns))
        }
        .await;
        match answer {
            Ok(a) => {
                reachable.insert(n.spec.name.clone(), a);
            }
            Err(e) => report
                .problems
                .push(format!("node {}: cannot read its state: {e}", n.spec.name)),
        }
    }
    let hints: BTreeMap<String, SubnetHints> = nodes
        .iter()
        .map(|n| {
            let current = reachable
                .get(&n.spec.name)
                .and_then(|(p, _)| p.as_ref())
                .and_then(|p| p.node_subnet.parse().ok());
            let recorded = snapshot
                .own_records
                .get(&node_record_name(&n.spec.name))
                .and_then(|v| serde_json::from_slice::<NodeRecord>(v).ok())
                .map(|r| r.subnet);
            (n.spec.name.clone(), SubnetHints { current, recorded })
        })
        .collect();
    let allocation = match allocate_subnets(block, cfg.node_prefix, &hints) {
        Ok(a) => a,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    for (name, result) in allocation {
        match result {
            Ok(s) => {
                report.subnets.insert(name, s);
            }
            Err(e) => {
                tracing::error!(node = %name, error = %e, "node gets no subnet");
                report.problems.push(e.to_string());
            }
        }
    }

    // Plans.
    let mut planned: BTreeMap<String, Ipv4Network> = BTreeMap::new();
    for n in nodes {
        let (Some(subnet), Some((current, cnf_netns))) = (
            report.subnets.get(&n.spec.name),
            reachable.get(&n.spec.name),
        ) else {
            continue;
        };
        let want = SetPlanRequest {
            fleet_cidr: snapshot.fleet.fleet_cidr.to_string(),
            vip_range: cfg.vip_range.to_string(),
            node_subnet: subnet.to_string(),
        };
        let applied = if current.as_ref() == Some(&want) {
            true
        } else {
            match n.api.set_plan(want).await {
                Ok(change) => {
                    tracing::info!(node = %n.spec.name, %subnet, ?change, "node plan handed over");
                    true
                }
                Err(e) => {
                    report.problems.push(format!(
                        "node {}: set_plan {subnet} refused: {e}",
                        n.spec.name
                    ));
                    false
                }
            }
        };
        if applied {
            planned.insert(n.spec.name.clone(), *subnet);
            if n.spec.name == cfg.gateway_node {
                if cnf_netns.is_empty() {
                    report.problems.push(format!(
                        "gateway node {}: its fleet-nri does not report its CNF netns (cnf_netns); \
                         upgrade fleet-nri",
                        n.spec.name
                    ));
                } else {
                    report.gateway_cnf_netns = Some(PathBuf::from(cnf_netns));
                }
            }
        }
    }

    // Peers: every node with a subnet, the gateway's entry routing the other blocks.
    let specs: Vec<NodeSpec> = nodes.iter().map(|n| n.spec.clone()).collect();
    let routed = snapshot.fleet.other_blocks(&cfg.cluster);
    let peers = node_peers(&specs, &report.subnets, &cfg.gateway_node, &routed);
    for n in nodes {
        let Some(p) = peers.get(&n.spec.name) else {
            continue;
        };
        if !planned.contains_key(&n.spec.name) {
            continue;
        }
        // The node persists every set_peers; send only a change.
        if let Ok(mut have) = n.api.list_peers().await {
            have.sort();
            if &have == p {
                continue;
            }
        }
        if let Err(e) = n.api.set_peers(p.clone()).await {
            report
                .problems
                .push(format!("node {}: set_peers failed: {e}", n.spec.name));
        }
    }

    // Records: one per node with a subnet; records of nodes no longer listed go.
    for n in nodes {
        let Some(subnet) = report.subnets.get(&n.spec.name) else {
            continue;
        };
        let want = NodeRecord {
            subnet: *subnet,
            underlay_ip: n.spec.underlay_ip,
        };
        let name = node_record_name(&n.spec.name);
        let have = snapshot
            .own_records
            .get(&name)
            .and_then(|v| serde_json::from_slice::<NodeRecord>(v).ok());
        if have.as_ref() == Some(&want) {
            continue;
        }
        let value = serde_json::to_vec(&want).expect("records serialise");
        if let Err(e) = hub.publish(&name, &value).await {
            report.removed |= is_removed(&e);
            report.problems.push(format!("publishing {name}: {e}"));
        }
    }
    for name in snapshot.own_records.keys() {
        let Some(node) = name.strip_prefix(NODE_RECORD_PREFIX) else {
            continue;
        };
        if nodes.iter().any(|n| n.spec.name == node) {
            continue;
        }
        match hub.unpublish(name).await {
            Ok(()) => tracing::info!(record = %name, "node no longer listed; record withdrawn"),
            Err(e) => {
                report.removed |= is_removed(&e);
                report.problems.push(format!("withdrawing {name}: {e}"));
            }
        }
    }
    report
}

#[cfg(test)]
pub(crate) mod fakes {
    //! Fakes of the hub and of a node's `fleet-nri`, recording what they were asked.

    use std::sync::Mutex;
    use std::time::Duration;

    use fleet_hub_api::client::HubError;
    use fleet_hub_api::model::GatewayState;
    use fleet_proto::node::{
        ClearGatewayResult, GatewayDevice, GatewayKey, GatewayPeerStatus, GatewayStatus, NodeError,
        PeerNode, PlanChange, SetGatewayRequest, SetGatewayResult, SetPlanRequest, StatusResult,
        WireguardBackend, code,
    };
    use fleet_proto::wireguard::PublicKey;

    use crate::hub::{Hub, LeaseAnswer};
    use crate::nodes::NodeApi;

    #[derive(Default)]
    pub struct FakeHub {
        pub published: Mutex<Vec<(String, Vec<u8>)>>,
        pub unpublished: Mutex<Vec<String>>,
        pub holder: Mutex<Option<String>>,
        pub down: Mutex<bool>,
        /// What a re-join answers; `None`: the hub does not know the cluster.
        pub record: Mutex<Option<fleet_hub_api::model::ClusterRecord>>,
    }

    impl FakeHub {
        fn check(&self) -> Result<(), HubError> {
            if *self.down.lock().unwrap() {
                return Err(HubError::Unreachable {
                    endpoints: "fake".into(),
                    errors: "down".into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl Hub for FakeHub {
        async fn rejoin(
            &self,
            public_key: fleet_hub_api::model::PublicKey,
            endpoint: Option<std::net::SocketAddr>,
        ) -> Result<fleet_hub_api::model::ClusterRecord, HubError> {
            self.check()?;
            let mut record = self.record.lock().unwrap();
            let Some(r) = record.as_mut() else {
                return Err(HubError::Api {
                    call: "rejoin",
                    code: fleet_hub_api::wire::ErrorCode::NotJoined,
                    message: "not joined".into(),
                });
            };
            r.public_key = public_key;
            r.endpoint = endpoint;
            Ok(r.clone())
        }
        async fn acquire_lease(
            &self,
            holder: &str,
            _ttl: Duration,
        ) -> Result<LeaseAnswer, HubError> {
            self.check()?;
            let mut h = self.holder.lock().unwrap();
            let current = h.get_or_insert_with(|| holder.to_string()).clone();
            Ok(LeaseAnswer {
                granted: current == holder,
                holder: current,
            })
        }
        async fn release_lease(&self, holder: &str) -> Result<(), HubError> {
            self.check()?;
            let mut h = self.holder.lock().unwrap();
            if h.as_deref() == Some(holder) {
                *h = None;
            }
            Ok(())
        }
        async fn publish(&self, name: &str, value: &[u8]) -> Result<(), HubError> {
            self.check()?;
            self.published
                .lock()
                .unwrap()
                .push((name.into(), value.to_vec()));
            Ok(())
        }
        async fn unpublish(&self, name: &str) -> Result<(), HubError> {
            self.check()?;
            self.unpublished.lock().unwrap().push(name.into());
            Ok(())
        }
        async fn set_gateway_state(&self, _state: GatewayState) -> Result<(), HubError> {
            self.check()
        }
    }

    /// A node daemon: keeps a plan and peers, refuses a plan change while `live_pods`.
    #[derive(Default)]
    pub struct FakeNode {
        pub plan: Mutex<Option<SetPlanRequest>>,
        pub peers: Mutex<Vec<PeerNode>>,
        pub live_pods: bool,
        pub unreachable: bool,
        pub set_plan_calls: Mutex<usize>,
        pub set_peers_calls: Mutex<usize>,
        /// The gateway state last set (`set_gateway`), until cleared.
        pub gateway: Mutex<Option<SetGatewayRequest>>,
        pub clear_gateway_calls: Mutex<usize>,
        /// What `list_attachments` answers.
        pub pods: Mutex<Vec<fleet_proto::node::Attachment>>,
        /// The VIP table last set.
        pub services: Mutex<Option<fleet_proto::node::SetServicesRequest>>,
    }

    impl FakeNode {
        pub fn with_plan(subnet: &str) -> Self {
            FakeNode {
                plan: Mutex::new(Some(SetPlanRequest {
                    fleet_cidr: "100.96.0.0/12".into(),
                    vip_range: "100.112.0.0/16".into(),
                    node_subnet: subnet.into(),
                })),
                ..Default::default()
            }
        }

        fn check(&self) -> Result<(), NodeError> {
            if self.unreachable {
                return Err(NodeError::new(code::TRY_AGAIN_LATER, "fake node down", ""));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl NodeApi for FakeNode {
        async fn status(&self) -> Result<StatusResult, NodeError> {
            self.check()?;
            let plan = self.plan.lock().unwrap().clone();
            Ok(StatusResult {
                ready: plan.is_some(),
                node_subnet: plan.map(|p| p.node_subnet).unwrap_or_default(),
                fleet_cidr: String::new(),
                vip_range: String::new(),
                allocated: 0,
                capacity: 0,
                nri_registered: false,
                nri_registrations: 0,
                cnf_netns: "/run/netns/fake-cnf".into(),
            })
        }
        async fn get_plan(&self) -> Result<Option<SetPlanRequest>, NodeError> {
            self.check()?;
            Ok(self.plan.lock().unwrap().clone())
        }
        async fn set_plan(&self, plan: SetPlanRequest) -> Result<PlanChange, NodeError> {
            self.check()?;
            *self.set_plan_calls.lock().unwrap() += 1;
            let mut p = self.plan.lock().unwrap();
            if p.as_ref() == Some(&plan) {
                return Ok(PlanChange::Unchanged);
            }
            if self.live_pods && p.is_some() {
                return Err(NodeError::new(code::PLAN_CONFLICT, "live pods", ""));
            }
            *p = Some(plan);
            Ok(PlanChange::Applied)
        }
        async fn set_peers(&self, peers: Vec<PeerNode>) -> Result<(), NodeError> {
            self.check()?;
            *self.set_peers_calls.lock().unwrap() += 1;
            *self.peers.lock().unwrap() = peers;
            Ok(())
        }
        async fn list_peers(&self) -> Result<Vec<PeerNode>, NodeError> {
            self.check()?;
            Ok(self.peers.lock().unwrap().clone())
        }
        async fn set_gateway(&self, req: SetGatewayRequest) -> Result<SetGatewayResult, NodeError> {
            self.check()?;
            let mut g = self.gateway.lock().unwrap();
            let created = g.is_none();
            let peers_changed = g.as_ref().map(|o| &o.peers) != Some(&req.peers);
            let device = Self::device(&req);
            *g = Some(req);
            Ok(SetGatewayResult {
                device,
                created,
                peers_changed,
            })
        }
        async fn gateway_status(&self) -> Result<Option<GatewayStatus>, NodeError> {
            self.check()?;
            Ok(self
                .gateway
                .lock()
                .unwrap()
                .as_ref()
                .map(|req| GatewayStatus {
                    device: Self::device(req),
                    cnf_netns: "/run/netns/fake-cnf".into(),
                    own_block: req.own_block.clone(),
                    peers: req
                        .peers
                        .iter()
                        .map(|p| GatewayPeerStatus {
                            public_key: p.public_key,
                            endpoint: p.endpoint,
                            allowed_ips: p.allowed_ips.clone(),
                            last_handshake: None,
                            rx_bytes: 0,
                            tx_bytes: 0,
                            path: None,
                            path_since: None,
                        })
                        .collect(),
                }))
        }
        async fn gateway_key(&self) -> Result<GatewayKey, NodeError> {
            self.check()?;
            Ok(GatewayKey {
                public_key: FAKE_GATEWAY_KEY,
            })
        }
        async fn clear_gateway(&self) -> Result<ClearGatewayResult, NodeError> {
            self.check()?;
            *self.clear_gateway_calls.lock().unwrap() += 1;
            Ok(ClearGatewayResult {
                removed: self.gateway.lock().unwrap().take().is_some(),
            })
        }
        async fn list_attachments(&self) -> Result<Vec<fleet_proto::node::Attachment>, NodeError> {
            self.check()?;
            Ok(self.pods.lock().unwrap().clone())
        }
        async fn set_services(
            &self,
            req: fleet_proto::node::SetServicesRequest,
        ) -> Result<fleet_proto::node::SetServicesResult, NodeError> {
            self.check()?;
            let mut s = self.services.lock().unwrap();
            let changed = s.as_ref() != Some(&req);
            *s = Some(req);
            Ok(fleet_proto::node::SetServicesResult { changed })
        }
    }

    /// The public key every fake gateway node reports.
    pub const FAKE_GATEWAY_KEY: PublicKey = PublicKey::from_bytes([42; 32]);

    impl FakeNode {
        fn device(req: &SetGatewayRequest) -> GatewayDevice {
            GatewayDevice {
                name: req.name.clone(),
                backend: WireguardBackend::Userspace,
                public_key: FAKE_GATEWAY_KEY,
                listen_port: req.listen_port,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::fakes::{FakeHub, FakeNode};
    use super::*;
    use crate::plan::{ClusterInfo, FleetState};

    fn spec(name: &str, ip: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            socket: format!("/run/{name}.sock").into(),
            underlay_ip: ip.parse().unwrap(),
            netns: format!("/run/netns/{name}").into(),
        }
    }

    fn snapshot(records: &[(&str, &str)]) -> FleetSnapshot {
        let cluster = |id: &str, block: &str, k: u8| ClusterInfo {
            id: ClusterId::new(id).unwrap(),
            block: block.parse().unwrap(),
            public_key: fleet_proto::wireguard::PublicKey::from_bytes([k; 32]),
            endpoint: None,
        };
        FleetSnapshot {
            fleet: FleetState {
                fleet_cidr: "100.96.0.0/12".parse().unwrap(),
                clusters: [
                    cluster("aa", "100.96.16.0/20", 1),
                    cluster("bb", "100.96.32.0/20", 2),
                ]
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect(),
                relays: BTreeMap::new(),
            },
            own_records: records
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            revision: 1,
        }
    }

    fn cfg() -> NodePlanConfig {
        NodePlanConfig {
            cluster: ClusterId::new("aa").unwrap(),
            gateway_node: "g".into(),
            node_prefix: 24,
            vip_range: "100.112.0.0/16".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn a_pass_hands_out_sticky_plans_peers_with_routes_and_records() {
        let g = Arc::new(FakeNode::default());
        // w already has a subnet (kept); x has a record (kept).
        let w = Arc::new(FakeNode::with_plan("100.96.20.0/24"));
        let x = Arc::new(FakeNode::default());
        let nodes = vec![
            ClusterNode {
                spec: spec("g", "192.0.2.1"),
                api: g.clone(),
            },
            ClusterNode {
                spec: spec("w", "192.0.2.2"),
                api: w.clone(),
            },
            ClusterNode {
                spec: spec("x", "192.0.2.3"),
                api: x.clone(),
            },
        ];
        let hub = FakeHub::default();
        let snap = snapshot(&[
            (
                "node/x",
                r#"{"subnet":"100.96.16.0/24","underlay_ip":"192.0.2.3"}"#,
            ),
            (
                "node/gone",
                r#"{"subnet":"100.96.30.0/24","underlay_ip":"192.0.2.9"}"#,
            ),
        ]);
        let r = reconcile_nodes(&cfg(), &snap, &nodes, &hub).await;
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.subnets["w"].to_string(), "100.96.20.0/24");
        assert_eq!(r.subnets["x"].to_string(), "100.96.16.0/24");
        assert_eq!(r.subnets["g"].to_string(), "100.96.17.0/24");
        assert_eq!(
            r.gateway_cnf_netns,
            Some(PathBuf::from("/run/netns/fake-cnf"))
        );
        assert_eq!(
            g.plan.lock().unwrap().as_ref().unwrap().node_subnet,
            "100.96.17.0/24"
        );
        // w peers with g (routing bb's block) and x.
        let wp = w.peers.lock().unwrap().clone();
        assert_eq!(wp.len(), 2);
        let gw = wp.iter().find(|p| p.name == "g").unwrap();
        assert_eq!(gw.routed_cidrs, vec!["100.96.32.0/20"]);
        assert!(
            wp.iter()
                .find(|p| p.name == "x")
                .unwrap()
                .routed_cidrs
                .is_empty()
        );
        // g's own list carries no routed CIDRs (the WireGuard device routes them there).
        assert!(
            g.peers
                .lock()
                .unwrap()
                .iter()
                .all(|p| p.routed_cidrs.is_empty())
        );
        // Records: g and w published (x's is already right), the stale one withdrawn.
        let published: Vec<String> = hub
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(published, vec!["node/g", "node/w"]);
        assert_eq!(*hub.unpublished.lock().unwrap(), vec!["node/gone"]);

        // A second pass with the records in place changes nothing and repeats no plan.
        let mut snap = snap;
        for (n, v) in hub.published.lock().unwrap().iter() {
            snap.own_records.insert(n.clone(), v.clone());
        }
        snap.own_records.remove("node/gone");
        let calls = *g.set_plan_calls.lock().unwrap();
        let peer_calls = *w.set_peers_calls.lock().unwrap();
        let r2 = reconcile_nodes(&cfg(), &snap, &nodes, &hub).await;
        assert!(r2.problems.is_empty(), "{:?}", r2.problems);
        assert_eq!(r2.subnets, r.subnets);
        assert_eq!(*g.set_plan_calls.lock().unwrap(), calls);
        assert_eq!(*w.set_peers_calls.lock().unwrap(), peer_calls);
        // A node whose peers were lost (e.g. its state wiped) gets them again.
        w.peers.lock().unwrap().clear();
        reconcile_nodes(&cfg(), &snap, &nodes, &hub).await;
        assert_eq!(w.peers.lock().unwrap().len(), 2);
        assert_eq!(hub.published.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_node_keeps_its_recorded_subnet_and_others_proceed() {
        let g = Arc::new(FakeNode::default());
        let down = Arc::new(FakeNode {
            unreachable: true,
            ..Default::default()
        });
        let nodes = vec![
            ClusterNode {
                spec: spec("g", "192.0.2.1"),
                api: g.clone(),
            },
            ClusterNode {
                spec: spec("down", "192.0.2.2"),
                api: down,
            },
        ];
        let hub = FakeHub::default();
        let snap = snapshot(&[(
            "node/down",
            r#"{"subnet":"100.96.16.0/24","underlay_ip":"192.0.2.2"}"#,
        )]);
        let r = reconcile_nodes(&cfg(), &snap, &nodes, &hub).await;
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("down"), "{:?}", r.problems);
        assert_eq!(r.subnets["down"].to_string(), "100.96.16.0/24");
        assert_eq!(r.subnets["g"].to_string(), "100.96.17.0/24");
        // g still peers with the unreachable node (its subnet is its own).
        assert_eq!(g.peers.lock().unwrap()[0].name, "down");
    }

    #[tokio::test]
    async fn a_refused_plan_is_reported_and_the_node_gets_no_peers() {
        // The node's current plan is from another fleet block, and it has live pods.
        let g = Arc::new(FakeNode {
            live_pods: true,
            ..FakeNode::with_plan("100.96.200.0/24")
        });
        let nodes = vec![ClusterNode {
            spec: spec("g", "192.0.2.1"),
            api: g.clone(),
        }];
        let hub = FakeHub::default();
        let r = reconcile_nodes(&cfg(), &snapshot(&[]), &nodes, &hub).await;
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("set_plan"), "{:?}", r.problems);
        assert_eq!(
            g.plan.lock().unwrap().as_ref().unwrap().node_subnet,
            "100.96.200.0/24",
            "unchanged"
        );
        assert!(r.gateway_cnf_netns.is_none());
    }
}

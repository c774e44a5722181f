//! Service discovery in the active controller (KEP-1645), both directions:
//!
//! - **exports up**: every `serviceexport/<ns>/<name>` spec of this cluster (node-first
//!   source, written by `fleetctl export`) becomes `export/<ns>/<name>`, whose endpoints are
//!   the pods of the namespace on this cluster's nodes whose labels match the spec's selector,
//!   as the node daemons report them (`list_attachments`: a pod is listed while its sandbox
//!   runs, so every listed pod is ready);
//! - **imports down**: every cluster's exports are aggregated ([`fleet_services::aggregate`]),
//!   each ClusterSetIP service gets a VIP of this cluster's VIP range (stable: the previous
//!   allocation is read back from this cluster's own `import/*` records), the liveness rule
//!   ([`fleet_services::liveness`]) decides which exporting clusters are routed to, and the
//!   result is published as `import/<ns>/<name>` (what `fleet-dns` answers from) and handed to
//!   every node as its VIP table (`set_services`), with the DNS VIP (the range's first usable
//!   address) in front of the cluster's `fleet-dns` servers.
//!
//! With a Kubernetes API the exports also come from ServiceExports ([`crate::kube_mcs`]): both
//! sources feed the same publishing path; a name exported by both is the Kubernetes one's.
//!
//! The decisions are pure functions ([`desired_exports`], [`vip_services`]); [`ServiceSync`]
//! holds what was last read and written and makes the calls. Failures are reported, never
//! fatal: the next pass retries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::records::{
    EXPORT_RECORD_PREFIX, EndpointRecord, ExportRecord, IMPORT_RECORD_PREFIX, ImportRecord,
    InternalTrafficPolicy, Protocol, SERVICE_EXPORT_RECORD_PREFIX, ServiceExportSpec,
    SessionAffinity, export_record_name, import_record_name, parse_service_record_name,
};
use fleet_proto::node::{Attachment, VipPort, VipProtocol, VipService};
use fleet_services::aggregate::ExportStatus;
use fleet_services::export::{ServiceKey, ServiceType, is_dns_label};
use fleet_services::liveness::Transition;
use fleet_services::{
    Liveness, LivenessConfig, ServiceImport, VipTable, aggregate_fleet, allocate_vips_reserving,
};
use ipnetwork::Ipv4Network;

use crate::config::DnsBackend;
use crate::hub::{Hub, is_removed};
use crate::kube_mcs::KubeView;
use crate::reconcile::ClusterNode;

/// The port `fleet-dns` is reached on through the DNS VIP.
pub const DNS_PORT: u16 = 53;

/// What is fixed for the controller's life.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub cluster: ClusterId,
    pub vip_range: Ipv4Network,
    /// The cluster's `fleet-dns` servers (UDP and TCP); empty: no DNS VIP.
    pub dns_backends: Vec<DnsBackend>,
    pub liveness: LivenessConfig,
    /// Exports also come from the Kubernetes API: until it has been read once, this
    /// cluster's exports are left as they are (a failover during an API outage must not
    /// withdraw them).
    pub kubernetes: bool,
}

/// The DNS VIP of a VIP range: its first usable address (reserved, never a service's).
pub fn dns_vip(range: Ipv4Network) -> Ipv4Addr {
    if range.prefix() >= 31 {
        range.network()
    } else {
        Ipv4Addr::from(u32::from(range.network()) + 1)
    }
}

/// The DNS backends as addresses; a node without a subnet yet is reported and left out.
pub fn resolve_dns_backends(
    backends: &[DnsBackend],
    subnets: &BTreeMap<String, Ipv4Network>,
    problems: &mut Vec<String>,
) -> Vec<SocketAddrV4> {
    backends
        .iter()
        .filter_map(|b| match b {
            DnsBackend::Address(a) => Some(*a),
            DnsBackend::Node { node, port } => match subnets.get(node) {
                Some(subnet) => Some(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from(subnet.network()) + 1),
                    *port,
                )),
                None => {
                    problems.push(format!(
                        "--dns-backend {node}:{port}: node {node} has no subnet yet"
                    ));
                    None
                }
            },
        })
        .collect()
}

/// One pod as a node daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    pub node: String,
    pub attachment: Attachment,
}

/// The `export/<ns>/<name>` records (name → value) for this cluster's specs and pods. Pods
/// outside `block` are skipped (aggregation would refuse the whole export for them).
pub fn desired_exports(
    specs: &BTreeMap<(String, String), ServiceExportSpec>,
    pods: &[NodePod],
    block: Ipv4Network,
) -> BTreeMap<String, ExportRecord> {
    specs
        .iter()
        .map(|((namespace, name), spec)| {
            let mut endpoints: BTreeMap<Ipv4Addr, EndpointRecord> = BTreeMap::new();
            for p in pods {
                let pod = &p.attachment.pod;
                let matches = pod.namespace == *namespace
                    && !spec.selector.is_empty()
                    && spec
                        .selector
                        .iter()
                        .all(|(k, v)| pod.labels.get(k) == Some(v));
                if !matches || !block.contains(p.attachment.address) {
                    continue;
                }
                endpoints
                    .entry(p.attachment.address)
                    .or_insert_with(|| EndpointRecord {
                        ip: p.attachment.address,
                        hostname: is_dns_label(&pod.name).then(|| pod.name.clone()),
                        ready: true,
                        serving: true,
                        terminating: false,
                        node_name: Some(p.node.clone()),
                    });
            }
            let record = ExportRecord {
                service_type: spec.service_type,
                ports: spec.ports.clone(),
                session_affinity: spec.session_affinity,
                internal_traffic_policy: InternalTrafficPolicy::Cluster,
                traffic_distribution: None,
                labels: spec.labels.clone(),
                annotations: spec.annotations.clone(),
                created_at_ms: spec.created_at_ms,
                endpoints: endpoints.into_values().collect(),
            };
            (export_record_name(namespace, name), record)
        })
        .collect()
}

fn vip_protocol(p: Protocol) -> VipProtocol {
    match p {
        Protocol::Tcp => VipProtocol::Tcp,
        Protocol::Udp => VipProtocol::Udp,
        Protocol::Sctp => VipProtocol::Sctp,
    }
}

/// Every node's VIP table: each ClusterSetIP import with a VIP, each port to the ready
/// endpoints of the live clusters that export that port (at their target port), and the DNS
/// VIP in front of `dns` (UDP and TCP 53).
pub fn vip_services(
    imports: &BTreeMap<ServiceKey, ServiceImport>,
    vips: &VipTable,
    live: &BTreeSet<ClusterId>,
    dns: Option<(Ipv4Addr, &[SocketAddrV4])>,
) -> Vec<VipService> {
    let mut services = Vec::new();
    if let Some((vip, backends)) = dns
        && !backends.is_empty()
    {
        let mut backends = backends.to_vec();
        backends.sort();
        backends.dedup();
        services.push(VipService {
            name: "fleetboard/fleet-dns".into(),
            vip,
            ports: [VipProtocol::Udp, VipProtocol::Tcp]
                .into_iter()
                .map(|protocol| VipPort {
                    protocol,
                    port: DNS_PORT,
                    backends: backends.clone(),
                })
                .collect(),
            affinity_timeout_seconds: None,
        });
    }
    for import in imports.values() {
        if import.service_type != ServiceType::ClusterSetIP {
            continue;
        }
        let Some(vip) = vips.get(&import.service) else {
            continue;
        };
        let ports = import
            .ports
            .iter()
            .map(|port| {
                let mut backends: Vec<SocketAddrV4> = port
                    .backends
                    .iter()
                    .filter(|(cluster, _)| live.contains(*cluster))
                    .flat_map(|(cluster, target)| {
                        import
                            .clusters
                            .get(cluster)
                            .into_iter()
                            .flatten()
                            .filter(|e| e.ready)
                            .map(|e| SocketAddrV4::new(e.ip, *target))
                    })
                    .collect();
                backends.sort();
                backends.dedup();
                VipPort {
                    protocol: vip_protocol(port.protocol),
                    port: port.port,
                    backends,
                }
            })
            .collect();
        services.push(VipService {
            name: import.service.to_string(),
            vip,
            ports,
            affinity_timeout_seconds: match import.session_affinity {
                SessionAffinity::None => None,
                SessionAffinity::ClientIP { timeout_seconds } => Some(timeout_seconds),
            },
        });
    }
    services.sort_by_key(|s| s.vip);
    services
}

/// The specs of this cluster's node-first exports, by (namespace, name); bad ones reported.
pub fn read_specs(
    fleet: &Fleet,
    own: &ClusterId,
) -> (BTreeMap<(String, String), ServiceExportSpec>, Vec<String>) {
    let mut specs = BTreeMap::new();
    let mut bad = Vec::new();
    for r in fleet.records_of(own) {
        if !r.name.starts_with(SERVICE_EXPORT_RECORD_PREFIX) {
            continue;
        }
        let Some((namespace, name)) =
            parse_service_record_name(SERVICE_EXPORT_RECORD_PREFIX, &r.name)
        else {
            bad.push(format!(
                "record {}: not serviceexport/<namespace>/<name>",
                r.name
            ));
            continue;
        };
        match serde_json::from_slice::<ServiceExportSpec>(&r.value) {
            Ok(spec) => {
                specs.insert((namespace.to_string(), name.to_string()), spec);
            }
            Err(e) => bad.push(format!("record {}: invalid JSON: {e}", r.name)),
        }
    }
    (specs, bad)
}

/// The VIPs this cluster handed out before, from its own `import/*` records.
pub fn previous_vips(fleet: &Fleet, own: &ClusterId) -> VipTable {
    fleet
        .records_of(own)
        .filter_map(|r| {
            let (namespace, name) = parse_service_record_name(IMPORT_RECORD_PREFIX, &r.name)?;
            let import: ImportRecord = serde_json::from_slice(&r.value).ok()?;
            let vip = *import.ips.first()?;
            Some((ServiceKey::new(namespace, name), vip))
        })
        .collect()
}

/// How long a written record is taken as written while the mirror has not shown it yet.
const ECHO_WAIT: Duration = Duration::from_secs(5);

/// What the service side of the active controller read and wrote last.
pub struct ServiceSync {
    cfg: ServiceConfig,
    liveness: Liveness,
    /// `None` until read back from the mirror (the first pass).
    vips: Option<VipTable>,
    /// Each node's pods as last read; nodes that did not answer keep their last list.
    pods: BTreeMap<String, Vec<Attachment>>,
    /// Records written and not yet seen in the mirror: name → (value, when).
    written: BTreeMap<String, (Vec<u8>, Instant)>,
    /// Each node's VIP table as it last accepted it.
    node_tables: BTreeMap<String, Vec<VipService>>,
    /// The problems of the last pass (to log only changes).
    last_problems: Vec<String>,
    /// The member cluster's Kubernetes API as last read (`None`: no Kubernetes source).
    kube: Option<KubeView>,
    /// The conditions of this cluster's exports from the last aggregation, by (ns, name).
    own_statuses: BTreeMap<(String, String), ExportStatus>,
    /// Names exported by both sources (the Kubernetes one wins), to log only changes.
    shadowed: BTreeSet<String>,
    /// The imports this cluster published in the last pass, by (ns, name).
    own_imports: BTreeMap<(String, String), ImportRecord>,
}

impl ServiceSync {
    pub fn new(cfg: ServiceConfig) -> Self {
        ServiceSync {
            liveness: Liveness::new(cfg.cluster.clone(), cfg.liveness),
            cfg,
            vips: None,
            pods: BTreeMap::new(),
            written: BTreeMap::new(),
            node_tables: BTreeMap::new(),
            last_problems: Vec::new(),
            kube: None,
            own_statuses: BTreeMap::new(),
            shadowed: BTreeSet::new(),
            own_imports: BTreeMap::new(),
        }
    }

    /// The Kubernetes source's latest read; true when it changed.
    pub fn set_kube_view(&mut self, view: KubeView) -> bool {
        let changed = self.kube.as_ref() != Some(&view);
        self.kube = Some(view);
        changed
    }

    /// The Kubernetes source's latest read, if any.
    pub fn kube_view(&self) -> Option<&KubeView> {
        self.kube.as_ref()
    }

    /// The imports this cluster published in the last pass, by (namespace, name).
    pub fn own_imports(&self) -> &BTreeMap<(String, String), ImportRecord> {
        &self.own_imports
    }

    /// The conditions of this cluster's exports from the last pass, by (namespace, name).
    pub fn own_statuses(&self) -> &BTreeMap<(String, String), ExportStatus> {
        &self.own_statuses
    }

    /// Reads every node's pods; true when some node's list changed.
    pub async fn poll_pods(&mut self, nodes: &[ClusterNode]) -> bool {
        let mut changed = false;
        for n in nodes {
            match n.api.list_attachments().await {
                Ok(mut list) => {
                    list.sort_by(|a, b| a.key.cmp(&b.key));
                    if self.pods.get(&n.spec.name) != Some(&list) {
                        self.pods.insert(n.spec.name.clone(), list);
                        changed = true;
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %n.spec.name, error = %e, "listing the node's pods failed; keeping its last list");
                }
            }
        }
        changed
    }

    /// When liveness may change with no new input.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.liveness.next_deadline()
    }

    /// One pass over exports, imports and the nodes' VIP tables. Returns `Err` only when the
    /// hub says this cluster is no longer a member.
    pub async fn sync(
        &mut self,
        fleet: &Fleet,
        nodes: &[ClusterNode],
        subnets: &BTreeMap<String, Ipv4Network>,
        hub: &dyn Hub,
        now: Instant,
    ) -> Result<(), fleet_hub_api::client::HubError> {
        let own = self.cfg.cluster.clone();
        let mut problems = Vec::new();
        for t in self.liveness.observe_fleet(fleet, now) {
            match t {
                Transition::Withdrawn(c) => {
                    tracing::warn!(cluster = %c, "cluster withdrawn from service discovery: its gateway is gone or silent")
                }
                Transition::Returned(c) => {
                    tracing::info!(cluster = %c, "cluster back in service discovery")
                }
            }
        }
        let own_records: BTreeMap<&str, &[u8]> = fleet
            .records_of(&own)
            .map(|r| (r.name.as_str(), r.value.as_slice()))
            .collect();
        self.written.retain(|name, (value, at)| {
            own_records.get(name.as_str()) != Some(&value.as_slice())
                && now.saturating_duration_since(*at) < ECHO_WAIT
        });

        // Exports up.
        let (specs, bad) = read_specs(fleet, &own);
        problems.extend(bad);
        let block = fleet
            .clusters
            .get(&own)
            .map_or(fleet.fleet_cidr, |c| c.block);
        let pods: Vec<NodePod> = self
            .pods
            .iter()
            .flat_map(|(node, list)| {
                list.iter().map(|a| NodePod {
                    node: node.clone(),
                    attachment: a.clone(),
                })
            })
            .collect();
        let mut exports = desired_exports(&specs, &pods, block);
        if let Some(view) = &self.kube {
            let kube = crate::kube_mcs::source::desired_exports(view, &pods, block);
            let shadowed: BTreeSet<String> = kube
                .records
                .keys()
                .filter(|n| exports.contains_key(*n))
                .cloned()
                .collect();
            for name in shadowed.difference(&self.shadowed) {
                tracing::warn!(record = %name, "exported by both a ServiceExport and fleetctl export: the ServiceExport's is published");
            }
            self.shadowed = shadowed;
            exports.extend(kube.records);
        }
        let exports: BTreeMap<String, Vec<u8>> = exports
            .into_iter()
            .map(|(name, r)| (name, serde_json::to_vec(&r).expect("records serialise")))
            .collect();
        if self.cfg.kubernetes && self.kube.is_none() {
            problems.push(
                "the Kubernetes API has not been read yet: this cluster's exports are left as they are"
                    .into(),
            );
        } else {
            self.converge_records(
                EXPORT_RECORD_PREFIX,
                &exports,
                &own_records,
                hub,
                now,
                &mut problems,
            )
            .await?;
        }

        // Imports down.
        let aggregation = aggregate_fleet(fleet);
        self.own_statuses = aggregation
            .statuses
            .iter()
            .filter(|(k, _)| k.cluster == own)
            .map(|(k, s)| {
                (
                    (k.service.namespace.clone(), k.service.name.clone()),
                    s.clone(),
                )
            })
            .collect();
        for u in &aggregation.unreadable {
            problems.push(u.to_string());
        }
        let previous = match self.vips.take() {
            Some(v) => v,
            None => previous_vips(fleet, &own),
        };
        let dns = dns_vip(self.cfg.vip_range);
        let vips = match allocate_vips_reserving(
            self.cfg.vip_range,
            &previous,
            &aggregation.imports,
            &BTreeSet::from([dns]),
        ) {
            Ok(v) => v,
            Err(e) => {
                problems.push(e.to_string());
                e.partial
            }
        };
        let live = self.liveness.live();
        self.own_imports = aggregation
            .imports
            .values()
            .map(|i| {
                let record = fleet_services::import::import_record(i, vips.get(&i.service), &live);
                (
                    (i.service.namespace.clone(), i.service.name.clone()),
                    record,
                )
            })
            .collect();
        let imports: BTreeMap<String, Vec<u8>> = self
            .own_imports
            .iter()
            .map(|((namespace, name), record)| {
                (
                    import_record_name(namespace, name),
                    serde_json::to_vec(record).expect("records serialise"),
                )
            })
            .collect();
        self.converge_records(
            IMPORT_RECORD_PREFIX,
            &imports,
            &own_records,
            hub,
            now,
            &mut problems,
        )
        .await?;

        // The nodes' VIP tables.
        let dns_backends = resolve_dns_backends(&self.cfg.dns_backends, subnets, &mut problems);
        let table = vip_services(
            &aggregation.imports,
            &vips,
            &live,
            Some((dns, &dns_backends)),
        );
        self.vips = Some(vips);
        self.push_tables(nodes, &table, &mut problems).await;

        if problems != self.last_problems {
            for p in &problems {
                tracing::warn!(problem = %p, "service discovery not converged; retrying");
            }
            if problems.is_empty() {
                tracing::info!("service discovery converged");
            }
            self.last_problems = problems;
        }
        Ok(())
    }

    /// Hands `table` to every node whose last accepted table differs.
    pub async fn push_tables(
        &mut self,
        nodes: &[ClusterNode],
        table: &[VipService],
        problems: &mut Vec<String>,
    ) {
        for n in nodes {
            if self.node_tables.get(&n.spec.name).map(Vec::as_slice) == Some(table) {
                continue;
            }
            let req = fleet_proto::node::SetServicesRequest {
                services: table.to_vec(),
            };
            match n.api.set_services(req).await {
                Ok(_) => {
                    self.node_tables.insert(n.spec.name.clone(), table.to_vec());
                }
                Err(e) => {
                    self.node_tables.remove(&n.spec.name);
                    problems.push(format!("node {}: setting its VIP table: {e}", n.spec.name));
                }
            }
        }
    }

    /// Publishes the records of `prefix` that differ from `desired` and deletes the others.
    async fn converge_records(
        &mut self,
        prefix: &str,
        desired: &BTreeMap<String, Vec<u8>>,
        current: &BTreeMap<&str, &[u8]>,
        hub: &dyn Hub,
        now: Instant,
        problems: &mut Vec<String>,
    ) -> Result<(), fleet_hub_api::client::HubError> {
        for (name, value) in desired {
            let pending = self.written.get(name).is_some_and(|(v, _)| v == value);
            if current.get(name.as_str()) == Some(&value.as_slice()) || pending {
                continue;
            }
            match hub.publish(name, value).await {
                Ok(()) => {
                    self.written.insert(name.clone(), (value.clone(), now));
                }
                Err(e) if is_removed(&e) => return Err(e),
                Err(e) => problems.push(format!("publishing {name}: {e}")),
            }
        }
        let stale: Vec<&str> = current
            .keys()
            .filter(|n| n.starts_with(prefix) && !desired.contains_key(**n))
            .copied()
            .collect();
        for name in stale {
            match hub.unpublish(name).await {
                Ok(()) => {
                    self.written.remove(name);
                }
                Err(e) if is_removed(&e) => return Err(e),
                Err(e) => problems.push(format!("deleting {name}: {e}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleet_hub_api::records::{ExportPortRecord, ExportedServiceType};
    use fleet_proto::node::{AttachmentKey, Origin, PodMeta};

    fn spec(selector: &[(&str, &str)]) -> ServiceExportSpec {
        ServiceExportSpec {
            service_type: ExportedServiceType::ClusterSetIP,
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: vec![ExportPortRecord {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: Some(8080),
                app_protocol: None,
            }],
            session_affinity: SessionAffinity::None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            created_at_ms: 7,
        }
    }

    pub(crate) fn pod(
        node: &str,
        ns: &str,
        name: &str,
        ip: &str,
        labels: &[(&str, &str)],
    ) -> NodePod {
        NodePod {
            node: node.into(),
            attachment: Attachment {
                key: AttachmentKey {
                    container_id: format!("c-{name}"),
                    ifname: "eth0".into(),
                },
                network: "fleet".into(),
                netns: "/run/netns/x".into(),
                interface: "eth-fleet".into(),
                mac: String::new(),
                address: ip.parse().unwrap(),
                prefix_len: 24,
                host_veth: "v".into(),
                pod: PodMeta {
                    namespace: ns.into(),
                    name: name.into(),
                    uid: String::new(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    annotations: BTreeMap::new(),
                },
                origin: Origin::Cni,
                created_unix: 0,
            },
        }
    }

    #[test]
    fn exports_take_the_namespace_pods_whose_labels_match_the_selector() {
        let specs = BTreeMap::from([(
            ("default".to_string(), "web".to_string()),
            spec(&[("app", "web")]),
        )]);
        let pods = [
            pod(
                "aa-1",
                "default",
                "web-1",
                "100.96.0.5",
                &[("app", "web"), ("x", "y")],
            ),
            pod("aa-2", "default", "web-2", "100.96.1.5", &[("app", "web")]),
            pod("aa-2", "other", "web-3", "100.96.1.6", &[("app", "web")]),
            pod("aa-2", "default", "db", "100.96.1.7", &[("app", "db")]),
            pod("aa-2", "default", "bare", "100.96.1.8", &[]),
            pod(
                "aa-2",
                "default",
                "Not_A_Label",
                "100.96.1.9",
                &[("app", "web")],
            ),
            pod(
                "aa-2",
                "default",
                "elsewhere",
                "100.97.0.9",
                &[("app", "web")],
            ),
        ];
        let out = desired_exports(&specs, &pods, "100.96.0.0/16".parse().unwrap());
        let r = &out["export/default/web"];
        let ips: Vec<String> = r.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["100.96.0.5", "100.96.1.5", "100.96.1.9"]);
        assert_eq!(r.endpoints[0].hostname.as_deref(), Some("web-1"));
        assert_eq!(r.endpoints[0].node_name.as_deref(), Some("aa-1"));
        assert_eq!(
            r.endpoints[2].hostname, None,
            "not a DNS label: no per-pod name"
        );
        assert!(
            r.endpoints
                .iter()
                .all(|e| e.ready && e.serving && !e.terminating)
        );
        assert_eq!(r.created_at_ms, 7);
        assert_eq!(r.ports[0].target_port, Some(8080));

        // An empty selector selects nothing (a Service without a selector has no endpoints
        // managed for it).
        let specs = BTreeMap::from([(("default".to_string(), "web".to_string()), spec(&[]))]);
        assert!(
            desired_exports(&specs, &pods, "100.96.0.0/16".parse().unwrap())["export/default/web"]
                .endpoints
                .is_empty()
        );
    }

    #[test]
    fn the_dns_vip_is_the_first_usable_address() {
        assert_eq!(
            dns_vip("100.112.0.0/16".parse().unwrap()),
            Ipv4Addr::new(100, 112, 0, 1)
        );
        assert_eq!(
            dns_vip("10.0.0.4/31".parse().unwrap()),
            Ipv4Addr::new(10, 0, 0, 4)
        );
    }

    fn cid(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    /// aa (own, block 100.96.0.0/16) and bb (100.97.0.0/16); bb exports default/web with two
    /// endpoints; `beat` is the fleet revision.
    fn fleet(beat: u64, aa_records: &[(&str, Vec<u8>)]) -> Fleet {
        use fleet_hub_api::model::{ClusterRecord, GatewayState, MemberRecord};
        use fleet_proto::wireguard::PublicKey;
        let mut fleet = Fleet {
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            clusters: BTreeMap::new(),
            records: BTreeMap::new(),
            relays: BTreeMap::new(),
            revision: beat,
        };
        for (i, (c, block)) in [("aa", "100.96.0.0/16"), ("bb", "100.97.0.0/16")]
            .into_iter()
            .enumerate()
        {
            fleet.clusters.insert(
                cid(c),
                ClusterRecord {
                    id: cid(c),
                    block: block.parse().unwrap(),
                    public_key: PublicKey::from_bytes([i as u8 + 1; 32]),
                    endpoint: None,
                    gateway: GatewayState::Up,
                    controller_live: true,
                    joined_at: 1,
                    token_id: "t".into(),
                },
            );
        }
        let mut put = |owner: &str, name: &str, value: Vec<u8>, revision: u64| {
            fleet.records.entry(cid(owner)).or_default().insert(
                name.to_string(),
                MemberRecord {
                    owner: cid(owner),
                    name: name.to_string(),
                    value,
                    revision,
                },
            );
        };
        let mut bb_export = ExportRecord {
            service_type: ExportedServiceType::ClusterSetIP,
            ports: spec(&[]).ports,
            session_affinity: SessionAffinity::ClientIP {
                timeout_seconds: 60,
            },
            internal_traffic_policy: InternalTrafficPolicy::Cluster,
            traffic_distribution: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            created_at_ms: 1,
            endpoints: Vec::new(),
        };
        for ip in ["100.97.0.5", "100.97.1.5"] {
            bb_export.endpoints.push(EndpointRecord {
                ip: ip.parse().unwrap(),
                hostname: None,
                ready: true,
                serving: true,
                terminating: false,
                node_name: None,
            });
        }
        put(
            "bb",
            "export/default/web",
            serde_json::to_vec(&bb_export).unwrap(),
            2,
        );
        put("bb", "gateway", b"{}".to_vec(), beat);
        for (name, value) in aa_records {
            put("aa", name, value.clone(), 3);
        }
        fleet
    }

    #[tokio::test]
    async fn exports_go_up_imports_come_down_and_a_silent_cluster_is_withdrawn() {
        use crate::plan::NodeSpec;
        use crate::reconcile::fakes::{FakeHub, FakeNode};
        use std::sync::Arc;

        let node = Arc::new(FakeNode::default());
        *node.pods.lock().unwrap() =
            vec![pod("aa-1", "default", "web-1", "100.96.0.9", &[("app", "web")]).attachment];
        let nodes = vec![ClusterNode {
            spec: NodeSpec {
                name: "aa-1".into(),
                socket: "/dev/null".into(),
                underlay_ip: "198.51.100.1".parse().unwrap(),
                netns: "/run/netns/x".into(),
            },
            api: node.clone(),
        }];
        let hub = FakeHub::default();
        let subnets = BTreeMap::from([("aa-1".to_string(), "100.96.0.0/24".parse().unwrap())]);
        let liveness = LivenessConfig {
            hold_down: Duration::from_secs(2),
            max_hold_down: Duration::from_secs(8),
            flap_window: Duration::from_secs(60),
        };
        let mut sync = ServiceSync::new(ServiceConfig {
            cluster: cid("aa"),
            vip_range: "100.112.0.0/16".parse().unwrap(),
            dns_backends: vec!["aa-1:53".parse().unwrap()],
            liveness,
            kubernetes: false,
        });
        assert!(sync.poll_pods(&nodes).await);
        assert!(!sync.poll_pods(&nodes).await, "same pods: no change");
        let spec = serde_json::to_vec(&spec(&[("app", "web")])).unwrap();
        let t0 = Instant::now();
        let f = fleet(10, &[("serviceexport/default/web", spec.clone())]);
        sync.sync(&f, &nodes, &subnets, &hub, t0).await.unwrap();

        let published = hub.published.lock().unwrap().clone();
        let names: Vec<&str> = published.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["export/default/web", "import/default/web"]);
        let export: ExportRecord = serde_json::from_slice(&published[0].1).unwrap();
        assert_eq!(export.endpoints.len(), 1);
        assert_eq!(export.endpoints[0].ip.to_string(), "100.96.0.9");
        let import: ImportRecord = serde_json::from_slice(&published[1].1).unwrap();
        let vip = import.ips[0];
        assert!(
            vip != Ipv4Addr::new(100, 112, 0, 1),
            "the DNS VIP is reserved"
        );
        assert_eq!(
            import.clusters.len(),
            1,
            "only bb's export is in the mirror yet"
        );
        assert!(import.clusters[0].live);

        let table = node.services.lock().unwrap().clone().unwrap().services;
        assert_eq!(table.len(), 2);
        assert_eq!(table[0].vip, Ipv4Addr::new(100, 112, 0, 1));
        assert_eq!(table[0].ports.len(), 2, "DNS over UDP and TCP");
        assert_eq!(
            table[0].ports[0].backends,
            ["100.96.0.1:53".parse().unwrap()]
        );
        let web = table.iter().find(|s| s.vip == vip).unwrap();
        assert_eq!(web.affinity_timeout_seconds, Some(60));
        let backends: Vec<String> = web.ports[0]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(backends, ["100.97.0.5:8080", "100.97.1.5:8080"]);

        // The own export arrives in the mirror: both clusters' endpoints, the same VIP.
        let aa_export = published[0].1.clone();
        let import_rec = published[1].1.clone();
        let f = fleet(
            11,
            &[
                ("serviceexport/default/web", spec.clone()),
                ("export/default/web", aa_export.clone()),
                ("import/default/web", import_rec),
            ],
        );
        sync.sync(&f, &nodes, &subnets, &hub, t0 + Duration::from_secs(1))
            .await
            .unwrap();
        let table = node.services.lock().unwrap().clone().unwrap().services;
        let web = table.iter().find(|s| s.name == "default/web").unwrap();
        assert_eq!(web.vip, vip);
        assert_eq!(web.ports[0].backends.len(), 3);

        // bb's controller lease lapses (the hub marks it not live): only aa's endpoint is
        // routed to, at once.
        let t_dead = t0 + Duration::from_secs(2);
        assert_eq!(sync.next_deadline(), None, "nothing times out by itself");
        let mut f = f;
        f.clusters.get_mut(&cid("bb")).unwrap().controller_live = false;
        sync.sync(&f, &nodes, &subnets, &hub, t_dead).await.unwrap();
        let table = node.services.lock().unwrap().clone().unwrap().services;
        let web = table.iter().find(|s| s.name == "default/web").unwrap();
        let backends: Vec<String> = web.ports[0]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(backends, ["100.96.0.9:8080"]);
        let last: ImportRecord =
            serde_json::from_slice(&hub.published.lock().unwrap().last().unwrap().1).unwrap();
        let bb = last.clusters.iter().find(|c| c.cluster == "bb").unwrap();
        assert!(!bb.live, "bb is kept in status.clusters but not live");

        // The spec is removed (fleetctl unexport): the export record goes.
        let f = fleet(12, &[("export/default/web", aa_export)]);
        sync.sync(&f, &nodes, &subnets, &hub, t_dead + Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            hub.unpublished.lock().unwrap().as_slice(),
            ["export/default/web"]
        );
    }

    #[tokio::test]
    async fn service_exports_join_the_node_first_exports_and_win_a_shared_name() {
        use crate::kube_mcs::source::tests::{export, web_view};
        use crate::plan::NodeSpec;
        use crate::reconcile::fakes::{FakeHub, FakeNode};
        use std::sync::Arc;

        let node = Arc::new(FakeNode::default());
        *node.pods.lock().unwrap() = vec![
            pod("aa-1", "default", "web-1", "100.96.0.9", &[("app", "web")]).attachment,
            pod("aa-1", "default", "db-1", "100.96.0.10", &[("app", "db")]).attachment,
        ];
        let nodes = vec![ClusterNode {
            spec: NodeSpec {
                name: "aa-1".into(),
                socket: "/dev/null".into(),
                underlay_ip: "198.51.100.1".parse().unwrap(),
                netns: "/run/netns/x".into(),
            },
            api: node.clone(),
        }];
        let hub = FakeHub::default();
        let mut sync = ServiceSync::new(ServiceConfig {
            cluster: cid("aa"),
            vip_range: "100.112.0.0/16".parse().unwrap(),
            dns_backends: Vec::new(),
            liveness: LivenessConfig::default(),
            kubernetes: true,
        });
        sync.poll_pods(&nodes).await;
        let subnets = BTreeMap::new();
        // Before the first read of the API nothing is published or withdrawn.
        let aa_old = (
            "export/default/web",
            serde_json::to_vec(&spec(&[("app", "web")])).unwrap(),
        );
        sync.sync(&fleet(9, &[aa_old]), &nodes, &subnets, &hub, Instant::now())
            .await
            .unwrap();
        assert!(hub.unpublished.lock().unwrap().is_empty());
        assert!(
            hub.published
                .lock()
                .unwrap()
                .iter()
                .all(|(n, _)| !n.starts_with("export/"))
        );
        let mut view = web_view();
        view.service_exports.push(export("default", "gone", 5));
        assert!(sync.set_kube_view(view.clone()));
        assert!(!sync.set_kube_view(view), "the same read: no change");
        // fleetctl exported web and db too: web is the ServiceExport's.
        let mut db = spec(&[("app", "db")]);
        db.ports[0].port = 5432;
        let f = fleet(
            10,
            &[
                (
                    "serviceexport/default/web",
                    serde_json::to_vec(&spec(&[("app", "web")])).unwrap(),
                ),
                ("serviceexport/default/db", serde_json::to_vec(&db).unwrap()),
            ],
        );
        sync.sync(&f, &nodes, &subnets, &hub, Instant::now())
            .await
            .unwrap();
        let published: BTreeMap<String, Vec<u8>> =
            hub.published.lock().unwrap().iter().cloned().collect();
        let web: ExportRecord = serde_json::from_slice(&published["export/default/web"]).unwrap();
        assert_eq!(web.created_at_ms, 1_700_000_000_123, "the ServiceExport's");
        assert_eq!(web.ports.len(), 2);
        assert_eq!(web.endpoints[0].ip.to_string(), "100.96.0.9");
        let db: ExportRecord = serde_json::from_slice(&published["export/default/db"]).unwrap();
        assert_eq!(db.ports[0].port, 5432, "the node-first export is kept");
        assert!(
            !published.contains_key("export/default/gone"),
            "a ServiceExport without a Service is not exported"
        );

        // Once the mirror shows the export, its conditions are this cluster's statuses.
        let mut records: Vec<(&str, Vec<u8>)> = published
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        records.retain(|(n, _)| n.starts_with("export/"));
        sync.sync(&fleet(11, &records), &nodes, &subnets, &hub, Instant::now())
            .await
            .unwrap();
        let status = &sync.own_statuses()[&("default".to_string(), "web".to_string())];
        assert_eq!(
            status
                .condition(fleet_services::aggregate::ConditionType::Valid)
                .unwrap()
                .status,
            fleet_services::aggregate::ConditionStatus::True
        );
    }

    #[test]
    fn vip_tables_route_each_port_to_the_live_clusters_that_export_it() {
        use fleet_services::aggregate::ImportPort;
        let import = ServiceImport {
            service: ServiceKey::new("default", "web"),
            service_type: ServiceType::ClusterSetIP,
            ports: vec![
                ImportPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    app_protocol: None,
                    backends: BTreeMap::from([(cid("aa"), 8080), (cid("bb"), 80)]),
                },
                ImportPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    app_protocol: None,
                    backends: BTreeMap::from([(cid("bb"), 5353)]),
                },
            ],
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: InternalTrafficPolicy::Cluster,
            traffic_distribution: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            clusters: BTreeMap::from([
                (
                    cid("aa"),
                    vec![EndpointRecord {
                        ip: "100.96.0.9".parse().unwrap(),
                        hostname: None,
                        ready: true,
                        serving: true,
                        terminating: false,
                        node_name: None,
                    }],
                ),
                (
                    cid("bb"),
                    vec![
                        EndpointRecord {
                            ip: "100.97.0.9".parse().unwrap(),
                            hostname: None,
                            ready: true,
                            serving: true,
                            terminating: false,
                            node_name: None,
                        },
                        EndpointRecord {
                            ip: "100.97.0.10".parse().unwrap(),
                            hostname: None,
                            ready: false,
                            serving: false,
                            terminating: true,
                            node_name: None,
                        },
                    ],
                ),
            ]),
        };
        let mut headless = import.clone();
        headless.service = ServiceKey::new("default", "db");
        headless.service_type = ServiceType::Headless;
        let imports = BTreeMap::from([
            (import.service.clone(), import.clone()),
            (headless.service.clone(), headless),
        ]);
        let vips: VipTable = [(import.service.clone(), Ipv4Addr::new(100, 112, 3, 4))]
            .into_iter()
            .collect();
        let both = BTreeSet::from([cid("aa"), cid("bb")]);
        let t = vip_services(&imports, &vips, &both, None);
        assert_eq!(t.len(), 1, "headless services get no VIP");
        let http: Vec<String> = t[0].ports[0]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            http,
            ["100.96.0.9:8080", "100.97.0.9:80"],
            "not-ready endpoints left out"
        );
        let dns: Vec<String> = t[0].ports[1]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(dns, ["100.97.0.9:5353"], "only bb exports 53/UDP");
        let only_aa = BTreeSet::from([cid("aa")]);
        let t = vip_services(&imports, &vips, &only_aa, None);
        assert_eq!(
            t[0].ports[1].backends,
            [],
            "a port with no live cluster is refused, not dropped from the table"
        );
        assert_eq!(t[0].ports.len(), 2);
    }
}

//! KEP-1645 aggregation: every cluster's export of one service becomes one [`ServiceImport`],
//! the same in every importing cluster because it depends only on the exports.
//!
//! Rules ("Constraints and Conflict Resolution"):
//! - exports are ranked oldest first (creation time, ties broken by cluster id); the oldest
//!   decides the type, session affinity (and its timeout), internalTrafficPolicy,
//!   trafficDistribution, and the exported labels and annotations; an export that differs is
//!   in conflict (`Conflict=True`) but still contributes its endpoints;
//! - ports are the union over all exports; a port that clashes with one taken from an older
//!   export (the same name for another protocol/port, or the same protocol/port under another
//!   name or appProtocol) is a `PortConflict`, and the older definition is kept;
//! - a port routes only to the clusters that export that protocol/port;
//! - an invalid export (ExternalName, bad names or ports) is reported `Valid=False` and not
//!   imported; a record that cannot be read at all is reported as unreadable.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::records::{EXPORT_RECORD_PREFIX, ExportRecord, parse_export_record_name};

use crate::export::{
    Endpoint, Export, ExportError, ExportKey, InternalTrafficPolicy, Protocol, ServiceKey,
    ServicePort, ServiceType, SessionAffinity,
};

/// One port of an import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub app_protocol: Option<String>,
    /// The clusters that export this protocol/port, with the port their endpoints listen on.
    /// Traffic to the port goes to these clusters' endpoints only.
    pub backends: BTreeMap<ClusterId, u16>,
}

/// A service as every cluster imports it (mcs-api `ServiceImport`, plus the endpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceImport {
    pub service: ServiceKey,
    pub service_type: ServiceType,
    /// The union of the exports' ports, in the order they were taken (oldest export first).
    pub ports: Vec<ImportPort>,
    pub session_affinity: SessionAffinity,
    pub internal_traffic_policy: InternalTrafficPolicy,
    pub traffic_distribution: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Every cluster with a valid export, and its endpoints (mcs-api `status.clusters`).
    pub clusters: BTreeMap<ClusterId, Vec<Endpoint>>,
}

/// An mcs-api `ServiceExport` condition type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConditionType {
    Valid,
    Conflict,
    Ready,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One condition of an export, as the exporting cluster shows it on its `ServiceExport`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub type_: ConditionType,
    pub status: ConditionStatus,
    /// mcs-api's reason; several conflict reasons are joined with commas.
    pub reason: String,
    pub message: String,
}

/// The conditions of one export: `Valid`, then (when valid) `Conflict`, then `Ready`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportStatus {
    pub conditions: Vec<Condition>,
}

impl ExportStatus {
    pub fn condition(&self, type_: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// A conflict reason, in mcs-api's spelling (`ServiceExportReason*Conflict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConflictReason {
    Port,
    Type,
    SessionAffinity,
    SessionAffinityConfig,
    InternalTrafficPolicy,
    TrafficDistribution,
    Labels,
    Annotations,
}

impl ConflictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictReason::Port => "PortConflict",
            ConflictReason::Type => "TypeConflict",
            ConflictReason::SessionAffinity => "SessionAffinityConflict",
            ConflictReason::SessionAffinityConfig => "SessionAffinityConfigConflict",
            ConflictReason::InternalTrafficPolicy => "InternalTrafficPolicyConflict",
            ConflictReason::TrafficDistribution => "TrafficDistributionConflict",
            ConflictReason::Labels => "LabelsConflict",
            ConflictReason::Annotations => "AnnotationsConflict",
        }
    }
}

impl fmt::Display for ConflictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `export/...` record that could not be read: its name or its JSON is malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableRecord {
    pub cluster: ClusterId,
    pub record: String,
    pub error: String,
}

impl fmt::Display for UnreadableRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster {}'s record {:?} is not a readable export: {}",
            self.cluster, self.record, self.error
        )
    }
}

/// An export that was read but is not valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidExport {
    pub key: ExportKey,
    pub error: ExportError,
}

/// Everything aggregation decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Aggregation {
    /// One import per service with at least one valid export.
    pub imports: BTreeMap<ServiceKey, ServiceImport>,
    /// The conditions of every export read, valid or not.
    pub statuses: BTreeMap<ExportKey, ExportStatus>,
    pub unreadable: Vec<UnreadableRecord>,
}

/// Reads every cluster's `export/<namespace>/<name>` records from the mirrored fleet and
/// aggregates them. Endpoints must lie in the exporting cluster's block (the fleet CIDR if
/// the cluster is not listed). Never fails: what cannot be read is reported.
pub fn aggregate_fleet(fleet: &Fleet) -> Aggregation {
    let mut exports = Vec::new();
    let mut unreadable = Vec::new();
    for (owner, records) in &fleet.records {
        let own_addresses = fleet
            .clusters
            .get(owner)
            .map_or(fleet.fleet_cidr, |c| c.block);
        for (name, record) in records.range(EXPORT_RECORD_PREFIX.to_string()..) {
            if !name.starts_with(EXPORT_RECORD_PREFIX) {
                break;
            }
            let bad = |error: String| UnreadableRecord {
                cluster: owner.clone(),
                record: name.clone(),
                error,
            };
            let Some((namespace, service)) = parse_export_record_name(name) else {
                unreadable.push(bad("the name is not export/<namespace>/<name>".into()));
                continue;
            };
            let parsed: ExportRecord = match serde_json::from_slice(&record.value) {
                Ok(parsed) => parsed,
                Err(e) => {
                    unreadable.push(bad(format!("invalid JSON: {e}")));
                    continue;
                }
            };
            exports.push(
                Export::validate(owner.clone(), namespace, service, &parsed, own_addresses)
                    .map_err(|error| InvalidExport {
                        key: ExportKey {
                            service: ServiceKey::new(namespace, service),
                            cluster: owner.clone(),
                        },
                        error,
                    }),
            );
        }
    }
    let mut aggregation = aggregate(exports);
    aggregation.unreadable = unreadable;
    aggregation
}

/// Aggregates exports into imports and the statuses of every export. Expects one export per
/// cluster and service (as the fleet's records are); of duplicates the last counts. The result
/// does not depend on the order of the exports.
pub fn aggregate(exports: impl IntoIterator<Item = Result<Export, InvalidExport>>) -> Aggregation {
    let mut by_service: BTreeMap<ServiceKey, BTreeMap<ClusterId, Export>> = BTreeMap::new();
    let mut aggregation = Aggregation::default();
    let mut invalid: BTreeMap<ExportKey, ExportError> = BTreeMap::new();
    for export in exports {
        match export {
            Ok(e) => {
                invalid.remove(&e.key);
                by_service
                    .entry(e.key.service.clone())
                    .or_default()
                    .insert(e.key.cluster.clone(), e);
            }
            Err(bad) => {
                if let Some(of_service) = by_service.get_mut(&bad.key.service) {
                    of_service.remove(&bad.key.cluster);
                }
                invalid.insert(bad.key, bad.error);
            }
        }
    }
    for (key, error) in invalid {
        aggregation.statuses.insert(key, invalid_status(&error));
    }
    for (service, exports) in by_service {
        if exports.is_empty() {
            continue;
        }
        let mut ranked: Vec<&Export> = exports.values().collect();
        ranked.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        let (import, statuses) = aggregate_service(&ranked);
        aggregation.statuses.extend(statuses);
        aggregation.imports.insert(service, import);
    }
    aggregation
}

/// One conflict of one export: the reason and what differs.
struct Conflict {
    reason: ConflictReason,
    detail: String,
}

/// Aggregates one service's valid exports, `ranked` oldest first (not empty).
fn aggregate_service(ranked: &[&Export]) -> (ServiceImport, Vec<(ExportKey, ExportStatus)>) {
    let oldest = ranked[0];
    let winner = &oldest.key.cluster;
    let mut conflicts: BTreeMap<&ClusterId, Vec<Conflict>> = BTreeMap::new();
    for e in &ranked[1..] {
        let mut found = Vec::new();
        let mut differs = |reason, what: &str, here: String, used: String| {
            found.push(Conflict {
                reason,
                detail: format!(
                    "{what} is {here} here but {used} in the export of cluster {winner}, \
                     which is used (the oldest export; ties go to the lower cluster id)"
                ),
            })
        };
        if e.service_type != oldest.service_type {
            differs(
                ConflictReason::Type,
                "the type",
                e.service_type.to_string(),
                oldest.service_type.to_string(),
            );
        }
        match (e.session_affinity, oldest.session_affinity) {
            (
                SessionAffinity::ClientIP { timeout_seconds: a },
                SessionAffinity::ClientIP { timeout_seconds: b },
            ) if a != b => differs(
                ConflictReason::SessionAffinityConfig,
                "the ClientIP affinity timeout",
                format!("{a}s"),
                format!("{b}s"),
            ),
            (a, b) if a != b => differs(
                ConflictReason::SessionAffinity,
                "session affinity",
                affinity_str(a).into(),
                affinity_str(b).into(),
            ),
            _ => {}
        }
        if e.internal_traffic_policy != oldest.internal_traffic_policy {
            differs(
                ConflictReason::InternalTrafficPolicy,
                "internalTrafficPolicy",
                format!("{:?}", e.internal_traffic_policy),
                format!("{:?}", oldest.internal_traffic_policy),
            );
        }
        if e.traffic_distribution != oldest.traffic_distribution {
            differs(
                ConflictReason::TrafficDistribution,
                "trafficDistribution",
                format!("{:?}", e.traffic_distribution),
                format!("{:?}", oldest.traffic_distribution),
            );
        }
        if e.labels != oldest.labels {
            differs(
                ConflictReason::Labels,
                "the exported labels",
                format!("{:?}", e.labels),
                format!("{:?}", oldest.labels),
            );
        }
        if e.annotations != oldest.annotations {
            differs(
                ConflictReason::Annotations,
                "the exported annotations",
                format!("{:?}", e.annotations),
                format!("{:?}", oldest.annotations),
            );
        }
        if !found.is_empty() {
            conflicts.insert(&e.key.cluster, found);
        }
    }

    // The union of ports: older definitions win; `taken_from` is the cluster each came from.
    let mut ports: Vec<ImportPort> = Vec::new();
    let mut taken_from: Vec<&ClusterId> = Vec::new();
    for e in ranked {
        for p in &e.ports {
            let cluster = &e.key.cluster;
            if let Some(i) = ports
                .iter()
                .position(|q| (q.protocol, q.port) == (p.protocol, p.port))
            {
                ports[i].backends.insert(cluster.clone(), p.target_port);
                if ports[i].name != p.name || ports[i].app_protocol != p.app_protocol {
                    let used = as_service_port(&ports[i]);
                    port_conflict(&mut conflicts, cluster, p, &used, taken_from[i], true);
                }
            } else if let Some(i) = ports.iter().position(|q| q.name == p.name) {
                let used = as_service_port(&ports[i]);
                port_conflict(&mut conflicts, cluster, p, &used, taken_from[i], false);
            } else {
                ports.push(ImportPort {
                    name: p.name.clone(),
                    protocol: p.protocol,
                    port: p.port,
                    app_protocol: p.app_protocol.clone(),
                    backends: BTreeMap::from([(cluster.clone(), p.target_port)]),
                });
                taken_from.push(cluster);
            }
        }
    }

    let import = ServiceImport {
        service: oldest.key.service.clone(),
        service_type: oldest.service_type,
        ports,
        session_affinity: oldest.session_affinity,
        internal_traffic_policy: oldest.internal_traffic_policy,
        traffic_distribution: oldest.traffic_distribution.clone(),
        labels: oldest.labels.clone(),
        annotations: oldest.annotations.clone(),
        clusters: ranked
            .iter()
            .map(|e| (e.key.cluster.clone(), e.endpoints.clone()))
            .collect(),
    };

    let all_reasons: BTreeSet<ConflictReason> = conflicts
        .values()
        .flat_map(|cs| cs.iter().map(|c| c.reason))
        .collect();
    let statuses = ranked
        .iter()
        .map(|e| {
            let conflict = match conflicts.get(&e.key.cluster) {
                Some(own) => {
                    let reasons: BTreeSet<ConflictReason> = own.iter().map(|c| c.reason).collect();
                    let details: Vec<&str> = own.iter().map(|c| c.detail.as_str()).collect();
                    condition(
                        ConditionType::Conflict,
                        ConditionStatus::True,
                        join_reasons(&reasons),
                        details.join("; "),
                    )
                }
                None if !all_reasons.is_empty() => {
                    let others: Vec<String> =
                        conflicts.keys().map(|c| format!("cluster {c}")).collect();
                    condition(
                        ConditionType::Conflict,
                        ConditionStatus::True,
                        join_reasons(&all_reasons),
                        format!(
                            "the exports of {} conflict with older ones; this export's values \
                             are used",
                            others.join(", ")
                        ),
                    )
                }
                None => condition(
                    ConditionType::Conflict,
                    ConditionStatus::False,
                    "NoConflicts".into(),
                    String::new(),
                ),
            };
            let status = ExportStatus {
                conditions: vec![
                    condition(
                        ConditionType::Valid,
                        ConditionStatus::True,
                        "Valid".into(),
                        String::new(),
                    ),
                    conflict,
                    condition(
                        ConditionType::Ready,
                        ConditionStatus::True,
                        "Exported".into(),
                        format!(
                            "imported as {} from {} cluster(s)",
                            import.service,
                            ranked.len()
                        ),
                    ),
                ],
            };
            (e.key.clone(), status)
        })
        .collect();
    (import, statuses)
}

fn port_conflict<'a>(
    conflicts: &mut BTreeMap<&'a ClusterId, Vec<Conflict>>,
    cluster: &'a ClusterId,
    here: &ServicePort,
    used: &ServicePort,
    from: &ClusterId,
    still_served: bool,
) {
    let outcome = if still_served {
        "this cluster serves it under that definition"
    } else {
        "this port is not imported"
    };
    conflicts.entry(cluster).or_default().push(Conflict {
        reason: ConflictReason::Port,
        detail: format!(
            "port {here} clashes with port {used} of cluster {from}, whose export ranks first \
             (older, or tied and a lower cluster id) and is used; {outcome}"
        ),
    });
}

fn as_service_port(p: &ImportPort) -> ServicePort {
    ServicePort {
        name: p.name.clone(),
        protocol: p.protocol,
        port: p.port,
        target_port: p.port,
        app_protocol: p.app_protocol.clone(),
    }
}

fn affinity_str(a: SessionAffinity) -> &'static str {
    match a {
        SessionAffinity::None => "None",
        SessionAffinity::ClientIP { .. } => "ClientIP",
    }
}

fn join_reasons(reasons: &BTreeSet<ConflictReason>) -> String {
    reasons
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn condition(
    type_: ConditionType,
    status: ConditionStatus,
    reason: String,
    message: String,
) -> Condition {
    Condition {
        type_,
        status,
        reason,
        message,
    }
}

fn invalid_status(error: &ExportError) -> ExportStatus {
    ExportStatus {
        conditions: vec![
            condition(
                ConditionType::Valid,
                ConditionStatus::False,
                error.reason().into(),
                error.to_string(),
            ),
            condition(
                ConditionType::Ready,
                ConditionStatus::False,
                "Failed".into(),
                "not exported: the export is not valid".into(),
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleet_hub_api::model::{ClusterRecord, GatewayState, MemberRecord, PublicKey};
    use fleet_hub_api::records::{ExportPortRecord, ExportedServiceType, export_record_name};
    use ipnetwork::Ipv4Network;
    use proptest::prelude::*;

    use super::*;
    use crate::export::tests::{endpoint, port, record};

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    /// The block of cluster `aa`, `bb`, ...: 100.96.<16 * index>.0/20.
    fn block(cluster: &str) -> Ipv4Network {
        let i = (cluster.as_bytes()[0] - b'a') as u32;
        Ipv4Network::new(std::net::Ipv4Addr::from(0x6460_0000 + (i << 12)), 20).unwrap()
    }

    fn export(cluster: &str, r: &ExportRecord) -> Result<Export, InvalidExport> {
        Export::validate(id(cluster), "shop", "web", r, block(cluster)).map_err(|error| {
            InvalidExport {
                key: ExportKey {
                    service: web(),
                    cluster: id(cluster),
                },
                error,
            }
        })
    }

    fn web() -> ServiceKey {
        ServiceKey::new("shop", "web")
    }

    fn key(cluster: &str) -> ExportKey {
        ExportKey {
            service: web(),
            cluster: id(cluster),
        }
    }

    fn conflict<'a>(a: &'a Aggregation, cluster: &str) -> &'a Condition {
        a.statuses[&key(cluster)]
            .condition(ConditionType::Conflict)
            .unwrap()
    }

    /// Exports `b` (by bb, newer) against `a` (by aa, older) and checks the conflict.
    fn assert_conflict(a: ExportRecord, b: ExportRecord, reason: &str, words: &str) -> Aggregation {
        let agg = aggregate([export("aa", &a), export("bb", &b)]);
        let c = conflict(&agg, "bb");
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, reason)
        );
        assert!(c.message.contains(words), "{}", c.message);
        assert!(c.message.contains("cluster aa"), "{}", c.message);
        // The winner is told too (recommended by mcs-api), with the same reason.
        let w = conflict(&agg, "aa");
        assert_eq!(
            (w.status, w.reason.as_str()),
            (ConditionStatus::True, reason)
        );
        assert!(w.message.contains("cluster bb"), "{}", w.message);
        // Both still serve: the conflict decides attributes, not membership.
        let import = &agg.imports[&web()];
        assert_eq!(import.clusters.len(), 2);
        agg
    }

    #[test]
    fn a_single_export_becomes_its_import() {
        let mut r = record(10);
        r.endpoints = vec![endpoint("100.96.0.5")];
        r.labels = [("app".into(), "web".into())].into();
        let agg = aggregate([export("aa", &r)]);
        let import = &agg.imports[&web()];
        assert_eq!(import.service_type, ServiceType::ClusterSetIP);
        assert_eq!(import.ports.len(), 1);
        assert_eq!(import.ports[0].backends, BTreeMap::from([(id("aa"), 80)]));
        assert_eq!(import.labels, r.labels);
        assert_eq!(import.clusters[&id("aa")][0].ip, r.endpoints[0].ip);
        let s = &agg.statuses[&key("aa")];
        let types: Vec<_> = s.conditions.iter().map(|c| (c.type_, c.status)).collect();
        assert_eq!(
            types,
            [
                (ConditionType::Valid, ConditionStatus::True),
                (ConditionType::Conflict, ConditionStatus::False),
                (ConditionType::Ready, ConditionStatus::True)
            ]
        );
        assert_eq!(
            s.condition(ConditionType::Conflict).unwrap().reason,
            "NoConflicts"
        );
        assert_eq!(
            s.condition(ConditionType::Ready).unwrap().reason,
            "Exported"
        );
    }

    #[test]
    fn identical_exports_merge_without_conflict() {
        let agg = aggregate([export("aa", &record(1)), export("bb", &record(2))]);
        assert_eq!(conflict(&agg, "bb").status, ConditionStatus::False);
        let import = &agg.imports[&web()];
        assert_eq!(import.ports.len(), 1);
        assert_eq!(import.ports[0].backends.len(), 2);
    }

    #[test]
    fn type_conflict_the_oldest_wins() {
        let mut b = record(2);
        b.service_type = ExportedServiceType::Headless;
        let agg = assert_conflict(record(1), b, "TypeConflict", "Headless");
        assert_eq!(agg.imports[&web()].service_type, ServiceType::ClusterSetIP);
        // The other way round: the older headless export wins.
        let mut a = record(1);
        a.service_type = ExportedServiceType::Headless;
        let agg = assert_conflict(a, record(2), "TypeConflict", "ClusterSetIP");
        assert_eq!(agg.imports[&web()].service_type, ServiceType::Headless);
    }

    #[test]
    fn session_affinity_and_its_config_conflict_separately() {
        let client_ip = |t| SessionAffinity::ClientIP { timeout_seconds: t };
        let mut a = record(1);
        a.session_affinity = client_ip(60);
        let agg = assert_conflict(a.clone(), record(2), "SessionAffinityConflict", "None");
        assert_eq!(agg.imports[&web()].session_affinity, client_ip(60));

        let mut b = record(2);
        b.session_affinity = client_ip(120);
        let agg = assert_conflict(a, b, "SessionAffinityConfigConflict", "120s");
        assert_eq!(agg.imports[&web()].session_affinity, client_ip(60));
    }

    #[test]
    fn traffic_policy_distribution_labels_and_annotations_conflict() {
        let mut b = record(2);
        b.internal_traffic_policy = InternalTrafficPolicy::Local;
        let agg = assert_conflict(record(1), b, "InternalTrafficPolicyConflict", "Local");
        assert_eq!(
            agg.imports[&web()].internal_traffic_policy,
            InternalTrafficPolicy::Cluster
        );

        let mut a = record(1);
        a.traffic_distribution = Some("PreferClose".into());
        let agg = assert_conflict(a, record(2), "TrafficDistributionConflict", "PreferClose");
        assert_eq!(
            agg.imports[&web()].traffic_distribution.as_deref(),
            Some("PreferClose")
        );

        let mut b = record(2);
        b.labels = [("tier".into(), "front".into())].into();
        let agg = assert_conflict(record(1), b, "LabelsConflict", "tier");
        assert!(agg.imports[&web()].labels.is_empty());

        let mut a = record(1);
        a.annotations = [("owner".into(), "team-a".into())].into();
        let agg = assert_conflict(a.clone(), record(2), "AnnotationsConflict", "team-a");
        assert_eq!(agg.imports[&web()].annotations, a.annotations);
    }

    #[test]
    fn several_conflicts_join_their_reasons_in_mcs_api_order() {
        let mut b = record(2);
        b.service_type = ExportedServiceType::Headless;
        b.labels = [("x".into(), "y".into())].into();
        b.ports = vec![port("http", Protocol::Tcp, 8080)];
        let agg = aggregate([export("aa", &record(1)), export("bb", &b)]);
        assert_eq!(
            conflict(&agg, "bb").reason,
            "PortConflict,TypeConflict,LabelsConflict"
        );
        assert_eq!(
            conflict(&agg, "aa").reason,
            "PortConflict,TypeConflict,LabelsConflict"
        );
    }

    #[test]
    fn ports_are_the_union_and_route_only_to_their_exporters() {
        let mut a = record(1);
        a.ports = vec![port("http", Protocol::Tcp, 80)];
        let mut b = record(2);
        b.ports = vec![
            ExportPortRecord {
                target_port: Some(8080),
                ..port("http", Protocol::Tcp, 80)
            },
            port("metrics", Protocol::Tcp, 9090),
        ];
        let agg = aggregate([export("aa", &a), export("bb", &b)]);
        // Different port sets alone are no conflict: the union is the service.
        assert_eq!(conflict(&agg, "bb").status, ConditionStatus::False);
        let ports = &agg.imports[&web()].ports;
        assert_eq!(ports.len(), 2);
        assert_eq!(
            ports[0].backends,
            BTreeMap::from([(id("aa"), 80), (id("bb"), 8080)])
        );
        assert_eq!(ports[1].name, "metrics");
        assert_eq!(ports[1].backends, BTreeMap::from([(id("bb"), 9090)]));
    }

    #[test]
    fn a_duplicate_port_is_resolved_by_the_oldest() {
        let mut a = record(1);
        a.ports = vec![port("http", Protocol::Tcp, 80)];
        // Same name, other port: not imported, bb does not serve it.
        let mut b = record(2);
        b.ports = vec![
            port("http", Protocol::Tcp, 8080),
            port("dns", Protocol::Udp, 53),
        ];
        // Same protocol/port, other name: aa's name is used, cc still serves port 80.
        let mut c = record(3);
        c.ports = vec![port("web", Protocol::Tcp, 80)];
        // Same protocol/port and name, other appProtocol: aa's definition, dd serves it.
        let mut d = record(4);
        d.ports = vec![ExportPortRecord {
            app_protocol: Some("kubernetes.io/h2c".into()),
            ..port("http", Protocol::Tcp, 80)
        }];
        let agg = aggregate([
            export("aa", &a),
            export("bb", &b),
            export("cc", &c),
            export("dd", &d),
        ]);
        let ports = &agg.imports[&web()].ports;
        let shape: Vec<_> = ports
            .iter()
            .map(|p| (p.name.as_str(), p.protocol, p.port, p.app_protocol.clone()))
            .collect();
        assert_eq!(
            shape,
            [
                ("http", Protocol::Tcp, 80, None),
                ("dns", Protocol::Udp, 53, None)
            ]
        );
        assert_eq!(
            ports[0].backends.keys().collect::<Vec<_>>(),
            [&id("aa"), &id("cc"), &id("dd")]
        );
        assert_eq!(ports[1].backends.keys().collect::<Vec<_>>(), [&id("bb")]);
        for (cluster, words) in [
            ("bb", "TCP/8080"),
            ("bb", "not imported"),
            ("cc", "\"web\""),
            ("cc", "serves it"),
            ("dd", "h2c"),
        ] {
            let c = conflict(&agg, cluster);
            assert_eq!(c.reason, "PortConflict", "{cluster}");
            assert!(c.message.contains(words), "{cluster}: {}", c.message);
            assert!(c.message.contains("cluster aa"), "{cluster}: {}", c.message);
        }
        // A port clash between two newer exports names the one whose port was taken.
        let mut e = record(5);
        e.ports = vec![port("dns", Protocol::Tcp, 53)];
        let agg = aggregate([export("aa", &a), export("bb", &b), export("ee", &e)]);
        assert!(conflict(&agg, "ee").message.contains("cluster bb"));
    }

    #[test]
    fn a_tie_on_creation_time_goes_to_the_lower_cluster_id() {
        let mut a = record(5);
        a.service_type = ExportedServiceType::Headless;
        let b = record(5);
        for order in [
            vec![export("aa", &a), export("bb", &b)],
            vec![export("bb", &b), export("aa", &a)],
        ] {
            let agg = aggregate(order);
            assert_eq!(agg.imports[&web()].service_type, ServiceType::Headless);
            assert_eq!(conflict(&agg, "bb").reason, "TypeConflict");
        }
    }

    #[test]
    fn a_late_joiner_changes_nothing_unless_it_is_older() {
        let before = aggregate([export("aa", &record(1)), export("bb", &record(2))]);
        let mut late = record(3);
        late.service_type = ExportedServiceType::Headless;
        late.endpoints = vec![endpoint("100.96.32.9")];
        let after = aggregate([
            export("aa", &record(1)),
            export("bb", &record(2)),
            export("cc", &late),
        ]);
        let (b, a) = (&before.imports[&web()], &after.imports[&web()]);
        assert_eq!(a.service_type, b.service_type);
        assert_eq!(a.ports[0].name, b.ports[0].name);
        assert_eq!(conflict(&after, "cc").reason, "TypeConflict");
        assert_eq!(a.clusters[&id("cc")].len(), 1);
        // An export created earlier than everyone's wins when it arrives, however late:
        // precedence is creation time, not arrival.
        let mut old = record(0);
        old.service_type = ExportedServiceType::Headless;
        old.ports.clear();
        let agg = aggregate([
            export("aa", &record(1)),
            export("bb", &record(2)),
            export("cc", &old),
        ]);
        assert_eq!(agg.imports[&web()].service_type, ServiceType::Headless);
        assert_eq!(conflict(&agg, "aa").reason, "TypeConflict");
        assert!(conflict(&agg, "aa").message.contains("cluster cc"));
    }

    #[test]
    fn invalid_exports_are_reported_and_not_imported() {
        let mut ext = record(1);
        ext.service_type = ExportedServiceType::ExternalName;
        let agg = aggregate([export("aa", &ext), export("bb", &record(2))]);
        let s = &agg.statuses[&key("aa")];
        let valid = s.condition(ConditionType::Valid).unwrap();
        assert_eq!(
            (valid.status, valid.reason.as_str()),
            (ConditionStatus::False, "InvalidServiceType")
        );
        assert_eq!(
            s.condition(ConditionType::Ready).unwrap().status,
            ConditionStatus::False
        );
        assert!(s.condition(ConditionType::Conflict).is_none());
        // bb's export alone makes the import; the ExternalName neither wins nor conflicts.
        let import = &agg.imports[&web()];
        assert_eq!(import.clusters.keys().collect::<Vec<_>>(), [&id("bb")]);
        assert_eq!(conflict(&agg, "bb").status, ConditionStatus::False);
        // Only ExternalName: no import at all.
        let agg = aggregate([export("aa", &ext)]);
        assert!(agg.imports.is_empty());
    }

    fn fleet(records: Vec<(&str, String, Vec<u8>)>) -> Fleet {
        let mut fleet = Fleet {
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            clusters: BTreeMap::new(),
            records: BTreeMap::new(),
            relays: BTreeMap::new(),
            revision: 1,
        };
        for (i, c) in ["aa", "bb"].into_iter().enumerate() {
            fleet.clusters.insert(
                id(c),
                ClusterRecord {
                    id: id(c),
                    block: block(c),
                    public_key: PublicKey::from_bytes([i as u8 + 1; 32]),
                    endpoint: None,
                    gateway: GatewayState::Up,
                    controller_live: true,
                    joined_at: 1,
                    token_id: "t".into(),
                },
            );
        }
        for (owner, name, value) in records {
            fleet.records.entry(id(owner)).or_default().insert(
                name.clone(),
                MemberRecord {
                    owner: id(owner),
                    name,
                    value,
                    revision: 1,
                },
            );
        }
        fleet
    }

    #[test]
    fn the_fleet_is_read_and_unreadable_records_are_reported() {
        let json = |r: &ExportRecord| serde_json::to_vec(r).unwrap();
        let mut good = record(1);
        good.endpoints = vec![endpoint("100.96.0.4")];
        let mut stolen = record(2);
        // bb claims an address of aa's block.
        stolen.endpoints = vec![endpoint("100.96.0.4")];
        let f = fleet(vec![
            ("aa", export_record_name("shop", "web"), json(&good)),
            ("aa", "gateway".into(), b"{}".to_vec()),
            ("aa", "node/aa-1".into(), b"not json".to_vec()),
            ("aa", "zzz".into(), b"not json".to_vec()),
            (
                "aa",
                export_record_name("shop", "api"),
                b"{\"type\":".to_vec(),
            ),
            ("bb", "export/broken".into(), json(&good)),
            ("bb", export_record_name("shop", "web"), json(&stolen)),
            ("bb", export_record_name("Shop", "web"), json(&good)),
        ]);
        let agg = aggregate_fleet(&f);
        assert_eq!(agg.imports.len(), 1);
        assert_eq!(
            agg.imports[&web()].clusters.keys().collect::<Vec<_>>(),
            [&id("aa")]
        );
        let unreadable: Vec<_> = agg
            .unreadable
            .iter()
            .map(|u| (u.cluster.as_str(), u.record.as_str()))
            .collect();
        assert_eq!(
            unreadable,
            [("aa", "export/shop/api"), ("bb", "export/broken")]
        );
        assert!(agg.unreadable[0].to_string().contains("invalid JSON"));
        let valid = |k: &ExportKey| {
            agg.statuses[k]
                .condition(ConditionType::Valid)
                .unwrap()
                .clone()
        };
        let stolen = valid(&key("bb"));
        assert_eq!(stolen.status, ConditionStatus::False);
        assert!(
            stolen.message.contains("100.96.16.0/20"),
            "{}",
            stolen.message
        );
        let bad_ns = valid(&ExportKey {
            service: ServiceKey::new("Shop", "web"),
            cluster: id("bb"),
        });
        assert_eq!(bad_ns.reason, "InvalidExport");
    }

    fn arb_export() -> impl Strategy<Value = ExportRecord> {
        (
            0u64..4,
            prop::bool::ANY,
            prop::option::of(prop::sample::select(vec![30u32, 60])),
            prop::bool::ANY,
            prop::sample::subsequence(
                vec![
                    ("http", Protocol::Tcp, 80u32),
                    ("http", Protocol::Tcp, 8080),
                    ("web", Protocol::Tcp, 80),
                    ("dns", Protocol::Udp, 53),
                    ("dns", Protocol::Tcp, 53),
                ],
                0..=5,
            ),
            prop::option::of(Just("x".to_string())),
        )
            .prop_map(|(created, headless, affinity, local, ports, label)| {
                let mut r = record(created);
                if headless {
                    r.service_type = ExportedServiceType::Headless;
                }
                if let Some(t) = affinity {
                    r.session_affinity = SessionAffinity::ClientIP { timeout_seconds: t };
                }
                if local {
                    r.internal_traffic_policy = InternalTrafficPolicy::Local;
                }
                // Keep each export valid: unique names and protocol/ports within it.
                let mut names = BTreeSet::new();
                let mut numbers = BTreeSet::new();
                r.ports = ports
                    .into_iter()
                    .filter(|(n, pr, p)| names.insert(*n) && numbers.insert((*pr, *p)))
                    .map(|(n, pr, p)| port(n, pr, p))
                    .collect();
                if r.ports.is_empty() {
                    r.ports = vec![port("http", Protocol::Tcp, 80)];
                }
                if let Some(v) = label {
                    r.labels.insert("l".into(), v);
                }
                r
            })
    }

    proptest! {
        #[test]
        fn aggregation_does_not_depend_on_input_order(
            records in prop::collection::vec(arb_export(), 1..6),
            seed in any::<u64>(),
        ) {
            let clusters = ["aa", "bb", "cc", "dd", "ee", "ff"];
            let exports: Vec<_> = records
                .iter()
                .zip(clusters)
                .map(|(r, c)| export(c, r))
                .collect();
            let forward = aggregate(exports.clone());
            let mut shuffled = exports.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(&aggregate(shuffled), &forward);
            let mut reversed = exports;
            reversed.reverse();
            prop_assert_eq!(&aggregate(reversed), &forward);
            // Every exporter is valid here, so every one has a status and is in the import.
            prop_assert_eq!(forward.statuses.len(), records.len());
            prop_assert_eq!(forward.imports[&web()].clusters.len(), records.len());
        }
    }
}

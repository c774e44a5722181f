//! Imports on the wire: a cluster publishes every service it imports as
//! `import/<namespace>/<name>` ([`ImportRecord`], schema in `fleet-hub-api`) under its own
//! cluster at the hub, after aggregation, VIP allocation and the liveness rule; its own
//! `fleet-dns` (and `fleetctl services`) read them back.
//!
//! - [`import_record`]: a [`ServiceImport`], its VIP and the live clusters → the record (what
//!   the controller publishes);
//! - [`imports_from_records`]: one cluster's records → the imports and VIP table to serve,
//!   **live clusters only**: a `live: false` cluster's endpoints and port backends are dropped,
//!   a port left without a backend is dropped, and an import left without a live cluster is
//!   dropped whole (with its VIP), so it is neither resolved nor routed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use fleet_hub_api::model::{ClusterId, MemberRecord};
use fleet_hub_api::records::{
    ExportedServiceType, IMPORT_RECORD_PREFIX, ImportClusterRecord, ImportPortRecord, ImportRecord,
    parse_service_record_name,
};

use crate::aggregate::{ImportPort, ServiceImport, UnreadableRecord};
use crate::export::{ServiceKey, ServiceType, is_dns_label};
use crate::vip::VipTable;

/// The record a cluster publishes for `import`: its `vip` (ClusterSetIP only; `None` while the
/// VIP range is full) and every exporting cluster, `live: false` unless it is in `live`.
pub fn import_record(
    import: &ServiceImport,
    vip: Option<Ipv4Addr>,
    live: &BTreeSet<ClusterId>,
) -> ImportRecord {
    let (service_type, ips) = match import.service_type {
        ServiceType::ClusterSetIP => (ExportedServiceType::ClusterSetIP, vip.into_iter().collect()),
        ServiceType::Headless => (ExportedServiceType::Headless, Vec::new()),
    };
    ImportRecord {
        service_type,
        ips,
        ports: import
            .ports
            .iter()
            .map(|p| ImportPortRecord {
                name: p.name.clone(),
                protocol: p.protocol,
                port: p.port,
                app_protocol: p.app_protocol.clone(),
                backends: p
                    .backends
                    .iter()
                    .map(|(cluster, port)| (cluster.as_str().to_string(), *port))
                    .collect(),
            })
            .collect(),
        session_affinity: import.session_affinity,
        internal_traffic_policy: import.internal_traffic_policy,
        traffic_distribution: import.traffic_distribution.clone(),
        labels: import.labels.clone(),
        annotations: import.annotations.clone(),
        clusters: import
            .clusters
            .iter()
            .map(|(cluster, endpoints)| ImportClusterRecord {
                cluster: cluster.as_str().to_string(),
                live: live.contains(cluster),
                endpoints: endpoints.clone(),
            })
            .collect(),
    }
}

/// Reads one cluster's `import/<namespace>/<name>` records (other records are skipped) into
/// the imports and the VIP table to serve, keeping only live clusters (see the module docs).
/// What cannot be read — a bad name, invalid JSON, an ExternalName type, a cluster id that is
/// not a DNS label — is returned as unreadable and left out; the rest is served.
pub fn imports_from_records(
    records: &BTreeMap<String, MemberRecord>,
) -> (
    BTreeMap<ServiceKey, ServiceImport>,
    VipTable,
    Vec<UnreadableRecord>,
) {
    let mut imports = BTreeMap::new();
    let mut vips = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (name, record) in records.range(IMPORT_RECORD_PREFIX.to_string()..) {
        if !name.starts_with(IMPORT_RECORD_PREFIX) {
            break;
        }
        let service = parse_service_record_name(IMPORT_RECORD_PREFIX, name)
            .filter(|(ns, svc)| is_dns_label(ns) && is_dns_label(svc))
            .map(|(ns, svc)| ServiceKey::new(ns, svc))
            .ok_or_else(|| "the name is not import/<namespace>/<name> with DNS labels".to_string());
        let parsed = service.and_then(|service| {
            let parsed: ImportRecord =
                serde_json::from_slice(&record.value).map_err(|e| format!("invalid JSON: {e}"))?;
            live_import(service, parsed)
        });
        match parsed {
            Ok(None) => {}
            Ok(Some((import, vip))) => {
                if let Some(vip) = vip {
                    vips.insert(import.service.clone(), vip);
                }
                imports.insert(import.service.clone(), import);
            }
            Err(error) => unreadable.push(UnreadableRecord {
                cluster: record.owner.clone(),
                record: name.clone(),
                error,
            }),
        }
    }
    (imports, VipTable(vips), unreadable)
}

/// The import as served: live clusters only; `None` when no exporting cluster is live.
fn live_import(
    service: ServiceKey,
    record: ImportRecord,
) -> Result<Option<(ServiceImport, Option<Ipv4Addr>)>, String> {
    let service_type = match record.service_type {
        ExportedServiceType::ClusterSetIP => ServiceType::ClusterSetIP,
        ExportedServiceType::Headless => ServiceType::Headless,
        ExportedServiceType::ExternalName => {
            return Err("an ExternalName service is never imported".into());
        }
    };
    let cluster_id =
        |id: &str| ClusterId::new(id).map_err(|_| format!("cluster id {id:?} is not a DNS label"));
    let mut clusters = BTreeMap::new();
    for c in record.clusters {
        let id = cluster_id(&c.cluster)?;
        if c.live {
            clusters.insert(id, c.endpoints);
        }
    }
    let mut ports = Vec::with_capacity(record.ports.len());
    for p in record.ports {
        let mut backends = BTreeMap::new();
        for (cluster, port) in p.backends {
            let id = cluster_id(&cluster)?;
            if clusters.contains_key(&id) {
                backends.insert(id, port);
            }
        }
        // A port only a withdrawn cluster exports leads nowhere: no SRV, no route.
        if !backends.is_empty() {
            ports.push(ImportPort {
                name: p.name,
                protocol: p.protocol,
                port: p.port,
                app_protocol: p.app_protocol,
                backends,
            });
        }
    }
    if clusters.is_empty() {
        return Ok(None);
    }
    let vip = match service_type {
        ServiceType::ClusterSetIP => record.ips.first().copied(),
        ServiceType::Headless => None,
    };
    let import = ServiceImport {
        service,
        service_type,
        ports,
        session_affinity: record.session_affinity,
        internal_traffic_policy: record.internal_traffic_policy,
        traffic_distribution: record.traffic_distribution,
        labels: record.labels,
        annotations: record.annotations,
        clusters,
    };
    Ok(Some((import, vip)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_hub_api::records::{
        EndpointRecord, InternalTrafficPolicy, Protocol, SessionAffinity, import_record_name,
    };

    fn id(c: &str) -> ClusterId {
        ClusterId::new(c).unwrap()
    }

    fn ep(last: u8, hostname: Option<&str>) -> EndpointRecord {
        EndpointRecord {
            ip: Ipv4Addr::new(100, 96, 0, last),
            hostname: hostname.map(str::to_string),
            ready: true,
            serving: true,
            terminating: false,
            node_name: Some("n1".into()),
        }
    }

    fn web(service_type: ServiceType) -> ServiceImport {
        ServiceImport {
            service: ServiceKey::new("shop", "web"),
            service_type,
            ports: vec![
                ImportPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    app_protocol: Some("http".into()),
                    backends: BTreeMap::from([(id("aa"), 8080), (id("bb"), 8081)]),
                },
                ImportPort {
                    name: "metrics".into(),
                    protocol: Protocol::Tcp,
                    port: 9090,
                    app_protocol: None,
                    backends: BTreeMap::from([(id("bb"), 9090)]),
                },
            ],
            session_affinity: SessionAffinity::ClientIP {
                timeout_seconds: 60,
            },
            internal_traffic_policy: InternalTrafficPolicy::Cluster,
            traffic_distribution: Some("PreferClose".into()),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            annotations: BTreeMap::new(),
            clusters: BTreeMap::from([
                (id("aa"), vec![ep(1, Some("web-0")), ep(2, None)]),
                (id("bb"), vec![ep(17, Some("web-0"))]),
            ]),
        }
    }

    fn records(
        owner: &str,
        entries: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> BTreeMap<String, MemberRecord> {
        entries
            .into_iter()
            .enumerate()
            .map(|(i, (name, value))| {
                let record = MemberRecord {
                    owner: id(owner),
                    name: name.clone(),
                    value,
                    revision: i as u64 + 1,
                };
                (name, record)
            })
            .collect()
    }

    fn json(record: &ImportRecord) -> Vec<u8> {
        serde_json::to_vec(record).unwrap()
    }

    #[test]
    fn all_live_round_trips() {
        let vip = Ipv4Addr::new(100, 112, 0, 9);
        let live = BTreeSet::from([id("aa"), id("bb")]);
        for (import, vip) in [
            (web(ServiceType::ClusterSetIP), Some(vip)),
            (web(ServiceType::Headless), None),
        ] {
            let record = import_record(&import, vip, &live);
            assert!(record.clusters.iter().all(|c| c.live));
            let name = import_record_name("shop", "web");
            let (imports, vips, bad) = imports_from_records(&records(
                "cc",
                [(name, json(&record)), ("gateway".into(), b"{}".to_vec())],
            ));
            assert!(bad.is_empty(), "{bad:?}");
            assert_eq!(imports.len(), 1);
            assert_eq!(imports[&import.service], import);
            assert_eq!(vips.get(&import.service), vip);
        }
    }

    #[test]
    fn the_record_has_the_contract_shape() {
        let vip = Ipv4Addr::new(100, 112, 0, 9);
        let record = import_record(
            &web(ServiceType::ClusterSetIP),
            Some(vip),
            &BTreeSet::from([id("bb")]),
        );
        let v = serde_json::to_value(&record).unwrap();
        assert_eq!(v["type"], "ClusterSetIP");
        assert_eq!(v["ips"], serde_json::json!(["100.112.0.9"]));
        assert_eq!(v["ports"][0]["backends"]["aa"], 8080);
        assert_eq!(v["clusters"][0]["cluster"], "aa");
        assert_eq!(v["clusters"][0]["live"], false);
        assert_eq!(v["clusters"][1]["live"], true);
        // A headless import never carries a VIP, even if one is passed.
        let headless = import_record(
            &web(ServiceType::Headless),
            Some(vip),
            &BTreeSet::from([id("bb")]),
        );
        assert!(headless.ips.is_empty());
        assert_eq!(headless.service_type, ExportedServiceType::Headless);
    }

    #[test]
    fn withdrawn_clusters_are_neither_resolved_nor_routed() {
        let import = web(ServiceType::ClusterSetIP);
        let vip = Ipv4Addr::new(100, 112, 0, 9);
        let only_aa = import_record(&import, Some(vip), &BTreeSet::from([id("aa")]));
        let (imports, vips, bad) = imports_from_records(&records(
            "cc",
            [(import_record_name("shop", "web"), json(&only_aa))],
        ));
        assert!(bad.is_empty());
        let served = &imports[&import.service];
        assert_eq!(served.clusters.keys().collect::<Vec<_>>(), vec![&id("aa")]);
        // `metrics` only had bb behind it: gone; `http` keeps aa only.
        assert_eq!(served.ports.len(), 1);
        assert_eq!(served.ports[0].backends, BTreeMap::from([(id("aa"), 8080)]));
        assert_eq!(vips.get(&import.service), Some(vip));

        // No live cluster at all: the service is not served, nor its VIP.
        let none = import_record(&import, Some(vip), &BTreeSet::new());
        let (imports, vips, bad) = imports_from_records(&records(
            "cc",
            [(import_record_name("shop", "web"), json(&none))],
        ));
        assert!(bad.is_empty() && imports.is_empty() && vips.is_empty());
    }

    #[test]
    fn a_clusterset_ip_import_without_a_vip_is_served_without_one() {
        let import = web(ServiceType::ClusterSetIP);
        let live = BTreeSet::from([id("aa"), id("bb")]);
        let record = import_record(&import, None, &live);
        let (imports, vips, _) = imports_from_records(&records(
            "cc",
            [(import_record_name("shop", "web"), json(&record))],
        ));
        assert_eq!(imports.len(), 1);
        assert!(vips.is_empty());
    }

    #[test]
    fn bad_records_are_reported_and_the_rest_served() {
        let live = BTreeSet::from([id("aa"), id("bb")]);
        let good = json(&import_record(&web(ServiceType::Headless), None, &live));
        let mut external = import_record(&web(ServiceType::Headless), None, &live);
        external.service_type = ExportedServiceType::ExternalName;
        let mut bad_cluster = import_record(&web(ServiceType::Headless), None, &live);
        bad_cluster.clusters[0].cluster = "Not A Label".into();
        let mut bad_backend = import_record(&web(ServiceType::Headless), None, &live);
        bad_backend.ports[0].backends.insert("x/y".into(), 1);
        let (imports, _, bad) = imports_from_records(&records(
            "cc",
            [
                ("import/shop/web".to_string(), good.clone()),
                ("import/shop".to_string(), good.clone()),
                ("import/Shop/web".to_string(), good.clone()),
                ("import/a/b/c".to_string(), good),
                ("import/shop/json".to_string(), b"{not json".to_vec()),
                ("import/shop/ext".to_string(), json(&external)),
                ("import/shop/cl".to_string(), json(&bad_cluster)),
                ("import/shop/be".to_string(), json(&bad_backend)),
                ("node/x".to_string(), b"junk".to_vec()),
            ],
        ));
        assert_eq!(
            imports.keys().collect::<Vec<_>>(),
            vec![&ServiceKey::new("shop", "web")]
        );
        let mut names: Vec<&str> = bad.iter().map(|b| b.record.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            vec![
                "import/Shop/web",
                "import/a/b/c",
                "import/shop",
                "import/shop/be",
                "import/shop/cl",
                "import/shop/ext",
                "import/shop/json",
            ]
        );
        assert!(bad.iter().all(|b| b.cluster == id("cc")));
        let json_error = bad.iter().find(|b| b.record == "import/shop/json").unwrap();
        assert!(json_error.error.starts_with("invalid JSON"), "{json_error}");
    }
}

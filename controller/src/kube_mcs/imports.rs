//! ServiceImports and MCS EndpointSlices, pure: the imports this cluster publishes
//! (`import/<ns>/<name>`, after aggregation, VIP allocation and liveness) as the mcs-api
//! objects the controller owns in its own cluster, in namespaces that exist.
//!
//! - a `ServiceImport` per import: `spec.type`, `ports`, `ips` (the VIP) with `ipFamilies`
//!   `[IPv4]`, `sessionAffinity`(+Config), `internalTrafficPolicy`, `trafficDistribution`;
//!   `status.clusters` (every exporting cluster) and `status.conditions[Ready]`;
//! - an `EndpointSlice` per import and **live** source cluster, named
//!   `<service>-fleet-<cluster>`, labelled `multicluster.kubernetes.io/service-name`,
//!   `multicluster.kubernetes.io/source-cluster` and [`SLICE_MANAGER_LABEL`] =
//!   [`SLICE_MANAGER`]: its addresses are the endpoints' **fleet** addresses, its ports the
//!   ports that cluster exports at its target ports.
//!
//! Everything we create carries [`OWNER_LABEL`] = [`OWNER`] (slices also the managed-by
//! label): only such objects are ever changed or deleted.

use std::collections::{BTreeMap, BTreeSet};

use fleet_hub_api::records::{ExportedServiceType, ImportRecord, Protocol, SessionAffinity};
use serde_json::{Value, json};

/// Marks the objects the controller owns.
pub const OWNER_LABEL: &str = "app.kubernetes.io/managed-by";
pub const OWNER: &str = "fleet-controller";
/// EndpointSlice's own "who manages this slice" label and our value.
pub const SLICE_MANAGER_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_MANAGER: &str = "fleetboard.io/controller";
pub const MCS_SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
pub const MCS_SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// EndpointSlice's limit of endpoints per slice.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;

/// (namespace, name) of an object.
pub type ObjectKey = (String, String);

fn protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// A ServiceImport's desired `spec` and `status` (absent optional fields are `null`, so a
/// merge patch removes them).
#[derive(Debug, Clone, PartialEq)]
pub struct ImportObject {
    pub spec: Value,
    pub status: Value,
}

/// What the controller wants in its cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredObjects {
    pub imports: BTreeMap<ObjectKey, ImportObject>,
    /// Slice key → the slice's `labels`, `addressType`, `endpoints`, `ports`.
    pub slices: BTreeMap<ObjectKey, Value>,
    /// Imports left out because their namespace does not exist.
    pub no_namespace: Vec<ObjectKey>,
}

/// The objects for `imports` (by (namespace, name)) in the namespaces that exist.
pub fn desired_objects(
    imports: &BTreeMap<ObjectKey, ImportRecord>,
    namespaces: &BTreeSet<String>,
) -> DesiredObjects {
    let mut out = DesiredObjects::default();
    for ((ns, name), import) in imports {
        let key = (ns.clone(), name.clone());
        if !namespaces.contains(ns) {
            out.no_namespace.push(key);
            continue;
        }
        out.imports.insert(key, import_object(import));
        for cluster in import.clusters.iter().filter(|c| c.live) {
            let slice = slice_object(name, import, &cluster.cluster);
            out.slices
                .insert((ns.clone(), slice_name(name, &cluster.cluster)), slice);
        }
    }
    out
}

/// `<service>-fleet-<cluster>`, cut to the 253 bytes of an object name.
pub fn slice_name(service: &str, cluster: &str) -> String {
    let mut n = format!("{service}-fleet-{cluster}");
    n.truncate(253);
    n
}

fn import_object(import: &ImportRecord) -> ImportObject {
    let (affinity, config) = match import.session_affinity {
        SessionAffinity::None => ("None", Value::Null),
        SessionAffinity::ClientIP { timeout_seconds } => (
            "ClientIP",
            json!({"clientIP": {"timeoutSeconds": timeout_seconds}}),
        ),
    };
    let headless = import.service_type == ExportedServiceType::Headless;
    let ips: Vec<String> = import.ips.iter().map(ToString::to_string).collect();
    let spec = json!({
        "type": if headless { "Headless" } else { "ClusterSetIP" },
        // Inside lists a null is a value, not a removal: leave absent members out.
        "ports": without_nulls(&json!(import.ports.iter().map(|p| json!({
            "name": p.name,
            "protocol": protocol(p.protocol),
            "port": p.port,
            "appProtocol": p.app_protocol,
        })).collect::<Vec<_>>())),
        "ips": if ips.is_empty() { Value::Null } else { json!(ips) },
        "ipFamilies": ["IPv4"],
        "sessionAffinity": affinity,
        "sessionAffinityConfig": config,
        "internalTrafficPolicy": match import.internal_traffic_policy {
            fleet_hub_api::records::InternalTrafficPolicy::Cluster => "Cluster",
            fleet_hub_api::records::InternalTrafficPolicy::Local => "Local",
        },
        "trafficDistribution": import.traffic_distribution,
    });
    let live = import.clusters.iter().any(|c| c.live);
    let (ready, reason, message) = if !headless && import.ips.is_empty() {
        (
            "False",
            "IPUnavailable",
            "no free address in the cluster's VIP range".to_string(),
        )
    } else if !live {
        (
            "False",
            "NoLiveClusters",
            "every exporting cluster is withdrawn (gateway gone or silent)".to_string(),
        )
    } else {
        let n = import.clusters.iter().filter(|c| c.live).count();
        ("True", "Ready", format!("{n} live exporting cluster(s)"))
    };
    let status = json!({
        "clusters": import.clusters.iter().map(|c| json!({"cluster": c.cluster})).collect::<Vec<_>>(),
        "conditions": [{
            "type": "Ready",
            "status": ready,
            "reason": reason,
            "message": message,
        }],
    });
    ImportObject { spec, status }
}

fn slice_object(service: &str, import: &ImportRecord, cluster: &str) -> Value {
    let endpoints: Vec<Value> = import
        .clusters
        .iter()
        .filter(|c| c.cluster == cluster)
        .flat_map(|c| c.endpoints.iter())
        .take(MAX_SLICE_ENDPOINTS)
        .map(|e| {
            json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "hostname": e.hostname,
            })
        })
        .collect();
    let ports: Vec<Value> = import
        .ports
        .iter()
        .filter_map(|p| {
            let target = p.backends.get(cluster)?;
            Some(json!({
                "name": p.name,
                "protocol": protocol(p.protocol),
                "port": target,
                "appProtocol": p.app_protocol,
            }))
        })
        .collect();
    json!({
        // Inside lists a null is a value, not a removal: leave absent members out.
        "endpoints": without_nulls(&json!(endpoints)),
        "ports": without_nulls(&json!(ports)),
        "labels": {
            MCS_SERVICE_NAME_LABEL: service,
            MCS_SOURCE_CLUSTER_LABEL: cluster,
            SLICE_MANAGER_LABEL: SLICE_MANAGER,
            OWNER_LABEL: OWNER,
        },
        "addressType": "IPv4",
    })
}

/// `v` without its `null` members (what the API server stores of a merge patch), to compare
/// a desired object with the stored one.
pub fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// True when `stored` already has every (non-null) member `desired` sets (the API server
/// may add defaults of its own).
pub fn covers(stored: &Value, desired: &Value) -> bool {
    match (stored, desired) {
        // A null member is one a merge patch removes.
        (s, Value::Null) => s.is_null(),
        (Value::Object(s), Value::Object(d)) => d
            .iter()
            .all(|(k, dv)| covers(s.get(k).unwrap_or(&Value::Null), dv)),
        (Value::Array(s), Value::Array(d)) => {
            s.len() == d.len() && s.iter().zip(d).all(|(s, d)| covers(s, d))
        }
        (s, d) => s == d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_hub_api::records::{EndpointRecord, ImportClusterRecord, ImportPortRecord};

    fn endpoint(ip: &str, ready: bool) -> EndpointRecord {
        EndpointRecord {
            ip: ip.parse().unwrap(),
            hostname: Some("web-0".into()),
            ready,
            serving: ready,
            terminating: false,
            node_name: None,
        }
    }

    pub(crate) fn web_import() -> ImportRecord {
        ImportRecord {
            service_type: ExportedServiceType::ClusterSetIP,
            ips: vec!["100.112.0.7".parse().unwrap()],
            ports: vec![
                ImportPortRecord {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    app_protocol: None,
                    backends: BTreeMap::from([("aa".into(), 8080), ("bb".into(), 80)]),
                },
                ImportPortRecord {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    app_protocol: Some("dns".into()),
                    backends: BTreeMap::from([("bb".into(), 5353)]),
                },
            ],
            session_affinity: SessionAffinity::ClientIP {
                timeout_seconds: 60,
            },
            internal_traffic_policy: fleet_hub_api::records::InternalTrafficPolicy::Cluster,
            traffic_distribution: Some("PreferClose".into()),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            clusters: vec![
                ImportClusterRecord {
                    cluster: "aa".into(),
                    live: true,
                    endpoints: vec![endpoint("100.96.0.5", true)],
                },
                ImportClusterRecord {
                    cluster: "bb".into(),
                    live: true,
                    endpoints: vec![endpoint("100.97.0.5", true), endpoint("100.97.0.6", false)],
                },
                ImportClusterRecord {
                    cluster: "cc".into(),
                    live: false,
                    endpoints: vec![endpoint("100.98.0.5", true)],
                },
            ],
        }
    }

    #[test]
    fn an_import_becomes_a_service_import_and_a_slice_per_live_cluster() {
        let imports = BTreeMap::from([
            (("default".to_string(), "web".to_string()), web_import()),
            (("absent".to_string(), "web".to_string()), web_import()),
        ]);
        let out = desired_objects(&imports, &BTreeSet::from(["default".to_string()]));
        assert_eq!(
            out.no_namespace,
            [("absent".to_string(), "web".to_string())]
        );
        let si = &out.imports[&("default".to_string(), "web".to_string())];
        assert_eq!(si.spec["type"], "ClusterSetIP");
        assert_eq!(si.spec["ips"], json!(["100.112.0.7"]));
        assert_eq!(si.spec["ipFamilies"], json!(["IPv4"]));
        assert_eq!(si.spec["sessionAffinity"], "ClientIP");
        assert_eq!(
            si.spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            60
        );
        assert_eq!(si.spec["trafficDistribution"], "PreferClose");
        assert_eq!(si.spec["ports"][1]["protocol"], "UDP");
        assert_eq!(
            si.status["clusters"],
            json!([{"cluster": "aa"}, {"cluster": "bb"}, {"cluster": "cc"}])
        );
        assert_eq!(si.status["conditions"][0]["status"], "True");

        let names: Vec<&str> = out.slices.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["web-fleet-aa", "web-fleet-bb"], "cc is withdrawn");
        let bb = &out.slices[&("default".to_string(), "web-fleet-bb".to_string())];
        assert_eq!(bb["labels"][MCS_SOURCE_CLUSTER_LABEL], "bb");
        assert_eq!(bb["labels"][MCS_SERVICE_NAME_LABEL], "web");
        assert_eq!(bb["labels"][SLICE_MANAGER_LABEL], SLICE_MANAGER);
        assert_eq!(bb["endpoints"][1]["addresses"], json!(["100.97.0.6"]));
        assert_eq!(bb["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(
            bb["ports"],
            json!([{"name": "http", "protocol": "TCP", "port": 80},
                   {"name": "dns", "protocol": "UDP", "port": 5353, "appProtocol": "dns"}])
        );
        let aa = &out.slices[&("default".to_string(), "web-fleet-aa".to_string())];
        assert_eq!(
            aa["ports"].as_array().unwrap().len(),
            1,
            "aa exports http only"
        );
        assert_eq!(aa["ports"][0]["port"], 8080);
    }

    #[test]
    fn ready_condition_and_headless_imports() {
        let mut import = web_import();
        import.ips.clear();
        let o = import_object(&import);
        assert_eq!(o.status["conditions"][0]["reason"], "IPUnavailable");
        assert!(o.spec["ips"].is_null());
        import.service_type = ExportedServiceType::Headless;
        import.session_affinity = SessionAffinity::None;
        let o = import_object(&import);
        assert_eq!(o.spec["type"], "Headless");
        assert!(o.spec["sessionAffinityConfig"].is_null());
        assert_eq!(o.status["conditions"][0]["status"], "True");
        for c in &mut import.clusters {
            c.live = false;
        }
        let o = import_object(&import);
        assert_eq!(o.status["conditions"][0]["reason"], "NoLiveClusters");
    }

    #[test]
    fn stored_objects_cover_what_we_want() {
        let want = json!({"a": 1, "b": null, "c": [{"x": 1, "y": null}]});
        assert!(covers(&json!({"a": 1, "c": [{"x": 1}], "d": 2}), &want));
        assert!(!covers(&json!({"a": 2, "c": [{"x": 1}]}), &want));
        assert!(!covers(&json!({"a": 1, "c": []}), &want));
        assert_eq!(without_nulls(&want), json!({"a": 1, "c": [{"x": 1}]}));
    }
}

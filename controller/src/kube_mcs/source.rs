//! The Kubernetes source of exports, pure: this cluster's `ServiceExport`s with their
//! `Service`s and `EndpointSlice`s become `export/<ns>/<name>` records, the same records the
//! node-first source ([`crate::services::desired_exports`]) makes.
//!
//! Endpoints are the pods' **fleet** addresses, not the slices' primary addresses: each
//! endpoint's `targetRef` Pod (namespace/name) is looked up in the pods the node daemons
//! report (`list_attachments`, which the controller polls anyway). So the fleet address
//! needs no extra API write (no pod annotation to keep current), the node daemons need no
//! API credentials, and a pod whose attachment the NRI daemon repaired is found by name.
//! An endpoint whose pod has no fleet attachment (yet) is left out until it has one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use fleet_hub_api::records::{
    DEFAULT_CLIENT_IP_TIMEOUT_SECONDS, EndpointRecord, ExportPortRecord, ExportRecord,
    ExportedServiceType, InternalTrafficPolicy, Protocol, SessionAffinity, export_record_name,
};
use fleet_services::export::is_dns_label;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{KubeView, ServiceExportObject};
use crate::services::NodePod;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the source made of the cluster's ServiceExports.
#[derive(Debug, Default, PartialEq)]
pub struct KubeExports {
    /// `export/<ns>/<name>` → record, for every ServiceExport whose Service exists.
    pub records: BTreeMap<String, ExportRecord>,
    /// ServiceExports whose Service does not exist: (namespace, name).
    pub without_service: Vec<(String, String)>,
}

/// The export records for `view`'s ServiceExports; endpoints are the fleet addresses of the
/// slices' pods among `pods` that lie in `block`.
pub fn desired_exports(view: &KubeView, pods: &[NodePod], block: Ipv4Network) -> KubeExports {
    let fleet_ips: BTreeMap<(&str, &str), &NodePod> = pods
        .iter()
        .filter(|p| block.contains(p.attachment.address))
        .map(|p| {
            let pod = &p.attachment.pod;
            ((pod.namespace.as_str(), pod.name.as_str()), p)
        })
        .collect();
    let mut out = KubeExports::default();
    for export in &view.service_exports {
        let key = (export.namespace.clone(), export.name.clone());
        let Some(service) = view.services.get(&key) else {
            out.without_service.push(key);
            continue;
        };
        let slices: Vec<&EndpointSlice> = view
            .slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(export.namespace.as_str())
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        == Some(&export.name)
            })
            .collect();
        out.records.insert(
            export_record_name(&export.namespace, &export.name),
            export_record(export, service, &slices, &fleet_ips),
        );
    }
    out
}

fn export_record(
    export: &ServiceExportObject,
    service: &Service,
    slices: &[&EndpointSlice],
    fleet_ips: &BTreeMap<(&str, &str), &NodePod>,
) -> ExportRecord {
    let spec = service.spec.clone().unwrap_or_default();
    let service_type = if spec.type_.as_deref() == Some("ExternalName") {
        ExportedServiceType::ExternalName
    } else if spec.cluster_ip.as_deref() == Some("None") {
        ExportedServiceType::Headless
    } else {
        ExportedServiceType::ClusterSetIP
    };
    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIP {
            timeout_seconds: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_CLIENT_IP_TIMEOUT_SECONDS),
        },
        _ => SessionAffinity::None,
    };
    let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
        Some("Local") => InternalTrafficPolicy::Local,
        _ => InternalTrafficPolicy::Cluster,
    };
    let ports = spec
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| export_port(p, slices))
        .collect();
    let mut endpoints: BTreeMap<Ipv4Addr, EndpointRecord> = BTreeMap::new();
    for e in slices.iter().flat_map(|s| s.endpoints.iter()) {
        let Some(target) = e.target_ref.as_ref() else {
            continue;
        };
        if target.kind.as_deref() != Some("Pod") {
            continue;
        }
        let namespace = target.namespace.as_deref().unwrap_or(&export.namespace);
        let Some(pod) = target
            .name
            .as_deref()
            .and_then(|name| fleet_ips.get(&(namespace, name)))
        else {
            continue;
        };
        let conditions = e.conditions.clone().unwrap_or_default();
        // EndpointSlice semantics: an unknown `ready` counts as ready, an unknown `serving`
        // as `ready`, an unknown `terminating` as not terminating.
        let ready = conditions.ready.unwrap_or(true);
        endpoints
            .entry(pod.attachment.address)
            .or_insert_with(|| EndpointRecord {
                ip: pod.attachment.address,
                hostname: e.hostname.clone().filter(|h| is_dns_label(h)),
                ready,
                serving: conditions.serving.unwrap_or(ready),
                terminating: conditions.terminating.unwrap_or(false),
                node_name: e.node_name.clone().or_else(|| Some(pod.node.clone())),
            });
    }
    ExportRecord {
        service_type,
        ports,
        session_affinity,
        internal_traffic_policy,
        traffic_distribution: spec.traffic_distribution.clone(),
        labels: export.exported_labels.clone(),
        annotations: export.exported_annotations.clone(),
        created_at_ms: export.created_at_ms,
        endpoints: endpoints.into_values().collect(),
    }
}

fn protocol(p: Option<&str>) -> Protocol {
    match p {
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

/// A Service port; its target port is what the EndpointSlices say for the port of that name
/// (the endpoints controller resolved a named `targetPort` per pod), else a numeric
/// `targetPort`, else `null` (the same as `port`).
fn export_port(p: &ServicePort, slices: &[&EndpointSlice]) -> ExportPortRecord {
    let name = p.name.clone().unwrap_or_default();
    let proto = protocol(p.protocol.as_deref());
    let from_slices = slices
        .iter()
        .flat_map(|s| s.ports.as_deref().unwrap_or_default())
        .find(|sp| {
            sp.name.clone().unwrap_or_default() == name && protocol(sp.protocol.as_deref()) == proto
        })
        .and_then(|sp| sp.port)
        .and_then(|port| u32::try_from(port).ok());
    let numeric = match &p.target_port {
        Some(IntOrString::Int(port)) => u32::try_from(*port).ok(),
        _ => None,
    };
    ExportPortRecord {
        name,
        protocol: proto,
        port: u32::try_from(p.port).unwrap_or(0),
        target_port: from_slices.or(numeric),
        app_protocol: p.app_protocol.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    pub(crate) fn pod(node: &str, ns: &str, name: &str, ip: &str) -> NodePod {
        crate::services::tests::pod(node, ns, name, ip, &[])
    }

    pub(crate) fn export(ns: &str, name: &str, created_at_ms: u64) -> ServiceExportObject {
        ServiceExportObject {
            namespace: ns.into(),
            name: name.into(),
            created_at_ms,
            exported_labels: BTreeMap::from([("tier".to_string(), "web".to_string())]),
            exported_annotations: BTreeMap::new(),
            conditions: Vec::new(),
        }
    }

    pub(crate) fn service(ns: &str, name: &str, spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    /// A slice of `service` with `endpoints` as (pod name, primary ip, ready, hostname).
    pub(crate) fn slice(
        ns: &str,
        service: &str,
        ports: serde_json::Value,
        endpoints: &[(&str, &str, Option<bool>, Option<&str>)],
    ) -> EndpointSlice {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(pod, ip, ready, hostname)| {
                json!({
                    "addresses": [ip],
                    "conditions": {"ready": ready},
                    "hostname": hostname,
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod},
                })
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": format!("{service}-abcde"),
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    pub(crate) fn web_view() -> KubeView {
        let web = service(
            "default",
            "web",
            json!({
                "clusterIP": "10.96.0.10",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http-alt", "protocol": "TCP"},
                    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP",
                     "appProtocol": "dns"},
                ],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "internalTrafficPolicy": "Local",
                "trafficDistribution": "PreferClose",
            }),
        );
        KubeView {
            service_exports: vec![export("default", "web", 1_700_000_000_123)],
            services: BTreeMap::from([(("default".into(), "web".into()), web)]),
            slices: vec![slice(
                "default",
                "web",
                json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
                &[
                    ("web-1", "10.244.1.5", Some(true), Some("web-1")),
                    ("web-2", "10.244.1.6", Some(false), None),
                    ("web-3", "10.244.1.7", None, None),
                    ("no-fleet", "10.244.1.8", Some(true), None),
                ],
            )],
            namespaces: BTreeSet::from(["default".to_string()]),
            nodes: BTreeMap::new(),
            ..KubeView::default()
        }
    }

    #[test]
    fn a_service_export_becomes_an_export_at_the_pods_fleet_addresses() {
        let pods = [
            pod("aa-1", "default", "web-1", "100.96.0.5"),
            pod("aa-2", "default", "web-2", "100.96.1.5"),
            pod("aa-2", "default", "web-3", "100.96.1.6"),
            pod("aa-2", "other", "no-fleet", "100.96.1.7"),
        ];
        let out = desired_exports(&web_view(), &pods, "100.96.0.0/16".parse().unwrap());
        assert!(out.without_service.is_empty());
        let r = &out.records["export/default/web"];
        assert_eq!(r.service_type, ExportedServiceType::ClusterSetIP);
        assert_eq!(r.created_at_ms, 1_700_000_000_123);
        assert_eq!(r.labels["tier"], "web");
        assert_eq!(
            r.session_affinity,
            SessionAffinity::ClientIP {
                timeout_seconds: 60
            }
        );
        assert_eq!(r.internal_traffic_policy, InternalTrafficPolicy::Local);
        assert_eq!(r.traffic_distribution.as_deref(), Some("PreferClose"));
        assert_eq!(
            (r.ports[0].port, r.ports[0].target_port),
            (80, Some(8080)),
            "a named targetPort resolved from the slice's port of that name"
        );
        assert_eq!(
            (r.ports[1].protocol, r.ports[1].target_port),
            (Protocol::Udp, Some(5353))
        );
        assert_eq!(r.ports[1].app_protocol.as_deref(), Some("dns"));
        let eps: Vec<(String, bool, Option<&str>)> = r
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.ready, e.hostname.as_deref()))
            .collect();
        assert_eq!(
            eps,
            [
                ("100.96.0.5".to_string(), true, Some("web-1")),
                ("100.96.1.5".to_string(), false, None),
                ("100.96.1.6".to_string(), true, None),
            ],
            "fleet addresses, not the slices' primary ones; a pod of another namespace \
             (no-fleet is in `other`) is not this endpoint; unknown readiness is ready"
        );
        assert_eq!(r.endpoints[0].node_name.as_deref(), Some("aa-1"));
    }

    #[test]
    fn service_types_and_a_missing_service() {
        let mut view = web_view();
        let pods = [];
        let block = "100.96.0.0/16".parse().unwrap();
        let spec = |v| {
            let mut s = view.services[&("default".to_string(), "web".to_string())].clone();
            s.spec = Some(serde_json::from_value(v).unwrap());
            s
        };
        let headless = spec(json!({"clusterIP": "None"}));
        let external = spec(json!({"type": "ExternalName", "externalName": "example.com"}));
        let key = ("default".to_string(), "web".to_string());
        view.services.insert(key.clone(), headless);
        let r = &desired_exports(&view, &pods, block).records["export/default/web"];
        assert_eq!(r.service_type, ExportedServiceType::Headless);
        assert_eq!(r.session_affinity, SessionAffinity::None);
        view.services.insert(key.clone(), external);
        let r = &desired_exports(&view, &pods, block).records["export/default/web"];
        assert_eq!(
            r.service_type,
            ExportedServiceType::ExternalName,
            "published so that aggregation reports Valid=False/InvalidServiceType"
        );
        view.services.clear();
        let out = desired_exports(&view, &pods, block);
        assert!(out.records.is_empty());
        assert_eq!(out.without_service, [key]);
    }
}

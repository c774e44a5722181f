//! The schemas of the records a controller publishes at the hub under its own cluster, in
//! JSON: one `node/<name>` per node (its subnet, so a restarted or standby controller hands out
//! the same ones), `gateway` (tunnel state, refreshed every status interval), one
//! `export/<namespace>/<name>` per exported service (KEP-1645 `ServiceExport`: the service's
//! shape and its endpoints), one `import/<namespace>/<name>` per service it imports (its VIP
//! and the endpoints it routes to) and, for the node-first source, one
//! `serviceexport/<namespace>/<name>` per `fleetctl export`. `fleetctl` reads the first two; service discovery (`fleet-services`,
//! `fleet-dns`) reads the exports. The hub stores them all as opaque bytes. Validation and
//! aggregation of exports live in `fleet-services`, not here: this is only the wire schema.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Record name prefix of the node records.
pub const NODE_RECORD_PREFIX: &str = "node/";
/// Record name of the gateway's status.
pub const GATEWAY_RECORD: &str = "gateway";

pub fn node_record_name(node: &str) -> String {
    format!("{NODE_RECORD_PREFIX}{node}")
}

/// `node/<name>`: the node's subnet of the cluster block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub subnet: Ipv4Network,
    pub underlay_ip: Ipv4Addr,
}

/// `gateway`: who runs the cluster's tunnel and how its peers are doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// The node whose CNF netns holds the WireGuard interface.
    pub node: String,
    /// The active controller's lease holder id.
    pub holder: String,
    /// `kernel` or `userspace`.
    pub backend: String,
    pub public_key: String,
    pub listen_port: u16,
    /// Unix seconds when this record was written.
    pub updated_at: u64,
    pub peers: Vec<GatewayPeerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPeerRecord {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    /// Unix seconds of the last handshake; `null` if none yet.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// `direct` or `relay`: the path the peer's packets take now (absent from older members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Unix seconds since when that path is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_since: Option<u64>,
}

/// Record name prefix of the service exports.
pub const EXPORT_RECORD_PREFIX: &str = "export/";

/// `export/<namespace>/<name>`.
pub fn export_record_name(namespace: &str, name: &str) -> String {
    format!("{EXPORT_RECORD_PREFIX}{namespace}/{name}")
}

/// The `(namespace, name)` of an `export/<namespace>/<name>` record name; `None` for any other
/// record, or an export name without exactly two non-empty parts.
pub fn parse_export_record_name(record: &str) -> Option<(&str, &str)> {
    parse_service_record_name(EXPORT_RECORD_PREFIX, record)
}

/// `export/<namespace>/<name>`: one cluster's export of one service, as the exporting cluster
/// saw it. Field values follow the Kubernetes Service and mcs-api spellings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    #[serde(rename = "type")]
    pub service_type: ExportedServiceType,
    #[serde(default)]
    pub ports: Vec<ExportPortRecord>,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    #[serde(default)]
    pub internal_traffic_policy: InternalTrafficPolicy,
    /// The Service's `trafficDistribution` (e.g. `PreferClose`), if set.
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    /// `ServiceExport.spec.exportedLabels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `ServiceExport.spec.exportedAnnotations`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the `ServiceExport` was created, unix milliseconds: the oldest export wins
    /// conflicts (KEP-1645).
    pub created_at_ms: u64,
    #[serde(default)]
    pub endpoints: Vec<EndpointRecord>,
}

/// The exported Service's type. `ExternalName` may be published but is never imported
/// (`Valid=False`, reason `InvalidServiceType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ExportedServiceType {
    /// A Service with a cluster IP: importers get a ClusterSetIP (a VIP).
    ClusterSetIP,
    /// `clusterIP: None`: importers resolve the endpoints' addresses directly.
    Headless,
    ExternalName,
}

/// One service port of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPortRecord {
    /// A DNS label, or empty when the service has a single port.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// 1-65535 (wider here so an out-of-range value is a validation error, not an unreadable
    /// record).
    pub port: u32,
    /// The port the endpoints listen on (the Service's `targetPort`, resolved by the exporter);
    /// `null` means the same as `port`.
    #[serde(default)]
    pub target_port: Option<u32>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// Kubernetes' default `ClientIP` affinity timeout: 3 hours.
pub const DEFAULT_CLIENT_IP_TIMEOUT_SECONDS: u32 = 10800;

fn default_client_ip_timeout() -> u32 {
    DEFAULT_CLIENT_IP_TIMEOUT_SECONDS
}

/// `sessionAffinity` with its `sessionAffinityConfig`: `{"type":"None"}` or
/// `{"type":"ClientIP","timeout_seconds":10800}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIP {
        #[serde(default = "default_client_ip_timeout")]
        timeout_seconds: u32,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InternalTrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// One endpoint (a pod) of an export, by its fleet address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The pod's fleet IPv4 address (on `eth-fleet`).
    pub ip: Ipv4Addr,
    /// The endpoint's hostname (a DNS label), for headless per-pod names.
    #[serde(default)]
    pub hostname: Option<String>,
    /// EndpointSlice conditions.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(default)]
    pub node_name: Option<String>,
}

/// Record name prefix of the node-first export specs.
pub const SERVICE_EXPORT_RECORD_PREFIX: &str = "serviceexport/";

/// `serviceexport/<namespace>/<name>`.
pub fn service_export_record_name(namespace: &str, name: &str) -> String {
    format!("{SERVICE_EXPORT_RECORD_PREFIX}{namespace}/{name}")
}

/// `serviceexport/<namespace>/<name>`: the node-first source's `ServiceExport` (clusters
/// without a Kubernetes API; written by `fleetctl export`, removed by `fleetctl unexport`).
/// The exporting cluster's controller reads it, finds the pods whose labels match `selector`
/// in `namespace` on its nodes, and publishes `export/<namespace>/<name>` with them as
/// endpoints. Other clusters ignore it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceExportSpec {
    #[serde(rename = "type")]
    pub service_type: ExportedServiceType,
    /// Pods of the namespace whose labels contain all of these are the endpoints (a Service's
    /// `spec.selector`); must not be empty.
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ExportPortRecord>,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the export was first made, unix milliseconds; kept when the spec is changed.
    pub created_at_ms: u64,
}

/// Record name prefix of the imports.
pub const IMPORT_RECORD_PREFIX: &str = "import/";

/// `import/<namespace>/<name>`.
pub fn import_record_name(namespace: &str, name: &str) -> String {
    format!("{IMPORT_RECORD_PREFIX}{namespace}/{name}")
}

/// The `(namespace, name)` of a `<prefix><namespace>/<name>` record name (`export/`,
/// `import/`, `serviceexport/`); `None` for any other record.
pub fn parse_service_record_name<'a>(prefix: &str, record: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = record.strip_prefix(prefix)?;
    let (namespace, name) = rest.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then_some((namespace, name))
}

/// `import/<namespace>/<name>`: a service as the publishing cluster imports it (mcs-api
/// `ServiceImport` and the endpoints it routes to), written by that cluster's active
/// controller after aggregation (KEP-1645), VIP allocation and the liveness rule. Its own
/// `fleet-dns` answers from these records only, and `fleetctl services` lists them; the VIP has
/// local meaning (another cluster's import of the same service has another VIP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecord {
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub service_type: ExportedServiceType,
    /// `spec.ips`: the ClusterSetIP VIP; empty for a headless service, or while the VIP range
    /// has no free address.
    #[serde(default)]
    pub ips: Vec<Ipv4Addr>,
    /// The union of the exports' ports, with the clusters each routes to.
    pub ports: Vec<ImportPortRecord>,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    #[serde(default)]
    pub internal_traffic_policy: InternalTrafficPolicy,
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `status.clusters`: every cluster with a valid export, live or not.
    pub clusters: Vec<ImportClusterRecord>,
}

/// One port of an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportPortRecord {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// Exporting cluster id → the port its endpoints listen on. Traffic to this port goes to
    /// these clusters only.
    pub backends: BTreeMap<String, u16>,
}

/// One exporting cluster of an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportClusterRecord {
    pub cluster: String,
    /// False while the cluster is withdrawn (its gateway gone, or back too recently after
    /// flapping): its endpoints are kept here but neither resolved nor routed to.
    pub live: bool,
    pub endpoints: Vec<EndpointRecord>,
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_the_contract_shape() {
        let n = NodeRecord {
            subnet: "100.96.16.0/24".parse().unwrap(),
            underlay_ip: "198.51.100.11".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"subnet":"100.96.16.0/24","underlay_ip":"198.51.100.11"}"#
        );
        let g = GatewayRecord {
            node: "aa-1".into(),
            holder: "h-1".into(),
            backend: "userspace".into(),
            public_key: "k".into(),
            listen_port: 51820,
            updated_at: 7,
            peers: vec![GatewayPeerRecord {
                public_key: "p".into(),
                endpoint: None,
                last_handshake: None,
                rx_bytes: 1,
                tx_bytes: 2,
                path: Some("relay".into()),
                path_since: Some(5),
            }],
        };
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["listen_port"], 51820);
        assert!(v["peers"][0]["endpoint"].is_null());
        assert!(v["peers"][0]["last_handshake"].is_null());
        assert_eq!(v["peers"][0]["path"], "relay");
        assert_eq!(v["peers"][0]["path_since"], 5);
        assert_eq!(serde_json::from_value::<GatewayRecord>(v).unwrap(), g);
        assert_eq!(node_record_name("aa-1"), "node/aa-1");
    }

    #[test]
    fn export_record_has_the_contract_shape() {
        let e = ExportRecord {
            service_type: ExportedServiceType::ClusterSetIP,
            ports: vec![ExportPortRecord {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: Some(8080),
                app_protocol: None,
            }],
            session_affinity: SessionAffinity::ClientIP {
                timeout_seconds: 60,
            },
            internal_traffic_policy: InternalTrafficPolicy::Cluster,
            traffic_distribution: Some("PreferClose".into()),
            labels: [("app".to_string(), "web".to_string())].into(),
            annotations: BTreeMap::new(),
            created_at_ms: 1_700_000_000_000,
            endpoints: vec![EndpointRecord {
                ip: "100.96.16.7".parse().unwrap(),
                hostname: Some("web-0".into()),
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some("aa-1".into()),
            }],
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "ClusterSetIP");
        assert_eq!(v["ports"][0]["protocol"], "TCP");
        assert_eq!(v["ports"][0]["target_port"], 8080);
        assert_eq!(
            v["session_affinity"],
            serde_json::json!({"type": "ClientIP", "timeout_seconds": 60})
        );
        assert_eq!(v["internal_traffic_policy"], "Cluster");
        assert_eq!(v["endpoints"][0]["ip"], "100.96.16.7");
        assert_eq!(serde_json::from_value::<ExportRecord>(v).unwrap(), e);

        // The smallest export a member may publish: defaults as Kubernetes has them.
        let min: ExportRecord =
            serde_json::from_str(r#"{"type":"Headless","created_at_ms":5}"#).unwrap();
        assert_eq!(min.session_affinity, SessionAffinity::None);
        assert_eq!(min.internal_traffic_policy, InternalTrafficPolicy::Cluster);
        assert!(min.ports.is_empty() && min.endpoints.is_empty());
        let affinity: SessionAffinity = serde_json::from_str(r#"{"type":"ClientIP"}"#).unwrap();
        assert_eq!(
            affinity,
            SessionAffinity::ClientIP {
                timeout_seconds: DEFAULT_CLIENT_IP_TIMEOUT_SECONDS
            }
        );
        let port: ExportPortRecord = serde_json::from_str(r#"{"port":53}"#).unwrap();
        assert_eq!((port.protocol, port.name.as_str()), (Protocol::Tcp, ""));

        assert_eq!(export_record_name("shop", "web"), "export/shop/web");
        assert_eq!(
            parse_export_record_name("export/shop/web"),
            Some(("shop", "web"))
        );
        for not_an_export in [
            "gateway",
            "node/x",
            "export/shop",
            "export//web",
            "export/a/b/c",
        ] {
            assert_eq!(
                parse_export_record_name(not_an_export),
                None,
                "{not_an_export}"
            );
        }
    }
}

//! One export: what one cluster says about one service it exports (KEP-1645 `ServiceExport`
//! plus the Service and endpoints behind it). Members publish it at the hub as the record
//! `export/<namespace>/<name>` ([`ExportRecord`], the wire schema, lives in `fleet-hub-api` so
//! `fleet-dns` can read it without this crate); here it is validated into an [`Export`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use fleet_hub_api::model::ClusterId;
pub use fleet_hub_api::records::{
    DEFAULT_CLIENT_IP_TIMEOUT_SECONDS, EndpointRecord as Endpoint, ExportPortRecord, ExportRecord,
    ExportedServiceType, InternalTrafficPolicy, Protocol, SessionAffinity,
};
use ipnetwork::Ipv4Network;

/// The longest `ClientIP` affinity timeout Kubernetes accepts: one day.
pub const MAX_CLIENT_IP_TIMEOUT_SECONDS: u32 = 86400;

/// A service across the fleet: `<name>.<namespace>.svc.clusterset.local`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One cluster's export of one service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExportKey {
    pub service: ServiceKey,
    pub cluster: ClusterId,
}

impl fmt::Display for ExportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from cluster {}", self.service, self.cluster)
    }
}

/// The type of an importable service (ExternalName is not importable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceType {
    ClusterSetIP,
    Headless,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceType::ClusterSetIP => "ClusterSetIP",
            ServiceType::Headless => "Headless",
        })
    }
}

/// A validated service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    /// A DNS label, or empty (only when it is the export's single port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Where this cluster's endpoints listen.
    pub target_port: u16,
    pub app_protocol: Option<String>,
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {}/{}",
            self.name,
            protocol_str(self.protocol),
            self.port
        )?;
        if let Some(app) = &self.app_protocol {
            write!(f, " ({app})")?;
        }
        Ok(())
    }
}

pub fn protocol_str(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// A validated export of one service by one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub key: ExportKey,
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    pub session_affinity: SessionAffinity,
    pub internal_traffic_policy: InternalTrafficPolicy,
    pub traffic_distribution: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Unix milliseconds; the oldest export wins conflicts.
    pub created_at_ms: u64,
    pub endpoints: Vec<Endpoint>,
}

/// Why an export is not valid. [`ExportError::reason`] is the `Valid=False` condition's reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error(
        "ExternalName services cannot be exported (KEP-1645): export a ClusterIP or headless \
         Service instead"
    )]
    InvalidServiceType,
    #[error("invalid namespace {0:?}: use a DNS label (lowercase letters, digits, '-', 1-63)")]
    InvalidNamespace(String),
    #[error("invalid service name {0:?}: use a DNS label (lowercase letters, digits, '-', 1-63)")]
    InvalidName(String),
    #[error("a ClusterSetIP export needs at least one port")]
    NoPorts,
    #[error("port {0} is out of range: use 1-65535")]
    InvalidPort(u32),
    #[error("target port {target} of port {port} is out of range: use 1-65535")]
    InvalidTargetPort { port: u32, target: u32 },
    #[error("invalid port name {0:?}: use a DNS label (lowercase letters, digits, '-', 1-63)")]
    InvalidPortName(String),
    #[error("port {0} has no name: every port must be named when there are several")]
    UnnamedPort(u32),
    #[error("port name {0:?} is used twice: port names must be unique")]
    DuplicatePortName(String),
    #[error("port {}/{} is listed twice: protocol and port must be unique", protocol_str(*.0), .1)]
    DuplicatePort(Protocol, u32),
    #[error("port {0} has an empty appProtocol: leave it out instead")]
    EmptyAppProtocol(u32),
    #[error(
        "ClientIP session affinity timeout {0}s is out of range: use 1-{MAX_CLIENT_IP_TIMEOUT_SECONDS}"
    )]
    InvalidAffinityTimeout(u32),
    #[error("trafficDistribution is empty: leave it out instead")]
    EmptyTrafficDistribution,
    #[error(
        "endpoint {ip} is outside {allowed}, the exporting cluster's addresses: export only its \
         own pods' fleet addresses"
    )]
    EndpointOutsideCluster { ip: Ipv4Addr, allowed: Ipv4Network },
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(Ipv4Addr),
    #[error("endpoint {ip} has an invalid hostname {hostname:?}: use a DNS label")]
    InvalidHostname { ip: Ipv4Addr, hostname: String },
}

impl ExportError {
    /// The `Valid=False` reason: mcs-api's `InvalidServiceType` for ExternalName, our own
    /// `InvalidExport` for everything else (mcs-api allows implementation reasons).
    pub fn reason(&self) -> &'static str {
        match self {
            ExportError::InvalidServiceType => "InvalidServiceType",
            _ => "InvalidExport",
        }
    }
}

/// RFC 1123 label: `[a-z0-9-]`, 1-63, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn port_u16(port: u32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

impl Export {
    /// Validates `cluster`'s record of `namespace/name`. Endpoints must lie in `own_addresses`
    /// (the cluster's block of the fleet CIDR), so a member cannot attract another cluster's
    /// traffic.
    pub fn validate(
        cluster: ClusterId,
        namespace: &str,
        name: &str,
        record: &ExportRecord,
        own_addresses: Ipv4Network,
    ) -> Result<Export, ExportError> {
        if !is_dns_label(namespace) {
            return Err(ExportError::InvalidNamespace(namespace.into()));
        }
        if !is_dns_label(name) {
            return Err(ExportError::InvalidName(name.into()));
        }
        let service_type = match record.service_type {
            ExportedServiceType::ClusterSetIP => ServiceType::ClusterSetIP,
            ExportedServiceType::Headless => ServiceType::Headless,
            ExportedServiceType::ExternalName => return Err(ExportError::InvalidServiceType),
        };
        let ports = validate_ports(&record.ports)?;
        if service_type == ServiceType::ClusterSetIP && ports.is_empty() {
            return Err(ExportError::NoPorts);
        }
        if let SessionAffinity::ClientIP { timeout_seconds } = record.session_affinity
            && !(1..=MAX_CLIENT_IP_TIMEOUT_SECONDS).contains(&timeout_seconds)
        {
            return Err(ExportError::InvalidAffinityTimeout(timeout_seconds));
        }
        if record.traffic_distribution.as_deref() == Some("") {
            return Err(ExportError::EmptyTrafficDistribution);
        }
        let mut seen = BTreeSet::new();
        for e in &record.endpoints {
            if !own_addresses.contains(e.ip) {
                return Err(ExportError::EndpointOutsideCluster {
                    ip: e.ip,
                    allowed: own_addresses,
                });
            }
            if !seen.insert(e.ip) {
                return Err(ExportError::DuplicateEndpoint(e.ip));
            }
            if let Some(h) = &e.hostname
                && !is_dns_label(h)
            {
                return Err(ExportError::InvalidHostname {
                    ip: e.ip,
                    hostname: h.clone(),
                });
            }
        }
        let mut endpoints = record.endpoints.clone();
        endpoints.sort_by_key(|e| e.ip);
        Ok(Export {
            key: ExportKey {
                service: ServiceKey::new(namespace, name),
                cluster,
            },
            service_type,
            ports,
            session_affinity: record.session_affinity,
            internal_traffic_policy: record.internal_traffic_policy,
            traffic_distribution: record.traffic_distribution.clone(),
            labels: record.labels.clone(),
            annotations: record.annotations.clone(),
            created_at_ms: record.created_at_ms,
            endpoints,
        })
    }

    /// The record the exporting cluster publishes for this export.
    pub fn to_record(&self) -> ExportRecord {
        ExportRecord {
            service_type: match self.service_type {
                ServiceType::ClusterSetIP => ExportedServiceType::ClusterSetIP,
                ServiceType::Headless => ExportedServiceType::Headless,
            },
            ports: self
                .ports
                .iter()
                .map(|p| ExportPortRecord {
                    name: p.name.clone(),
                    protocol: p.protocol,
                    port: p.port.into(),
                    target_port: Some(p.target_port.into()),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            session_affinity: self.session_affinity,
            internal_traffic_policy: self.internal_traffic_policy,
            traffic_distribution: self.traffic_distribution.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            created_at_ms: self.created_at_ms,
            endpoints: self.endpoints.clone(),
        }
    }

    /// KEP-1645 precedence: the oldest export first, ties broken by cluster id.
    pub fn precedence(&self) -> (u64, &ClusterId) {
        (self.created_at_ms, &self.key.cluster)
    }
}

fn validate_ports(ports: &[ExportPortRecord]) -> Result<Vec<ServicePort>, ExportError> {
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        let port = port_u16(p.port).ok_or(ExportError::InvalidPort(p.port))?;
        let target = p.target_port.unwrap_or(p.port);
        let target_port = port_u16(target).ok_or(ExportError::InvalidTargetPort {
            port: p.port,
            target,
        })?;
        if p.name.is_empty() {
            if ports.len() > 1 {
                return Err(ExportError::UnnamedPort(p.port));
            }
        } else if !is_dns_label(&p.name) {
            return Err(ExportError::InvalidPortName(p.name.clone()));
        }
        if !names.insert(p.name.as_str()) {
            return Err(ExportError::DuplicatePortName(p.name.clone()));
        }
        if !numbers.insert((p.protocol, p.port)) {
            return Err(ExportError::DuplicatePort(p.protocol, p.port));
        }
        if p.app_protocol.as_deref() == Some("") {
            return Err(ExportError::EmptyAppProtocol(p.port));
        }
        out.push(ServicePort {
            name: p.name.clone(),
            protocol: p.protocol,
            port,
            target_port,
            app_protocol: p.app_protocol.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn port(name: &str, protocol: Protocol, port: u32) -> ExportPortRecord {
        ExportPortRecord {
            name: name.into(),
            protocol,
            port,
            target_port: None,
            app_protocol: None,
        }
    }

    pub fn endpoint(ip: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            hostname: None,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
        }
    }

    pub fn record(created_at_ms: u64) -> ExportRecord {
        ExportRecord {
            service_type: ExportedServiceType::ClusterSetIP,
            ports: vec![port("http", Protocol::Tcp, 80)],
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: InternalTrafficPolicy::Cluster,
            traffic_distribution: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            created_at_ms,
            endpoints: vec![],
        }
    }

    fn aa() -> ClusterId {
        ClusterId::new("aa").unwrap()
    }

    fn block() -> Ipv4Network {
        "100.96.0.0/20".parse().unwrap()
    }

    fn check(r: &ExportRecord) -> Result<Export, ExportError> {
        Export::validate(aa(), "shop", "web", r, block())
    }

    #[test]
    fn a_valid_export_keeps_its_shape_and_round_trips_to_its_record() {
        let mut r = record(7);
        r.ports = vec![
            ExportPortRecord {
                target_port: Some(8080),
                app_protocol: Some("http".into()),
                ..port("http", Protocol::Tcp, 80)
            },
            port("dns", Protocol::Udp, 53),
        ];
        r.endpoints = vec![endpoint("100.96.1.9"), endpoint("100.96.1.3")];
        let e = check(&r).unwrap();
        assert_eq!(e.key.service, ServiceKey::new("shop", "web"));
        assert_eq!(e.service_type, ServiceType::ClusterSetIP);
        assert_eq!((e.ports[0].port, e.ports[0].target_port), (80, 8080));
        // No target port: the endpoints listen on the service port.
        assert_eq!(e.ports[1].target_port, 53);
        // Endpoints in address order, whatever the exporter's order.
        assert_eq!(e.endpoints[0].ip, "100.96.1.3".parse::<Ipv4Addr>().unwrap());
        let again = check(&e.to_record()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn external_name_is_not_valid_with_the_mcs_api_reason() {
        let mut r = record(1);
        r.service_type = ExportedServiceType::ExternalName;
        let err = check(&r).unwrap_err();
        assert_eq!(err, ExportError::InvalidServiceType);
        assert_eq!(err.reason(), "InvalidServiceType");
        assert!(err.to_string().contains("ExternalName"));
    }

    #[test]
    fn names_must_be_dns_labels() {
        let r = record(1);
        for bad in ["", "Web", "-web", "web-", "we_b", &"a".repeat(64)] {
            assert_eq!(
                Export::validate(aa(), bad, "web", &r, block()),
                Err(ExportError::InvalidNamespace(bad.into()))
            );
            assert_eq!(
                Export::validate(aa(), "shop", bad, &r, block()),
                Err(ExportError::InvalidName(bad.into()))
            );
        }
        assert!(Export::validate(aa(), "a", &"b".repeat(63), &r, block()).is_ok());
    }

    #[test]
    fn ports_are_checked() {
        let cases: Vec<(Vec<ExportPortRecord>, ExportError)> = vec![
            (
                vec![port("http", Protocol::Tcp, 0)],
                ExportError::InvalidPort(0),
            ),
            (
                vec![port("http", Protocol::Tcp, 65536)],
                ExportError::InvalidPort(65536),
            ),
            (
                vec![ExportPortRecord {
                    target_port: Some(70000),
                    ..port("http", Protocol::Tcp, 80)
                }],
                ExportError::InvalidTargetPort {
                    port: 80,
                    target: 70000,
                },
            ),
            (
                vec![port("HTTP", Protocol::Tcp, 80)],
                ExportError::InvalidPortName("HTTP".into()),
            ),
            (
                vec![port("", Protocol::Tcp, 80), port("b", Protocol::Tcp, 81)],
                ExportError::UnnamedPort(80),
            ),
            (
                vec![port("a", Protocol::Tcp, 80), port("a", Protocol::Udp, 81)],
                ExportError::DuplicatePortName("a".into()),
            ),
            (
                vec![port("a", Protocol::Tcp, 80), port("b", Protocol::Tcp, 80)],
                ExportError::DuplicatePort(Protocol::Tcp, 80),
            ),
            (
                vec![ExportPortRecord {
                    app_protocol: Some(String::new()),
                    ..port("a", Protocol::Tcp, 80)
                }],
                ExportError::EmptyAppProtocol(80),
            ),
            (vec![], ExportError::NoPorts),
        ];
        for (ports, want) in cases {
            let mut r = record(1);
            r.ports = ports;
            assert_eq!(check(&r), Err(want.clone()), "{want}");
            assert_eq!(want.reason(), "InvalidExport");
        }
        // The same port number on two protocols is fine; so is a single unnamed port, and
        // a headless export without ports.
        let mut r = record(1);
        r.ports = vec![port("a", Protocol::Tcp, 53), port("b", Protocol::Udp, 53)];
        assert!(check(&r).is_ok());
        r.ports = vec![port("", Protocol::Sctp, 65535)];
        assert!(check(&r).is_ok());
        r.ports.clear();
        r.service_type = ExportedServiceType::Headless;
        assert!(check(&r).is_ok());
    }

    #[test]
    fn affinity_distribution_and_endpoints_are_checked() {
        let mut r = record(1);
        for bad in [0, MAX_CLIENT_IP_TIMEOUT_SECONDS + 1] {
            r.session_affinity = SessionAffinity::ClientIP {
                timeout_seconds: bad,
            };
            assert_eq!(check(&r), Err(ExportError::InvalidAffinityTimeout(bad)));
        }
        r.session_affinity = SessionAffinity::ClientIP {
            timeout_seconds: DEFAULT_CLIENT_IP_TIMEOUT_SECONDS,
        };
        assert!(check(&r).is_ok());

        r.traffic_distribution = Some(String::new());
        assert_eq!(check(&r), Err(ExportError::EmptyTrafficDistribution));
        r.traffic_distribution = Some("PreferClose".into());

        r.endpoints = vec![endpoint("100.96.16.1")];
        assert_eq!(
            check(&r),
            Err(ExportError::EndpointOutsideCluster {
                ip: "100.96.16.1".parse().unwrap(),
                allowed: block()
            })
        );
        r.endpoints = vec![endpoint("100.96.1.1"), endpoint("100.96.1.1")];
        assert_eq!(
            check(&r),
            Err(ExportError::DuplicateEndpoint(
                "100.96.1.1".parse().unwrap()
            ))
        );
        r.endpoints = vec![Endpoint {
            hostname: Some("Web_0".into()),
            ..endpoint("100.96.1.1")
        }];
        assert!(matches!(
            check(&r),
            Err(ExportError::InvalidHostname { .. })
        ));
    }
}

//! `fleetctl export`, `unexport` and `services`: the node-first source's `ServiceExport`
//! (a `serviceexport/<namespace>/<name>` record of the caller's cluster; its controller
//! finds the endpoints) and the fleet's exports and imports with their KEP-1645 conditions.
//! Pure: parsing, validation and rendering; the binary does the hub calls.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;

use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::model::FleetView;
use fleet_hub_api::records::{
    ExportPortRecord, ExportRecord, ExportedServiceType, IMPORT_RECORD_PREFIX, ImportRecord,
    InternalTrafficPolicy, Protocol, SERVICE_EXPORT_RECORD_PREFIX, ServiceExportSpec,
    SessionAffinity, parse_service_record_name,
};
use fleet_services::aggregate::{ConditionStatus, ConditionType};
use fleet_services::aggregate_fleet;
use fleet_services::export::{Export, is_dns_label};
use serde::Serialize;

/// A bad `fleetctl export` argument.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExportArgError {
    #[error(
        "--port {0:?}: expected [name:]protocol:port[:targetPort], e.g. http:tcp:80 or http:tcp:80:8080 (protocol tcp, udp or sctp; ports 1-65535)"
    )]
    Port(String),
    #[error("--selector {0:?}: expected key=value[,key=value...], e.g. app=web")]
    Selector(String),
    #[error("--selector is required: the endpoints are the namespace's pods whose labels match it")]
    NoSelector,
    #[error("at least one --port is required for a ClusterSetIP service (or pass --headless)")]
    NoPorts,
    #[error("--selector gives the key {0:?} twice with different values: give each key once")]
    SelectorKeyTwice(String),
    #[error(
        "--client-ip-affinity needs a ClusterSetIP service: a headless service has no VIP to keep a client on (drop --headless or the affinity)"
    )]
    AffinityWithoutVip,
    #[error("{0}")]
    Invalid(String),
}

fn protocol(s: &str) -> Option<Protocol> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn port_number(s: &str) -> Option<u32> {
    s.parse::<u16>().ok().filter(|p| *p != 0).map(u32::from)
}

/// `[name:]protocol:port[:targetPort]`.
pub fn parse_port(text: &str) -> Result<ExportPortRecord, ExportArgError> {
    let bad = || ExportArgError::Port(text.to_string());
    let parts: Vec<&str> = text.split(':').collect();
    // The protocol is the first part that is one, so an unnamed port needs no leading colon.
    let (name, rest) = match parts.as_slice() {
        [first, rest @ ..] if protocol(first).is_some() => ("", rest.to_vec()),
        [name, rest @ ..] => (*name, rest.to_vec()),
        [] => return Err(bad()),
    };
    let (proto, numbers) = if name.is_empty() {
        (parts[0], rest)
    } else {
        let (p, n) = rest.split_first().ok_or_else(bad)?;
        (*p, n.to_vec())
    };
    let protocol = protocol(proto).ok_or_else(bad)?;
    let (port, target_port) = match numbers.as_slice() {
        [p] => (port_number(p).ok_or_else(bad)?, None),
        [p, t] => (
            port_number(p).ok_or_else(bad)?,
            Some(port_number(t).ok_or_else(bad)?),
        ),
        _ => return Err(bad()),
    };
    // A Kubernetes port name (IANA_SVC_NAME): a DNS label of at most 15 characters.
    if !name.is_empty() && (!is_dns_label(name) || name.len() > 15) {
        return Err(bad());
    }
    Ok(ExportPortRecord {
        name: name.to_string(),
        protocol,
        port,
        target_port,
        app_protocol: None,
    })
}

/// A label key or value as Kubernetes allows them (a key may carry a `prefix/`).
fn is_label_part(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn is_label_key(s: &str) -> bool {
    let name = match s.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(is_dns_label) {
                return false;
            }
            name
        }
        None => s,
    };
    !name.is_empty() && is_label_part(name)
}

/// `key=value[,key=value...]`, each repeated flag adding to the others.
pub fn parse_selector(items: &[String]) -> Result<BTreeMap<String, String>, ExportArgError> {
    let mut out = BTreeMap::new();
    for item in items {
        for pair in item.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| ExportArgError::Selector(item.clone()))?;
            if !is_label_key(k) || !is_label_part(v) {
                return Err(ExportArgError::Selector(item.clone()));
            }
            if let Some(old) = out.insert(k.to_string(), v.to_string())
                && old != v
            {
                return Err(ExportArgError::SelectorKeyTwice(k.to_string()));
            }
        }
    }
    if out.is_empty() {
        return Err(ExportArgError::NoSelector);
    }
    Ok(out)
}

/// What `fleetctl export` was given.
#[derive(Clone, Debug, Default)]
pub struct ExportArgs {
    pub namespace: String,
    pub name: String,
    pub selector: Vec<String>,
    pub ports: Vec<String>,
    pub headless: bool,
    /// `ClientIP` affinity with this timeout, seconds.
    pub client_ip_affinity: Option<u32>,
}

/// The spec `fleetctl export` publishes, checked the way every importer will check the export
/// (names, ports, affinity timeout). `created_at_ms` is kept from an earlier spec of the same
/// service (the oldest export wins conflicts, KEP-1645).
pub fn export_spec(
    args: &ExportArgs,
    created_at_ms: u64,
) -> Result<ServiceExportSpec, ExportArgError> {
    let selector = parse_selector(&args.selector)?;
    let ports = args
        .ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>, _>>()?;
    if ports.is_empty() && !args.headless {
        return Err(ExportArgError::NoPorts);
    }
    if args.headless && args.client_ip_affinity.is_some() {
        return Err(ExportArgError::AffinityWithoutVip);
    }
    let spec = ServiceExportSpec {
        service_type: if args.headless {
            ExportedServiceType::Headless
        } else {
            ExportedServiceType::ClusterSetIP
        },
        selector,
        ports,
        session_affinity: match args.client_ip_affinity {
            Some(timeout_seconds) => SessionAffinity::ClientIP { timeout_seconds },
            None => SessionAffinity::None,
        },
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        created_at_ms,
    };
    // The export its controller will publish, without endpoints: the same checks.
    let probe = ExportRecord {
        service_type: spec.service_type,
        ports: spec.ports.clone(),
        session_affinity: spec.session_affinity,
        internal_traffic_policy: InternalTrafficPolicy::Cluster,
        traffic_distribution: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        created_at_ms,
        endpoints: Vec::new(),
    };
    let any = ClusterId::new("probe").expect("a valid id");
    Export::validate(
        any,
        &args.namespace,
        &args.name,
        &probe,
        "0.0.0.0/0".parse().expect("a network"),
    )
    .map_err(|e| ExportArgError::Invalid(format!("{}/{}: {e}", args.namespace, args.name)))?;
    Ok(spec)
}

#[derive(Debug, Serialize)]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct ExportView {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    /// `node-first` when a `fleetctl export` spec drives it.
    pub source: String,
    pub endpoints: usize,
    pub ready_endpoints: usize,
    pub conditions: Vec<ConditionView>,
}

#[derive(Debug, Serialize)]
pub struct ImportClusterView {
    pub cluster: String,
    pub live: bool,
    pub ready_endpoints: usize,
}

#[derive(Debug, Serialize)]
pub struct ImportView {
    /// The importing cluster.
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub vip: Option<Ipv4Addr>,
    /// `name protocol/port` each.
    pub ports: Vec<String>,
    pub clusters: Vec<ImportClusterView>,
}

#[derive(Debug, Serialize)]
pub struct ServicesView {
    pub exports: Vec<ExportView>,
    pub imports: Vec<ImportView>,
    /// Records that could not be read, one line each.
    pub problems: Vec<String>,
}

fn condition_type(t: ConditionType) -> &'static str {
    match t {
        ConditionType::Valid => "Valid",
        ConditionType::Conflict => "Conflict",
        ConditionType::Ready => "Ready",
    }
}

fn condition_status(s: ConditionStatus) -> &'static str {
    match s {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
}

/// What `fleetctl export --wait` says on stderr when the export converged with no endpoint:
/// most often the selector matches no pod (a typo, or the pods are not running yet).
pub fn no_endpoints_warning(
    cluster: &ClusterId,
    namespace: &str,
    name: &str,
    selector: &[String],
) -> String {
    format!(
        "fleetctl: warning: cluster {cluster}'s controller published {namespace}/{name} with 0 \
         endpoints: no running pod in namespace {namespace} has the labels {}; check \
         --selector against the pods' labels for a typo, and that the pods run. The export \
         stays, and takes the pods as soon as they match",
        selector.join(",")
    )
}

/// What `fleetctl export --wait` waits for: the cluster's controller has published
/// `export/<namespace>/<name>` for exactly this spec (type, ports, affinity, labels,
/// annotations and creation time as the spec says). Then the endpoints it found, and how many
/// are ready.
pub fn export_converged(
    view: &FleetView,
    cluster: &ClusterId,
    namespace: &str,
    name: &str,
    spec: &ServiceExportSpec,
) -> Option<(usize, usize)> {
    let record = fleet_hub_api::records::export_record_name(namespace, name);
    let published = view
        .records
        .iter()
        .find(|r| &r.owner == cluster && r.name == record)
        .and_then(|r| serde_json::from_slice::<ExportRecord>(&r.value).ok())?;
    (published.service_type == spec.service_type
        && published.ports == spec.ports
        && published.session_affinity == spec.session_affinity
        && published.labels == spec.labels
        && published.annotations == spec.annotations
        && published.created_at_ms == spec.created_at_ms)
        .then(|| {
            (
                published.endpoints.len(),
                published.endpoints.iter().filter(|e| e.ready).count(),
            )
        })
}

/// Every export with its conditions (KEP-1645 aggregation over the whole listing, the same
/// every controller computes) and every cluster's imports.
pub fn services_view(view: &FleetView) -> ServicesView {
    let fleet = Fleet::from(view.clone());
    let aggregation = aggregate_fleet(&fleet);
    let mut problems: Vec<String> = aggregation
        .unreadable
        .iter()
        .map(ToString::to_string)
        .collect();
    let exports = aggregation
        .statuses
        .iter()
        .map(|(key, status)| {
            let record = fleet
                .record(
                    &key.cluster,
                    &fleet_hub_api::records::export_record_name(
                        &key.service.namespace,
                        &key.service.name,
                    ),
                )
                .and_then(|r| serde_json::from_slice::<ExportRecord>(&r.value).ok());
            let spec_name = format!(
                "{SERVICE_EXPORT_RECORD_PREFIX}{}/{}",
                key.service.namespace, key.service.name
            );
            let (endpoints, ready) = record.as_ref().map_or((0, 0), |r| {
                (
                    r.endpoints.len(),
                    r.endpoints.iter().filter(|e| e.ready).count(),
                )
            });
            ExportView {
                cluster: key.cluster.to_string(),
                namespace: key.service.namespace.clone(),
                name: key.service.name.clone(),
                source: if fleet.record(&key.cluster, &spec_name).is_some() {
                    "node-first".into()
                } else {
                    "kubernetes".into()
                },
                endpoints,
                ready_endpoints: ready,
                conditions: status
                    .conditions
                    .iter()
                    .map(|c| ConditionView {
                        type_: condition_type(c.type_).into(),
                        status: condition_status(c.status).into(),
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                    })
                    .collect(),
            }
        })
        .collect();
    let mut imports = Vec::new();
    for (owner, records) in &fleet.records {
        for r in records.values() {
            let Some((namespace, name)) = parse_service_record_name(IMPORT_RECORD_PREFIX, &r.name)
            else {
                continue;
            };
            let import: ImportRecord = match serde_json::from_slice(&r.value) {
                Ok(i) => i,
                Err(e) => {
                    problems.push(format!("cluster {owner}'s record {}: {e}", r.name));
                    continue;
                }
            };
            imports.push(ImportView {
                cluster: owner.to_string(),
                namespace: namespace.into(),
                name: name.into(),
                type_: format!("{:?}", import.service_type),
                vip: import.ips.first().copied(),
                ports: import
                    .ports
                    .iter()
                    .map(|p| {
                        let proto = fleet_services::export::protocol_str(p.protocol);
                        if p.name.is_empty() {
                            format!("{proto}/{}", p.port)
                        } else {
                            format!("{} {proto}/{}", p.name, p.port)
                        }
                    })
                    .collect(),
                clusters: import
                    .clusters
                    .iter()
                    .map(|c| ImportClusterView {
                        cluster: c.cluster.clone(),
                        live: c.live,
                        ready_endpoints: c.endpoints.iter().filter(|e| e.ready).count(),
                    })
                    .collect(),
            });
        }
    }
    ServicesView {
        exports,
        imports,
        problems,
    }
}

/// The services as tables.
pub fn render_services(s: &ServicesView, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<10} {:<28} {:<11} {:>9}  CONDITIONS",
        "EXPORTED BY", "SERVICE", "SOURCE", "ENDPOINTS"
    )?;
    if s.exports.is_empty() {
        writeln!(out, "(no exports)")?;
    }
    for e in &s.exports {
        let conditions: Vec<String> = e
            .conditions
            .iter()
            .map(|c| {
                if c.reason.is_empty() {
                    format!("{}={}", c.type_, c.status)
                } else {
                    format!("{}={}({})", c.type_, c.status, c.reason)
                }
            })
            .collect();
        writeln!(
            out,
            "{:<10} {:<28} {:<11} {:>4}/{:<4}  {}",
            e.cluster,
            format!("{}/{}", e.namespace, e.name),
            e.source,
            e.ready_endpoints,
            e.endpoints,
            conditions.join(" ")
        )?;
        for c in &e.conditions {
            if c.status == "True" && c.type_ == "Conflict"
                || c.status == "False" && c.type_ == "Valid"
            {
                writeln!(out, "{:<10}   {}: {}", "", c.type_, c.message)?;
            }
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<10} {:<28} {:<13} {:<16} {:<22} FROM (ready endpoints)",
        "IMPORTED BY", "SERVICE", "TYPE", "VIP", "PORTS"
    )?;
    if s.imports.is_empty() {
        writeln!(out, "(no imports)")?;
    }
    for i in &s.imports {
        let from: Vec<String> = i
            .clusters
            .iter()
            .map(|c| {
                if c.live {
                    format!("{} ({})", c.cluster, c.ready_endpoints)
                } else {
                    format!("{} (withdrawn)", c.cluster)
                }
            })
            .collect();
        writeln!(
            out,
            "{:<10} {:<28} {:<13} {:<16} {:<22} {}",
            i.cluster,
            format!("{}/{}", i.namespace, i.name),
            i.type_,
            i.vip.map_or("-".to_string(), |v| v.to_string()),
            i.ports.join(", "),
            from.join(", ")
        )?;
    }
    for p in &s.problems {
        writeln!(out, "problem: {p}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_converges_when_its_controller_published_this_spec() {
        let args = ExportArgs {
            namespace: "default".into(),
            name: "web".into(),
            selector: vec!["app=web".into()],
            ports: vec!["http:tcp:80".into()],
            headless: false,
            client_ip_affinity: None,
        };
        let spec = export_spec(&args, 1_000).unwrap();
        let aa = ClusterId::new("aa").unwrap();
        let published = |spec: &ServiceExportSpec, ready: &[bool]| {
            let record = ExportRecord {
                service_type: spec.service_type,
                ports: spec.ports.clone(),
                session_affinity: spec.session_affinity,
                internal_traffic_policy: InternalTrafficPolicy::Cluster,
                traffic_distribution: None,
                labels: spec.labels.clone(),
                annotations: spec.annotations.clone(),
                created_at_ms: spec.created_at_ms,
                endpoints: ready
                    .iter()
                    .enumerate()
                    .map(|(i, r)| fleet_hub_api::records::EndpointRecord {
                        ip: Ipv4Addr::new(100, 96, 0, 10 + i as u8),
                        hostname: None,
                        ready: *r,
                        serving: *r,
                        terminating: false,
                        node_name: None,
                    })
                    .collect(),
            };
            FleetView {
                clusters: vec![],
                records: vec![fleet_hub_api::model::MemberRecord {
                    owner: aa.clone(),
                    name: "export/default/web".into(),
                    value: serde_json::to_vec(&record).unwrap(),
                    revision: 3,
                }],
                fleet_cidr: "100.96.0.0/12".parse().unwrap(),
                relays: vec![],
                revision: 3,
            }
        };
        let empty = FleetView {
            records: vec![],
            ..published(&spec, &[])
        };
        assert_eq!(export_converged(&empty, &aa, "default", "web", &spec), None);
        let view = published(&spec, &[true, false]);
        assert_eq!(
            export_converged(&view, &aa, "default", "web", &spec),
            Some((2, 1))
        );
        // The controller still shows the previous ports: not converged on the new spec.
        let mut changed = spec.clone();
        changed.ports = vec![parse_port("http:tcp:8080").unwrap()];
        assert_eq!(
            export_converged(&view, &aa, "default", "web", &changed),
            None
        );
        let bb = ClusterId::new("bb").unwrap();
        assert_eq!(export_converged(&view, &bb, "default", "web", &spec), None);
    }

    #[test]
    fn ports_parse_with_and_without_names_and_target_ports() {
        let p = parse_port("http:tcp:80").unwrap();
        assert_eq!(
            (p.name.as_str(), p.protocol, p.port, p.target_port),
            ("http", Protocol::Tcp, 80, None)
        );
        let p = parse_port("dns:UDP:53:5353").unwrap();
        assert_eq!(
            (p.name.as_str(), p.protocol, p.port, p.target_port),
            ("dns", Protocol::Udp, 53, Some(5353))
        );
        let p = parse_port("tcp:8080").unwrap();
        assert_eq!((p.name.as_str(), p.port), ("", 8080));
        for bad in [
            "",
            "http",
            "http:tcp",
            "http:icmp:80",
            "http:tcp:0",
            "http:tcp:65536",
            "http:tcp:80:0",
            "Http:tcp:80",
            "http:tcp:80:81:82",
            "http:tcp:-1",
            ":tcp:80",
        ] {
            assert!(parse_port(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn selectors_are_label_pairs() {
        let s =
            parse_selector(&["app=web,tier=front".into(), "example.com/team=a".into()]).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s["example.com/team"], "a");
        assert_eq!(parse_selector(&[]), Err(ExportArgError::NoSelector));
        assert_eq!(
            parse_selector(&["app=web,app=other".into()]),
            Err(ExportArgError::SelectorKeyTwice("app".into()))
        );
        assert_eq!(
            parse_selector(&["app=web".into(), "app=web".into()])
                .unwrap()
                .len(),
            1
        );
        for bad in ["app", "=web", "app=we b", "app=-web", "/x=y", "a/b/c=d"] {
            assert!(parse_selector(&[bad.into()]).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn export_specs_are_checked_like_importers_check_exports() {
        let args = ExportArgs {
            namespace: "default".into(),
            name: "web".into(),
            selector: vec!["app=web".into()],
            ports: vec!["http:tcp:80".into()],
            ..Default::default()
        };
        let spec = export_spec(&args, 5).unwrap();
        assert_eq!(spec.created_at_ms, 5);
        assert_eq!(spec.service_type, ExportedServiceType::ClusterSetIP);
        let mut no_ports = args.clone();
        no_ports.ports.clear();
        assert_eq!(export_spec(&no_ports, 5), Err(ExportArgError::NoPorts));
        no_ports.headless = true;
        assert!(export_spec(&no_ports, 5).is_ok(), "headless needs no ports");
        let mut bad_name = args.clone();
        bad_name.name = "Web".into();
        assert!(matches!(
            export_spec(&bad_name, 5),
            Err(ExportArgError::Invalid(_))
        ));
        let mut two_unnamed = args.clone();
        two_unnamed.ports = vec!["tcp:80".into(), "tcp:81".into()];
        assert!(matches!(
            export_spec(&two_unnamed, 5),
            Err(ExportArgError::Invalid(_))
        ));
        let mut headless_affinity = args.clone();
        headless_affinity.headless = true;
        headless_affinity.client_ip_affinity = Some(60);
        assert_eq!(
            export_spec(&headless_affinity, 5),
            Err(ExportArgError::AffinityWithoutVip)
        );
        let mut affinity = args.clone();
        affinity.client_ip_affinity = Some(0);
        assert!(matches!(
            export_spec(&affinity, 5),
            Err(ExportArgError::Invalid(_))
        ));
    }

    #[test]
    fn an_export_without_endpoints_warns_of_the_selector() {
        let w = no_endpoints_warning(
            &ClusterId::new("aa").unwrap(),
            "default",
            "web",
            &["app=wbe".into(), "tier=front".into()],
        );
        assert!(w.starts_with("fleetctl: warning:"), "{w}");
        assert!(w.contains("default/web with 0 endpoints"), "{w}");
        assert!(w.contains("app=wbe,tier=front"), "{w}");
        assert!(w.contains("--selector"), "{w}");
    }
}

//! A small fleet for the tests: a ClusterSetIP service, a headless one with ready and unready
//! endpoints in two clusters, a headless one with nothing ready, and a large one for TC.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use fleet_dns::{DnsConfig, DnsTable};
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::records::{EndpointRecord, InternalTrafficPolicy, Protocol, SessionAffinity};
use fleet_services::aggregate::ImportPort;
use fleet_services::{ServiceImport, ServiceKey, ServiceType, VipTable};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};

pub const VIP: Ipv4Addr = Ipv4Addr::new(100, 112, 0, 7);

pub fn cluster(id: &str) -> ClusterId {
    ClusterId::new(id).unwrap()
}

pub fn endpoint(ip: [u8; 4], hostname: Option<&str>, ready: bool) -> EndpointRecord {
    EndpointRecord {
        ip: Ipv4Addr::from(ip),
        hostname: hostname.map(str::to_string),
        ready,
        serving: ready,
        terminating: false,
        node_name: None,
    }
}

pub fn port(name: &str, protocol: Protocol, port: u16) -> ImportPort {
    ImportPort {
        name: name.to_string(),
        protocol,
        port,
        app_protocol: None,
        backends: BTreeMap::new(),
    }
}

pub fn import(
    ns: &str,
    name: &str,
    service_type: ServiceType,
    ports: Vec<ImportPort>,
    clusters: Vec<(&str, Vec<EndpointRecord>)>,
) -> ServiceImport {
    ServiceImport {
        service: ServiceKey::new(ns, name),
        service_type,
        ports,
        session_affinity: SessionAffinity::None,
        internal_traffic_policy: InternalTrafficPolicy::Cluster,
        traffic_distribution: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        clusters: clusters
            .into_iter()
            .map(|(c, eps)| (cluster(c), eps))
            .collect(),
    }
}

/// `web.shop` (ClusterSetIP, ports `http`/TCP 80, `dns`/UDP 53, one unnamed would be invalid
/// with several, so none), `db.shop` (headless: `db-0` and `db-1` ready in east, `db-2` not
/// ready in west, an unnamed ready endpoint in west), `idle.shop` (headless, nothing ready),
/// `big.shop` (headless, 60 ready endpoints: too big for 512 bytes).
pub fn fleet() -> (BTreeMap<ServiceKey, ServiceImport>, VipTable) {
    let imports = vec![
        import(
            "shop",
            "web",
            ServiceType::ClusterSetIP,
            vec![
                port("http", Protocol::Tcp, 80),
                port("dns", Protocol::Udp, 53),
            ],
            vec![("east", vec![endpoint([100, 96, 1, 10], None, true)])],
        ),
        import(
            "shop",
            "db",
            ServiceType::Headless,
            vec![port("pg", Protocol::Tcp, 5432)],
            vec![
                (
                    "east",
                    vec![
                        endpoint([100, 96, 1, 20], Some("db-0"), true),
                        endpoint([100, 96, 1, 21], Some("db-1"), true),
                    ],
                ),
                (
                    "west",
                    vec![
                        endpoint([100, 96, 2, 22], Some("db-2"), false),
                        endpoint([100, 96, 2, 23], None, true),
                    ],
                ),
            ],
        ),
        import(
            "shop",
            "idle",
            ServiceType::Headless,
            vec![port("pg", Protocol::Tcp, 5432)],
            vec![(
                "east",
                vec![endpoint([100, 96, 1, 30], Some("idle-0"), false)],
            )],
        ),
        import(
            "shop",
            "big",
            ServiceType::Headless,
            vec![],
            vec![(
                "east",
                (0..60)
                    .map(|i| endpoint([100, 96, 3, i], None, true))
                    .collect(),
            )],
        ),
    ];
    let vips = [(ServiceKey::new("shop", "web"), VIP)]
        .into_iter()
        .collect();
    (
        imports
            .into_iter()
            .map(|i| (i.service.clone(), i))
            .collect(),
        vips,
    )
}

pub fn table() -> DnsTable {
    let (imports, vips) = fleet();
    DnsTable::build(&DnsConfig::default(), &imports, &vips).unwrap()
}

/// A query for `name`/`rtype`, with EDNS advertising `edns_payload` when given.
pub fn query(name: &str, rtype: RecordType, edns_payload: Option<u16>) -> Vec<u8> {
    query_class(name, rtype, DNSClass::IN, edns_payload)
}

pub fn query_class(
    name: &str,
    rtype: RecordType,
    class: DNSClass,
    edns_payload: Option<u16>,
) -> Vec<u8> {
    let mut message = Message::new(0x1234, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    let mut q = Query::query(Name::from_ascii(name).unwrap(), rtype);
    q.set_query_class(class);
    message.add_query(q);
    if let Some(payload) = edns_payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        message.set_edns(edns);
    }
    message.to_vec().unwrap()
}

//! The DNS table: every name `fleet-dns` answers for, with its records, built purely from the
//! service imports and this cluster's VIP table (MCS DNS specification 1.0.0). A new table is
//! built on every change and swapped in whole (a `tokio::sync::watch<Arc<DnsTable>>`); lookups
//! never wait on anything.
//!
//! Per zone (`clusterset.local` by default) it holds:
//! - the zone's SOA, and `dns-version.<zone>` TXT "1.0.0";
//! - ClusterSetIP: `<svc>.<ns>.svc.<zone>` A → the VIP; `_<port>._<proto>.<svc>...` SRV →
//!   `<svc>.<ns>.svc.<zone>` for every named port;
//! - headless, only while some endpoint is ready: `<svc>...` A → every ready endpoint,
//!   `<hostname>.<clusterid>.<svc>...` A → that endpoint, and SRV per named port × ready
//!   endpoint with a hostname → `<hostname>.<clusterid>.<svc>...`;
//! - every ancestor of those names down to the zone as an empty non-terminal (NODATA, not
//!   NXDOMAIN — RFC 8020), which is how `<clusterid>.<svc>...` exists yet resolves to nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use fleet_hub_api::records::Protocol;
use fleet_services::{ServiceImport, ServiceKey, ServiceType, VipTable};
use hickory_proto::rr::rdata::{A, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::wire::WireAnswers;

/// The MCS zone (KEP-1645: must be `clusterset.local` today; configurable here).
pub const DEFAULT_ZONE: &str = "clusterset.local";
/// The TTL of every record and of negative answers, in seconds.
pub const DEFAULT_TTL: u32 = 5;
/// The MCS DNS schema version served at `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.0.0";

/// What the table serves and for which zones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// The zones, e.g. `clusterset.local`; every zone serves the same services.
    pub zones: Vec<String>,
    /// TTL of every record, and the SOA minimum (the negative-caching TTL).
    pub ttl: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            zones: vec![DEFAULT_ZONE.to_string()],
            ttl: DEFAULT_TTL,
        }
    }
}

/// Why a table cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("no DNS zone configured: give at least one zone, e.g. {DEFAULT_ZONE}")]
    NoZones,
    #[error("the DNS zone {zone:?} is not a valid domain name ({reason}): use e.g. {DEFAULT_ZONE}")]
    InvalidZone { zone: String, reason: String },
    #[error("the DNS zone {zone:?} is configured twice: list each zone once")]
    DuplicateZone { zone: String },
}

/// The outcome of a lookup.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    /// Records of the asked type (owner names as stored; the handler echoes the query's case).
    Answer {
        records: Vec<&'a Record>,
        /// The A records of SRV targets (the spec's optional Additional section).
        additional: Vec<&'a Record>,
    },
    /// The name exists but has no record of that type: NOERROR, empty answer, SOA in authority.
    NoData { soa: &'a Record },
    /// The name does not exist in the zone: NXDOMAIN, SOA in authority.
    NxDomain { soa: &'a Record },
    /// The name is in none of our zones.
    Refused,
}

#[derive(Debug)]
struct Zone {
    name: LowerName,
    soa: Record,
}

/// Every name served, with its records. Immutable once built.
#[derive(Debug)]
pub struct DnsTable {
    zones: Vec<Zone>,
    /// The same answers prebuilt in wire form (the handler's fast path).
    pub(crate) wire: WireAnswers,
    /// An empty list is an empty non-terminal (or the zone apex's non-SOA types).
    names: HashMap<LowerName, Vec<Record>>,
    ttl: u32,
}

impl DnsTable {
    /// The table for `imports` (from `fleet_services::aggregate*`) and this cluster's `vips`
    /// (from `allocate_vips`). A ClusterSetIP import without a VIP (the range ran out) gets no
    /// names until it has one.
    ///
    /// Errors: the zones are missing, invalid or duplicated.
    pub fn build(
        config: &DnsConfig,
        imports: &BTreeMap<ServiceKey, ServiceImport>,
        vips: &VipTable,
    ) -> Result<Self, TableError> {
        let zone_names = parse_zones(&config.zones)?;
        let ttl = config.ttl;
        let mut names: HashMap<LowerName, Vec<Record>> = HashMap::new();
        let mut zones = Vec::with_capacity(zone_names.len());
        for zone in zone_names {
            let mut builder = ZoneBuilder {
                zone: &zone,
                ttl,
                names: &mut names,
            };
            builder.add_zone_records();
            for import in imports.values() {
                builder.add_service(import, vips.get(&import.service));
            }
            zones.push(zone);
        }
        // Most names hold one or two records; a grown Vec keeps room for four.
        for records in names.values_mut() {
            records.shrink_to_fit();
        }
        names.shrink_to_fit();
        let serial = content_serial(&names);
        let zones: Vec<Zone> = zones
            .into_iter()
            .map(|zone| Zone {
                soa: soa_record(&zone, ttl, serial),
                name: LowerName::new(&zone),
            })
            .collect();
        let wire = WireAnswers::build(
            zones
                .iter()
                .map(|z| (&z.soa.name, &z.soa, negative_ttl(&z.soa))),
            &names,
        );
        Ok(DnsTable {
            zones,
            wire,
            names,
            ttl,
        })
    }

    /// An empty table for `config`'s zones: SOA and dns-version only.
    pub fn empty(config: &DnsConfig) -> Result<Self, TableError> {
        Self::build(config, &BTreeMap::new(), &VipTable::default())
    }

    /// The configured TTL.
    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// Looks up `name` (any case) for `rtype`. `ANY` returns every record at the name.
    pub fn lookup(&self, name: &Name, rtype: RecordType) -> Lookup<'_> {
        let name = LowerName::new(name);
        // The most specific zone wins when one zone lies inside another.
        let Some(zone) = self
            .zones
            .iter()
            .filter(|z| z.name.zone_of(&name))
            .max_by_key(|z| z.name.num_labels())
        else {
            return Lookup::Refused;
        };
        if name == zone.name && matches!(rtype, RecordType::SOA | RecordType::ANY) {
            return Lookup::Answer {
                records: vec![&zone.soa],
                additional: Vec::new(),
            };
        }
        let Some(records) = self.names.get(&name) else {
            return Lookup::NxDomain { soa: &zone.soa };
        };
        let records: Vec<&Record> = records
            .iter()
            .filter(|r| rtype == RecordType::ANY || r.record_type() == rtype)
            .collect();
        if records.is_empty() {
            return Lookup::NoData { soa: &zone.soa };
        }
        let additional = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(&srv.target),
                _ => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|target| self.names.get(&LowerName::new(target)))
            .flatten()
            .filter(|r| r.record_type() == RecordType::A)
            .collect();
        Lookup::Answer {
            records,
            additional,
        }
    }

    /// Every record held, each zone's SOA first (e.g. to write the same data as a zone file).
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.zones
            .iter()
            .map(|z| &z.soa)
            .chain(self.names.values().flatten())
    }

    /// The number of names held (with empty non-terminals), for logs.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

fn parse_zones(zones: &[String]) -> Result<Vec<Name>, TableError> {
    if zones.is_empty() {
        return Err(TableError::NoZones);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(zones.len());
    for zone in zones {
        let invalid = |reason: String| TableError::InvalidZone {
            zone: zone.clone(),
            reason,
        };
        let trimmed = zone.trim_end_matches('.');
        if trimmed.is_empty() {
            return Err(invalid("the root zone cannot be served".into()));
        }
        let mut name = Name::from_ascii(trimmed).map_err(|e| invalid(e.to_string()))?;
        name.set_fqdn(true);
        // Room for the longest names below the zone is checked per record; the zone itself
        // must at least leave space for `dns-version.`.
        if name.len() + "dns-version.".len() > 255 {
            return Err(invalid("too long".into()));
        }
        if !seen.insert(LowerName::new(&name)) {
            return Err(TableError::DuplicateZone { zone: zone.clone() });
        }
        out.push(name.to_lowercase());
    }
    Ok(out)
}

struct ZoneBuilder<'a> {
    zone: &'a Name,
    ttl: u32,
    names: &'a mut HashMap<LowerName, Vec<Record>>,
}

impl ZoneBuilder<'_> {
    fn add_zone_records(&mut self) {
        self.names.entry(LowerName::new(self.zone)).or_default();
        if let Some(name) = self.name(&["dns-version"]) {
            let txt = TXT::new(vec![SCHEMA_VERSION.to_string()]);
            self.add(name, RData::TXT(txt));
        }
    }

    fn add_service(&mut self, import: &ServiceImport, vip: Option<Ipv4Addr>) {
        let svc = [
            import.service.name.as_str(),
            import.service.namespace.as_str(),
            "svc",
        ];
        let Some(service_name) = self.name(&svc) else {
            return;
        };
        match import.service_type {
            ServiceType::ClusterSetIP => {
                let Some(vip) = vip else { return };
                self.add(service_name.clone(), RData::A(A(vip)));
                for port in import.ports.iter().filter(|p| !p.name.is_empty()) {
                    let port_labels = srv_labels(&port.name, port.protocol);
                    let labels: Vec<&str> =
                        port_labels.iter().map(String::as_str).chain(svc).collect();
                    if let Some(name) = self.name(&labels) {
                        let srv = SRV::new(0, 100, port.port, service_name.clone());
                        self.add(name, RData::SRV(srv));
                    }
                }
            }
            ServiceType::Headless => {
                let mut addresses = BTreeSet::new();
                let mut hosts: BTreeMap<Name, BTreeSet<Ipv4Addr>> = BTreeMap::new();
                for (cluster, endpoints) in &import.clusters {
                    for ep in endpoints.iter().filter(|e| e.ready) {
                        addresses.insert(ep.ip);
                        let Some(hostname) = &ep.hostname else {
                            continue;
                        };
                        let labels = [hostname.as_str(), cluster.as_str(), svc[0], svc[1], svc[2]];
                        if let Some(host) = self.name(&labels) {
                            hosts.entry(host).or_default().insert(ep.ip);
                        }
                    }
                }
                // No ready endpoint: the service has no name at all (the spec's NXDOMAIN).
                if addresses.is_empty() {
                    return;
                }
                for ip in addresses {
                    self.add(service_name.clone(), RData::A(A(ip)));
                }
                for port in import.ports.iter().filter(|p| !p.name.is_empty()) {
                    let port_labels = srv_labels(&port.name, port.protocol);
                    let labels: Vec<&str> =
                        port_labels.iter().map(String::as_str).chain(svc).collect();
                    let Some(name) = self.name(&labels) else {
                        continue;
                    };
                    for host in hosts.keys() {
                        let srv = SRV::new(0, 100, port.port, host.clone());
                        self.add(name.clone(), RData::SRV(srv));
                    }
                    // A named port with no hostname endpoint still exists (NODATA).
                    self.add_name(&name);
                }
                for (host, ips) in hosts {
                    for ip in ips {
                        self.add(host.clone(), RData::A(A(ip)));
                    }
                }
            }
        }
    }

    /// `labels` under the zone, or `None` (logged) when the name would exceed 255 octets.
    fn name(&self, labels: &[&str]) -> Option<Name> {
        let relative = labels.join(".");
        match Name::from_ascii(&relative).and_then(|n| n.append_domain(self.zone)) {
            Ok(name) => Some(name.to_lowercase()),
            Err(error) => {
                tracing::warn!(name = %relative, zone = %self.zone, %error, "name left out of the DNS table");
                None
            }
        }
    }

    fn add(&mut self, name: Name, data: RData) {
        self.add_name(&name);
        let records = self
            .names
            .get_mut(&LowerName::new(&name))
            .expect("just added");
        let record = Record::from_rdata(name, self.ttl, data);
        if !records.contains(&record) {
            records.push(record);
        }
    }

    /// `name` and its ancestors down to the zone exist (empty non-terminals unless filled).
    /// A name that exists already has its ancestors: the walk stops there.
    fn add_name(&mut self, name: &Name) {
        let mut name = name.clone();
        while name.num_labels() > self.zone.num_labels() {
            match self.names.entry(LowerName::new(&name)) {
                std::collections::hash_map::Entry::Occupied(_) => return,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(Vec::new());
                }
            }
            name = name.base_name();
        }
    }
}

fn srv_labels(port: &str, protocol: Protocol) -> [String; 2] {
    let proto = match protocol {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    };
    [format!("_{port}"), proto.to_string()]
}

/// The TTL of a negative answer's SOA: min(SOA TTL, SOA minimum) (RFC 2308 §3).
pub(crate) fn negative_ttl(soa: &Record) -> u32 {
    match &soa.data {
        RData::SOA(data) => soa.ttl.min(data.minimum),
        _ => soa.ttl,
    }
}

fn soa_record(zone: &Name, ttl: u32, serial: u32) -> Record {
    let child = |label: &str| {
        Name::from_ascii(label)
            .and_then(|n| n.append_domain(zone))
            .unwrap_or_else(|_| zone.clone())
    };
    let soa = SOA::new(
        child("ns.dns"),
        child("hostmaster"),
        serial,
        7200,
        1800,
        86400,
        ttl,
    );
    Record::from_rdata(zone.clone(), ttl, RData::SOA(soa))
}

/// A serial that changes when the content does, so a table rebuilt from the same model carries
/// the same SOA: per name, FNV-1a over the name and its records; the names' hashes summed (the
/// map's order does not matter, and no copy of the table is made).
fn content_serial(names: &HashMap<LowerName, Vec<Record>>) -> u32 {
    use std::fmt::Write as _;
    struct Fnv(u64);
    impl std::fmt::Write for Fnv {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            for byte in s.bytes() {
                self.0 ^= u64::from(byte);
                self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
            }
            Ok(())
        }
    }
    let sum = names.iter().fold(0u64, |sum, (name, records)| {
        let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
        let _ = writeln!(hash, "{name}");
        for record in records {
            let _ = writeln!(hash, "{record}");
        }
        sum.wrapping_add(hash.0)
    });
    (sum ^ (sum >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_hub_api::model::ClusterId;
    use fleet_hub_api::records::{EndpointRecord, InternalTrafficPolicy, SessionAffinity};

    /// An endpoint: its address and hostname.
    type Ep<'a> = (Ipv4Addr, Option<&'a str>);

    fn headless(ns: &str, name: &str, clusters: &[(&str, &[Ep<'_>])]) -> ServiceImport {
        ServiceImport {
            service: ServiceKey::new(ns, name),
            service_type: ServiceType::Headless,
            ports: Vec::new(),
            session_affinity: SessionAffinity::None,
            internal_traffic_policy: InternalTrafficPolicy::Cluster,
            traffic_distribution: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            clusters: clusters
                .iter()
                .map(|(c, eps)| {
                    let eps = eps
                        .iter()
                        .map(|(ip, host)| EndpointRecord {
                            ip: *ip,
                            hostname: host.map(str::to_string),
                            ready: true,
                            serving: true,
                            terminating: false,
                            node_name: None,
                        })
                        .collect();
                    (ClusterId::new(*c).unwrap(), eps)
                })
                .collect(),
        }
    }

    fn build(zones: &[&str], imports: Vec<ServiceImport>) -> DnsTable {
        let config = DnsConfig {
            zones: zones.iter().map(|z| z.to_string()).collect(),
            ttl: DEFAULT_TTL,
        };
        let imports = imports
            .into_iter()
            .map(|i| (i.service.clone(), i))
            .collect();
        DnsTable::build(&config, &imports, &VipTable::default()).unwrap()
    }

    fn a(table: &DnsTable, name: &str) -> Vec<Ipv4Addr> {
        match table.lookup(&Name::from_ascii(name).unwrap(), RecordType::A) {
            Lookup::Answer { records, .. } => records
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn an_address_in_two_clusters_is_one_record() {
        let ip = Ipv4Addr::new(100, 96, 1, 1);
        let t = build(
            &[DEFAULT_ZONE],
            vec![headless(
                "ns",
                "s",
                &[
                    ("a", &[(ip, Some("h")), (ip, Some("h"))]),
                    ("b", &[(ip, None)]),
                ],
            )],
        );
        assert_eq!(a(&t, "s.ns.svc.clusterset.local."), vec![ip]);
        assert_eq!(a(&t, "h.a.s.ns.svc.clusterset.local."), vec![ip]);
    }

    #[test]
    fn the_most_specific_zone_answers() {
        let t = build(&["local", "clusterset.local"], vec![]);
        let soa_of = |name: &str| match t.lookup(&Name::from_ascii(name).unwrap(), RecordType::A) {
            Lookup::NxDomain { soa } => soa.name.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(soa_of("x.clusterset.local."), "clusterset.local.");
        assert_eq!(soa_of("x.local."), "local.");
        assert_eq!(
            t.lookup(&Name::from_ascii("x.example.").unwrap(), RecordType::A),
            Lookup::Refused
        );
    }

    #[test]
    fn a_name_over_255_octets_is_left_out_and_the_rest_served() {
        let long = "a".repeat(63);
        let ip = Ipv4Addr::new(100, 96, 1, 1);
        let t = build(
            &[DEFAULT_ZONE],
            vec![headless(
                &long,
                &long,
                &[(long.as_str(), &[(ip, Some(long.as_str()))])],
            )],
        );
        let service = format!("{long}.{long}.svc.clusterset.local.");
        assert_eq!(a(&t, &service), vec![ip]);
        // hostname.cluster.svc.ns.svc.clusterset.local would be 4*64 + 21 octets.
        let host = format!("{long}.{long}.{service}");
        assert!(matches!(
            t.lookup(
                &Name::from_ascii(&service)
                    .unwrap()
                    .prepend_label(long.as_str())
                    .unwrap(),
                RecordType::A
            ),
            Lookup::NxDomain { .. }
        ));
        assert!(Name::from_ascii(&host).is_err());
    }
}

//! The MCS DNS rules, asked through the handler as a client would (wire format in and out).

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::{VIP, fleet, query, query_class, table};
use fleet_dns::{DnsConfig, DnsTable, TableError, answer, answer_tcp};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

fn ask(table: &DnsTable, name: &str, rtype: RecordType) -> Message {
    let reply = answer(table, &query(name, rtype, Some(1232)), 1232).expect("a reply");
    Message::from_vec(&reply).expect("the reply parses")
}

fn a_records(records: &[Record]) -> BTreeSet<Ipv4Addr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn srv_records(reply: &Message) -> BTreeSet<(u16, String)> {
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv.port, srv.target.to_string())),
            _ => None,
        })
        .collect()
}

/// NOERROR, authoritative, no answer, the zone's SOA in authority.
fn assert_nodata(reply: &Message) {
    assert_eq!(reply.response_code, ResponseCode::NoError, "{reply}");
    assert!(reply.authoritative);
    assert!(reply.answers.is_empty(), "{reply}");
    assert_soa_authority(reply);
}

fn assert_nxdomain(reply: &Message) {
    assert_eq!(reply.response_code, ResponseCode::NXDomain, "{reply}");
    assert!(reply.authoritative);
    assert!(reply.answers.is_empty(), "{reply}");
    assert_soa_authority(reply);
}

fn assert_soa_authority(reply: &Message) {
    let [soa] = reply.authorities.as_slice() else {
        panic!("one SOA in authority expected: {reply}");
    };
    assert_eq!(soa.record_type(), RecordType::SOA);
    assert_eq!(soa.name.to_string(), "clusterset.local.");
    assert_eq!(soa.ttl, 5);
}

#[test]
fn clustersetip_service_resolves_to_its_vip() {
    let reply = ask(&table(), "web.shop.svc.clusterset.local.", RecordType::A);
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert!(reply.authoritative);
    assert_eq!(a_records(&reply.answers), BTreeSet::from([VIP]));
    assert_eq!(reply.answers[0].ttl, 5);
    assert_eq!(
        reply.answers[0].name.to_string(),
        "web.shop.svc.clusterset.local."
    );
}

#[test]
fn aaaa_of_an_ipv4_service_is_nodata() {
    assert_nodata(&ask(
        &table(),
        "web.shop.svc.clusterset.local.",
        RecordType::AAAA,
    ));
    assert_nodata(&ask(
        &table(),
        "db.shop.svc.clusterset.local.",
        RecordType::AAAA,
    ));
}

#[test]
fn srv_per_named_port_targets_the_service_with_its_a_in_additional() {
    let t = table();
    let reply = ask(
        &t,
        "_http._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(
        srv_records(&reply),
        BTreeSet::from([(80, "web.shop.svc.clusterset.local.".to_string())])
    );
    assert_eq!(a_records(&reply.additionals), BTreeSet::from([VIP]));
    let reply = ask(
        &t,
        "_dns._udp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(
        srv_records(&reply),
        BTreeSet::from([(53, "web.shop.svc.clusterset.local.".to_string())])
    );
    // The protocol is part of the name: http is not served over UDP.
    assert_nxdomain(&ask(
        &t,
        "_http._udp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    ));
    // `_tcp.<svc>` is an empty non-terminal.
    assert_nodata(&ask(
        &t,
        "_tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    ));
}

#[test]
fn headless_service_resolves_to_ready_endpoints_only() {
    let reply = ask(&table(), "db.shop.svc.clusterset.local.", RecordType::A);
    assert_eq!(
        a_records(&reply.answers),
        BTreeSet::from([
            Ipv4Addr::new(100, 96, 1, 20),
            Ipv4Addr::new(100, 96, 1, 21),
            Ipv4Addr::new(100, 96, 2, 23),
        ])
    );
}

#[test]
fn headless_service_without_ready_endpoints_is_nxdomain() {
    let t = table();
    assert_nxdomain(&ask(&t, "idle.shop.svc.clusterset.local.", RecordType::A));
    assert_nxdomain(&ask(
        &t,
        "_pg._tcp.idle.shop.svc.clusterset.local.",
        RecordType::SRV,
    ));
    assert_nxdomain(&ask(
        &t,
        "idle-0.east.idle.shop.svc.clusterset.local.",
        RecordType::A,
    ));
}

#[test]
fn headless_endpoint_hostnames_resolve_under_their_cluster() {
    let t = table();
    let reply = ask(&t, "db-0.east.db.shop.svc.clusterset.local.", RecordType::A);
    assert_eq!(
        a_records(&reply.answers),
        BTreeSet::from([Ipv4Addr::new(100, 96, 1, 20)])
    );
    // Not ready: no name.
    assert_nxdomain(&ask(
        &t,
        "db-2.west.db.shop.svc.clusterset.local.",
        RecordType::A,
    ));
    // A hostname only exists under its own cluster.
    assert_nxdomain(&ask(
        &t,
        "db-0.west.db.shop.svc.clusterset.local.",
        RecordType::A,
    ));
}

#[test]
fn headless_srv_lists_each_ready_hostname() {
    let reply = ask(
        &table(),
        "_pg._tcp.db.shop.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(
        srv_records(&reply),
        BTreeSet::from([
            (5432, "db-0.east.db.shop.svc.clusterset.local.".to_string()),
            (5432, "db-1.east.db.shop.svc.clusterset.local.".to_string()),
        ])
    );
    assert_eq!(
        a_records(&reply.additionals),
        BTreeSet::from([Ipv4Addr::new(100, 96, 1, 20), Ipv4Addr::new(100, 96, 1, 21)])
    );
}

#[test]
fn clusterid_under_a_service_does_not_resolve() {
    let t = table();
    for rtype in [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::ANY,
    ] {
        // Headless: an empty non-terminal above the hostnames (NODATA, RFC 8020).
        assert_nodata(&ask(&t, "east.db.shop.svc.clusterset.local.", rtype));
        // ClusterSetIP: nothing below the service but its SRV names.
        assert_nxdomain(&ask(&t, "east.web.shop.svc.clusterset.local.", rtype));
    }
}

#[test]
fn dns_version_is_txt_1_0_0() {
    let reply = ask(&table(), "dns-version.clusterset.local.", RecordType::TXT);
    let [record] = reply.answers.as_slice() else {
        panic!("{reply}")
    };
    let RData::TXT(txt) = &record.data else {
        panic!("{reply}")
    };
    assert_eq!(txt.to_string(), "1.0.0");
    assert_nodata(&ask(
        &table(),
        "dns-version.clusterset.local.",
        RecordType::A,
    ));
}

#[test]
fn apex_has_an_soa_and_ancestors_are_nodata() {
    let t = table();
    let reply = ask(&t, "clusterset.local.", RecordType::SOA);
    assert_eq!(reply.answers.len(), 1);
    assert_eq!(reply.answers[0].record_type(), RecordType::SOA);
    assert_nodata(&ask(&t, "clusterset.local.", RecordType::A));
    assert_nodata(&ask(&t, "svc.clusterset.local.", RecordType::A));
    assert_nodata(&ask(&t, "shop.svc.clusterset.local.", RecordType::A));
    assert_nxdomain(&ask(&t, "other.svc.clusterset.local.", RecordType::A));
    assert_nxdomain(&ask(&t, "nope.shop.svc.clusterset.local.", RecordType::A));
    assert_nxdomain(&ask(&t, "x.clusterset.local.", RecordType::A));
}

#[test]
fn names_outside_the_zones_are_refused() {
    let t = table();
    for name in [
        "example.com.",
        "local.",
        ".",
        "cluster.local.",
        "clusterset.local.evil.",
    ] {
        let reply = ask(&t, name, RecordType::A);
        assert_eq!(reply.response_code, ResponseCode::Refused, "{name}");
        assert!(!reply.authoritative, "{name}");
        assert!(
            reply.answers.is_empty() && reply.authorities.is_empty(),
            "{name}"
        );
    }
}

#[test]
fn names_are_case_insensitive_and_echoed_as_asked() {
    let reply = ask(&table(), "WeB.ShOp.SVC.ClusterSet.LOCAL.", RecordType::A);
    assert_eq!(a_records(&reply.answers), BTreeSet::from([VIP]));
    assert_eq!(
        reply.queries[0].name().to_string(),
        "WeB.ShOp.SVC.ClusterSet.LOCAL."
    );
    assert_eq!(
        reply.answers[0].name.to_string(),
        "WeB.ShOp.SVC.ClusterSet.LOCAL."
    );
}

#[test]
fn every_configured_zone_serves_the_same_services_and_ttl_is_configurable() {
    let (imports, vips) = fleet();
    let config = DnsConfig {
        zones: vec!["clusterset.local".into(), "fleet.example.".into()],
        ttl: 30,
    };
    let t = DnsTable::build(&config, &imports, &vips).unwrap();
    for zone in ["clusterset.local.", "fleet.example."] {
        let reply = ask(&t, &format!("web.shop.svc.{zone}"), RecordType::A);
        assert_eq!(a_records(&reply.answers), BTreeSet::from([VIP]), "{zone}");
        assert_eq!(reply.answers[0].ttl, 30);
        let reply = ask(&t, &format!("missing.{zone}"), RecordType::A);
        assert_eq!(reply.response_code, ResponseCode::NXDomain);
        assert_eq!(reply.authorities[0].name.to_string(), zone);
        assert_eq!(reply.authorities[0].ttl, 30);
    }
}

#[test]
fn bad_zone_configs_are_typed_errors() {
    let (imports, vips) = fleet();
    let build = |zones: &[&str]| {
        let config = DnsConfig {
            zones: zones.iter().map(|z| z.to_string()).collect(),
            ttl: 5,
        };
        DnsTable::build(&config, &imports, &vips).map(|_| ())
    };
    assert_eq!(build(&[]), Err(TableError::NoZones));
    assert!(matches!(build(&["."]), Err(TableError::InvalidZone { .. })));
    assert!(matches!(
        build(&["a..b"]),
        Err(TableError::InvalidZone { .. })
    ));
    assert!(matches!(
        build(&["clusterset.local", "ClusterSet.Local."]),
        Err(TableError::DuplicateZone { .. })
    ));
}

#[test]
fn clustersetip_without_a_vip_has_no_name() {
    let (imports, _) = fleet();
    let t = DnsTable::build(&DnsConfig::default(), &imports, &Default::default()).unwrap();
    assert_nxdomain(&ask(&t, "web.shop.svc.clusterset.local.", RecordType::A));
}

#[test]
fn tables_built_from_the_same_model_carry_the_same_soa_serial() {
    let soa = |t: &DnsTable| ask(t, "clusterset.local.", RecordType::SOA).answers[0].clone();
    assert_eq!(soa(&table()), soa(&table()));
    let empty = DnsTable::empty(&DnsConfig::default()).unwrap();
    assert_ne!(soa(&table()), soa(&empty));
}

#[test]
fn udp_replies_fit_the_clients_payload_size_and_set_tc() {
    let t = table();
    let name = "big.shop.svc.clusterset.local.";
    // 60 A records: ~1000 bytes.
    let full = answer_tcp(&t, &query(name, RecordType::A, None)).unwrap();
    assert!(full.len() > 512 && full.len() < 1232, "{}", full.len());
    assert_eq!(Message::from_vec(&full).unwrap().answers.len(), 60);

    for (payload, truncated) in [
        (None, true),
        (Some(512), true),
        (Some(100), true),
        (Some(1232), false),
        (Some(4096), false),
    ] {
        let reply = answer(&t, &query(name, RecordType::A, payload), 1232).unwrap();
        let message = Message::from_vec(&reply).unwrap();
        assert_eq!(message.truncation, truncated, "payload {payload:?}");
        if truncated {
            assert!(
                reply.len() <= 512,
                "payload {payload:?}: {} bytes",
                reply.len()
            );
            assert!(message.answers.is_empty());
            assert_eq!(message.queries.len(), 1);
        } else {
            assert_eq!(message.answers.len(), 60);
        }
        // We advertise our own size, and only to EDNS clients.
        assert_eq!(
            message.edns.as_ref().map(|e| e.max_payload()),
            payload.map(|_| 1232)
        );
    }
    // Our own limit caps a larger client size.
    let reply = answer(&t, &query(name, RecordType::A, Some(4096)), 600).unwrap();
    assert!(Message::from_vec(&reply).unwrap().truncation);
}

#[test]
fn other_classes_are_refused() {
    for class in [DNSClass::CH, DNSClass::HS, DNSClass::ANY] {
        let q = query_class("web.shop.svc.clusterset.local.", RecordType::A, class, None);
        let reply = Message::from_vec(&answer(&table(), &q, 1232).unwrap()).unwrap();
        assert_eq!(reply.response_code, ResponseCode::Refused, "{class:?}");
        assert!(reply.answers.is_empty());
    }
}

#[test]
fn zone_transfers_are_not_implemented_rather_than_empty() {
    for rtype in [RecordType::AXFR, RecordType::IXFR] {
        let reply = ask(&table(), "clusterset.local.", rtype);
        assert_eq!(reply.response_code, ResponseCode::NotImp, "{rtype}");
        assert!(reply.answers.is_empty());
        let tcp = answer_tcp(&table(), &query("clusterset.local.", rtype, None)).expect("a reply");
        let tcp = Message::from_vec(&tcp).unwrap();
        assert_eq!(tcp.response_code, ResponseCode::NotImp, "{rtype} over TCP");
    }
}

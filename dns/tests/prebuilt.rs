//! The prebuilt wire answers (the fast path of `answer_into`) agree with the general path
//! (`answer_general`: hickory's parse and encode) on every query the fast path takes, and
//! the fast path really takes the plain ones. Property-tested over the names of a small fleet
//! (and names next to them), every case mix, query types, EDNS sizes and options, RD/CD bits,
//! UDP limits and TCP.

mod common;

use fleet_dns::handler::{answer_general, answer_into};
use fleet_dns::{DnsConfig, DnsTable};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RecordType};
use proptest::prelude::*;

const NAMES: &[&str] = &[
    "clusterset.local.",
    "dns-version.clusterset.local.",
    "svc.clusterset.local.",
    "shop.svc.clusterset.local.",
    "web.shop.svc.clusterset.local.",
    "_http._tcp.web.shop.svc.clusterset.local.",
    "_dns._udp.web.shop.svc.clusterset.local.",
    "_tcp.web.shop.svc.clusterset.local.",
    "east.web.shop.svc.clusterset.local.",
    "db.shop.svc.clusterset.local.",
    "db-0.east.db.shop.svc.clusterset.local.",
    "db-2.west.db.shop.svc.clusterset.local.",
    "east.db.shop.svc.clusterset.local.",
    "_pg._tcp.db.shop.svc.clusterset.local.",
    "idle.shop.svc.clusterset.local.",
    "big.shop.svc.clusterset.local.",
    "nope.shop.svc.clusterset.local.",
    "a.b.c.nope.clusterset.local.",
    "example.com.",
    "local.",
    "1.0.96.100.in-addr.arpa.",
];

const TYPES: &[RecordType] = &[
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::TXT,
    RecordType::SOA,
    RecordType::NS,
    RecordType::CNAME,
    RecordType::PTR,
    RecordType::MX,
    RecordType::ANY,
];

static TABLES: std::sync::LazyLock<Vec<DnsTable>> = std::sync::LazyLock::new(|| {
    let (imports, vips) = common::fleet();
    vec![
        common::table(),
        // Nested zones, another TTL.
        DnsTable::build(
            &DnsConfig {
                zones: vec!["local".into(), "clusterset.local".into()],
                ttl: 30,
            },
            &imports,
            &vips,
        )
        .unwrap(),
    ]
});

fn flip_case(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    name: usize,
    case_mask: u64,
    rtype: usize,
    rd: bool,
    cd: bool,
    edns: Option<(u16, bool)>,
    max_udp: Option<usize>,
    id: u16,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..NAMES.len(),
        any::<u64>(),
        0..TYPES.len(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of((0u16..5000, any::<bool>())),
        proptest::option::of(0usize..5000),
        any::<u16>(),
    )
        .prop_map(|(name, case_mask, rtype, rd, cd, edns, max_udp, id)| Case {
            name,
            case_mask,
            rtype,
            rd,
            cd,
            edns,
            max_udp,
            id,
        })
}

fn build(case: &Case) -> Vec<u8> {
    let mut message = Message::new(case.id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = case.rd;
    message.metadata.checking_disabled = case.cd;
    let name = Name::from_ascii(flip_case(NAMES[case.name], case.case_mask)).unwrap();
    message.add_query(Query::query(name, TYPES[case.rtype]));
    if let Some((payload, cookie)) = case.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        if cookie {
            edns.options_mut()
                .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![7; 8]));
        }
        message.set_edns(edns);
    }
    message.to_vec().unwrap()
}

/// The reply as parsed, with names in their exact case (Debug shows it).
fn parsed(reply: &[u8]) -> String {
    format!("{:?}", Message::from_vec(reply).expect("a reply parses"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn prebuilt_answers_agree_with_the_general_path(case in case()) {
        let query = build(&case);
        for table in TABLES.iter() {
            let general = answer_general(table, &query, case.max_udp);
            let mut out = Vec::new();
            let answered = answer_into(table, &query, case.max_udp, &mut out);
            prop_assert_eq!(answered, general.is_some());
            if let Some(general) = general {
                prop_assert_eq!(parsed(&out), parsed(&general), "{:?}", case);
            }
        }
    }
}

#[test]
fn plain_queries_take_the_prebuilt_path() {
    // The general path compresses the SRV targets' additional names; the prebuilt answer
    // carries them whole, so a longer reply shows which path answered.
    let table = common::table();
    let query = common::query(
        "_pg._tcp.db.shop.svc.clusterset.local.",
        RecordType::SRV,
        Some(1232),
    );
    let mut out = Vec::new();
    assert!(answer_into(&table, &query, None, &mut out));
    let general = answer_general(&table, &query, None).unwrap();
    assert!(
        out.len() > general.len(),
        "{} vs {}",
        out.len(),
        general.len()
    );
    assert_eq!(parsed(&out), parsed(&general));
}

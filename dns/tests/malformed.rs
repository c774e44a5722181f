//! Bad input gets the RFCs' rcode, and the handler never panics: hand-made cases plus a
//! proptest "fuzz" harness over arbitrary and mutated packets (runs in CI with the tests).

mod common;

use std::sync::LazyLock;

use common::{query, table};
use fleet_dns::{DnsTable, answer, answer_tcp};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use proptest::prelude::*;

static TABLE: LazyLock<DnsTable> = LazyLock::new(table);

const WEB: &str = "web.shop.svc.clusterset.local.";

fn rcode(reply: &[u8]) -> ResponseCode {
    Message::from_vec(reply)
        .expect("reply parses")
        .response_code
}

/// A header with the given flags byte and counts, then `body`.
fn packet(flags: u8, counts: [u16; 4], body: &[u8]) -> Vec<u8> {
    let mut p = vec![0xab, 0xcd, flags, 0];
    for c in counts {
        p.extend_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(body);
    p
}

/// A question for `web...` in wire format.
fn question() -> Vec<u8> {
    let mut q = Vec::new();
    for label in WEB.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// An OPT RR with the given version.
fn opt(version: u8) -> Vec<u8> {
    vec![0, 0, 41, 0x04, 0xd0, 0, version, 0, 0, 0, 0]
}

#[test]
fn no_reply_without_a_header_or_to_a_response() {
    let t = table();
    assert_eq!(answer(&t, &[], 1232), None);
    assert_eq!(answer(&t, &[0xab, 0xcd, 1, 0, 0], 1232), None);
    let mut reply_packet = query(WEB, RecordType::A, None);
    reply_packet[2] |= 0x80;
    assert_eq!(answer(&t, &reply_packet, 1232), None);
    assert_eq!(answer_tcp(&t, &reply_packet), None);
}

#[test]
fn other_opcodes_are_notimp() {
    let t = table();
    for opcode in [1u8, 2, 4, 5, 15] {
        let p = packet(opcode << 3 | 1, [1, 0, 0, 0], &question());
        let reply = answer(&t, &p, 1232).unwrap();
        assert_eq!(&reply[..2], &[0xab, 0xcd]);
        assert_eq!(reply[2], 0x80 | opcode << 3 | 1, "QR, opcode and RD echoed");
        assert_eq!(reply[3] & 0x0f, 4, "NOTIMP for opcode {opcode}");
    }
}

#[test]
fn unparseable_messages_are_formerr() {
    let t = table();
    let mut loop_name = packet(1, [1, 0, 0, 0], &[0xc0, 0x0c]);
    loop_name.extend_from_slice(&[0, 1, 0, 1]);
    let mut long_name = Vec::new();
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'a'; 63]);
    }
    long_name.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut long_label = vec![64];
    long_label.extend_from_slice(&[b'a'; 64]);
    long_label.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut two_opts = question();
    two_opts.extend(opt(0));
    two_opts.extend(opt(0));
    let cases = [
        (
            "garbage after the header",
            packet(1, [1, 0, 0, 0], &[0xff; 7]),
        ),
        (
            "truncated question",
            packet(1, [1, 0, 0, 0], &question()[..9]),
        ),
        ("compression loop", loop_name),
        ("name over 255 octets", packet(1, [1, 0, 0, 0], &long_name)),
        ("label over 63 octets", packet(1, [1, 0, 0, 0], &long_label)),
        (
            "counts beyond the data",
            packet(1, [1, 9, 9, 9], &question()),
        ),
        ("two OPT records", packet(1, [1, 0, 0, 2], &two_opts)),
        ("no question", packet(1, [0, 0, 0, 0], &[])),
        (
            "two questions",
            packet(1, [2, 0, 0, 0], &[question(), question()].concat()),
        ),
    ];
    for (what, p) in cases {
        let reply = answer(&t, &p, 1232).unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(&reply[..2], &[0xab, 0xcd], "{what}");
        assert_eq!(rcode(&reply), ResponseCode::FormErr, "{what}");
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.message_type, MessageType::Response, "{what}");
        assert!(reply.answers.is_empty(), "{what}");
    }
}

#[test]
fn unknown_edns_version_is_badvers() {
    let p = packet(1, [1, 0, 0, 1], &[question(), opt(1)].concat());
    let reply = answer(&table(), &p, 1232).unwrap();
    let message = Message::from_vec(&reply).unwrap();
    // BADVERS is 16 (shared with BADSIG): 1 in the OPT's high bits, 0 in the header.
    assert_eq!(u16::from(message.response_code), 16);
    assert_eq!(reply[3] & 0x0f, 0);
    assert_eq!(message.edns.as_ref().map(|e| e.version()), Some(0));
    // And version 0 is answered.
    let p = packet(1, [1, 0, 0, 1], &[question(), opt(0)].concat());
    assert_eq!(
        rcode(&answer(&table(), &p, 1232).unwrap()),
        ResponseCode::NoError
    );
}

/// Whatever comes in, a reply (if any) is a parseable response to the same id, and fits.
fn check(input: &[u8]) -> Result<(), TestCaseError> {
    let t = &*TABLE;
    for (reply, limit) in [
        (answer(t, input, 1232), 1232),
        (answer_tcp(t, input), 65535),
    ] {
        let Some(reply) = reply else {
            prop_assert!(input.len() < 12 || input[2] & 0x80 != 0);
            continue;
        };
        prop_assert!(reply.len() <= limit);
        let message = Message::from_vec(&reply);
        prop_assert!(message.is_ok(), "reply does not parse: {:?}", message);
        let message = message.unwrap();
        prop_assert_eq!(message.message_type, MessageType::Response);
        prop_assert_eq!(&reply[..2], &input[..2]);
    }
    Ok(())
}

fn valid_query() -> impl Strategy<Value = Vec<u8>> {
    let names = prop::sample::select(vec![
        WEB,
        "db.shop.svc.clusterset.local.",
        "big.shop.svc.clusterset.local.",
        "_pg._tcp.db.shop.svc.clusterset.local.",
        "db-0.east.db.shop.svc.clusterset.local.",
        "dns-version.clusterset.local.",
        "clusterset.local.",
        "example.com.",
    ]);
    let types = prop::sample::select(vec![
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::SOA,
        RecordType::ANY,
        RecordType::MX,
    ]);
    let edns = prop::option::of(0u16..5000);
    (names, types, edns).prop_map(|(n, t, e)| query(n, t, e))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..600)) {
        check(&input)?;
    }

    #[test]
    fn arbitrary_bodies_behind_a_query_header_never_panic(
        counts in prop::array::uniform4(0u16..4),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        check(&packet(1, counts, &body))?;
    }

    #[test]
    fn mutated_queries_never_panic(
        q in valid_query(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut q = q;
        for (at, byte) in flips {
            let i = at.index(q.len());
            q[i] = byte;
        }
        if truncate {
            q.truncate(cut.index(q.len() + 1));
        }
        check(&q)?;
    }

    #[test]
    fn valid_queries_get_an_answer_for_the_same_question(q in valid_query()) {
        check(&q)?;
        let reply = Message::from_vec(&answer(&TABLE, &q, 1232).unwrap()).unwrap();
        let asked = Message::from_vec(&q).unwrap();
        prop_assert_eq!(&reply.queries, &asked.queries);
        prop_assert_ne!(reply.response_code, ResponseCode::FormErr);
    }
}

//! Prebuilt answers: every (name, type) the table answers, encoded once when the table is built
//! (with hickory-proto), so a plain query is answered by copying bytes — no parse into a
//! `Message`, no allocation, no encoding per query.
//!
//! Answer records are stored with their owner as a compression pointer to the question
//! (`0xC00C`: every answer's owner is the name asked, so the reply carries it in the client's
//! case); the SOA of a negative answer and the additional records (SRV targets' addresses)
//! carry their names uncompressed, as the table holds them. The handler
//! ([`crate::handler`]) uses these for standard queries only and falls back to the general path
//! for everything else (see [`answer_plain`]); the two are checked to agree by tests.

use std::collections::{BTreeSet, HashMap};

use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};

const HEADER_LEN: usize = 12;
const TYPE_ANY: u16 = 255;
/// Zone transfers (IXFR 251, AXFR 252): answered NOTIMP by the general path.
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;

/// The prebuilt answers of one table.
#[derive(Debug, Default)]
pub(crate) struct WireAnswers {
    zones: Vec<WireZone>,
    names: HashMap<Box<[u8]>, WireName>,
}

#[derive(Debug)]
struct WireZone {
    /// The zone's name in lowercase wire form.
    name: Box<[u8]>,
    labels: usize,
    /// The SOA record after its owner (type, class, TTL, RDATA), with the negative TTL.
    negative_soa: Box<[u8]>,
}

#[derive(Debug)]
struct WireName {
    zone: usize,
    types: Vec<(u16, WireRecords)>,
}

#[derive(Debug)]
struct WireRecords {
    /// Answer records, each starting with `0xC00C`.
    answers: Box<[u8]>,
    answer_count: u16,
    additional: Box<[u8]>,
    additional_count: u16,
}

/// `name` in wire form, lowercase, uncompressed.
fn name_wire(name: &Name) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(name.len() + 2);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::UncompressedLowercase);
    name.emit(&mut encoder).expect("a valid name encodes");
    buf.into_boxed_slice()
}

/// `record` in wire form without its owner name (type, class, TTL, RDLENGTH, RDATA).
fn record_tail(record: &Record) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    record.emit(&mut encoder).expect("a table record encodes");
    let owner = name_wire(&record.name).len();
    buf.split_off(owner)
}

impl WireAnswers {
    /// `zones`: (zone name, SOA record, negative TTL); `names`: every name with its records.
    pub(crate) fn build<'a>(
        zones: impl IntoIterator<Item = (&'a Name, &'a Record, u32)>,
        names: &HashMap<hickory_proto::rr::LowerName, Vec<Record>>,
    ) -> WireAnswers {
        let mut wire = WireAnswers::default();
        let mut apexes = Vec::new();
        for (name, soa, negative_ttl) in zones {
            let mut negative = soa.clone();
            negative.ttl = negative_ttl;
            wire.zones.push(WireZone {
                name: name_wire(name),
                labels: usize::from(name.num_labels()),
                negative_soa: record_tail(&negative).into_boxed_slice(),
            });
            apexes.push((name_wire(name), soa));
        }
        let lookup_a = |target: &Name| {
            names
                .get(&hickory_proto::rr::LowerName::new(target))
                .into_iter()
                .flatten()
                .filter(|r| r.record_type() == RecordType::A)
        };
        for (name, records) in names {
            let name: Name = name.into();
            let key = name_wire(&name);
            let Some(zone) = wire.zone_of(&key) else {
                continue;
            };
            let mut by_type: Vec<(u16, Vec<&Record>)> = Vec::new();
            for record in records {
                let rtype = u16::from(record.record_type());
                match by_type.iter_mut().find(|(t, _)| *t == rtype) {
                    Some((_, list)) => list.push(record),
                    None => by_type.push((rtype, vec![record])),
                }
            }
            if let Some((_, soa)) = apexes.iter().find(|(apex, _)| *apex == key) {
                by_type.push((u16::from(RecordType::SOA), vec![soa]));
            }
            let types = by_type
                .into_iter()
                .map(|(rtype, records)| {
                    let mut answers = Vec::new();
                    for record in &records {
                        answers.extend_from_slice(&[0xC0, 0x0C]);
                        answers.extend_from_slice(&record_tail(record));
                    }
                    // The A records of SRV targets, deduplicated, in name order (as the
                    // table's lookup gives them).
                    let targets: BTreeSet<&Name> = records
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::SRV(srv) => Some(&srv.target),
                            _ => None,
                        })
                        .collect();
                    let mut additional = Vec::new();
                    let mut additional_count = 0u16;
                    for record in targets.into_iter().flat_map(lookup_a) {
                        additional.extend_from_slice(&name_wire(&record.name));
                        additional.extend_from_slice(&record_tail(record));
                        additional_count += 1;
                    }
                    let wire_records = WireRecords {
                        answers: answers.into_boxed_slice(),
                        answer_count: records.len() as u16,
                        additional: additional.into_boxed_slice(),
                        additional_count,
                    };
                    (rtype, wire_records)
                })
                .collect();
            wire.names.insert(key, WireName { zone, types });
        }
        wire
    }

    /// The most specific zone holding the lowercase wire name `key`.
    fn zone_of(&self, key: &[u8]) -> Option<usize> {
        let starts = label_starts(key)?;
        self.zone_of_labels(key, &starts)
    }

    fn zone_of_labels(&self, key: &[u8], starts: &LabelStarts) -> Option<usize> {
        self.zones
            .iter()
            .enumerate()
            .filter(|(_, zone)| {
                zone.labels <= starts.count && {
                    let start = starts.at[starts.count - zone.labels];
                    key[start..] == zone.name[..]
                }
            })
            .max_by_key(|(_, zone)| zone.labels)
            .map(|(i, _)| i)
    }
}

/// Where each label of a wire name starts (the root's empty label not counted).
struct LabelStarts {
    at: [usize; 128],
    count: usize,
}

fn label_starts(name: &[u8]) -> Option<LabelStarts> {
    let mut starts = LabelStarts {
        at: [0; 128],
        count: 0,
    };
    let mut i = 0;
    loop {
        let len = usize::from(*name.get(i)?);
        if len == 0 {
            return Some(starts);
        }
        starts.at[starts.count] = i;
        starts.count += 1;
        i += 1 + len;
    }
}

/// Answers a plain query from the prebuilt answers, into `out`: exactly one question of
/// class IN, not ANY, an uncompressed name, no answer or authority records, at most an OPT
/// (version 0, well-formed options) in additional, nothing after it; a name inside one of the
/// zones; a reply that fits `limit`. Returns false — `out` then holds nothing useful — for
/// anything else, which the general path answers.
///
/// `advertised`: the EDNS payload size we put in our OPT; `max_udp`: `None` over TCP, else
/// the largest UDP reply we send.
pub(crate) fn answer_plain(
    wire: &WireAnswers,
    query: &[u8],
    max_udp: Option<usize>,
    advertised: u16,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    if query.len() < HEADER_LEN + 5 {
        return false;
    }
    let count = |at: usize| u16::from_be_bytes([query[at], query[at + 1]]);
    // QR=0, opcode QUERY; one question, no answers or authority, at most the OPT.
    if query[2] & 0xF8 != 0 || count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return false;
    }
    // The question name, lowercased into `key`.
    let mut key = [0u8; 255];
    let mut starts = LabelStarts {
        at: [0; 128],
        count: 0,
    };
    let mut i = HEADER_LEN;
    loop {
        let Some(&len) = query.get(i) else {
            return false;
        };
        let at = i - HEADER_LEN;
        if len == 0 {
            if at + 1 > 255 {
                return false;
            }
            key[at] = 0;
            i += 1;
            break;
        }
        // Compression or extended label types: the general path decides.
        if len & 0xC0 != 0 || at + 1 + usize::from(len) + 1 > 255 || starts.count == 127 {
            return false;
        }
        let Some(label) = query.get(i + 1..i + 1 + usize::from(len)) else {
            return false;
        };
        starts.at[starts.count] = at;
        starts.count += 1;
        key[at] = len;
        for (k, b) in key[at + 1..].iter_mut().zip(label) {
            *k = b.to_ascii_lowercase();
        }
        i += 1 + usize::from(len);
    }
    let key = &key[..i - HEADER_LEN];
    let Some(question) = query.get(HEADER_LEN..i + 4) else {
        return false;
    };
    let qtype = u16::from_be_bytes([query[i], query[i + 1]]);
    let qclass = u16::from_be_bytes([query[i + 2], query[i + 3]]);
    if qclass != CLASS_IN || matches!(qtype, TYPE_ANY | TYPE_AXFR | TYPE_IXFR) {
        return false;
    }
    i += 4;
    // The client's OPT: root owner, version 0, options that fill its RDATA exactly.
    let client_payload = if count(10) == 1 {
        let Some(opt) = query.get(i..i + 11) else {
            return false;
        };
        let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
        let opt_type = u16::from_be_bytes([opt[1], opt[2]]);
        if opt[0] != 0 || opt_type != TYPE_OPT || opt[6] != 0 || i + 11 + rdlen != query.len() {
            return false;
        }
        let mut options = &query[i + 11..];
        while !options.is_empty() {
            if options.len() < 4 {
                return false;
            }
            let len = usize::from(u16::from_be_bytes([options[2], options[3]]));
            let Some(rest) = options.get(4 + len..) else {
                return false;
            };
            options = rest;
        }
        Some(usize::from(u16::from_be_bytes([opt[3], opt[4]])))
    } else {
        if i != query.len() {
            return false;
        }
        None
    };

    let (zone, records, rcode) = match wire.names.get(key) {
        Some(entry) => (
            entry.zone,
            entry
                .types
                .iter()
                .find(|(t, _)| *t == qtype)
                .map(|(_, r)| r),
            0,
        ),
        None => match wire.zone_of_labels(key, &starts) {
            Some(zone) => (zone, None, RCODE_NXDOMAIN),
            // Outside our zones (REFUSED): the general path.
            None => return false,
        },
    };
    let zone = &wire.zones[zone];
    let edns = client_payload.is_some();
    let (answer_count, authority_count, additional_count) = match records {
        Some(r) => (r.answer_count, 0u16, r.additional_count),
        None => (0, 1, 0),
    };
    out.extend_from_slice(&query[..2]);
    // QR, opcode 0, AA, RD as asked; CD as asked, the rcode.
    out.push(0x84 | (query[2] & 0x01));
    out.push((query[3] & 0x10) | rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&answer_count.to_be_bytes());
    out.extend_from_slice(&authority_count.to_be_bytes());
    out.extend_from_slice(&(additional_count + u16::from(edns)).to_be_bytes());
    out.extend_from_slice(question);
    match records {
        Some(r) => {
            out.extend_from_slice(&r.answers);
            out.extend_from_slice(&r.additional);
        }
        None => {
            // The SOA's owner is the zone, as the zone is written (not as asked).
            out.extend_from_slice(&zone.name);
            out.extend_from_slice(&zone.negative_soa);
        }
    }
    if edns {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&advertised.max(512).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    let limit = match (max_udp, client_payload) {
        (None, _) => usize::from(u16::MAX),
        (Some(max), Some(client)) => client.clamp(512, max),
        (Some(_), None) => 512,
    };
    out.len() <= limit
}

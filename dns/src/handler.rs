//! The query handler: one DNS message in, at most one out, answered from a [`DnsTable`]. Pure
//! and synchronous — the fuzz target.
//!
//! - fewer than 12 bytes, or a response (QR=1): no reply (never answer a reply: no loops);
//! - an opcode other than QUERY: NOTIMP (RFC 1035 §4.1.1), header only;
//! - a message that does not parse (bad names, compression loops, names over 255 octets,
//!   truncated records, two OPT records), or without exactly one question: FORMERR;
//! - EDNS version above 0: BADVERS (RFC 6891 §6.1.3);
//! - a class other than IN: REFUSED (we hold no zone in any other class);
//! - a name outside our zones: REFUSED; otherwise an authoritative (AA) answer, NODATA or
//!   NXDOMAIN, the last two with the zone's SOA in the authority section (RFC 2308);
//! - over UDP the reply fits the client's EDNS payload size (512 without EDNS, at least 512,
//!   at most ours): first the additional section goes, then the answer, with TC set.

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};

use crate::table::{DnsTable, Lookup};

/// The smallest UDP payload every DNS client accepts (RFC 1035).
pub const MIN_UDP_PAYLOAD: usize = 512;
/// The EDNS payload size we advertise by default (DNS flag day 2020: no IP fragmentation).
pub const DEFAULT_UDP_PAYLOAD: u16 = 1232;
/// The largest DNS message over TCP (2-byte length prefix).
pub const MAX_TCP_MESSAGE: usize = u16::MAX as usize;

const HEADER_LEN: usize = 12;

/// Answers one query received over UDP. `max_udp` is the largest reply we send (and the EDNS
/// payload size we advertise); a client's smaller EDNS size, or 512 without EDNS, is honoured.
pub fn answer(table: &DnsTable, query: &[u8], max_udp: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    answer_into(table, query, Some(max_udp), &mut out).then_some(out)
}

/// Answers one query received over TCP: no truncation below 65535 bytes.
pub fn answer_tcp(table: &DnsTable, query: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    answer_into(table, query, None, &mut out).then_some(out)
}

/// [`answer`] (`max_udp` given) or [`answer_tcp`] (`None`) into a buffer the caller reuses;
/// false when there is no reply. Plain queries are answered from the table's prebuilt wire
/// answers (copying bytes); everything else takes the general path ([`answer_general`]).
pub fn answer_into(
    table: &DnsTable,
    query: &[u8],
    max_udp: Option<usize>,
    out: &mut Vec<u8>,
) -> bool {
    let max_udp = max_udp.map(|m| m.clamp(MIN_UDP_PAYLOAD, MAX_TCP_MESSAGE));
    if crate::wire::answer_plain(&table.wire, query, max_udp, advertised(max_udp), out) {
        return true;
    }
    match respond(table, query, max_udp) {
        Some(reply) => {
            *out = reply;
            true
        }
        None => false,
    }
}

/// The general path alone: parses the query into a hickory `Message` and encodes the reply
/// (what the prebuilt answers must agree with; tests compare the two).
pub fn answer_general(table: &DnsTable, query: &[u8], max_udp: Option<usize>) -> Option<Vec<u8>> {
    respond(
        table,
        query,
        max_udp.map(|m| m.clamp(MIN_UDP_PAYLOAD, MAX_TCP_MESSAGE)),
    )
}

/// The EDNS payload size we advertise.
fn advertised(max_udp: Option<usize>) -> u16 {
    max_udp
        .unwrap_or(DEFAULT_UDP_PAYLOAD as usize)
        .min(u16::MAX as usize) as u16
}

fn respond(table: &DnsTable, query: &[u8], max_udp: Option<usize>) -> Option<Vec<u8>> {
    if query.len() < HEADER_LEN || query[2] & 0x80 != 0 {
        return None;
    }
    let opcode = (query[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Some(header_only_error(query, ResponseCode::NotImp));
    }
    let request = match Message::from_vec(query) {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, "malformed DNS query");
            return Some(header_only_error(query, ResponseCode::FormErr));
        }
    };
    let advertised = advertised(max_udp);
    let mut response = Message::new(request.id, MessageType::Response, OpCode::Query);
    response.metadata = Metadata::response_from_request(&request.metadata);
    if let Some(client) = &request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(advertised.max(MIN_UDP_PAYLOAD as u16));
        edns.set_version(0);
        response.set_edns(edns);
        if client.version() > 0 {
            response.metadata.response_code = ResponseCode::BADVERS;
            return encode(&response);
        }
    }
    let [question] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return encode(&response);
    };
    response.add_query(question.clone());
    if question.query_class() != DNSClass::IN {
        response.metadata.response_code = ResponseCode::Refused;
        return encode(&response);
    }
    // Zone transfers are not offered (the zone is generated, each cluster's own): NOTIMP
    // rather than an empty transfer that a secondary would take as the whole zone.
    if matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR) {
        response.metadata.response_code = ResponseCode::NotImp;
        return encode(&response);
    }

    let owner = question.name();
    // Answers carry the name as asked (its case too), so 0x20-randomising resolvers match.
    let as_asked = |r: &Record| {
        let mut r = r.clone();
        if r.name == *owner {
            r.name = owner.clone();
        }
        r
    };
    match table.lookup(owner, question.query_type()) {
        Lookup::Refused => {
            response.metadata.response_code = ResponseCode::Refused;
        }
        Lookup::Answer {
            records,
            additional,
        } => {
            response.metadata.authoritative = true;
            response.add_answers(records.into_iter().map(as_asked));
            response.add_additionals(additional.into_iter().cloned());
        }
        Lookup::NoData { soa } => {
            response.metadata.authoritative = true;
            response.add_authority(negative_soa(soa));
        }
        Lookup::NxDomain { soa } => {
            response.metadata.authoritative = true;
            response.metadata.response_code = ResponseCode::NXDomain;
            response.add_authority(negative_soa(soa));
        }
    }

    let bytes = encode(&response)?;
    let Some(max_udp) = max_udp else {
        return (bytes.len() <= MAX_TCP_MESSAGE).then_some(bytes);
    };
    let limit = match &request.edns {
        Some(client) => usize::from(client.max_payload()).clamp(MIN_UDP_PAYLOAD, max_udp),
        None => MIN_UDP_PAYLOAD,
    };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // The additional section is optional: drop it before truncating the answer.
    response.additionals.clear();
    let bytes = encode(&response)?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // RFC 2181 §9: a partial RRset is useless; send none and let the client retry over TCP.
    response.answers.clear();
    response.authorities.clear();
    response.metadata.truncation = true;
    encode(&response)
}

/// The negative-answer SOA: TTL = min(SOA TTL, SOA minimum) (RFC 2308 §3).
fn negative_soa(soa: &Record) -> Record {
    let ttl = crate::table::negative_ttl(soa);
    let mut soa = soa.clone();
    soa.ttl = ttl;
    soa
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            tracing::warn!(%error, id = message.id, "DNS reply could not be encoded");
            None
        }
    }
}

/// A reply that is only a header: the query's id, opcode and RD, QR set, `rcode`, no sections.
/// Used when the message cannot be parsed further (so nothing of it can be echoed).
fn header_only_error(query: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut reply = vec![0u8; HEADER_LEN];
    reply[..2].copy_from_slice(&query[..2]);
    reply[2] = 0x80 | (query[2] & 0x78) | (query[2] & 0x01);
    reply[3] = rcode.low();
    reply
}

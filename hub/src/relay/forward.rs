//! The relay's forwarding table: which member a WireGuard datagram goes to, decided from its
//! unencrypted fields only — the relay holds no key that opens member-to-member traffic.
//!
//! - A handshake initiation names its responder only through `mac1` =
//!   MAC(HASH("mac1----" ‖ responder's static public key), message): one `mac1` key is kept
//!   per member and each is tried. One keyed to the relay's own key starts a session of the
//!   relay itself with that member (gotatun's [`Tunn`], responder only).
//! - A handshake response, a cookie reply and transport data carry the receiver's index.
//!   Indices are learnt from the initiations and responses forwarded (an initiation from A to
//!   B with sender index i: "i, heard from B, goes to A"); the table is keyed by (sender
//!   member, index), so a member can only reach a peer it did a handshake with, and bounded
//!   per member; entries expire with the session they belong to (WireGuard rejects a session
//!   180 s after its handshake).
//! - A member's address is its mapped (NAT) address as the relay's own session with it last
//!   authenticated it; a member that roams is followed at its next keepalive. Datagrams from
//!   any other source are dropped, so the relay is no open reflector.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{Digest, Mac};
use blake2::{Blake2s256, Blake2sMac};
use bytes::BytesMut;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::x25519;

/// A public key's 32 bytes.
pub type Key = [u8; 32];

const INIT: u8 = 1;
const RESPONSE: u8 = 2;
const COOKIE: u8 = 3;
const DATA: u8 = 4;
const INIT_LEN: usize = 148;
const RESPONSE_LEN: usize = 92;
const COOKIE_LEN: usize = 64;
const DATA_MIN_LEN: usize = 32;
/// Where `mac1` starts in an initiation and in a response.
pub const INIT_MAC1: usize = 116;
pub const RESPONSE_MAC1: usize = 60;

/// An index entry lives this long after the handshake that taught it: WireGuard rejects a
/// session 180 s after its handshake (REJECT_AFTER_TIME), plus a margin.
pub const ROUTE_LIFETIME: Duration = Duration::from_secs(240);
/// Index entries a member's handshakes may create at most, whatever the fleet's size (a
/// member retrying a handshake every 5 s towards many peers makes one per attempt).
pub const MIN_ROUTES_PER_MEMBER: usize = 4096;
/// Relay sessions remembered per member (gotatun keeps 8 per peer).
const RELAY_SESSIONS_PER_MEMBER: usize = 8;
/// Handshakes per second the relay's own sessions accept before asking for cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 1000;

/// `HASH("mac1----" ‖ public key)`: the key of `mac1` for messages to that key's owner.
pub fn mac1_key(public_key: &Key) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(b"mac1----");
    h.update(public_key);
    h.finalize().into()
}

/// Whether `message`'s `mac1` (at byte `at`) was made for the owner of `key` ([`mac1_key`]).
pub fn mac1_matches(key: &[u8; 32], message: &[u8], at: usize) -> bool {
    let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(key).expect("32-byte key");
    mac.update(&message[..at]);
    mac.verify_slice(&message[at..at + 16]).is_ok()
}

fn index_at(message: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(message[at..at + 4].try_into().expect("4 bytes"))
}

/// Who an index entry sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Member(Key),
}

#[derive(Debug)]
struct Route {
    to: Hop,
    /// The member whose handshake taught it (counted against its bound).
    taught_by: Key,
    learnt: Instant,
}

struct Member {
    id: String,
    mac1_key: [u8; 32],
    /// The relay's own session with the member (it initiates, we respond).
    tunn: Tunn,
    /// Its mapped address, as last authenticated by `tunn`.
    addr: Option<SocketAddr>,
    /// When `tunn` last authenticated a message of it.
    last_heard: Option<Instant>,
    /// When its last handshake with the relay completed.
    last_handshake: Option<Instant>,
    relay_indices: VecDeque<u32>,
    routes_taught: usize,
    counters: MemberCounters,
}

/// Bytes and datagrams forwarded from and to one member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub tx_datagrams: u64,
}

/// Why a datagram was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Not a WireGuard message (bad type or size).
    Malformed,
    /// From an address that is no member's authenticated address.
    UnknownSource,
    /// An initiation whose `mac1` matches no member (nor the relay).
    UnknownResponder,
    /// To a member the relay has no address of (yet).
    NoAddress,
    /// A receiver index the relay did not learn from this sender's handshakes.
    UnknownIndex,
    /// The sender's share of the index table is full.
    TableFull,
    /// A message to the relay's own session that did not authenticate.
    NotAuthenticated,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::UnknownSource,
        DropReason::UnknownResponder,
        DropReason::NoAddress,
        DropReason::UnknownIndex,
        DropReason::TableFull,
        DropReason::NotAuthenticated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownSource => "unknown_source",
            DropReason::UnknownResponder => "unknown_responder",
            DropReason::NoAddress => "no_address",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::TableFull => "table_full",
            DropReason::NotAuthenticated => "not_authenticated",
        }
    }
}

/// What to do with one received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the datagram, unchanged, to this address.
    Forward(SocketAddr),
    /// The relay's own session answers these datagrams (to the sender's address).
    Reply(Vec<Vec<u8>>),
    /// Nothing to send (a keepalive of the relay's own session).
    Consumed,
    Drop(DropReason),
}

/// One member as [`Forwarder::set_members`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    pub id: String,
    pub public_key: Key,
}

/// One member's state, for metrics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: String,
    pub public_key: Key,
    pub addr: Option<SocketAddr>,
    pub last_handshake: Option<Instant>,
    pub counters: MemberCounters,
}

/// Forwarded datagrams by WireGuard message type, and drops by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Indexed by message type - 1 (initiation, response, cookie reply, data).
    pub forwarded: [u64; 4],
    pub dropped: HashMap<DropReason, u64>,
    /// Datagrams of the relay's own sessions (handshakes and keepalives with members).
    pub own: u64,
}

/// The relay's whole state; single-threaded (the relay's socket loop owns it).
pub struct Forwarder {
    private: x25519::StaticSecret,
    public: Key,
    own_mac1: [u8; 32],
    members: HashMap<Key, Member>,
    by_addr: HashMap<SocketAddr, Key>,
    /// (the member that sends it, receiver index) -> where it goes.
    routes: HashMap<(Key, u32), Route>,
    /// Receiver indices of the relay's own sessions -> the member.
    relay_sessions: HashMap<u32, Key>,
    index_table: IndexTable,
    rate_limiter: Arc<RateLimiter>,
    totals: Totals,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("members", &self.members.len())
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder whose own sessions use `private` (the relay's key: it opens only
    /// member-to-relay keepalives).
    pub fn new(private: [u8; 32]) -> Self {
        let private = x25519::StaticSecret::from(private);
        let public = x25519::PublicKey::from(&private);
        Forwarder {
            own_mac1: mac1_key(public.as_bytes()),
            public: *public.as_bytes(),
            private,
            members: HashMap::new(),
            by_addr: HashMap::new(),
            routes: HashMap::new(),
            relay_sessions: HashMap::new(),
            index_table: IndexTable::from_os_rng(),
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            totals: Totals::default(),
        }
    }

    pub fn public_key(&self) -> Key {
        self.public
    }

    /// Makes `members` the members: new ones are added (without an address until they
    /// register), missing ones forgotten with their address and index entries. A key given
    /// twice serves the first.
    pub fn set_members(&mut self, members: &[MemberSpec]) {
        let mut wanted: HashMap<Key, &MemberSpec> = HashMap::new();
        for m in members {
            if m.public_key == self.public {
                tracing::warn!(cluster = %m.id, "a cluster uses the relay's own key; not served");
                continue;
            }
            if wanted.contains_key(&m.public_key) {
                tracing::warn!(cluster = %m.id, "two clusters use one WireGuard key; the relay serves only the first");
                continue;
            }
            wanted.insert(m.public_key, m);
        }
        let gone: Vec<Key> = self
            .members
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .copied()
            .collect();
        for key in &gone {
            if let Some(m) = self.members.remove(key) {
                if let Some(addr) = m.addr {
                    self.by_addr.remove(&addr);
                }
                for i in m.relay_indices {
                    self.relay_sessions.remove(&i);
                }
                tracing::info!(cluster = %m.id, "relay member removed");
            }
        }
        if !gone.is_empty() {
            self.routes.retain(|(from, _), r| {
                !gone.contains(from) && !gone.contains(&r.taught_by) && {
                    let Hop::Member(to) = r.to;
                    !gone.contains(&to)
                }
            });
        }
        for (key, spec) in wanted {
            if let Some(m) = self.members.get_mut(&key) {
                m.id.clone_from(&spec.id);
                continue;
            }
            let tunn = Tunn::new(
                self.private.clone(),
                x25519::PublicKey::from(key),
                None,
                None,
                self.index_table.clone(),
                self.rate_limiter.clone(),
            );
            self.members.insert(
                key,
                Member {
                    id: spec.id.clone(),
                    mac1_key: mac1_key(&key),
                    tunn,
                    addr: None,
                    last_heard: None,
                    last_handshake: None,
                    relay_indices: VecDeque::new(),
                    routes_taught: 0,
                    counters: MemberCounters::default(),
                },
            );
        }
    }

    fn routes_per_member(&self) -> usize {
        MIN_ROUTES_PER_MEMBER.max(self.members.len() * 16)
    }

    /// Decides what to do with `datagram`, received from `src` at `now`.
    pub fn handle(&mut self, src: SocketAddr, datagram: &[u8], now: Instant) -> Action {
        let action = self.decide(src, datagram, now);
        match &action {
            Action::Forward(_) => self.totals.forwarded[usize::from(datagram[0] - 1)] += 1,
            Action::Reply(_) | Action::Consumed => self.totals.own += 1,
            Action::Drop(reason) => *self.totals.dropped.entry(*reason).or_default() += 1,
        }
        action
    }

    fn decide(&mut self, src: SocketAddr, d: &[u8], now: Instant) -> Action {
        let kind = match (d.first().copied(), d.len()) {
            (Some(INIT), INIT_LEN) => INIT,
            (Some(RESPONSE), RESPONSE_LEN) => RESPONSE,
            (Some(COOKIE), COOKIE_LEN) => COOKIE,
            (Some(DATA), n) if n >= DATA_MIN_LEN => DATA,
            _ => return Action::Drop(DropReason::Malformed),
        };
        if d[1..4] != [0, 0, 0] {
            return Action::Drop(DropReason::Malformed);
        }
        if kind == INIT && mac1_matches(&self.own_mac1, d, INIT_MAC1) {
            return self.own_session(src, d, now);
        }
        if kind == DATA
            && let Some(key) = self.relay_sessions.get(&index_at(d, 4)).copied()
        {
            let action = self.own_session_data(key, src, d, now);
            if action != Action::Drop(DropReason::NotAuthenticated)
                || !self.by_addr.contains_key(&src)
            {
                return action;
            }
            // An index of a member-to-member session that happens to equal one of ours.
        }
        let Some(from) = self.by_addr.get(&src).copied() else {
            return Action::Drop(DropReason::UnknownSource);
        };
        match kind {
            INIT => {
                let Some(to) = self
                    .members
                    .iter()
                    .find(|(k, m)| **k != from && mac1_matches(&m.mac1_key, d, INIT_MAC1))
                    .map(|(k, _)| *k)
                else {
                    return Action::Drop(DropReason::UnknownResponder);
                };
                self.forward_learning(from, to, index_at(d, 4), d.len(), now)
            }
            RESPONSE => {
                let Some(to) = self.route(from, index_at(d, 8)) else {
                    return Action::Drop(DropReason::UnknownIndex);
                };
                if !mac1_matches(&self.members[&to].mac1_key, d, RESPONSE_MAC1) {
                    return Action::Drop(DropReason::UnknownResponder);
                }
                self.forward_learning(from, to, index_at(d, 4), d.len(), now)
            }
            _ => {
                let Some(to) = self.route(from, index_at(d, 4)) else {
                    return Action::Drop(DropReason::UnknownIndex);
                };
                self.forward(from, to, d.len())
            }
        }
    }

    fn route(&self, from: Key, index: u32) -> Option<Key> {
        self.routes.get(&(from, index)).map(|r| {
            let Hop::Member(to) = r.to;
            to
        })
    }

    /// Forwards a handshake message from `from` to `to`, learning that `sender_index`, heard
    /// from `to`, goes back to `from`.
    fn forward_learning(
        &mut self,
        from: Key,
        to: Key,
        sender_index: u32,
        len: usize,
        now: Instant,
    ) -> Action {
        if self.members[&to].addr.is_none() {
            return Action::Drop(DropReason::NoAddress);
        }
        let slot = (to, sender_index);
        if !self.routes.contains_key(&slot) {
            if self.members[&from].routes_taught >= self.routes_per_member() {
                return Action::Drop(DropReason::TableFull);
            }
            self.members.get_mut(&from).expect("member").routes_taught += 1;
        } else if let Some(old) = self.routes.get(&slot)
            && old.taught_by != from
        {
            let old = old.taught_by;
            if let Some(m) = self.members.get_mut(&old) {
                m.routes_taught = m.routes_taught.saturating_sub(1);
            }
            self.members.get_mut(&from).expect("member").routes_taught += 1;
        }
        self.routes.insert(
            slot,
            Route {
                to: Hop::Member(from),
                taught_by: from,
                learnt: now,
            },
        );
        self.forward(from, to, len)
    }

    fn forward(&mut self, from: Key, to: Key, len: usize) -> Action {
        let Some(addr) = self.members.get(&to).and_then(|m| m.addr) else {
            return Action::Drop(DropReason::NoAddress);
        };
        let len = len as u64;
        if let Some(m) = self.members.get_mut(&from) {
            m.counters.rx_bytes += len;
            m.counters.rx_datagrams += 1;
        }
        if let Some(m) = self.members.get_mut(&to) {
            m.counters.tx_bytes += len;
            m.counters.tx_datagrams += 1;
        }
        Action::Forward(addr)
    }

    /// An initiation to the relay's own key: its session with a member.
    fn own_session(&mut self, src: SocketAddr, d: &[u8], now: Instant) -> Action {
        let packet = Packet::from_bytes(BytesMut::from(d));
        let packet = match self.rate_limiter.verify_packet(src, packet) {
            Ok(WgKind::HandshakeInit(p)) => p,
            Ok(_) => return Action::Drop(DropReason::Malformed),
            // Under load: a cookie reply asks the sender to prove its address first.
            Err(TunnResult::WriteToNetwork(reply)) => {
                return Action::Reply(vec![Packet::from(reply).to_vec()]);
            }
            Err(_) => return Action::Drop(DropReason::NotAuthenticated),
        };
        let Ok(half) = gotatun::noise::handshake::parse_handshake_anon(
            &self.private,
            &self.public_x(),
            &packet,
        ) else {
            return Action::Drop(DropReason::NotAuthenticated);
        };
        let key = half.peer_static_public;
        let Some(member) = self.members.get_mut(&key) else {
            return Action::Drop(DropReason::UnknownSource);
        };
        match member
            .tunn
            .handle_incoming_packet(WgKind::HandshakeInit(packet))
        {
            TunnResult::WriteToNetwork(reply) => {
                let reply = Packet::from(reply).to_vec();
                if reply.len() == RESPONSE_LEN {
                    let index = index_at(&reply, 4);
                    member.relay_indices.push_back(index);
                    self.relay_sessions.insert(index, key);
                    while member.relay_indices.len() > RELAY_SESSIONS_PER_MEMBER {
                        if let Some(old) = member.relay_indices.pop_front() {
                            self.relay_sessions.remove(&old);
                        }
                    }
                }
                member.last_handshake = Some(now);
                self.heard(key, src, now);
                Action::Reply(vec![reply])
            }
            _ => Action::Drop(DropReason::NotAuthenticated),
        }
    }

    fn public_x(&self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.public)
    }

    /// Transport data of the relay's own session with `key` (keepalives).
    fn own_session_data(&mut self, key: Key, src: SocketAddr, d: &[u8], now: Instant) -> Action {
        let Some(member) = self.members.get_mut(&key) else {
            return Action::Drop(DropReason::NotAuthenticated);
        };
        let Ok(kind) = Packet::from_bytes(BytesMut::from(d)).try_into_wg() else {
            return Action::Drop(DropReason::Malformed);
        };
        match member.tunn.handle_incoming_packet(kind) {
            TunnResult::Done | TunnResult::WriteToTunnel(_) => {
                self.heard(key, src, now);
                // Anything queued (nothing: the relay never sends first) goes out now.
                Action::Consumed
            }
            TunnResult::WriteToNetwork(reply) => {
                self.heard(key, src, now);
                Action::Reply(vec![Packet::from(reply).to_vec()])
            }
            TunnResult::Err(_) => Action::Drop(DropReason::NotAuthenticated),
        }
    }

    /// `key` authenticated from `src`: that is its address now.
    fn heard(&mut self, key: Key, src: SocketAddr, now: Instant) {
        let Some(member) = self.members.get_mut(&key) else {
            return;
        };
        member.last_heard = Some(now);
        if member.addr == Some(src) {
            return;
        }
        let old = member.addr.replace(src);
        if let Some(old) = old {
            self.by_addr.remove(&old);
        }
        tracing::info!(cluster = %member.id, addr = %src, previous = ?old, "relay member registered at its mapped address");
        // One address, one member: a NAT may hand an old mapping to someone else.
        if let Some(other) = self.by_addr.insert(src, key)
            && other != key
            && let Some(o) = self.members.get_mut(&other)
        {
            o.addr = None;
        }
    }

    /// Timers of the relay's own sessions (what each must send; sent to its member) and
    /// expiry of index entries past [`ROUTE_LIFETIME`].
    pub fn tick(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        for m in self.members.values_mut() {
            if let Ok(Some(packet)) = m.tunn.update_timers()
                && let Some(addr) = m.addr
            {
                out.push((addr, Packet::from(packet).to_vec()));
            }
        }
        let mut expired: Vec<Key> = Vec::new();
        self.routes.retain(|_, r| {
            let keep = now.duration_since(r.learnt) < ROUTE_LIFETIME;
            if !keep {
                expired.push(r.taught_by);
            }
            keep
        });
        for k in expired {
            if let Some(m) = self.members.get_mut(&k) {
                m.routes_taught = m.routes_taught.saturating_sub(1);
            }
        }
        out
    }

    pub fn members(&self) -> Vec<MemberStatus> {
        self.members
            .iter()
            .map(|(k, m)| MemberStatus {
                id: m.id.clone(),
                public_key: *k,
                addr: m.addr,
                last_handshake: m.last_handshake,
                counters: m.counters,
            })
            .collect()
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    pub fn routes(&self) -> usize {
        self.routes.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gotatun::packet::WgKind;

    /// One side of a WireGuard session, as a member gateway runs it.
    pub(crate) struct End(Tunn);

    impl End {
        pub(crate) fn new(own: &x25519::StaticSecret, peer: Key) -> End {
            let public = x25519::PublicKey::from(own);
            End(Tunn::new(
                own.clone(),
                x25519::PublicKey::from(peer),
                None,
                None,
                IndexTable::from_os_rng(),
                Arc::new(RateLimiter::new(&public, 100)),
            ))
        }

        pub(crate) fn initiation(&mut self) -> Vec<u8> {
            Packet::from(WgKind::from(
                self.0.format_handshake_initiation(true).unwrap(),
            ))
            .to_vec()
        }

        /// What the session answers to `datagram` (a response, a keepalive) or decrypts.
        pub(crate) fn receive(&mut self, datagram: &[u8]) -> TunnResult {
            let kind = Packet::from_bytes(BytesMut::from(datagram))
                .try_into_wg()
                .unwrap();
            self.0.handle_incoming_packet(kind)
        }

        pub(crate) fn send(&mut self, payload: &[u8]) -> Vec<u8> {
            let packet = Packet::from_bytes(BytesMut::from(payload));
            match self.0.handle_outgoing_packet(packet, None) {
                Some(WgKind::Data(d)) => Packet::from(WgKind::Data(d)).to_vec(),
                other => panic!("no session to send on: {other:?}"),
            }
        }
    }

    pub(crate) fn out(r: TunnResult) -> Vec<u8> {
        match r {
            TunnResult::WriteToNetwork(p) => Packet::from(p).to_vec(),
            other => panic!("expected a datagram to send, got {other:?}"),
        }
    }

    struct Gateway {
        secret: x25519::StaticSecret,
        key: Key,
        addr: SocketAddr,
        relay: End,
    }

    fn gateway(relay: Key, addr: &str) -> Gateway {
        let secret = x25519::StaticSecret::random();
        let key = *x25519::PublicKey::from(&secret).as_bytes();
        Gateway {
            relay: End::new(&secret, relay),
            secret,
            key,
            addr: addr.parse().unwrap(),
        }
    }

    fn spec(id: &str, g: &Gateway) -> MemberSpec {
        MemberSpec {
            id: id.into(),
            public_key: g.key,
        }
    }

    /// `g` registers with the relay from `from`: initiation, response, confirming keepalive.
    fn register(f: &mut Forwarder, g: &mut Gateway, from: SocketAddr, now: Instant) {
        let init = g.relay.initiation();
        let Action::Reply(replies) = f.handle(from, &init, now) else {
            panic!("the relay did not answer the initiation");
        };
        let keepalive = out(g.relay.receive(&replies[0]));
        assert_eq!(f.handle(from, &keepalive, now), Action::Consumed);
    }

    /// A relay with members aa and bb registered at their addresses.
    fn fleet() -> (Forwarder, x25519::StaticSecret, Gateway, Gateway) {
        let relay_secret = x25519::StaticSecret::random();
        let mut f = Forwarder::new(relay_secret.to_bytes());
        let mut a = gateway(f.public_key(), "203.0.113.21:40001");
        let mut b = gateway(f.public_key(), "203.0.113.22:40002");
        f.set_members(&[spec("aa", &a), spec("bb", &b)]);
        let now = Instant::now();
        let (aa, ba) = (a.addr, b.addr);
        register(&mut f, &mut a, aa, now);
        register(&mut f, &mut b, ba, now);
        (f, relay_secret, a, b)
    }

    pub(crate) fn ipv4_packet(marker: &[u8]) -> Vec<u8> {
        let total = 20 + marker.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&[100, 96, 0, 1, 100, 96, 16, 1]);
        p.extend_from_slice(marker);
        p
    }

    #[test]
    fn mac1_finds_the_responder_of_an_initiation() {
        let (_, _, mut a, b) = fleet();
        let mut ab = End::new(&a.secret, b.key);
        let init = ab.initiation();
        assert!(mac1_matches(&mac1_key(&b.key), &init, INIT_MAC1));
        assert!(!mac1_matches(&mac1_key(&a.key), &init, INIT_MAC1));
        let to_relay = a.relay.initiation();
        assert!(!mac1_matches(&mac1_key(&b.key), &to_relay, INIT_MAC1));
    }

    #[test]
    fn members_handshake_and_exchange_data_end_to_end_through_the_relay() {
        let (mut f, relay_secret, a, b) = fleet();
        let now = Instant::now();
        let mut ab = End::new(&a.secret, b.key);
        let mut ba = End::new(&b.secret, a.key);

        let init = ab.initiation();
        assert_eq!(f.handle(a.addr, &init, now), Action::Forward(b.addr));
        // The relay's key cannot open the initiation: it does not learn who sent it.
        let packet = Packet::from_bytes(BytesMut::from(&init[..]))
            .try_into_wg()
            .unwrap();
        let WgKind::HandshakeInit(packet) = packet else {
            panic!()
        };
        let relay_public = x25519::PublicKey::from(&relay_secret);
        assert!(
            gotatun::noise::handshake::parse_handshake_anon(&relay_secret, &relay_public, &packet)
                .is_err()
        );
        let response = out(ba.receive(&init));
        assert_eq!(f.handle(b.addr, &response, now), Action::Forward(a.addr));
        let confirm = out(ab.receive(&response));
        assert_eq!(f.handle(a.addr, &confirm, now), Action::Forward(b.addr));
        assert!(matches!(ba.receive(&confirm), TunnResult::WriteToTunnel(p) if p.is_empty()));

        let mut one_way = |from, to, sender: &mut End, receiver: &mut End| {
            let inner = ipv4_packet(b"fleet-plaintext-marker");
            let sealed = sender.send(&inner);
            assert!(!sealed.windows(6).any(|w| w == b"marker"), "encrypted");
            assert_eq!(f.handle(from, &sealed, now), Action::Forward(to));
            match receiver.receive(&sealed) {
                TunnResult::WriteToTunnel(p) => assert_eq!(&p[..], &inner[..]),
                other => panic!("{other:?}"),
            }
        };
        one_way(a.addr, b.addr, &mut ab, &mut ba);
        one_way(b.addr, a.addr, &mut ba, &mut ab);
        assert_eq!(f.totals().forwarded, [1, 1, 0, 3]);
        let bytes: HashMap<String, MemberCounters> = f
            .members()
            .into_iter()
            .map(|m| (m.id, m.counters))
            .collect();
        assert_eq!(bytes["aa"].rx_datagrams, 3);
        assert_eq!(bytes["bb"].rx_datagrams, 2);
    }

    #[test]
    fn strangers_unknown_indices_and_unregistered_members_are_not_forwarded() {
        let (mut f, _, a, b) = fleet();
        let now = Instant::now();
        let mut ab = End::new(&a.secret, b.key);
        let init = ab.initiation();
        // Not from a member's registered address: no open reflector.
        let stranger: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        assert_eq!(
            f.handle(stranger, &init, now),
            Action::Drop(DropReason::UnknownSource)
        );
        // Transport data with an index no handshake taught.
        let mut data = vec![4, 0, 0, 0, 1, 2, 3, 4];
        data.resize(48, 0);
        assert_eq!(
            f.handle(a.addr, &data, now),
            Action::Drop(DropReason::UnknownIndex)
        );
        // An initiation for a key that is no member.
        let mut ax = End::new(
            &a.secret,
            *x25519::PublicKey::from(&x25519::StaticSecret::random()).as_bytes(),
        );
        assert_eq!(
            f.handle(a.addr, &ax.initiation(), now),
            Action::Drop(DropReason::UnknownResponder)
        );
        // Not WireGuard.
        assert_eq!(
            f.handle(a.addr, b"GET / HTTP/1.1\r\n", now),
            Action::Drop(DropReason::Malformed)
        );
        // A member without an address yet (cc joined, never registered).
        let c = gateway(f.public_key(), "203.0.113.23:40003");
        f.set_members(&[spec("aa", &a), spec("bb", &b), spec("cc", &c)]);
        let mut ac = End::new(&a.secret, c.key);
        assert_eq!(
            f.handle(a.addr, &ac.initiation(), now),
            Action::Drop(DropReason::NoAddress)
        );
    }

    #[test]
    fn a_member_that_roams_is_followed_and_a_removed_one_forgotten() {
        let (mut f, _, mut a, b) = fleet();
        let now = Instant::now();
        let mut ab = End::new(&a.secret, b.key);
        let mut ba = End::new(&b.secret, a.key);
        let init = ab.initiation();
        assert_eq!(f.handle(a.addr, &init, now), Action::Forward(b.addr));
        let response = out(ba.receive(&init));
        f.handle(b.addr, &response, now);
        out(ab.receive(&response));

        // aa's NAT gives it a new mapping: its next keepalive to the relay moves it.
        let moved: SocketAddr = "203.0.113.21:40999".parse().unwrap();
        let keepalive = a.relay.send(&[]);
        assert_eq!(f.handle(moved, &keepalive, now), Action::Consumed);
        let sealed = ba.send(&ipv4_packet(b"x"));
        assert_eq!(f.handle(b.addr, &sealed, now), Action::Forward(moved));
        // The old address is nobody's now.
        let sealed = ab.send(&ipv4_packet(b"y"));
        assert_eq!(
            f.handle(a.addr, &sealed, now),
            Action::Drop(DropReason::UnknownSource)
        );
        a.addr = moved;

        // aa removed: bb's datagrams to it are dropped, its index entries gone.
        f.set_members(&[spec("bb", &b)]);
        assert_eq!(f.routes(), 0);
        let sealed = ba.send(&ipv4_packet(b"z"));
        assert_eq!(
            f.handle(b.addr, &sealed, now),
            Action::Drop(DropReason::UnknownIndex)
        );
        assert_eq!(
            f.handle(a.addr, &ab.send(&ipv4_packet(b"w")), now),
            Action::Drop(DropReason::UnknownSource)
        );
    }

    #[test]
    fn index_entries_expire_with_their_session_and_are_bounded_per_member() {
        let (mut f, _, a, b) = fleet();
        let now = Instant::now();
        let mut ab = End::new(&a.secret, b.key);
        f.handle(a.addr, &ab.initiation(), now);
        assert_eq!(f.routes(), 1);
        f.tick(now + ROUTE_LIFETIME - Duration::from_secs(1));
        assert_eq!(f.routes(), 1);
        f.tick(now + ROUTE_LIFETIME);
        assert_eq!(f.routes(), 0);

        // A member that floods initiations fills only its own share.
        let mut init = ab.initiation();
        let share = f.routes_per_member();
        for i in 0..share as u32 {
            init[4..8].copy_from_slice(&i.to_le_bytes());
            // mac1 covers the index: recompute it as a sender would.
            let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(&mac1_key(&b.key)).unwrap();
            mac.update(&init[..INIT_MAC1]);
            init[INIT_MAC1..INIT_MAC1 + 16].copy_from_slice(&mac.finalize().into_bytes());
            assert_eq!(f.handle(a.addr, &init, now), Action::Forward(b.addr));
        }
        init[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut mac = <Blake2sMac<U16> as Mac>::new_from_slice(&mac1_key(&b.key)).unwrap();
        mac.update(&init[..INIT_MAC1]);
        init[INIT_MAC1..INIT_MAC1 + 16].copy_from_slice(&mac.finalize().into_bytes());
        assert_eq!(
            f.handle(a.addr, &init, now),
            Action::Drop(DropReason::TableFull)
        );
        // bb's own handshakes are unaffected.
        let mut ba = End::new(&b.secret, a.key);
        assert_eq!(
            f.handle(b.addr, &ba.initiation(), now),
            Action::Forward(a.addr)
        );
    }
}

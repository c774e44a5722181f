//! The fleet as members see it on the wire: clusters, their blocks and WireGuard keys, the
//! records they publish, the hub's relays, leases, join tokens, and the events of a watch.
//! Plain data with validation; no I/O.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use fleet_proto::wireguard::{InvalidPublicKey, PublicKey};

/// The hub's store revision: grows by one or more with every change; a watch resumes after
/// one.
pub type Revision = u64;

/// Text that is not a valid model value. Each message names the input and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error(
        "invalid cluster id {0:?}: use a DNS label (lowercase letters, digits and '-', 1-63 \
         characters, starting and ending with a letter or digit)"
    )]
    InvalidClusterId(String),
    #[error(transparent)]
    InvalidPublicKey(#[from] InvalidPublicKey),
    /// The input is not repeated: it may hold a secret.
    #[error("malformed join token: expected <12 hex digits>.<64 hex digits>")]
    TokenMalformed,
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// A member cluster's name: a DNS label (`[a-z0-9-]`, 1–63 chars, alphanumeric at both ends),
/// so it is safe in store keys, DNS names and interface names alike.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterId(String);

impl ClusterId {
    /// Errors: [`ModelError::InvalidClusterId`] unless `id` is a DNS label.
    pub fn new(id: impl Into<String>) -> Result<Self, ModelError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-');
        if valid {
            Ok(ClusterId(id))
        } else {
            Err(ModelError::InvalidClusterId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClusterId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ClusterId::new(s)
    }
}

impl std::str::FromStr for ClusterId {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClusterId::new(s)
    }
}

impl From<ClusterId> for String {
    fn from(id: ClusterId) -> String {
        id.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the cluster's gateway last reported about its tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayState {
    /// Joined, no tunnel reported yet.
    #[default]
    Pending,
    Up,
    Down,
}

/// A member cluster as the hub knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub id: ClusterId,
    /// The cluster's block of the fleet CIDR; kept across re-joins.
    pub block: Ipv4Network,
    pub public_key: PublicKey,
    /// Set when the cluster's gateway is publicly reachable (direct tunnels to it).
    pub endpoint: Option<SocketAddr>,
    pub gateway: GatewayState,
    /// The cluster's controller lease is held: granted, and renewed within its TTL as the hub
    /// observed it. Written by the hub only when it changes (a grant after a lapse; the
    /// lease sweep), so members follow every cluster's liveness from this record without
    /// receiving any renewal or heartbeat. `true` in records of hubs that predate it.
    #[serde(default = "held")]
    pub controller_live: bool,
    /// Unix seconds of the first join.
    pub joined_at: u64,
    /// The join token it joined with (its id only).
    pub token_id: String,
}

fn held() -> bool {
    true
}

/// What a cluster sends to join (or re-join).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub cluster: ClusterId,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
}

/// A member's change to its own record; `None` fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterUpdate {
    pub public_key: Option<PublicKey>,
    pub endpoint: Option<Option<SocketAddr>>,
    pub gateway: Option<GatewayState>,
}

/// A record a member published (opaque bytes here; the schemas are in [`crate::records`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    pub owner: ClusterId,
    pub name: String,
    pub value: Vec<u8>,
    pub revision: Revision,
}

/// One hub replica's relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRecord {
    /// The replica's relay id (derived from its public key: stable across restarts).
    pub id: String,
    pub public_key: PublicKey,
    /// Where members send their encrypted traffic.
    pub endpoint: SocketAddr,
    /// Unix time in milliseconds (by the hub's clock) after which the record is swept unless
    /// its relay renews it. Set by the hub on publish; 0 (a record without one) counts as
    /// expired.
    #[serde(default)]
    pub expires_at: u64,
    /// New at every start of the relay process: a member that sees it change resets its
    /// sessions through the relay (the new process knows no member's address nor any session
    /// index). Empty from a relay that predates it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
}

impl RelayRecord {
    /// The id a relay with this key gets: the first 6 bytes of its public key, in hex.
    pub fn id_for(public_key: &PublicKey) -> String {
        hex(&public_key.as_bytes()[..6])
    }

    /// The same relay (id, key, endpoint), whatever the expiry.
    pub fn same_relay(&self, other: &RelayRecord) -> bool {
        (&self.id, self.public_key, self.endpoint) == (&other.id, other.public_key, other.endpoint)
    }
}

/// Everything a member may read, at one revision: watch from `revision` to follow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetView {
    /// The fleet CIDR every cluster's block is cut from (what members route to the relay).
    pub fleet_cidr: Ipv4Network,
    pub clusters: Vec<ClusterRecord>,
    pub records: Vec<MemberRecord>,
    /// The hub's relays (one per replica that runs one).
    pub relays: Vec<RelayRecord>,
    pub revision: Revision,
}

/// Which part of the fleet a listing or a watch carries (`/v1/list` and `/v1/watch`,
/// field `scope`; `all` when absent, as before the field existed).
///
/// Scale: with `all`, every watcher receives every member's `gateway` record, republished by
/// every member every status interval, so N members cost O(N²) events per interval (1,000
/// members at the default 5 s: 200,000 events/s). A member needs only the fleet's shape, the
/// other clusters' service exports and its own records; the relay needs only the shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetScope {
    /// Everything: clusters, relays, every record (operators' tools, the fleet board).
    #[default]
    All,
    /// Clusters, relays, every cluster's `export/*` records and every record of the caller's
    /// own cluster (controllers, `fleet-dns`). Needs a member credential.
    Member,
    /// Clusters and relays, no records (the relay).
    Clusters,
}

impl FleetScope {
    /// Whether record `name` of `owner` is in this scope for a caller of cluster `own`.
    pub fn includes_record(self, own: Option<&ClusterId>, owner: &str, name: &str) -> bool {
        match self {
            FleetScope::All => true,
            FleetScope::Clusters => false,
            FleetScope::Member => {
                own.is_some_and(|o| o.as_str() == owner)
                    || name.starts_with(crate::records::EXPORT_RECORD_PREFIX)
            }
        }
    }
}

/// One change to the fleet as a member sees it (tokens and internals are not shown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryEvent {
    ClusterUpserted {
        record: ClusterRecord,
        revision: Revision,
    },
    ClusterRemoved {
        id: ClusterId,
        revision: Revision,
    },
    RecordPut {
        owner: ClusterId,
        name: String,
        value: Vec<u8>,
        revision: Revision,
    },
    RecordDeleted {
        owner: ClusterId,
        name: String,
        revision: Revision,
    },
    RelayUpserted {
        record: RelayRecord,
        revision: Revision,
    },
    RelayRemoved {
        id: String,
        revision: Revision,
    },
}

impl RegistryEvent {
    pub fn revision(&self) -> Revision {
        match self {
            RegistryEvent::ClusterUpserted { revision, .. }
            | RegistryEvent::ClusterRemoved { revision, .. }
            | RegistryEvent::RecordPut { revision, .. }
            | RegistryEvent::RecordDeleted { revision, .. }
            | RegistryEvent::RelayUpserted { revision, .. }
            | RegistryEvent::RelayRemoved { revision, .. } => *revision,
        }
    }
}

/// The answer to a lease acquire (or renew): the cluster's controller lease at the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// True when the caller holds the lease now.
    pub granted: bool,
    /// Who holds it (the caller when granted).
    pub holder: String,
    /// The holder's generation: grows whenever the holder changes.
    pub generation: u64,
    /// Granted: the TTL just granted. Refused: how long the current holder's lease still runs.
    pub ttl: Duration,
}

const TOKEN_ID_BYTES: usize = 6;
const TOKEN_SECRET_BYTES: usize = 32;

/// A join token as handed to an operator once, and presented by a joining cluster:
/// `<id>.<secret>`, the id public (listed, revoked by), the secret stored by the hub only as
/// its SHA-256. Its `Debug` shows the id only; it is never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

impl JoinToken {
    /// A fresh token from the OS random source. Errors: [`ModelError::Random`].
    pub fn generate() -> Result<Self, ModelError> {
        let mut id = [0u8; TOKEN_ID_BYTES];
        let mut secret = [0u8; TOKEN_SECRET_BYTES];
        getrandom::fill(&mut id)
            .and_then(|()| getrandom::fill(&mut secret))
            .map_err(|e| ModelError::Random(e.to_string()))?;
        Ok(JoinToken {
            id: hex(&id),
            secret: hex(&secret),
        })
    }

    /// Parses `<12 hex>.<64 hex>`. Errors: [`ModelError::TokenMalformed`], which never
    /// repeats the input.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let (id, secret) = text
            .trim()
            .split_once('.')
            .ok_or(ModelError::TokenMalformed)?;
        let is_hex = |s: &str, n: usize| {
            s.len() == n * 2
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, TOKEN_ID_BYTES) || !is_hex(secret, TOKEN_SECRET_BYTES) {
            return Err(ModelError::TokenMalformed);
        }
        Ok(JoinToken {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// The public half: lists and revocations name a token by it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The full token text, to hand to an operator exactly once. Never log it.
    pub fn expose_secret(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// SHA-256 of the secret in hex: what the hub stores and compares.
    pub fn secret_hash(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A token as listed: everything but the secret (and its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub description: String,
    /// Unix seconds.
    pub created_at: u64,
    pub expires_at: u64,
    pub revoked_at: Option<u64>,
}

/// A token lifetime: `90s`, `30m`, `24h`, `7d` (a positive whole number and one unit);
/// `None` for anything else.
pub fn parse_lifetime(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.len().checked_sub(1)?;
    let (number, unit) = text.split_at_checked(split)?;
    let n: u64 = number.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    let secs = n.checked_mul(scale).filter(|s| *s > 0)?;
    Some(Duration::from_secs(secs))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_dns_labels() {
        for ok in ["aa", "a", "cluster-1", "0"] {
            ClusterId::new(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a/b", "a.b", &"x".repeat(64)] {
            assert!(ClusterId::new(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<ClusterId>("\"Bad\"").is_err());
    }

    #[test]
    fn public_keys_round_trip_base64() {
        let key = PublicKey::from_bytes([7; 32]);
        let text = key.to_string();
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        assert!("abc".parse::<PublicKey>().is_err());
    }

    #[test]
    fn tokens_parse_and_never_show_their_secret() {
        let t = JoinToken::generate().unwrap();
        let text = t.expose_secret();
        assert_eq!(JoinToken::parse(&text).unwrap(), t);
        assert!(!format!("{t:?}").contains(&text[13..]));
        for bad in [
            "",
            "abc",
            "0123456789ab",
            "0123456789ab.xyz",
            &text.to_uppercase(),
        ] {
            let err = JoinToken::parse(bad).unwrap_err();
            assert_eq!(err, ModelError::TokenMalformed);
        }
    }

    #[test]
    fn relay_ids_come_from_the_key() {
        let k = PublicKey::from_bytes([0xab; 32]);
        assert_eq!(RelayRecord::id_for(&k), "abababababab");
    }
}

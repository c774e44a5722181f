//! The hub API on the wire: what members and operators send and receive, over TLS.
//!
//! # Protocol: HTTP/1.1 + JSON, watch as a stream of JSON lines
//!
//! Every call is `POST /v1/<call>` with a JSON body and a JSON answer; errors are a status
//! code plus `{"code": ..., "message": ...}` with a stable [`ErrorCode`]. `watch` answers with
//! a chunked body of newline-delimited JSON, one [`WatchLine`] per change (plus heartbeats).
//!
//! Why not gRPC (tonic is in the tree through etcd-client): the API is a dozen small calls and
//! one server stream, which HTTP/1.1 chunked transfer does as well as an HTTP/2 stream; JSON
//! keeps the wire readable with `curl --cacert` when a member misbehaves, needs no protobuf
//! code generation in this crate, and the same serde types are the store's record format. The
//! price is no multiplexing: a client holds one connection for calls and one per watch, which
//! at 1,000 members is 2,000 TLS connections — well within one hub (see `hub-scale`).
//!
//! # Identity
//!
//! - A join string `<token id>.<token secret>.<CA SHA-256>` ([`JoinString`]) lets a member pin
//!   the hub's CA ([`crate::tls`]) and present the token. A successful join returns a per-cluster
//!   credential ([`Credential::Member`]), stored by the hub as a SHA-256 only.
//! - Every later call carries `Authorization: Bearer <credential>`. The writer of a member
//!   call is the cluster named by the *verified credential*, never by the request body: the
//!   registry's ownership rule then refuses writes to another cluster's records.
//! - Token calls need the admin credential (`<data dir>/admin.credential`, 0600).

use std::fmt;
use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::model::{
    ClusterId, ClusterRecord, FleetScope, GatewayState, JoinToken, MemberRecord, ModelError,
    PublicKey, RegistryEvent, RelayRecord, Revision, TokenInfo,
};
pub use crate::tls::CaHash;

/// Largest request body the hub reads (a record value is at most a little less).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How often a hub sends a heartbeat line on a watch with nothing else to say. Heartbeats are
/// sent only while the replica's store answers, so a silent watch means "this replica cannot
/// serve" (its host gone, or its store cut) as well as "connection dead".
pub const WATCH_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// A client gives up on a watch that heard nothing for this many heartbeat intervals (one
/// late heartbeat is tolerated, two are not).
pub const WATCH_IDLE_HEARTBEATS: u32 = 3;

/// A credential presented as a bearer token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// `m.<cluster>.<64 hex>`: a member cluster's own credential, from its join.
    Member { cluster: ClusterId, secret: String },
    /// `a.<64 hex>`: the hub operator's.
    Admin(String),
}

fn is_secret(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Credential {
    pub fn parse(text: &str) -> Option<Credential> {
        let text = text.trim();
        if let Some(secret) = text.strip_prefix("a.") {
            return is_secret(secret).then(|| Credential::Admin(secret.to_string()));
        }
        let rest = text.strip_prefix("m.")?;
        let (cluster, secret) = rest.rsplit_once('.')?;
        let cluster = ClusterId::new(cluster).ok()?;
        is_secret(secret).then(|| Credential::Member {
            cluster,
            secret: secret.to_string(),
        })
    }

    /// The credential's text, to store (0600) or send. Never log it.
    pub fn expose(&self) -> String {
        match self {
            Credential::Member { cluster, secret } => format!("m.{cluster}.{secret}"),
            Credential::Admin(secret) => format!("a.{secret}"),
        }
    }

    /// SHA-256 of the secret in hex: what the hub stores and compares.
    pub fn secret_sha256(&self) -> String {
        let secret = match self {
            Credential::Member { secret, .. } | Credential::Admin(secret) => secret,
        };
        crate::model::sha256_hex(secret.as_bytes())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Member { cluster, .. } => {
                write!(f, "Credential::Member({cluster}, <redacted>)")
            }
            Credential::Admin(_) => f.write_str("Credential::Admin(<redacted>)"),
        }
    }
}

/// What an operator hands to a joining cluster: the join token and the hub CA's hash.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinString {
    pub token: JoinToken,
    pub ca_hash: CaHash,
}

impl JoinString {
    /// Parses `<token id>.<token secret>.<CA SHA-256>`; errors never repeat the input.
    ///
    /// Errors: [`ModelError::TokenMalformed`].
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let text = text.trim();
        let (token, ca) = text.rsplit_once('.').ok_or(ModelError::TokenMalformed)?;
        let ca_hash = ca.parse().map_err(|_| ModelError::TokenMalformed)?;
        Ok(JoinString {
            token: JoinToken::parse(token)?,
            ca_hash,
        })
    }

    /// The full text. Never log it.
    pub fn expose_secret(&self) -> String {
        format!("{}.{}", self.token.expose_secret(), self.ca_hash)
    }
}

impl fmt::Debug for JoinString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinString")
            .field("token", &self.token)
            .field("ca_hash", &self.ca_hash)
            .finish()
    }
}

/// Stable machine-readable error codes of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    TokenMalformed,
    TokenInvalid,
    TokenExpired,
    TokenRevoked,
    Unauthenticated,
    PermissionDenied,
    NotJoined,
    AlreadyJoined,
    FleetExhausted,
    NotFound,
    InvalidArgument,
    /// The watch's start is no longer in the store's history: relist, then watch again.
    Compacted,
    TooLarge,
    /// The member is at its record count or byte quota: retrying gets the same answer until
    /// it unpublishes something or the operator raises the quota.
    QuotaExceeded,
    Timeout,
    Unavailable,
    Internal,
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::TokenMalformed | ErrorCode::InvalidArgument => 400,
            ErrorCode::TokenInvalid
            | ErrorCode::TokenExpired
            | ErrorCode::TokenRevoked
            | ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied | ErrorCode::QuotaExceeded => 403,
            ErrorCode::NotJoined | ErrorCode::NotFound => 404,
            ErrorCode::AlreadyJoined | ErrorCode::FleetExhausted => 409,
            ErrorCode::Compacted => 410,
            ErrorCode::TooLarge => 413,
            ErrorCode::Timeout => 504,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }
}

/// An error as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

// ---- calls ------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinCall {
    /// `<token id>.<token secret>` (the CA hash stays with the client).
    pub token: String,
    pub cluster: ClusterId,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub record: ClusterRecord,
    /// The member's credential (`m.<cluster>.<secret>`): shown once, stored only hashed.
    pub credential: String,
}

/// A re-join with the member's credential: keeps the block, updates key and endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RejoinCall {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
}

/// How an update treats the public endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointUpdate {
    Set(SocketAddr),
    Clear,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpdateCall {
    /// The cluster whose record is written (must be the caller's own).
    pub cluster: Option<ClusterId>,
    #[serde(default)]
    pub public_key: Option<PublicKey>,
    #[serde(default)]
    pub endpoint: Option<EndpointUpdate>,
    #[serde(default)]
    pub gateway: Option<GatewayState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordCall {
    /// The owning cluster (must be the caller's own).
    pub owner: ClusterId,
    pub name: String,
    /// Base64 of the value (publish only).
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RevisionReply {
    pub revision: Revision,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemovedReply {
    pub removed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordWire {
    pub owner: ClusterId,
    pub name: String,
    /// Base64.
    pub value: String,
    pub revision: Revision,
}

impl From<MemberRecord> for RecordWire {
    fn from(r: MemberRecord) -> Self {
        RecordWire {
            owner: r.owner,
            name: r.name,
            value: BASE64.encode(&r.value),
            revision: r.revision,
        }
    }
}

impl RecordWire {
    pub fn into_record(self) -> Result<MemberRecord, String> {
        Ok(MemberRecord {
            value: BASE64
                .decode(&self.value)
                .map_err(|e| format!("record {}/{}: bad base64: {e}", self.owner, self.name))?,
            owner: self.owner,
            name: self.name,
            revision: self.revision,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListReply {
    pub fleet_cidr: ipnetwork::Ipv4Network,
    pub clusters: Vec<ClusterRecord>,
    pub records: Vec<RecordWire>,
    #[serde(default)]
    pub relays: Vec<RelayRecord>,
    pub revision: Revision,
}

/// Acquire or renew the caller's cluster lease for `holder`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseCall {
    pub holder: String,
    pub ttl_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseReply {
    pub granted: bool,
    pub holder: String,
    pub generation: u64,
    /// Granted: the TTL granted; refused: what remains of the holder's lease.
    pub ttl_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseReleaseCall {
    pub holder: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleasedReply {
    pub released: bool,
}

/// Admin (the relay): publish or renew a relay record, valid for `ttl_ms` from the hub's
/// now (absent: [`DEFAULT_RELAY_TTL_MS`]); the record's `expires_at` is set by the hub.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayPublishCall {
    #[serde(flatten)]
    pub record: RelayRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// The TTL of a relay record published without one.
pub const DEFAULT_RELAY_TTL_MS: u64 = 6_000;

/// Admin: withdraw relay `id`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayRemoveCall {
    pub id: String,
}

/// Admin: remove cluster `id` (its record, block, credential, lease and records).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterRemoveCall {
    pub id: ClusterId,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchCall {
    /// Changes with a revision above this one.
    pub after: Revision,
    /// Which changes (absent: all).
    #[serde(default)]
    pub scope: FleetScope,
}

/// The body of `/v1/list` (absent or `null`: the whole fleet).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListCall {
    #[serde(default)]
    pub scope: FleetScope,
}

/// One line of a watch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchLine {
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
        value: String,
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
    /// Sent when nothing changed for a while, so a client can tell a quiet hub from a dead one.
    Heartbeat,
    /// The stream ends after this.
    Error(ErrorBody),
}

impl From<RegistryEvent> for WatchLine {
    fn from(e: RegistryEvent) -> Self {
        match e {
            RegistryEvent::ClusterUpserted { record, revision } => {
                WatchLine::ClusterUpserted { record, revision }
            }
            RegistryEvent::ClusterRemoved { id, revision } => {
                WatchLine::ClusterRemoved { id, revision }
            }
            RegistryEvent::RecordPut {
                owner,
                name,
                value,
                revision,
            } => WatchLine::RecordPut {
                owner,
                name,
                value: BASE64.encode(&value),
                revision,
            },
            RegistryEvent::RecordDeleted {
                owner,
                name,
                revision,
            } => WatchLine::RecordDeleted {
                owner,
                name,
                revision,
            },
            RegistryEvent::RelayUpserted { record, revision } => {
                WatchLine::RelayUpserted { record, revision }
            }
            RegistryEvent::RelayRemoved { id, revision } => {
                WatchLine::RelayRemoved { id, revision }
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenCreateCall {
    pub ttl_secs: u64,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenCreateReply {
    /// The join string (token + CA hash): shown once.
    pub join: String,
    pub info: TokenInfo,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenListReply {
    pub tokens: Vec<TokenInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRevokeCall {
    pub id: String,
}

/// `board/login` (admin): a one-time link to the fleet board. The path carries a random
/// token, never the admin credential; opening it within `expires_in_secs` swaps it for a
/// browser session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BoardLoginReply {
    /// `/board/login?token=…`, to append to `https://<hub address>`.
    pub path: String,
    pub expires_in_secs: u64,
}

/// Record values travel in base64.
pub fn decode_b64(text: &str) -> Result<Vec<u8>, String> {
    BASE64.decode(text).map_err(|e| format!("bad base64: {e}"))
}

/// Record values travel in base64.
pub fn encode_b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_and_redact() {
        let secret = "ab".repeat(32);
        let member = Credential::parse(&format!("m.cluster-1.{secret}")).unwrap();
        assert!(
            matches!(&member, Credential::Member { cluster, .. } if cluster.as_str() == "cluster-1")
        );
        assert_eq!(member.expose(), format!("m.cluster-1.{secret}"));
        assert!(!format!("{member:?}").contains(&secret));
        let admin = Credential::parse(&format!("a.{secret}")).unwrap();
        assert!(!format!("{admin:?}").contains(&secret));
        for bad in [
            "",
            "a.",
            "m.x",
            "m..abc",
            &format!("m.UPPER.{secret}"),
            "a.zz",
        ] {
            assert!(Credential::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn join_strings_round_trip() {
        let token = format!("{}.{}", "0a".repeat(6), "1b".repeat(32));
        let ca = "c".repeat(64);
        let js = JoinString::parse(&format!("{token}.{ca}")).unwrap();
        assert_eq!(js.expose_secret(), format!("{token}.{ca}"));
        assert!(!format!("{js:?}").contains(&"1b".repeat(32)));
        assert!(
            JoinString::parse(&token).is_err(),
            "a bare token has no CA hash"
        );
    }
}

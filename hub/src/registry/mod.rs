//! The registry: the hub's model of the fleet, kept in a [`Store`].
//!
//! It owns the member clusters (block, WireGuard key, endpoint, gateway state), the
//! allocation of fleet blocks, the join tokens, and the records each member publishes
//! (exports and the like; opaque bytes here). Every multi-key change is one store
//! transaction guarded by conditions, so several hub replicas on one etcd never hand out the
//! same block, and a failed operation changes nothing.
//!
//! Store layout (keys under the store's namespace):
//! ```text
//! meta/layout               FleetLayout (fleet CIDR + block prefix), written once
//! clusters/<id>             ClusterRecord (JSON)
//! blocks/<addr>_<prefix>    owning cluster id: the allocation marker that makes blocks unique
//! tokens/<token id>         token record (secret as SHA-256 only)
//! records/<id>/<name>       a record published by cluster <id>
//! credentials/<id>          SHA-256 of the cluster's API credential secret (set at join)
//! leases/<id>               the cluster's controller lease (holder, generation, expiry)
//! relays/<relay id>         a hub replica's relay (WireGuard key + endpoint + expiry)
//! usage/<id>                what cluster <id>'s records hold (count, bytes): its quota
//! ```
//! Ownership: every member write names the writer's cluster id; a writer may only touch its own
//! cluster's records ([`RegistryError::NotOwner`] otherwise). Admin operations (tokens,
//! removing a cluster) take no writer; the API layer decides who may call them.

mod expiry;
mod fanout;
mod lease;
mod model;
mod quota;
mod relay;
mod token;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ipnetwork::Ipv4Network;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use fleet_hub_api::model::{
    ClusterId, ClusterRecord, ClusterUpdate, FleetScope, FleetView, GatewayState, JoinRequest,
    MemberRecord, ModelError, PublicKey, RegistryEvent,
};
pub use lease::{Lease, MAX_LEASE_TTL};
pub use model::{DEFAULT_BLOCK_PREFIX, FleetLayout};
pub use quota::{DEFAULT_MEMBER_MAX_BYTES, DEFAULT_MEMBER_MAX_RECORDS, Quotas, Usage};
pub use relay::{MAX_RELAY_TTL, RelayRecord};
pub use token::{Clock, JoinToken, ManualClock, SystemClock, TokenInfo};

use crate::store::{Change, Condition, Revision, Store, StoreError, Txn, TxnOutcome};
pub(crate) use fleet_hub_api::model::sha256_hex;
pub(crate) use token::constant_time_eq;
use token::{TokenRecord, unix_secs};

const LAYOUT_KEY: &str = "meta/layout";
const CLUSTERS: &str = "clusters/";
const BLOCKS: &str = "blocks/";
const TOKENS: &str = "tokens/";
const RECORDS: &str = "records/";
const CREDENTIALS: &str = "credentials/";

/// Conflicting writers retry; past this many lost races something is wrong.
const MAX_CONTENDED_RETRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid record name {0:?}: use 1-253 printable characters")]
    InvalidRecordName(String),
    #[error(
        "invalid fleet layout: blocks of /{block_prefix} do not fit the fleet CIDR {fleet_cidr} \
         (the block prefix must be between the fleet's prefix and 30)"
    )]
    InvalidLayout {
        fleet_cidr: Ipv4Network,
        block_prefix: u8,
    },
    #[error(
        "this store's fleet uses {stored_cidr} in blocks of /{stored_prefix}, but the hub is \
         configured with {configured_cidr} in /{configured_prefix}; the layout of a fleet cannot \
         change: fix the hub's configuration"
    )]
    LayoutMismatch {
        stored_cidr: Ipv4Network,
        stored_prefix: u8,
        configured_cidr: Ipv4Network,
        configured_prefix: u8,
    },
    #[error(
        "the fleet CIDR {fleet_cidr} is exhausted: all {blocks} blocks of /{block_prefix} are \
         allocated; remove a departed cluster or grow the fleet CIDR"
    )]
    FleetExhausted {
        fleet_cidr: Ipv4Network,
        block_prefix: u8,
        blocks: u64,
    },
    #[error("invalid join token {id}: no such token or wrong secret")]
    TokenInvalid { id: String },
    #[error("join token {id} expired at unix time {expired_at}; create a new token")]
    TokenExpired { id: String, expired_at: u64 },
    #[error("join token {id} was revoked at unix time {revoked_at}; create a new token")]
    TokenRevoked { id: String, revoked_at: u64 },
    #[error("no join token with id {0}")]
    TokenNotFound(String),
    #[error("join token lifetime must be positive")]
    InvalidTokenTtl,
    #[error(
        "cluster {writer} may not write records of cluster {target}: a member writes only its own"
    )]
    NotOwner {
        writer: ClusterId,
        target: ClusterId,
    },
    #[error(
        "cluster {0} is already a member: re-join with its credential, or have the hub's \
         operator remove it before joining it again with a token"
    )]
    AlreadyJoined(ClusterId),
    #[error("invalid or unknown credential for cluster {0}; join again with a new token")]
    BadCredential(ClusterId),
    #[error("cluster {0} has not joined the fleet (or was removed); join with a token first")]
    NotJoined(ClusterId),
    #[error("store key {key} holds an unreadable value: {reason}")]
    BadRecord { key: String, reason: String },
    #[error("could not {operation}: lost {attempts} consecutive races with other writers; retry")]
    Contended {
        operation: &'static str,
        attempts: usize,
    },
    #[error("no randomness from the OS: {0}")]
    Random(String),
    #[error("invalid lease holder {0:?}: use 1-253 printable characters")]
    InvalidLeaseHolder(String),
    #[error("invalid lease TTL {0:?}: it must be positive and at most an hour")]
    InvalidLeaseTtl(Duration),
    #[error("invalid relay id {0:?}: use 1-63 letters, digits or '-'")]
    InvalidRelayId(String),
    #[error("invalid relay TTL {0:?}: it must be positive and at most an hour")]
    InvalidRelayTtl(Duration),
    #[error(
        "cluster {cluster} is over its quota: {what} would be {would_be}, the limit is {limit}; \
         unpublish records it no longer needs, or have the hub's operator raise \
         --member-max-records / --member-max-bytes"
    )]
    QuotaExceeded {
        cluster: ClusterId,
        what: &'static str,
        would_be: u64,
        limit: u64,
    },
}

/// The hub's registry. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    layout: FleetLayout,
    clock: Arc<dyn Clock>,
    quotas: Quotas,
    /// Since when (by this replica's own clock) it has seen each lease and relay record at
    /// its current revision: expiry is judged on that, never on another host's clock.
    observed: Arc<expiry::Observations>,
    /// One store watch shared by every member- and clusters-scoped watch ([`fanout`]).
    fanout: fanout::Fanout,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("layout", &self.layout)
            .finish()
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("registry records serialise")
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::BadRecord {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn block_key(block: Ipv4Network) -> String {
    format!("{BLOCKS}{}_{}", block.network(), block.prefix())
}

fn cluster_key(id: &ClusterId) -> String {
    format!("{CLUSTERS}{id}")
}

fn record_key(owner: &ClusterId, name: &str) -> String {
    format!("{RECORDS}{owner}/{name}")
}

fn check_record_name(name: &str) -> Result<(), RegistryError> {
    if name.is_empty() || name.len() > 253 || name.chars().any(char::is_control) {
        return Err(RegistryError::InvalidRecordName(name.to_string()));
    }
    Ok(())
}

fn check_owner(writer: &ClusterId, target: &ClusterId) -> Result<(), RegistryError> {
    if writer != target {
        tracing::warn!(%writer, %target, "refused a write to another cluster's records");
        return Err(RegistryError::NotOwner {
            writer: writer.clone(),
            target: target.clone(),
        });
    }
    Ok(())
}

impl Registry {
    /// Opens the registry on `store`, recording `layout` on first use and refusing a store
    /// whose fleet was created with another layout.
    pub async fn open(
        store: Arc<dyn Store>,
        layout: FleetLayout,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, RegistryError> {
        let stored = match store.create(LAYOUT_KEY, encode(&layout)).await? {
            Some(_) => layout,
            None => {
                let kv = store
                    .get(LAYOUT_KEY)
                    .await?
                    .ok_or_else(|| RegistryError::BadRecord {
                        key: LAYOUT_KEY.into(),
                        reason: "vanished right after a create found it".into(),
                    })?;
                decode(LAYOUT_KEY, &kv.value)?
            }
        };
        if stored != layout {
            return Err(RegistryError::LayoutMismatch {
                stored_cidr: stored.fleet_cidr,
                stored_prefix: stored.block_prefix,
                configured_cidr: layout.fleet_cidr,
                configured_prefix: layout.block_prefix,
            });
        }
        let fanout = fanout::Fanout::start(&store).await?;
        Ok(Registry {
            store,
            layout,
            clock,
            quotas: Quotas::default(),
            observed: Arc::default(),
            fanout,
        })
    }

    /// The same registry with other per-member quotas.
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    pub fn layout(&self) -> FleetLayout {
        self.layout
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn now(&self) -> u64 {
        unix_secs(self.clock.now())
    }

    // ---- join tokens -------------------------------------------------------------------

    /// Creates a token valid for `ttl`. The returned token's secret exists nowhere else.
    pub async fn create_token(
        &self,
        ttl: Duration,
        description: &str,
    ) -> Result<(JoinToken, TokenInfo), RegistryError> {
        if ttl.is_zero() {
            return Err(RegistryError::InvalidTokenTtl);
        }
        let now = self.now();
        for _ in 0..MAX_CONTENDED_RETRIES {
            let token = JoinToken::generate()?;
            let record = TokenRecord {
                id: token.id().to_string(),
                secret_sha256: token.secret_hash(),
                description: description.to_string(),
                created_at: now,
                expires_at: now.saturating_add(ttl.as_secs().max(1)),
                revoked_at: None,
            };
            let key = format!("{TOKENS}{}", record.id);
            if self.store.create(&key, encode(&record)).await?.is_some() {
                tracing::info!(token_id = %record.id, expires_at = record.expires_at, "join token created");
                return Ok((token, record.info()));
            }
            // 48-bit id collision: draw again.
        }
        Err(RegistryError::Contended {
            operation: "create a join token",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    /// Every token, without secrets, by id.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, RegistryError> {
        let listing = self.store.list(TOKENS).await?;
        listing
            .items
            .iter()
            .map(|kv| decode::<TokenRecord>(&kv.key, &kv.value).map(|r| r.info()))
            .collect()
    }

    /// Revokes token `id` (idempotent).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo, RegistryError> {
        let key = format!("{TOKENS}{id}");
        for _ in 0..MAX_CONTENDED_RETRIES {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| RegistryError::TokenNotFound(id.to_string()))?;
            let mut record: TokenRecord = decode(&key, &kv.value)?;
            if record.revoked_at.is_some() {
                return Ok(record.info());
            }
            record.revoked_at = Some(self.now());
            if self
                .store
                .compare_and_swap(&key, kv.mod_revision, encode(&record))
                .await?
                .is_some()
            {
                tracing::info!(token_id = %id, "join token revoked");
                return Ok(record.info());
            }
        }
        Err(RegistryError::Contended {
            operation: "revoke a join token",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    /// Checks `token`: it must exist with this secret, not be revoked, not be expired.
    pub async fn verify_token(&self, token: &JoinToken) -> Result<TokenInfo, RegistryError> {
        Ok(self.check_token(token).await?.0)
    }

    /// [`Registry::verify_token`], also returning the token record's key and revision so a
    /// join can require that the token did not change (was not revoked) until it commits.
    async fn check_token(
        &self,
        token: &JoinToken,
    ) -> Result<(TokenInfo, Condition), RegistryError> {
        let key = format!("{TOKENS}{}", token.id());
        let invalid = || RegistryError::TokenInvalid {
            id: token.id().to_string(),
        };
        let kv = self.store.get(&key).await?.ok_or_else(invalid)?;
        let record: TokenRecord = decode(&key, &kv.value)?;
        if !constant_time_eq(&record.secret_sha256, &token.secret_hash()) {
            tracing::warn!(token_id = %token.id(), "join token with a wrong secret refused");
            return Err(invalid());
        }
        if let Some(revoked_at) = record.revoked_at {
            return Err(RegistryError::TokenRevoked {
                id: record.id,
                revoked_at,
            });
        }
        if self.now() >= record.expires_at {
            return Err(RegistryError::TokenExpired {
                id: record.id,
                expired_at: record.expires_at,
            });
        }
        Ok((record.info(), Condition::ModRevision(key, kv.mod_revision)))
    }

    // ---- clusters ----------------------------------------------------------------------

    /// Joins (or re-joins) a cluster with a valid token. A new cluster gets the first free
    /// block; a cluster that is already a member keeps its block (its key and endpoint are
    /// updated). A full fleet CIDR is [`RegistryError::FleetExhausted`] and changes nothing.
    pub async fn join(
        &self,
        token: &JoinToken,
        request: JoinRequest,
    ) -> Result<ClusterRecord, RegistryError> {
        self.join_inner(token, request, None).await
    }

    /// A new cluster joins through the API: like [`Registry::join`], but the cluster must not
    /// be a member yet ([`RegistryError::AlreadyJoined`]: a token alone never takes over an
    /// existing cluster) and the SHA-256 of its API credential is stored in the same
    /// transaction as its block.
    pub async fn join_with_credential(
        &self,
        token: &JoinToken,
        request: JoinRequest,
        credential_sha256: String,
    ) -> Result<ClusterRecord, RegistryError> {
        self.join_inner(token, request, Some(credential_sha256))
            .await
    }

    /// Checks a member's API credential (its secret's SHA-256) against the stored one.
    pub async fn authenticate_member(
        &self,
        id: &ClusterId,
        credential_sha256: &str,
    ) -> Result<(), RegistryError> {
        let key = format!("{CREDENTIALS}{id}");
        let stored = self.store.get(&key).await?;
        match stored {
            Some(kv)
                if constant_time_eq(&String::from_utf8_lossy(&kv.value), credential_sha256) =>
            {
                Ok(())
            }
            _ => Err(RegistryError::BadCredential(id.clone())),
        }
    }

    async fn join_inner(
        &self,
        token: &JoinToken,
        request: JoinRequest,
        credential_sha256: Option<String>,
    ) -> Result<ClusterRecord, RegistryError> {
        let key = cluster_key(&request.cluster);
        for attempt in 0..MAX_CONTENDED_RETRIES {
            // Checked on every attempt and made a condition of the write: a token revoked
            // while a join is in flight stops it.
            let (info, token_unchanged) = self.check_token(token).await?;
            if let Some(kv) = self.store.get(&key).await? {
                if credential_sha256.is_some() {
                    return Err(RegistryError::AlreadyJoined(request.cluster.clone()));
                }
                let mut record: ClusterRecord = decode(&key, &kv.value)?;
                if record.public_key == request.public_key && record.endpoint == request.endpoint {
                    tracing::info!(cluster = %record.id, block = %record.block, "cluster re-joined");
                    return Ok(record);
                }
                record.public_key = request.public_key;
                record.endpoint = request.endpoint;
                let txn = Txn::new()
                    .when(token_unchanged)
                    .when(Condition::ModRevision(key.clone(), kv.mod_revision))
                    .put(key.clone(), encode(&record));
                if self.store.txn(txn).await?.committed().is_some() {
                    tracing::info!(cluster = %record.id, block = %record.block, "cluster re-joined with a new key or endpoint");
                    return Ok(record);
                }
                continue;
            }
            let taken: HashSet<String> = self
                .store
                .list(BLOCKS)
                .await?
                .items
                .into_iter()
                .map(|kv| kv.key)
                .collect();
            // First free block; after losing a race, a random free one, so many concurrent
            // joins spread out instead of all retrying on the same next block.
            let free = self.layout.block_count() - taken.len() as u64;
            let skip = if attempt == 0 || free == 0 {
                0
            } else {
                random_below(free)?
            };
            let Some(block) = self
                .layout
                .blocks()
                .filter(|b| !taken.contains(&block_key(*b)))
                .nth(skip as usize)
            else {
                tracing::warn!(cluster = %request.cluster, fleet_cidr = %self.layout.fleet_cidr, "join refused: fleet CIDR exhausted");
                return Err(RegistryError::FleetExhausted {
                    fleet_cidr: self.layout.fleet_cidr,
                    block_prefix: self.layout.block_prefix,
                    blocks: self.layout.block_count(),
                });
            };
            let record = ClusterRecord {
                id: request.cluster.clone(),
                block,
                public_key: request.public_key,
                endpoint: request.endpoint,
                gateway: GatewayState::Pending,
                // Live once its controller takes the lease.
                controller_live: false,
                joined_at: self.now(),
                token_id: info.id.clone(),
            };
            let mut txn = Txn::new()
                .when(token_unchanged)
                .when(Condition::Absent(key.clone()))
                .when(Condition::Absent(block_key(block)))
                .put(
                    block_key(block),
                    request.cluster.as_str().as_bytes().to_vec(),
                )
                .put(key.clone(), encode(&record));
            if let Some(hash) = &credential_sha256 {
                txn = txn.put(
                    format!("{CREDENTIALS}{}", request.cluster),
                    hash.as_bytes().to_vec(),
                );
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { revision } => {
                    tracing::info!(cluster = %record.id, block = %block, token_id = %info.id, revision, "cluster joined");
                    return Ok(record);
                }
                // Another join took this block (or this cluster joined concurrently): look again.
                TxnOutcome::ConditionFailed => {
                    tracing::debug!(cluster = %request.cluster, %block, "block allocation raced; retrying")
                }
            }
        }
        Err(RegistryError::Contended {
            operation: "allocate a fleet block",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    pub async fn get_cluster(
        &self,
        id: &ClusterId,
    ) -> Result<Option<ClusterRecord>, RegistryError> {
        let key = cluster_key(id);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some(decode(&key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Every member, by id, and the revision of the read.
    pub async fn list_clusters(&self) -> Result<(Vec<ClusterRecord>, Revision), RegistryError> {
        let listing = self.store.list(CLUSTERS).await?;
        let clusters = listing
            .items
            .iter()
            .map(|kv| decode(&kv.key, &kv.value))
            .collect::<Result<_, _>>()?;
        Ok((clusters, listing.revision))
    }

    /// A member changes its own record (key, endpoint, gateway state).
    pub async fn update_cluster(
        &self,
        writer: &ClusterId,
        target: &ClusterId,
        update: ClusterUpdate,
    ) -> Result<ClusterRecord, RegistryError> {
        check_owner(writer, target)?;
        let key = cluster_key(target);
        for _ in 0..MAX_CONTENDED_RETRIES {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| RegistryError::NotJoined(target.clone()))?;
            let mut record: ClusterRecord = decode(&key, &kv.value)?;
            if let Some(k) = update.public_key {
                record.public_key = k;
            }
            if let Some(e) = update.endpoint {
                record.endpoint = e;
            }
            if let Some(g) = update.gateway {
                record.gateway = g;
            }
            if self
                .store
                .compare_and_swap(&key, kv.mod_revision, encode(&record))
                .await?
                .is_some()
            {
                tracing::debug!(cluster = %target, gateway = ?record.gateway, "cluster record updated");
                return Ok(record);
            }
        }
        Err(RegistryError::Contended {
            operation: "update a cluster record",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    /// A member leaves the fleet: its record, block and published records go.
    pub async fn leave(
        &self,
        writer: &ClusterId,
        target: &ClusterId,
    ) -> Result<bool, RegistryError> {
        check_owner(writer, target)?;
        self.remove_cluster(target).await
    }

    /// Admin: removes a cluster, frees its block and deletes its credential, lease and
    /// published records. Returns false if it was not a member.
    pub async fn remove_cluster(&self, id: &ClusterId) -> Result<bool, RegistryError> {
        let key = cluster_key(id);
        let prefix = format!("{RECORDS}{id}/");
        for _ in 0..MAX_CONTENDED_RETRIES {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let record: ClusterRecord = decode(&key, &kv.value)?;
            // One prefix delete for the records: the transaction's size does not grow with
            // them (etcd refuses more than 128 operations), and a publish cannot slip in
            // between (it requires the cluster record this transaction deletes).
            let txn = Txn::new()
                .when(Condition::ModRevision(key.clone(), kv.mod_revision))
                .delete(key.clone())
                .delete(block_key(record.block))
                .delete(format!("{CREDENTIALS}{id}"))
                .delete(lease::lease_key(id))
                .delete(quota::usage_key(id))
                .delete_prefix(prefix.clone());
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                self.observed.forget(&lease::lease_key(id));
                tracing::info!(cluster = %id, block = %record.block, revision, "cluster removed");
                return Ok(true);
            }
        }
        Err(RegistryError::Contended {
            operation: "remove a cluster",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    // ---- member records ----------------------------------------------------------------

    /// A member publishes (creates or replaces) one of its records, within its quota
    /// ([`RegistryError::QuotaExceeded`] otherwise, and nothing is written).
    pub async fn publish(
        &self,
        writer: &ClusterId,
        owner: &ClusterId,
        name: &str,
        value: Vec<u8>,
    ) -> Result<Revision, RegistryError> {
        check_owner(writer, owner)?;
        check_record_name(name)?;
        let key = record_key(owner, name);
        for _ in 0..MAX_CONTENDED_RETRIES {
            let old = self.store.get(&key).await?;
            let (usage, usage_unchanged) = self.usage(owner).await?;
            let next = usage
                .without(old.as_ref().map(|kv| (name, kv.value.len())))
                .with(name, value.len());
            self.quotas.check(owner, &usage, &next)?;
            let record_unchanged = match &old {
                Some(kv) => Condition::ModRevision(key.clone(), kv.mod_revision),
                None => Condition::Absent(key.clone()),
            };
            let txn = Txn::new()
                .when(Condition::Exists(cluster_key(owner)))
                .when(usage_unchanged)
                .when(record_unchanged)
                .put(key.clone(), value.clone())
                .put(quota::usage_key(owner), encode(&next));
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                return Ok(revision);
            }
            if self.store.get(&cluster_key(owner)).await?.is_none() {
                return Err(RegistryError::NotJoined(owner.clone()));
            }
            // Another write of this member's records came first: count again.
        }
        Err(RegistryError::Contended {
            operation: "publish a record",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    /// A member withdraws one of its records; false if it did not exist.
    pub async fn unpublish(
        &self,
        writer: &ClusterId,
        owner: &ClusterId,
        name: &str,
    ) -> Result<bool, RegistryError> {
        check_owner(writer, owner)?;
        check_record_name(name)?;
        let key = record_key(owner, name);
        for _ in 0..MAX_CONTENDED_RETRIES {
            let Some(old) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let (usage, usage_unchanged) = self.usage(owner).await?;
            let next = usage.without(Some((name, old.value.len())));
            let txn = Txn::new()
                .when(Condition::ModRevision(key.clone(), old.mod_revision))
                .when(usage_unchanged)
                .delete(key.clone())
                .put(quota::usage_key(owner), encode(&next));
            if self.store.txn(txn).await?.committed().is_some() {
                return Ok(true);
            }
        }
        Err(RegistryError::Contended {
            operation: "unpublish a record",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    /// What `owner`'s records hold, and the condition that it is still so. A member without a
    /// usage record (records published before quotas existed) is counted once from its records.
    pub async fn usage(&self, owner: &ClusterId) -> Result<(Usage, Condition), RegistryError> {
        let key = quota::usage_key(owner);
        if let Some(kv) = self.store.get(&key).await? {
            return Ok((
                decode(&key, &kv.value)?,
                Condition::ModRevision(key, kv.mod_revision),
            ));
        }
        let mut usage = Usage::default();
        for kv in self.store.list(&format!("{RECORDS}{owner}/")).await?.items {
            let name = &kv.key[RECORDS.len() + owner.as_str().len() + 1..];
            usage = usage.with(name, kv.value.len());
        }
        Ok((usage, Condition::Absent(key)))
    }

    /// Clusters and published records at one revision: the starting point of a watch.
    pub async fn view(&self) -> Result<FleetView, RegistryError> {
        self.view_scoped(FleetScope::All, None).await
    }

    /// The part of the fleet `scope` shows to a caller of cluster `own` (see [`FleetScope`]).
    pub async fn view_scoped(
        &self,
        scope: FleetScope,
        own: Option<&ClusterId>,
    ) -> Result<FleetView, RegistryError> {
        // One listing of both prefixes' parent, so both halves are at the same revision.
        let listing = self.store.list("").await?;
        let mut view = FleetView {
            fleet_cidr: self.layout.fleet_cidr,
            clusters: Vec::new(),
            records: Vec::new(),
            relays: Vec::new(),
            revision: listing.revision,
        };
        for kv in listing.items {
            if kv.key.starts_with(CLUSTERS) {
                view.clusters.push(decode(&kv.key, &kv.value)?);
            } else if kv.key.starts_with(relay::RELAYS) {
                view.relays.push(decode(&kv.key, &kv.value)?);
            } else if let Some((owner, name)) = split_record_key(&kv.key)
                && scope.includes_record(own, owner.as_str(), &name)
            {
                view.records.push(MemberRecord {
                    owner,
                    name,
                    value: kv.value,
                    revision: kv.mod_revision,
                });
            }
        }
        Ok(view)
    }

    /// Changes to clusters and records after `after` (from [`Registry::view`] or the last
    /// event seen). A [`StoreError::Compacted`] error means: take a new view.
    pub async fn watch(
        &self,
        after: Revision,
    ) -> Result<
        impl Stream<Item = Result<RegistryEvent, RegistryError>> + Send + use<>,
        RegistryError,
    > {
        self.watch_scoped(after, FleetScope::All, None).await
    }

    /// [`Registry::watch`] of the part of the fleet `scope` shows to a caller of cluster
    /// `own`. Member and clusters scopes are served by the replica's watch fan-out (one store
    /// watch, changes filed per member: a watcher wakes only for what it is shown); the all
    /// scope by a store watch of its own, changes out of scope dropped by key.
    pub async fn watch_scoped(
        &self,
        after: Revision,
        scope: FleetScope,
        own: Option<&ClusterId>,
    ) -> Result<
        impl Stream<Item = Result<RegistryEvent, RegistryError>> + Send + use<>,
        RegistryError,
    > {
        let own = own.cloned();
        if scope != FleetScope::All {
            // Members and relays: from the replica's one shared store watch.
            return Ok(self.fanout.watch(after, scope, own).left_stream());
        }
        let changes = self.store.watch("", after).await?;
        Ok(changes
            .filter_map(move |change| {
                let own = own.clone();
                async move {
                    match change {
                        Err(e) => Some(Err(RegistryError::Store(e))),
                        Ok(change) if !in_scope(change.key(), scope, own.as_ref()) => None,
                        Ok(change) => to_event(change).transpose(),
                    }
                }
            })
            .right_stream())
    }
}

fn random_below(n: u64) -> Result<u64, RegistryError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| RegistryError::Random(e.to_string()))?;
    Ok(u64::from_le_bytes(bytes) % n)
}

/// Whether a change of store key `key` belongs to `scope` for a caller of cluster `own`
/// (keys that are neither clusters, relays nor records never become events anyway).
fn in_scope(key: &str, scope: FleetScope, own: Option<&ClusterId>) -> bool {
    if scope == FleetScope::All || key.starts_with(CLUSTERS) || key.starts_with(relay::RELAYS) {
        return true;
    }
    match key
        .strip_prefix(RECORDS)
        .and_then(|rest| rest.split_once('/'))
    {
        Some((owner, name)) => scope.includes_record(own, owner, name),
        None => false,
    }
}

fn split_record_key(key: &str) -> Option<(ClusterId, String)> {
    let rest = key.strip_prefix(RECORDS)?;
    let (owner, name) = rest.split_once('/')?;
    Some((ClusterId::new(owner).ok()?, name.to_string()))
}

fn to_event(change: Change) -> Result<Option<RegistryEvent>, RegistryError> {
    let revision = change.revision();
    Ok(match change {
        Change::Put(kv) if kv.key.starts_with(CLUSTERS) => Some(RegistryEvent::ClusterUpserted {
            record: decode(&kv.key, &kv.value)?,
            revision,
        }),
        Change::Delete { key, .. } if key.starts_with(CLUSTERS) => {
            ClusterId::new(&key[CLUSTERS.len()..])
                .ok()
                .map(|id| RegistryEvent::ClusterRemoved { id, revision })
        }
        Change::Put(kv) if kv.key.starts_with(relay::RELAYS) => {
            Some(RegistryEvent::RelayUpserted {
                record: decode(&kv.key, &kv.value)?,
                revision,
            })
        }
        Change::Delete { key, .. } if key.starts_with(relay::RELAYS) => {
            Some(RegistryEvent::RelayRemoved {
                id: key[relay::RELAYS.len()..].to_string(),
                revision,
            })
        }
        Change::Put(kv) => {
            split_record_key(&kv.key).map(|(owner, name)| RegistryEvent::RecordPut {
                owner,
                name,
                value: kv.value,
                revision,
            })
        }
        Change::Delete { key, .. } => {
            split_record_key(&key).map(|(owner, name)| RegistryEvent::RecordDeleted {
                owner,
                name,
                revision,
            })
        }
    })
}

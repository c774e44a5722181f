//! One lease per member cluster: which of the cluster's controller replicas is active.
//!
//! `leases/<cluster id>` holds a [`LeaseRecord`]. Every change is a compare-and-swap on the
//! record's revision that also requires the cluster to exist, so two acquirers — on one hub or
//! on two replicas sharing an etcd — never both win, and a removed cluster's lease cannot come
//! back. Expiry never compares two hosts' clocks: the replica asked judges a lease expired
//! once it has itself seen the record unchanged for the lease's TTL ([`super::expiry`]), so
//! replicas whose clocks disagree by any amount neither hand out a live lease nor hold a dead
//! one for longer than TTL + one ask. A release keeps the record (expired) so the generation
//! keeps counting: a holder change always makes the generation grow, never repeat.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    CLUSTERS, ClusterId, ClusterRecord, MAX_CONTENDED_RETRIES, Registry, RegistryError, decode,
    encode,
};
use crate::store::{Condition, Txn, TxnOutcome};

pub(super) const LEASES: &str = "leases/";

/// The longest lease the hub grants: a dead holder blocks its standbys at most this long.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// What the store keeps per cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LeaseRecord {
    pub holder: String,
    /// Starts at 1; +1 whenever the holder changes.
    pub generation: u64,
    /// Unix milliseconds (the granting replica's clock; for operators, never compared with
    /// another clock); 0 once released, which frees the lease at once.
    pub expires_at_ms: u64,
    /// The TTL granted: how long a replica must see the record unchanged to judge it expired.
    /// 0 in a record of an older hub (the asker's TTL is used then).
    #[serde(default)]
    pub ttl_ms: u64,
}

pub use fleet_hub_api::model::Lease;

pub(super) fn lease_key(id: &ClusterId) -> String {
    format!("{LEASES}{id}")
}

fn check_holder(holder: &str) -> Result<(), RegistryError> {
    if holder.is_empty() || holder.len() > 253 || holder.chars().any(char::is_control) {
        return Err(RegistryError::InvalidLeaseHolder(holder.to_string()));
    }
    Ok(())
}

impl Registry {
    pub(super) fn now_ms(&self) -> u64 {
        self.clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Member `writer` asks for its cluster's lease for `holder`, for `ttl`. Granted when the
    /// lease is free, expired, released, or already `holder`'s (a renewal); otherwise refused
    /// with the current holder and its remaining time. Nothing is written when refused.
    pub async fn acquire_lease(
        &self,
        writer: &ClusterId,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, RegistryError> {
        check_holder(holder)?;
        if ttl.is_zero() || ttl > MAX_LEASE_TTL {
            return Err(RegistryError::InvalidLeaseTtl(ttl));
        }
        let key = lease_key(writer);
        let cluster = format!("{CLUSTERS}{writer}");
        for _ in 0..MAX_CONTENDED_RETRIES {
            let observed_at = self.clock.now();
            let now = self.now_ms();
            let Some(cluster_kv) = self.store.get(&cluster).await? else {
                return Err(RegistryError::NotJoined(writer.clone()));
            };
            let current = self.store.get(&key).await?;
            let (next, condition) = match &current {
                None => (
                    LeaseRecord {
                        holder: holder.to_string(),
                        generation: 1,
                        expires_at_ms: 0,
                        ttl_ms: 0,
                    },
                    Condition::Absent(key.clone()),
                ),
                Some(kv) => {
                    let record: LeaseRecord = decode(&key, &kv.value)?;
                    if record.holder != holder && record.expires_at_ms != 0 {
                        let granted_for = match record.ttl_ms {
                            0 => ttl,
                            ms => Duration::from_millis(ms),
                        };
                        let unchanged =
                            self.observed
                                .unchanged_for(&key, kv.mod_revision, observed_at);
                        if unchanged < granted_for {
                            return Ok(Lease {
                                granted: false,
                                ttl: granted_for - unchanged,
                                holder: record.holder,
                                generation: record.generation,
                            });
                        }
                    }
                    let generation = if record.holder == holder {
                        record.generation
                    } else {
                        record.generation + 1
                    };
                    (
                        LeaseRecord {
                            holder: holder.to_string(),
                            generation,
                            expires_at_ms: 0,
                            ttl_ms: 0,
                        },
                        Condition::ModRevision(key.clone(), kv.mod_revision),
                    )
                }
            };
            let next = LeaseRecord {
                expires_at_ms: now.saturating_add(ttl.as_millis() as u64),
                ttl_ms: ttl.as_millis() as u64,
                ..next
            };
            let mut txn = Txn::new().when(condition).put(key.clone(), encode(&next));
            // A grant makes the cluster live again if the sweep had marked it not live; the
            // cluster record is written only then (renewals write the lease alone).
            let mut record: ClusterRecord = decode(&cluster, &cluster_kv.value)?;
            if record.controller_live {
                txn = txn.when(Condition::Exists(cluster.clone()));
            } else {
                record.controller_live = true;
                txn = txn
                    .when(Condition::ModRevision(
                        cluster.clone(),
                        cluster_kv.mod_revision,
                    ))
                    .put(cluster.clone(), encode(&record));
            }
            if let Some(revision) = self.store.txn(txn).await?.committed() {
                self.observed.wrote(&key, revision, observed_at);
                let previous = current
                    .as_ref()
                    .and_then(|kv| decode::<LeaseRecord>(&key, &kv.value).ok());
                if !cluster_was_live(&cluster_kv.value) {
                    tracing::info!(cluster = %writer, holder, "controller lease held again: cluster live");
                }
                if previous.as_ref().is_none_or(|p| p.holder != holder) {
                    tracing::info!(cluster = %writer, holder, generation = next.generation, "lease granted to a new holder");
                }
                return Ok(Lease {
                    granted: true,
                    holder: next.holder,
                    generation: next.generation,
                    ttl,
                });
            }
            // Raced with another acquirer (or the cluster went away): look again.
            if self.store.get(&cluster).await?.is_none() {
                return Err(RegistryError::NotJoined(writer.clone()));
            }
        }
        Err(RegistryError::Contended {
            operation: "acquire a lease",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    /// Member `writer`'s `holder` gives its cluster's lease up at once (a clean stop). True if
    /// `holder` held it; a lease held by someone else (or nobody) is left as it is.
    pub async fn release_lease(
        &self,
        writer: &ClusterId,
        holder: &str,
    ) -> Result<bool, RegistryError> {
        check_holder(holder)?;
        let key = lease_key(writer);
        for _ in 0..MAX_CONTENDED_RETRIES {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let mut record: LeaseRecord = decode(&key, &kv.value)?;
            if record.holder != holder || record.expires_at_ms == 0 {
                return Ok(false);
            }
            record.expires_at_ms = 0;
            if self
                .store
                .compare_and_swap(&key, kv.mod_revision, encode(&record))
                .await?
                .is_some()
            {
                tracing::info!(cluster = %writer, holder, generation = record.generation, "lease released");
                return Ok(true);
            }
        }
        Err(RegistryError::Contended {
            operation: "release a lease",
            attempts: MAX_CONTENDED_RETRIES,
        })
    }

    /// Marks every cluster whose controller lease lapsed as not live
    /// ([`ClusterRecord::controller_live`] = false) and returns their ids.
    ///
    /// A lease has lapsed once this replica has seen its record unchanged for the lease's TTL
    /// (renewals write it; a release is judged the same way, so a controller restarted within
    /// one TTL never makes its cluster look dead), and this sweeper has itself run that long
    /// (a hub coming back gives every controller one TTL to renew). Each change is one
    /// compare-and-swap on both the lease and the cluster record, so a renewal racing the
    /// sweep wins and the cluster stays live. Bound: TTL + the sweep interval.
    pub async fn sweep_leases(
        &self,
        sweeping_since: std::time::SystemTime,
    ) -> Result<Vec<ClusterId>, RegistryError> {
        let observed_at = self.clock.now();
        let sweeping_for = observed_at
            .duration_since(sweeping_since)
            .unwrap_or_default();
        let listing = self.store.list(LEASES).await?;
        let mut lapsed = Vec::new();
        for kv in listing.items {
            let Ok(lease) = decode::<LeaseRecord>(&kv.key, &kv.value) else {
                continue;
            };
            // A record of an older hub without its TTL: judged by the longest one.
            let ttl = match lease.ttl_ms {
                0 => MAX_LEASE_TTL,
                ms => Duration::from_millis(ms),
            };
            let unchanged = self
                .observed
                .unchanged_for(&kv.key, kv.mod_revision, observed_at);
            if sweeping_for < ttl || unchanged < ttl {
                continue;
            }
            let Ok(id) = ClusterId::new(&kv.key[LEASES.len()..]) else {
                continue;
            };
            let cluster = format!("{CLUSTERS}{id}");
            let Some(cluster_kv) = self.store.get(&cluster).await? else {
                continue;
            };
            let mut record: ClusterRecord = decode(&cluster, &cluster_kv.value)?;
            if !record.controller_live {
                continue;
            }
            record.controller_live = false;
            let txn = Txn::new()
                .when(Condition::ModRevision(kv.key.clone(), kv.mod_revision))
                .when(Condition::ModRevision(
                    cluster.clone(),
                    cluster_kv.mod_revision,
                ))
                .put(cluster.clone(), encode(&record));
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                tracing::warn!(cluster = %id, holder = %lease.holder, revision, "controller lease lapsed (unchanged for its TTL): cluster not live");
                lapsed.push(id);
            }
        }
        Ok(lapsed)
    }
}

fn cluster_was_live(value: &[u8]) -> bool {
    serde_json::from_slice::<ClusterRecord>(value).is_ok_and(|r| r.controller_live)
}

//! The hub's relays: `relays/<relay id>` holds a [`RelayRecord`] — the WireGuard identity
//! and endpoint of a hub replica's relay device, which members peer with for the fleet CIDR
//! when they have no direct tunnel. Written by the hub itself (its relay process, through the
//! admin API), never by members.
//!
//! Liveness: a record carries its TTL; the relay renews it (publishes again, a new revision)
//! every TTL/3, and every serving hub replica sweeps the records it has itself seen unchanged
//! for their TTL, by its own clock ([`Registry::sweep_relays`], [`super::expiry`]), so the
//! relay of a dead host disappears from members' views within TTL + one sweep interval and
//! they switch to another — and replicas whose clocks disagree never sweep a live relay.
//! `expires_at` (unix ms by the publishing replica's clock) is informational.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use fleet_hub_api::model::RelayRecord;

use super::{Registry, RegistryError, decode, encode};
use crate::store::{Condition, Revision, Txn, TxnOutcome};

pub(super) const RELAYS: &str = "relays/";

/// The longest relay TTL the hub accepts.
pub const MAX_RELAY_TTL: Duration = Duration::from_secs(3600);

/// What `relays/<id>` holds: the record and the TTL it was published with (hub-internal;
/// readers of [`RelayRecord`] ignore `ttl_ms`).
#[derive(Serialize, Deserialize)]
struct StoredRelay {
    #[serde(flatten)]
    record: RelayRecord,
    /// 0 in a record without one (an older hub's).
    #[serde(default)]
    ttl_ms: u64,
}

pub(super) fn relay_key(id: &str) -> String {
    format!("{RELAYS}{id}")
}

fn check_relay_id(id: &str) -> Result<(), RegistryError> {
    if id.is_empty() || id.len() > 63 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(RegistryError::InvalidRelayId(id.to_string()));
    }
    Ok(())
}

impl Registry {
    /// The registry's clock (what relay expiry is judged by).
    pub fn clock_now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    /// Publishes (creates, replaces or renews) a relay record, valid for `ttl` from now by
    /// this hub's clock (its `expires_at` is set here). Hub-internal: the relay calls it
    /// through the admin API.
    pub async fn publish_relay(
        &self,
        record: &RelayRecord,
        ttl: Duration,
    ) -> Result<(Revision, RelayRecord), RegistryError> {
        check_relay_id(&record.id)?;
        if ttl.is_zero() || ttl > MAX_RELAY_TTL {
            return Err(RegistryError::InvalidRelayTtl(ttl));
        }
        let mut record = record.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        record.expires_at = self.now_ms().saturating_add(ttl_ms);
        let stored = StoredRelay { record, ttl_ms };
        let key = relay_key(&stored.record.id);
        let written_at = self.clock.now();
        let revision = self.store.put(&key, encode(&stored)).await?;
        self.observed.wrote(&key, revision, written_at);
        let record = stored.record;
        tracing::debug!(relay = %record.id, endpoint = %record.endpoint, expires_at = record.expires_at, "relay published");
        Ok((revision, record))
    }

    /// Withdraws relay `id`; false if it was not there.
    pub async fn remove_relay(&self, id: &str) -> Result<bool, RegistryError> {
        check_relay_id(id)?;
        let removed = self.store.delete(&relay_key(id)).await?.is_some();
        if removed {
            tracing::info!(relay = %id, "relay withdrawn");
        }
        Ok(removed)
    }

    /// Deletes every relay record this replica has seen unchanged (same revision) for its TTL,
    /// by its own clock — never comparing another replica's clock with its own — each only if
    /// it is still the exact version read (a renewal in between wins, and of several replicas
    /// sweeping at once only one deletes). Returns the ids removed.
    ///
    /// `sweeping_since` (by the registry's clock): when this sweeper started. A record is
    /// left alone until the sweeper has run for its whole TTL, so a hub that comes back after
    /// being down (while its relay's renewals failed) gives the relay one TTL to renew before
    /// judging it — a lone hub's restart does not cut members off their live relay.
    pub async fn sweep_relays(
        &self,
        sweeping_since: std::time::SystemTime,
    ) -> Result<Vec<String>, RegistryError> {
        let observed_at = self.clock.now();
        let sweeping_for = observed_at
            .duration_since(sweeping_since)
            .unwrap_or_default();
        let listing = self.store.list(RELAYS).await?;
        self.observed
            .retain(RELAYS, |key| listing.items.iter().any(|kv| kv.key == key));
        let mut removed = Vec::new();
        for kv in listing.items {
            let (expires_at, ttl_ms) = match decode::<StoredRelay>(&kv.key, &kv.value) {
                Ok(stored) => (stored.record.expires_at, stored.ttl_ms),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "unreadable relay record; sweeping it");
                    (0, 0)
                }
            };
            if ttl_ms > 0 {
                let ttl = Duration::from_millis(ttl_ms);
                // Observed on every sweep, also while the sweeper is young, so a record's
                // count starts when it is first seen.
                let unchanged = self
                    .observed
                    .unchanged_for(&kv.key, kv.mod_revision, observed_at);
                if sweeping_for < ttl || unchanged < ttl {
                    continue;
                }
            } else if expires_at > self.now_ms() {
                // A record of a hub from before TTLs were stored: its absolute expiry.
                continue;
            }
            let txn = Txn::new()
                .when(Condition::ModRevision(kv.key.clone(), kv.mod_revision))
                .delete(kv.key.clone());
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                let id = kv.key[RELAYS.len()..].to_string();
                tracing::warn!(relay = %id, ttl_ms, revision, "relay record expired (unchanged for its TTL: its relay stopped renewing it); removed");
                removed.push(id);
            }
        }
        Ok(removed)
    }
}

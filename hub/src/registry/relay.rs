//! The hub's relays: `relays/<relay id>` holds a [`RelayRecord`] — the WireGuard identity
//! and endpoint of a hub replica's relay device, which members peer with for the fleet CIDR
//! when they have no direct tunnel. Written by the hub itself (its relay process, through the
//! admin API), never by members.
//!
//! Liveness: a record carries `expires_at` (unix ms, set by the hub from the publisher's TTL);
//! the relay renews it (publishes again) every TTL/3, and every serving hub replica sweeps
//! records past their expiry ([`Registry::sweep_relays`]), so the relay of a dead host
//! disappears from members' views within TTL + one sweep interval and they switch to another.

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
        let revision = self
            .store
            .put(&relay_key(&stored.record.id), encode(&stored))
            .await?;
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

    /// Deletes every relay record past its expiry (by this hub's clock), each only if it is
    /// still the exact version read (a renewal in between wins, and of several replicas
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
        let now = self.now_ms();
        let since = sweeping_since
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let sweeping_for = now.saturating_sub(since);
        let mut removed = Vec::new();
        for kv in self.store.list(RELAYS).await?.items {
            let (expires_at, ttl_ms) = match decode::<StoredRelay>(&kv.key, &kv.value) {
                Ok(stored) => (stored.record.expires_at, stored.ttl_ms),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "unreadable relay record; sweeping it");
                    (0, 0)
                }
            };
            if expires_at > now || sweeping_for < ttl_ms {
                continue;
            }
            let txn = Txn::new()
                .when(Condition::ModRevision(kv.key.clone(), kv.mod_revision))
                .delete(kv.key.clone());
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                let id = kv.key[RELAYS.len()..].to_string();
                tracing::warn!(relay = %id, expires_at, now, revision, "relay record expired (its relay stopped renewing it); removed");
                removed.push(id);
            }
        }
        Ok(removed)
    }
}

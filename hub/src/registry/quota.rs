//! Per-member quotas: how many records a member may publish and how many bytes they may hold
//! together, so one member cannot exhaust the hub's memory (every replica holds every record,
//! and every member's mirror receives them).
//!
//! `usage/<cluster id>` holds the member's [`Usage`]; every publish and unpublish updates it
//! in the same transaction as the record, guarded by its revision, so the count stays exact
//! with concurrent writers and several replicas. A refused publish writes nothing and is
//! `quota_exceeded` at the API, which clients do not retry.

use serde::{Deserialize, Serialize};

use super::{ClusterId, RegistryError};

pub(super) const USAGE: &str = "usage/";

/// Default record count per member. Sized for service discovery: a member publishes one
/// `node/<name>` per node, a `gateway`, an `export/*` and a `serviceexport/*` per exported
/// service and an `import/*` per service imported from the fleet, so thousands of services
/// must fit with room to spare.
pub const DEFAULT_MEMBER_MAX_RECORDS: u64 = 20_000;

/// Default bytes (record names + values) per member: 20,000 records of ~1 KiB plus a few
/// large exports (a headless service of a whole /20 block is ~400 KiB of endpoints).
pub const DEFAULT_MEMBER_MAX_BYTES: u64 = 64 << 20;

/// The limits every member's records are held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    pub max_records: u64,
    pub max_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_records: DEFAULT_MEMBER_MAX_RECORDS,
            max_bytes: DEFAULT_MEMBER_MAX_BYTES,
        }
    }
}

/// What one member's records hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub records: u64,
    /// Record names plus values, in bytes.
    pub bytes: u64,
}

impl Usage {
    pub(super) fn with(self, name: &str, value_len: usize) -> Usage {
        Usage {
            records: self.records + 1,
            bytes: self.bytes + (name.len() + value_len) as u64,
        }
    }

    pub(super) fn without(self, record: Option<(&str, usize)>) -> Usage {
        match record {
            None => self,
            Some((name, value_len)) => Usage {
                records: self.records.saturating_sub(1),
                bytes: self.bytes.saturating_sub((name.len() + value_len) as u64),
            },
        }
    }
}

impl Quotas {
    /// Refuses a change from `now` to `next` that grows past a limit (one that shrinks is
    /// always allowed, so a member over a lowered quota can still clean up).
    pub(super) fn check(
        &self,
        cluster: &ClusterId,
        now: &Usage,
        next: &Usage,
    ) -> Result<(), RegistryError> {
        let over = |what, would_be: u64, was: u64, limit: u64| {
            (would_be > limit && would_be > was).then(|| RegistryError::QuotaExceeded {
                cluster: cluster.clone(),
                what,
                would_be,
                limit,
            })
        };
        if let Some(e) = over("records", next.records, now.records, self.max_records) {
            tracing::warn!(%cluster, error = %e, "publish refused");
            return Err(e);
        }
        if let Some(e) = over("bytes", next.bytes, now.bytes, self.max_bytes) {
            tracing::warn!(%cluster, error = %e, "publish refused");
            return Err(e);
        }
        Ok(())
    }
}

pub(super) fn usage_key(id: &ClusterId) -> String {
    format!("{USAGE}{id}")
}

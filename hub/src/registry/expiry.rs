//! Expiry without comparing clocks: a lease or relay record is expired once *this replica* has
//! seen it unchanged (same store revision) for its TTL, measured on its own clock.
//!
//! Replicas' clocks may disagree by any amount: an absolute expiry written by one replica and
//! judged by another's clock made a replica running 30 s ahead sweep live relay records every
//! second and hand out leases that were still held (issue 12, item 12). As Kubernetes' leader
//! election does with `observedTime`, each replica notes when it first saw a record's current
//! revision (or wrote it); every renewal is a write, so a new revision restarts the count. The
//! cost: a replica that sees a record for the first time gives it one full TTL, so a dead
//! holder is noticed within TTL + the observer's polling interval rather than exactly at TTL.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::store::Revision;

#[derive(Default)]
pub(super) struct Observations(Mutex<HashMap<String, (Revision, SystemTime)>>);

impl Observations {
    /// How long `key` has been seen at `revision`, as of `now`; zero when it is seen at this
    /// revision for the first time (from then on the count runs).
    pub fn unchanged_for(&self, key: &str, revision: Revision, now: SystemTime) -> Duration {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(key) {
            Some((r, since)) if *r == revision => now.duration_since(*since).unwrap_or_default(),
            _ => {
                seen.insert(key.to_string(), (revision, now));
                Duration::ZERO
            }
        }
    }

    /// This replica wrote `key` at `revision` at `now`.
    pub fn wrote(&self, key: &str, revision: Revision, now: SystemTime) {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(key.to_string(), (revision, now));
    }

    /// Forgets `key` (its record is gone).
    pub fn forget(&self, key: &str) {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.remove(key);
    }

    /// Forgets every key under `prefix` that `keep` rejects (records that are gone).
    pub fn retain(&self, prefix: &str, keep: impl Fn(&str) -> bool) {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|k, _| !k.starts_with(prefix) || keep(k));
    }
}

//! The one fleet mirror: every consumer of the fleet view (the hub's relay, the controller,
//! `fleet-dns`, service discovery) reads it instead of writing its own list → watch → relist
//! loop. Shaped like kube-runtime:
//!
//! - [`watcher`] (kube-runtime's `watcher`): a stream that lists, then watches from the
//!   listing's revision, and turns every relist — the first, one after the hub's history moved
//!   past us ([`HubError::Relist`]), one after an error — into a [`WatcherEvent::Restarted`]
//!   carrying the complete view. Errors are yielded, then retried with backoff; the stream
//!   never ends by itself.
//! - [`FleetMirror`] (kube-runtime's `reflector` + store): folds the watcher into the whole
//!   current [`Fleet`] — every cluster, every cluster's records, every relay — and publishes
//!   it through a [`MirrorReader`] whose [`MirrorReader::changed`] is the change signal.
//!   Changes that arrive together are folded into one update.
//!
//! ```text
//!   FleetSource (HubClient, or a fake)      list ──► Restarted(view) ─┐
//!        │                                  watch ─► Applied(event) ──┼─► Fleet ─► MirrorReader(s)
//!        └─ error (relist, hub down) ─► yielded, backoff, list again ─┘      (changed() = signal)
//! ```
//!
//! Consumers read the latest [`Fleet`], compute what they want from it and converge; a
//! consumer that is slower than the hub simply skips intermediate states. While the hub is
//! unreachable the mirror keeps the last fleet it saw and reports the error beside it
//! ([`MirrorState::error`]), so data planes keep running on the last known state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use ipnetwork::Ipv4Network;
use tokio::sync::watch;

use crate::client::{HubClient, HubError};
use crate::model::{
    ClusterId, ClusterRecord, FleetView, MemberRecord, RegistryEvent, RelayRecord, Revision,
};

/// Where fleet listings and watches come from: the hub through [`HubClient`], or a fake in
/// tests.
pub trait FleetSource: Send + Sync + 'static {
    /// Everything a member may read, at one revision.
    fn list(&self) -> BoxFuture<'_, Result<FleetView, HubError>>;
    /// Every change after `after`, in order, each once; ends (or yields an error) when it
    /// cannot go on — [`HubError::Relist`] when the history after `after` is gone.
    fn watch(&self, after: Revision) -> BoxStream<'static, Result<RegistryEvent, HubError>>;
}

impl FleetSource for HubClient {
    fn list(&self) -> BoxFuture<'_, Result<FleetView, HubError>> {
        HubClient::list(self).boxed()
    }

    fn watch(&self, after: Revision) -> BoxStream<'static, Result<RegistryEvent, HubError>> {
        HubClient::watch(self, after).boxed()
    }
}

/// What the [`watcher`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatcherEvent {
    /// A complete listing: it replaces everything known before (the first listing and every
    /// relist).
    Restarted(FleetView),
    /// One change after the last listing.
    Applied(RegistryEvent),
}

/// Retry pacing of the [`watcher`] after an error (a relist after [`HubError::Relist`] is
/// immediate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatcherConfig {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for WatcherConfig {
    fn default() -> Self {
        WatcherConfig {
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Lists, then watches from the listing's revision; after a watch error or end, lists again.
/// Every listing is a [`WatcherEvent::Restarted`]; every error is yielded before the retry.
/// The stream never ends: drop it to stop.
pub fn watcher(
    source: Arc<dyn FleetSource>,
    config: WatcherConfig,
) -> impl Stream<Item = Result<WatcherEvent, HubError>> + Send + 'static {
    async_stream::stream! {
        let mut backoff = config.backoff_min;
        loop {
            let view = match source.list().await {
                Ok(view) => view,
                Err(e) => {
                    yield Err(e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(config.backoff_max);
                    continue;
                }
            };
            let after = view.revision;
            yield Ok(WatcherEvent::Restarted(view));
            let mut events = source.watch(after);
            let pause = loop {
                match events.next().await {
                    Some(Ok(event)) => {
                        backoff = config.backoff_min;
                        yield Ok(WatcherEvent::Applied(event));
                    }
                    Some(Err(e)) => {
                        let relist = matches!(e, HubError::Relist { .. });
                        yield Err(e);
                        break !relist;
                    }
                    // The client's watch rides out hub restarts itself; an end is unexpected.
                    None => break true,
                }
            };
            if pause {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.backoff_max);
            }
        }
    }
}

/// The whole fleet at one revision, as the hub shows it to members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    /// The fleet CIDR every cluster's block is cut from.
    pub fleet_cidr: Ipv4Network,
    pub clusters: BTreeMap<ClusterId, ClusterRecord>,
    /// Every cluster's published records: owner → name → record.
    pub records: BTreeMap<ClusterId, BTreeMap<String, MemberRecord>>,
    /// The hub's relays by id.
    pub relays: BTreeMap<String, RelayRecord>,
    /// The revision of the last change folded in.
    pub revision: Revision,
}

impl From<FleetView> for Fleet {
    fn from(view: FleetView) -> Self {
        let mut records: BTreeMap<ClusterId, BTreeMap<String, MemberRecord>> = BTreeMap::new();
        for r in view.records {
            records
                .entry(r.owner.clone())
                .or_default()
                .insert(r.name.clone(), r);
        }
        Fleet {
            fleet_cidr: view.fleet_cidr,
            clusters: view
                .clusters
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect(),
            records,
            relays: view.relays.into_iter().map(|r| (r.id.clone(), r)).collect(),
            revision: view.revision,
        }
    }
}

impl Fleet {
    /// Folds one change in. A removed cluster's records go with it (the hub deletes them in
    /// the same transaction and reports each; this keeps the mirror consistent either way).
    pub fn apply(&mut self, event: &RegistryEvent) {
        self.revision = self.revision.max(event.revision());
        match event {
            RegistryEvent::ClusterUpserted { record, .. } => {
                self.clusters.insert(record.id.clone(), record.clone());
            }
            RegistryEvent::ClusterRemoved { id, .. } => {
                self.clusters.remove(id);
                self.records.remove(id);
            }
            RegistryEvent::RecordPut {
                owner,
                name,
                value,
                revision,
            } => {
                let record = MemberRecord {
                    owner: owner.clone(),
                    name: name.clone(),
                    value: value.clone(),
                    revision: *revision,
                };
                self.records
                    .entry(owner.clone())
                    .or_default()
                    .insert(name.clone(), record);
            }
            RegistryEvent::RecordDeleted { owner, name, .. } => {
                if let Some(of_owner) = self.records.get_mut(owner) {
                    of_owner.remove(name);
                    if of_owner.is_empty() {
                        self.records.remove(owner);
                    }
                }
            }
            RegistryEvent::RelayUpserted { record, .. } => {
                self.relays.insert(record.id.clone(), record.clone());
            }
            RegistryEvent::RelayRemoved { id, .. } => {
                self.relays.remove(id);
            }
        }
    }

    /// The records `owner` published, by name (empty if none).
    pub fn records_of(&self, owner: &ClusterId) -> impl Iterator<Item = &MemberRecord> {
        self.records.get(owner).into_iter().flat_map(|m| m.values())
    }

    /// One record, if published.
    pub fn record(&self, owner: &ClusterId, name: &str) -> Option<&MemberRecord> {
        self.records.get(owner).and_then(|m| m.get(name))
    }
}

/// What a [`MirrorReader`] sees.
#[derive(Clone, Debug, Default)]
pub struct MirrorState {
    /// The fleet, once the first listing arrived (then always the latest known, also while
    /// the hub is unreachable).
    pub fleet: Option<Arc<Fleet>>,
    /// The list/watch loop's last error; cleared by the next listing or change.
    pub error: Option<HubError>,
    /// Listings so far: 1 after the first, +1 per relist.
    pub listings: u64,
}

/// Keeps a [`Fleet`] current from a [`FleetSource`] on a background task. Dropping it stops
/// the task; readers then see [`MirrorReader::changed`] fail.
#[derive(Debug)]
pub struct FleetMirror {
    task: tokio::task::JoinHandle<()>,
    reader: MirrorReader,
}

impl FleetMirror {
    /// Starts listing and watching `source` at once.
    pub fn spawn(source: Arc<dyn FleetSource>, config: WatcherConfig) -> Self {
        let (tx, rx) = watch::channel(MirrorState::default());
        let task = tokio::spawn(reflect(watcher(source, config), tx));
        FleetMirror {
            task,
            reader: MirrorReader(rx),
        }
    }

    /// A reader of the mirror; as many as wanted.
    pub fn reader(&self) -> MirrorReader {
        self.reader.clone()
    }
}

impl Drop for FleetMirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Folds watcher events into the published state; events that are already waiting are folded
/// in before one update is published.
async fn reflect(
    events: impl Stream<Item = Result<WatcherEvent, HubError>> + Send,
    tx: watch::Sender<MirrorState>,
) {
    let mut events = std::pin::pin!(events);
    let mut state = MirrorState::default();
    while let Some(first) = events.next().await {
        fold(&mut state, first);
        while let Some(Some(more)) = events.next().now_or_never() {
            fold(&mut state, more);
        }
        if tx.send(state.clone()).is_err() {
            return;
        }
    }
}

fn fold(state: &mut MirrorState, item: Result<WatcherEvent, HubError>) {
    match item {
        Ok(WatcherEvent::Restarted(view)) => {
            state.fleet = Some(Arc::new(Fleet::from(view)));
            state.listings += 1;
            state.error = None;
        }
        Ok(WatcherEvent::Applied(event)) => {
            if let Some(fleet) = &mut state.fleet {
                Arc::make_mut(fleet).apply(&event);
            }
            state.error = None;
        }
        Err(e) => {
            tracing::debug!(error = %e, "fleet mirror: list/watch failed; retrying");
            state.error = Some(e);
        }
    }
}

/// The mirror stopped (its [`FleetMirror`] was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the fleet mirror stopped")]
pub struct MirrorStopped;

/// A read handle on a [`FleetMirror`]: the latest state and a change signal. Cheap to clone;
/// each clone has its own notion of "seen".
#[derive(Clone, Debug)]
pub struct MirrorReader(watch::Receiver<MirrorState>);

impl MirrorReader {
    /// The latest state (cheap: the fleet is shared).
    pub fn state(&self) -> MirrorState {
        self.0.borrow().clone()
    }

    /// The latest fleet, `None` before the first listing.
    pub fn fleet(&self) -> Option<Arc<Fleet>> {
        self.0.borrow().fleet.clone()
    }

    /// Waits until the state changed since this reader last looked (by [`Self::changed`],
    /// [`Self::ready`] or [`Self::mark_seen`]).
    pub async fn changed(&mut self) -> Result<(), MirrorStopped> {
        self.0.changed().await.map_err(|_| MirrorStopped)
    }

    /// Marks the current state as seen and returns it.
    pub fn mark_seen(&mut self) -> MirrorState {
        self.0.borrow_and_update().clone()
    }

    /// Waits for the first listing and returns the fleet then.
    pub async fn ready(&mut self) -> Result<Arc<Fleet>, MirrorStopped> {
        loop {
            if let Some(fleet) = self.0.borrow_and_update().fleet.clone() {
                return Ok(fleet);
            }
            self.changed().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GatewayState, PublicKey};

    fn cluster(id: &str, key: u8) -> ClusterRecord {
        ClusterRecord {
            id: ClusterId::new(id).unwrap(),
            block: "100.96.0.0/20".parse().unwrap(),
            public_key: PublicKey::from_bytes([key; 32]),
            endpoint: None,
            gateway: GatewayState::Up,
            controller_live: true,
            joined_at: 1,
            token_id: "t".into(),
        }
    }

    fn view(clusters: Vec<ClusterRecord>, revision: Revision) -> FleetView {
        FleetView {
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            clusters,
            records: Vec::new(),
            relays: Vec::new(),
            revision,
        }
    }

    #[test]
    fn records_of_every_cluster_are_kept_and_go_with_their_cluster() {
        let mut fleet = Fleet::from(view(vec![cluster("aa", 1), cluster("bb", 2)], 5));
        let aa = ClusterId::new("aa").unwrap();
        let bb = ClusterId::new("bb").unwrap();
        for (owner, name, rev) in [(&aa, "gateway", 6), (&bb, "gateway", 7), (&bb, "node/x", 8)] {
            fleet.apply(&RegistryEvent::RecordPut {
                owner: owner.clone(),
                name: name.into(),
                value: name.as_bytes().to_vec(),
                revision: rev,
            });
        }
        assert_eq!(fleet.records_of(&bb).count(), 2);
        assert_eq!(fleet.record(&aa, "gateway").unwrap().revision, 6);
        fleet.apply(&RegistryEvent::RecordDeleted {
            owner: bb.clone(),
            name: "node/x".into(),
            revision: 9,
        });
        assert_eq!(fleet.records_of(&bb).count(), 1);
        fleet.apply(&RegistryEvent::ClusterRemoved {
            id: bb.clone(),
            revision: 10,
        });
        assert!(!fleet.clusters.contains_key(&bb));
        assert_eq!(fleet.records_of(&bb).count(), 0);
        assert_eq!(fleet.records_of(&aa).count(), 1);
        assert_eq!(fleet.revision, 10);
    }
}

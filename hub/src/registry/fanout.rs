//! The replica's watch fan-out: one store watch per registry, shared by every scoped watch.
//!
//! Every controller, fleet-dns and relay holds a watch in the member or clusters scope
//! ([`FleetScope`]). Given a store watch each, every one of N watchers looked at every change
//! of the store — N lease renewals and gateway records per interval looked at N times, which
//! is what stopped the hub short of 10,000 clusters. Here one task follows the store, turns
//! each change into a [`RegistryEvent`] once and files it:
//! - **fleet-wide** (clusters, relays, `export/*` records): one ring every scoped watcher reads;
//! - **a member's other records** (its `gateway` record and the like): that member's ring,
//!   read only by its own watchers;
//! - anything else (leases, tokens, blocks, credentials, usage): no event, no watcher wakes.
//!
//! A watcher wakes only when one of its rings grows. Rings are bounded (the fleet-wide ring by
//! count and bytes, a member's ring by count and bytes); a watcher whose `after` is below a
//! ring's floor, or below the revision the follower (re)started at, gets
//! [`StoreError::Compacted`] and relists, exactly as from a store watch. All-scope watches
//! (admin, the board) stay on the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::watch;

use super::{ClusterId, FleetScope, RECORDS, RegistryError, RegistryEvent, in_scope, to_event};
use crate::store::{Change, Revision, Store, StoreError, change_bytes};

/// Most events the fleet-wide ring keeps (a watcher further behind relists).
pub const SHARED_RING_EVENTS: usize = 100_000;
/// Most bytes (keys, values and a fixed overhead each, as the embedded store's history
/// counts them) the fleet-wide ring keeps.
pub const SHARED_RING_BYTES: usize = 64 << 20;
/// Most events one member's ring keeps: its own non-export records change rarely (the
/// controller's `gateway` record every 5 s status interval: 80 s of history), and a watch
/// that reconnects does so within seconds. Kept small because there is one ring per member:
/// 16 gateway records of ~600 bytes are ~10 KB, ~100 MB at 10,000 clusters.
pub const MEMBER_RING_EVENTS: usize = 16;
/// Most bytes one member's ring keeps (its newest event is always kept).
pub const MEMBER_RING_BYTES: usize = 32 << 10;
/// How long the follower waits before following the store again after its watch failed.
const RESTART_AFTER: Duration = Duration::from_millis(500);

type Entry = Arc<Result<RegistryEvent, String>>;

#[derive(Default)]
struct Ring {
    /// Every event of this ring above `floor` is in `entries`.
    floor: Revision,
    entries: VecDeque<(Revision, usize, Entry)>,
    bytes: usize,
}

impl Ring {
    fn push(
        &mut self,
        revision: Revision,
        bytes: usize,
        entry: Entry,
        max: usize,
        max_bytes: usize,
    ) {
        self.entries.push_back((revision, bytes, entry));
        self.bytes += bytes;
        while self.entries.len() > max || (self.bytes > max_bytes && self.entries.len() > 1) {
            if let Some((rev, b, _)) = self.entries.pop_front() {
                self.bytes -= b;
                self.floor = self.floor.max(rev);
            }
        }
    }

    /// The entries after `after`, or `Compacted` when some were dropped.
    fn after(&self, after: Revision, out: &mut Vec<(Revision, Entry)>) -> Result<(), StoreError> {
        if after < self.floor {
            return Err(StoreError::Compacted {
                after,
                compacted: self.floor,
            });
        }
        let start = self.entries.partition_point(|(r, _, _)| *r <= after);
        out.extend(self.entries.range(start..).map(|(r, _, e)| (*r, e.clone())));
        Ok(())
    }
}

struct State {
    /// The revision the follower (re)started from: nothing at or below it is in any ring.
    base: Revision,
    shared: Ring,
    /// A removed cluster's ring is kept empty, its floor at its last event.
    members: HashMap<ClusterId, Ring>,
    /// The follower stopped for good (the store was dropped).
    ended: bool,
}

impl State {
    fn from(base: Revision) -> State {
        State {
            base,
            shared: Ring {
                floor: base,
                ..Ring::default()
            },
            members: HashMap::new(),
            ended: false,
        }
    }
}

struct Inner {
    state: RwLock<State>,
    /// Bumped when the fleet-wide ring grows, the follower restarts or ends.
    shared: watch::Sender<u64>,
    /// One notifier per member with a watcher, bumped when its ring grows.
    members: Mutex<HashMap<ClusterId, watch::Sender<u64>>>,
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn member_notifier(&self, id: &ClusterId) -> watch::Receiver<u64> {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members
            .entry(id.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    fn bump_shared(&self) {
        self.shared.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn bump_member(&self, id: &ClusterId) {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = members.get(id) {
            if sender.receiver_count() == 0 {
                members.remove(id);
            } else {
                sender.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
}

/// The fan-out of one registry; cheap to clone. Its follower stops when the last clone of
/// the [`Fanout`] (held by the registry's clones) is dropped, or when the store is.
#[derive(Clone)]
pub(super) struct Fanout {
    inner: Arc<Inner>,
    _stop: Arc<watch::Sender<()>>,
}

/// Where a change is filed.
enum Filing {
    Shared,
    Member(ClusterId),
    Nowhere,
}

fn filing(key: &str) -> Filing {
    if !in_scope(key, FleetScope::Member, None) {
        // Not fleet-wide: a member's own record, or no event at all.
        return match key
            .strip_prefix(RECORDS)
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(owner, _)| ClusterId::new(owner).ok())
        {
            Some(owner) => Filing::Member(owner),
            None => Filing::Nowhere,
        };
    }
    Filing::Shared
}

impl Fanout {
    /// Starts following `store` from its current revision. Needs a Tokio runtime.
    pub(super) async fn start(store: &Arc<dyn Store>) -> Result<Fanout, StoreError> {
        let from = store.revision().await?;
        let stream = store.watch("", from).await?;
        let inner = Arc::new(Inner {
            state: RwLock::new(State::from(from)),
            shared: watch::Sender::new(0),
            members: Mutex::default(),
        });
        let (stop, stopped) = watch::channel(());
        tokio::spawn(follow(
            Arc::downgrade(store),
            inner.clone(),
            stream,
            stopped,
        ));
        Ok(Fanout {
            inner,
            _stop: Arc::new(stop),
        })
    }

    /// The events after `after` that `scope` shows to a caller of cluster `own` (member and
    /// clusters scopes; [`FleetScope::All`] is served from the store).
    pub(super) fn watch(
        &self,
        after: Revision,
        scope: FleetScope,
        own: Option<ClusterId>,
    ) -> impl Stream<Item = Result<RegistryEvent, RegistryError>> + Send + use<> {
        let inner = self.inner.clone();
        let mut shared = inner.shared.subscribe();
        let member = match (&own, scope) {
            (Some(id), FleetScope::Member) => Some((id.clone(), inner.member_notifier(id))),
            _ => None,
        };
        async_stream::stream! {
            let mut last = after;
            let mut member = member;
            loop {
                shared.mark_unchanged();
                if let Some((_, rx)) = &mut member {
                    rx.mark_unchanged();
                }
                let batch = {
                    let state = inner.read();
                    collect(&state, last, scope, member.as_ref().map(|(id, _)| id))
                };
                match batch {
                    Err(e) => {
                        yield Err(RegistryError::Store(e));
                        return;
                    }
                    Ok(events) if !events.is_empty() => {
                        for (revision, entry) in events {
                            last = revision;
                            match entry.as_ref() {
                                Ok(event) => yield Ok(event.clone()),
                                Err(reason) => {
                                    yield Err(RegistryError::BadRecord {
                                        key: format!("revision {revision}"),
                                        reason: reason.clone(),
                                    });
                                    return;
                                }
                            }
                        }
                        continue;
                    }
                    Ok(_) => {}
                }
                // Nothing new: wait for one of this watcher's rings to grow.
                let woke = match &mut member {
                    Some((_, rx)) => tokio::select! {
                        r = shared.changed() => r,
                        r = rx.changed() => r,
                    },
                    None => shared.changed().await,
                };
                if woke.is_err() {
                    yield Err(RegistryError::Store(StoreError::Closed));
                    return;
                }
            }
        }
    }
}

/// What a watcher after `last` has to read: its rings' entries, merged in revision order.
fn collect(
    state: &State,
    last: Revision,
    scope: FleetScope,
    own: Option<&ClusterId>,
) -> Result<Vec<(Revision, Entry)>, StoreError> {
    if state.ended {
        return Err(StoreError::Closed);
    }
    if last < state.base {
        return Err(StoreError::Compacted {
            after: last,
            compacted: state.base,
        });
    }
    let mut out = Vec::new();
    state.shared.after(last, &mut out)?;
    if scope == FleetScope::Clusters {
        // Clusters and relays only: no records.
        out.retain(|(_, e)| {
            !matches!(
                e.as_ref(),
                Ok(RegistryEvent::RecordPut { .. } | RegistryEvent::RecordDeleted { .. })
            )
        });
    }
    // No ring: no event of this member since the follower started, nothing to read.
    if let Some(ring) = own.and_then(|id| state.members.get(id)) {
        let shared = out.len();
        ring.after(last, &mut out)?;
        if out.len() > shared && shared > 0 {
            // Stable: changes of one revision keep their order.
            out.sort_by_key(|(r, _)| *r);
        }
    }
    Ok(out)
}

/// Files what one store change means for watchers, and wakes those whose ring grew.
fn file(inner: &Inner, change: Change) {
    let revision = change.revision();
    let bytes = change_bytes(&change);
    let place = filing(change.key());
    let entry = match &place {
        Filing::Nowhere => None,
        _ => match to_event(change) {
            Ok(Some(event)) => Some(Arc::new(Ok(event))),
            Ok(None) => None,
            Err(e) => Some(Arc::new(Err(e.to_string()))),
        },
    };
    let Some(entry) = entry else {
        return;
    };
    let mut state = inner.write();
    match place {
        Filing::Shared => {
            let removed = match entry.as_ref() {
                Ok(RegistryEvent::ClusterRemoved { id, .. }) => Some(id.clone()),
                _ => None,
            };
            state.shared.push(
                revision,
                bytes,
                entry,
                SHARED_RING_EVENTS,
                SHARED_RING_BYTES,
            );
            if let Some(id) = removed {
                // The removed cluster's events go; its ring's floor stays at its last one.
                if let Some(ring) = state.members.get_mut(&id) {
                    ring.floor = ring.entries.back().map_or(ring.floor, |(r, _, _)| *r);
                    ring.entries.clear();
                    ring.bytes = 0;
                }
            }
            drop(state);
            inner.bump_shared();
        }
        Filing::Member(owner) => {
            let floor = state.base;
            state
                .members
                .entry(owner.clone())
                .or_insert_with(|| Ring {
                    floor,
                    ..Ring::default()
                })
                .push(
                    revision,
                    bytes,
                    entry,
                    MEMBER_RING_EVENTS,
                    MEMBER_RING_BYTES,
                );
            drop(state);
            inner.bump_member(&owner);
        }
        Filing::Nowhere => {}
    }
}

/// Follows the store, filing each change; on a failed watch, starts again from the store's
/// current revision (watchers below it relist). Ends when the store or the fan-out is gone.
async fn follow(
    store: Weak<dyn Store>,
    inner: Arc<Inner>,
    first: crate::store::WatchStream,
    mut stopped: watch::Receiver<()>,
) {
    let mut stream = Some(first);
    loop {
        let Some(mut changes) = stream.take() else {
            // (Re)start: from the store's current revision, every ring emptied.
            let Some(strong) = store.upgrade() else { break };
            let opened = async {
                let from = strong.revision().await?;
                Ok::<_, StoreError>((from, strong.watch("", from).await?))
            }
            .await;
            drop(strong);
            match opened {
                Ok((from, changes)) => {
                    // Watchers below `from` relist; every scoped watcher also waits on the
                    // fleet-wide notifier, so one bump wakes them all.
                    *inner.write() = State::from(from);
                    inner.bump_shared();
                    stream = Some(changes);
                }
                Err(error) => {
                    tracing::warn!(%error, "watch fan-out: cannot follow the store; retrying");
                    tokio::select! {
                        _ = stopped.changed() => break,
                        _ = tokio::time::sleep(RESTART_AFTER) => {}
                    }
                }
            }
            continue;
        };
        loop {
            tokio::select! {
                _ = stopped.changed() => {
                    end(&inner);
                    return;
                }
                next = changes.next() => match next {
                    Some(Ok(change)) => file(&inner, change),
                    Some(Err(StoreError::Closed)) | None if store.strong_count() == 0 => {
                        end(&inner);
                        return;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "watch fan-out: the store watch failed; following again");
                        break;
                    }
                    None => {
                        tracing::warn!("watch fan-out: the store watch ended; following again");
                        break;
                    }
                },
            }
        }
        tokio::select! {
            _ = stopped.changed() => break,
            _ = tokio::time::sleep(RESTART_AFTER) => {}
        }
    }
    end(&inner);
}

/// The follower stopped for good: every scoped watcher ends with `Closed`.
fn end(inner: &Inner) {
    inner.write().ended = true;
    inner.bump_shared();
}

//! The fleet mirror against `FakeFleetSource`, an in-memory stand-in for the hub's list and
//! watch (the real hub is covered by the relay's and the controller's tests, which consume the
//! mirror): listing, following, relisting after the history is gone, and riding out a hub
//! that is down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_hub_api::client::HubError;
use fleet_hub_api::mirror::{FleetMirror, FleetSource, MirrorReader, WatcherConfig};
use fleet_hub_api::model::{
    ClusterId, ClusterRecord, FleetView, GatewayState, PublicKey, RegistryEvent, Revision,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

/// A fake hub: the current clusters and revision, and the open watches to push events into.
#[derive(Default)]
struct FakeFleetSource {
    inner: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    clusters: Vec<ClusterRecord>,
    revision: Revision,
    watches: Vec<mpsc::UnboundedSender<Result<RegistryEvent, HubError>>>,
    /// While set, `list` fails like an unreachable hub.
    down: bool,
    lists: usize,
}

fn cluster(id: &str) -> ClusterRecord {
    ClusterRecord {
        id: ClusterId::new(id).unwrap(),
        block: "100.96.0.0/20".parse().unwrap(),
        public_key: PublicKey::from_bytes([id.len() as u8; 32]),
        endpoint: None,
        gateway: GatewayState::Up,
        controller_live: true,
        joined_at: 1,
        token_id: "t".into(),
    }
}

impl FakeFleetSource {
    fn upsert(&self, record: ClusterRecord, notify: bool) {
        let mut s = self.inner.lock().unwrap();
        s.revision += 1;
        let revision = s.revision;
        s.clusters.retain(|c| c.id != record.id);
        s.clusters.push(record.clone());
        if notify {
            let event = RegistryEvent::ClusterUpserted { record, revision };
            s.watches.retain(|w| w.send(Ok(event.clone())).is_ok());
        }
    }

    /// A removal the watches never hear of (as if the history were compacted past it).
    fn remove_silently(&self, id: &str) {
        let mut s = self.inner.lock().unwrap();
        s.revision += 1;
        s.clusters.retain(|c| c.id.as_str() != id);
    }

    /// Ends every open watch with `error`.
    fn break_watches(&self, error: HubError) {
        let mut s = self.inner.lock().unwrap();
        for w in s.watches.drain(..) {
            let _ = w.send(Err(error.clone()));
        }
    }

    fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    fn lists(&self) -> usize {
        self.inner.lock().unwrap().lists
    }
}

impl FleetSource for FakeFleetSource {
    fn list(&self) -> BoxFuture<'_, Result<FleetView, HubError>> {
        let mut s = self.inner.lock().unwrap();
        s.lists += 1;
        let result = if s.down {
            Err(HubError::Unreachable {
                endpoints: "fake".into(),
                errors: "connection refused".into(),
            })
        } else {
            Ok(FleetView {
                fleet_cidr: "100.96.0.0/12".parse().unwrap(),
                clusters: s.clusters.clone(),
                records: Vec::new(),
                relays: Vec::new(),
                revision: s.revision,
            })
        };
        Box::pin(async move { result })
    }

    fn watch(&self, _after: Revision) -> BoxStream<'static, Result<RegistryEvent, HubError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.lock().unwrap().watches.push(tx);
        tokio_stream_from(rx)
    }
}

fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<Result<RegistryEvent, HubError>>,
) -> BoxStream<'static, Result<RegistryEvent, HubError>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

fn fast() -> WatcherConfig {
    WatcherConfig {
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

/// Waits (bounded) until the reader's state satisfies `pred`.
async fn until(reader: &mut MirrorReader, what: &str, pred: impl Fn(&MirrorReader) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !pred(reader) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            tokio::time::timeout(left, reader.changed()).await.is_ok(),
            "timed out waiting for: {what}; state {:?}",
            reader.state()
        );
    }
}

fn ids(reader: &MirrorReader) -> Vec<String> {
    let fleet = reader.fleet().unwrap_or_else(|| panic!("no fleet yet"));
    fleet.clusters.keys().map(|c| c.to_string()).collect()
}

#[tokio::test]
async fn the_mirror_lists_then_follows_every_change() {
    let hub = Arc::new(FakeFleetSource::default());
    hub.upsert(cluster("aa"), false);
    let mirror = FleetMirror::spawn(hub.clone(), fast());
    let mut reader = mirror.reader();
    let fleet = reader.ready().await.unwrap();
    assert_eq!(fleet.clusters.len(), 1);
    assert_eq!(reader.state().listings, 1);

    hub.upsert(cluster("bb"), true);
    until(&mut reader, "bb appears", |r| ids(r) == ["aa", "bb"]).await;
    assert_eq!(reader.fleet().unwrap().revision, 2);
    assert_eq!(reader.state().listings, 1, "no relist for a plain change");
}

#[tokio::test]
async fn a_relist_replaces_the_fleet_with_the_new_listing() {
    let hub = Arc::new(FakeFleetSource::default());
    hub.upsert(cluster("aa"), false);
    hub.upsert(cluster("bb"), false);
    let mirror = FleetMirror::spawn(hub.clone(), fast());
    let mut reader = mirror.reader();
    reader.ready().await.unwrap();
    assert_eq!(ids(&reader), ["aa", "bb"]);

    // bb leaves while the watch's history is lost: only a relist can show it.
    hub.remove_silently("bb");
    hub.break_watches(HubError::Relist { after: 2 });
    until(&mut reader, "the relist drops bb", |r| ids(r) == ["aa"]).await;
    let state = reader.state();
    assert_eq!(state.listings, 2);
    assert!(state.error.is_none(), "{:?}", state.error);
}

#[tokio::test]
async fn a_hub_that_is_down_keeps_the_last_fleet_and_reports_why() {
    let hub = Arc::new(FakeFleetSource::default());
    hub.upsert(cluster("aa"), false);
    let mirror = FleetMirror::spawn(hub.clone(), fast());
    let mut reader = mirror.reader();
    reader.ready().await.unwrap();

    hub.set_down(true);
    hub.break_watches(HubError::Transport {
        call: "watch",
        reason: "connection reset".into(),
    });
    until(&mut reader, "an unreachable error", |r| {
        matches!(r.state().error, Some(HubError::Unreachable { .. }))
    })
    .await;
    assert_eq!(
        ids(&reader),
        ["aa"],
        "the last fleet is kept while the hub is down"
    );
    let lists_while_down = hub.lists();

    hub.upsert(cluster("cc"), false);
    hub.set_down(false);
    until(&mut reader, "recovery with cc", |r| {
        r.state().error.is_none() && ids(r) == ["aa", "cc"]
    })
    .await;
    assert!(hub.lists() > lists_while_down);
}

#[tokio::test]
async fn dropping_the_mirror_stops_it_and_its_readers_hear_so() {
    let hub = Arc::new(FakeFleetSource::default());
    let mirror = FleetMirror::spawn(hub.clone(), fast());
    let mut reader = mirror.reader();
    reader.ready().await.unwrap();
    drop(mirror);
    let result = tokio::time::timeout(Duration::from_secs(5), reader.changed()).await;
    assert!(matches!(result, Ok(Err(_))), "{result:?}");
}

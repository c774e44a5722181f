//! The registry suite, run on each store backend. Each function gets two handles on one fresh
//! store: the same handle for the embedded store, two separate etcd connections ("two hub
//! replicas") for etcd.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fleet_hub::registry::{
    ClusterId, ClusterUpdate, FleetLayout, GatewayState, JoinRequest, JoinToken, ManualClock,
    PublicKey, Registry, RegistryError, RegistryEvent, RelayRecord, SystemClock,
};
use fleet_hub::store::Store;
use futures::StreamExt;

const DAY: Duration = Duration::from_secs(86_400);

fn id(s: &str) -> ClusterId {
    ClusterId::new(s).unwrap()
}

fn key(n: u8) -> PublicKey {
    PublicKey::from_bytes([n; 32])
}

fn request(cluster: &str, n: u8) -> JoinRequest {
    JoinRequest {
        cluster: id(cluster),
        public_key: key(n),
        endpoint: None,
    }
}

async fn registry(store: Arc<dyn Store>, layout: FleetLayout) -> Registry {
    Registry::open(store, layout, Arc::new(SystemClock))
        .await
        .unwrap()
}

fn small_layout() -> FleetLayout {
    // 4 blocks of /30.
    FleetLayout::new("198.18.0.0/28".parse().unwrap(), 30).unwrap()
}

pub async fn join_allocates_blocks_and_rejoin_keeps_them(store: Arc<dyn Store>, _: Arc<dyn Store>) {
    let reg = registry(store, FleetLayout::default()).await;
    let (token, _) = reg.create_token(DAY, "test").await.unwrap();
    let aa = reg.join(&token, request("aa", 1)).await.unwrap();
    let bb = reg.join(&token, request("bb", 2)).await.unwrap();
    assert_eq!(aa.block.to_string(), "100.96.0.0/20");
    assert_eq!(bb.block.to_string(), "100.96.16.0/20");
    assert_eq!(aa.gateway, GatewayState::Pending);

    // A restarted member re-joins: same block; a new key or endpoint is taken.
    let again = reg.join(&token, request("aa", 1)).await.unwrap();
    assert_eq!(again, aa);
    let mut moved = request("aa", 9);
    moved.endpoint = Some("203.0.113.7:51820".parse().unwrap());
    let again = reg.join(&token, moved).await.unwrap();
    assert_eq!(again.block, aa.block);
    assert_eq!(again.public_key, key(9));
    assert_eq!(
        reg.get_cluster(&id("aa")).await.unwrap().unwrap().endpoint,
        Some("203.0.113.7:51820".parse().unwrap())
    );
    let (clusters, _) = reg.list_clusters().await.unwrap();
    assert_eq!(clusters.len(), 2);
}

/// Two registries (two hub replicas) join 24 clusters concurrently: all blocks distinct.
pub async fn concurrent_joins_get_distinct_blocks(store: Arc<dyn Store>, replica: Arc<dyn Store>) {
    let one = registry(store, FleetLayout::default()).await;
    let two = registry(replica, FleetLayout::default()).await;
    let (token, _) = one.create_token(DAY, "race").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..24u8 {
        let reg = if i % 2 == 0 { one.clone() } else { two.clone() };
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            reg.join(&token, request(&format!("c{i}"), i))
                .await
                .unwrap()
        }));
    }
    let mut blocks = HashSet::new();
    for t in tasks {
        let record = t.await.unwrap();
        assert!(
            FleetLayout::default()
                .fleet_cidr
                .contains(record.block.network()),
            "{record:?}"
        );
        assert!(
            blocks.insert(record.block),
            "block {} handed out twice",
            record.block
        );
    }
    assert_eq!(blocks.len(), 24);
    let (clusters, _) = two.list_clusters().await.unwrap();
    assert_eq!(clusters.len(), 24);
}

/// As many concurrent joins (over two replicas) as the fleet has blocks: every one succeeds,
/// no block twice, and the next join finds the fleet full.
pub async fn a_fleet_fills_exactly_under_concurrent_joins(
    store: Arc<dyn Store>,
    replica: Arc<dyn Store>,
) {
    let layout = FleetLayout::new("10.0.0.0/18".parse().unwrap(), 24).unwrap();
    assert_eq!(layout.block_count(), 64);
    let one = registry(store, layout).await;
    let two = registry(replica, layout).await;
    let (token, _) = one.create_token(DAY, "fill").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u8 {
        let reg = if i % 2 == 0 { one.clone() } else { two.clone() };
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            reg.join(&token, request(&format!("f{i}"), i)).await
        }));
    }
    let mut blocks = HashSet::new();
    for t in tasks {
        let record = t.await.unwrap().expect("every join fits");
        assert!(blocks.insert(record.block), "block {} twice", record.block);
    }
    assert_eq!(blocks.len(), 64);
    let err = two
        .join(&token, request("one-too-many", 200))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::FleetExhausted { .. }), "{err}");
}

pub async fn exhausted_fleet_is_a_clear_error_without_change(
    store: Arc<dyn Store>,
    _: Arc<dyn Store>,
) {
    let reg = registry(store.clone(), small_layout()).await;
    let (token, _) = reg.create_token(DAY, "small").await.unwrap();
    for i in 0..4u8 {
        reg.join(&token, request(&format!("m{i}"), i))
            .await
            .unwrap();
    }
    let before = store.revision().await.unwrap();
    let (clusters_before, _) = reg.list_clusters().await.unwrap();
    let err = reg.join(&token, request("late", 99)).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::FleetExhausted { blocks: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("198.18.0.0/28"), "{err}");
    assert_eq!(store.revision().await.unwrap(), before, "no state change");
    assert_eq!(reg.list_clusters().await.unwrap().0, clusters_before);
    assert_eq!(reg.get_cluster(&id("late")).await.unwrap(), None);

    // A member already in keeps its block even when the fleet is full.
    reg.join(&token, request("m2", 2)).await.unwrap();

    // Removing a cluster frees its block for the next join.
    let freed = reg.get_cluster(&id("m1")).await.unwrap().unwrap().block;
    assert!(reg.remove_cluster(&id("m1")).await.unwrap());
    let late = reg.join(&token, request("late", 99)).await.unwrap();
    assert_eq!(late.block, freed);
}

pub async fn tokens_verify_expire_and_revoke(store: Arc<dyn Store>, _: Arc<dyn Store>) {
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
    ));
    let reg = Registry::open(store.clone(), FleetLayout::default(), clock.clone())
        .await
        .unwrap();
    let (short, short_info) = reg
        .create_token(Duration::from_secs(60), "short")
        .await
        .unwrap();
    let (long, _) = reg.create_token(DAY, "long").await.unwrap();
    let (revoked, _) = reg.create_token(DAY, "to revoke").await.unwrap();

    assert_eq!(reg.verify_token(&short).await.unwrap(), short_info);

    // Listing shows ids and metadata, never a secret or its hash; neither does the store.
    let listed = reg.list_tokens().await.unwrap();
    assert_eq!(listed.len(), 3);
    let listed_json = serde_json::to_string(&listed).unwrap();
    let stored = store.list("tokens/").await.unwrap();
    for token in [&short, &long, &revoked] {
        let text = token.expose_secret();
        let secret = text.split_once('.').unwrap().1;
        assert!(!listed_json.contains(secret));
        assert!(!format!("{token:?}").contains(secret), "Debug redacts");
        for kv in &stored.items {
            assert!(
                !String::from_utf8_lossy(&kv.value).contains(secret),
                "stored as a hash only"
            );
        }
    }
    assert!(!listed_json.contains("sha256"));

    // Wrong secret and unknown id: invalid.
    let forged = JoinToken::parse(&format!("{}.{}", short.id(), "0".repeat(64))).unwrap();
    assert!(matches!(
        reg.verify_token(&forged).await,
        Err(RegistryError::TokenInvalid { .. })
    ));
    let unknown = JoinToken::parse(&format!("{}.{}", "f".repeat(12), "0".repeat(64))).unwrap();
    assert!(matches!(
        reg.verify_token(&unknown).await,
        Err(RegistryError::TokenInvalid { .. })
    ));

    // Revoked.
    let info = reg.revoke_token(revoked.id()).await.unwrap();
    assert!(info.revoked_at.is_some());
    assert!(matches!(
        reg.verify_token(&revoked).await,
        Err(RegistryError::TokenRevoked { .. })
    ));
    assert!(matches!(
        reg.revoke_token("ffffffffffff").await,
        Err(RegistryError::TokenNotFound(_))
    ));

    // Expired once the clock passes its lifetime; the long one still works.
    clock.advance(Duration::from_secs(61));
    let err = reg.verify_token(&short).await.unwrap_err();
    assert!(matches!(err, RegistryError::TokenExpired { .. }), "{err}");
    assert!(!err.to_string().contains(&short.expose_secret()));
    reg.verify_token(&long).await.unwrap();

    // None of the bad tokens joins, and a refused join changes nothing.
    let before = store.revision().await.unwrap();
    for bad in [&short, &revoked, &forged, &unknown] {
        assert!(reg.join(bad, request("aa", 1)).await.is_err());
    }
    assert_eq!(store.revision().await.unwrap(), before);
    assert_eq!(reg.get_cluster(&id("aa")).await.unwrap(), None);
    reg.join(&long, request("aa", 1)).await.unwrap();
}

pub async fn members_write_only_their_own_records(store: Arc<dyn Store>, _: Arc<dyn Store>) {
    let reg = registry(store.clone(), FleetLayout::default()).await;
    let (token, _) = reg.create_token(DAY, "t").await.unwrap();
    let aa = id("aa");
    let bb = id("bb");
    reg.join(&token, request("aa", 1)).await.unwrap();
    let bb_record = reg.join(&token, request("bb", 2)).await.unwrap();
    reg.publish(&bb, &bb, "svc/web", b"bb's".to_vec())
        .await
        .unwrap();
    let before = store.revision().await.unwrap();

    let up = ClusterUpdate {
        gateway: Some(GatewayState::Up),
        ..Default::default()
    };
    let not_owner = |r: Result<_, RegistryError>| match r {
        Err(RegistryError::NotOwner { writer, target }) => {
            assert_eq!((writer.as_str(), target.as_str()), ("aa", "bb"))
        }
        Err(other) => panic!("expected NotOwner, got {other}"),
        Ok(_) => panic!("expected NotOwner, got success"),
    };
    not_owner(reg.update_cluster(&aa, &bb, up.clone()).await.map(|_| ()));
    not_owner(
        reg.publish(&aa, &bb, "svc/web", b"hijack".to_vec())
            .await
            .map(|_| ()),
    );
    not_owner(reg.unpublish(&aa, &bb, "svc/web").await.map(|_| ()));
    not_owner(reg.leave(&aa, &bb).await.map(|_| ()));
    let err = reg.update_cluster(&aa, &bb, up.clone()).await.unwrap_err();
    assert!(err.to_string().contains("may not write"), "{err}");
    assert_eq!(
        store.revision().await.unwrap(),
        before,
        "refused writes change nothing"
    );
    assert_eq!(reg.get_cluster(&bb).await.unwrap().unwrap(), bb_record);

    // Its own records: fine.
    let updated = reg.update_cluster(&aa, &aa, up).await.unwrap();
    assert_eq!(updated.gateway, GatewayState::Up);
    reg.publish(&aa, &aa, "svc/api", b"aa's".to_vec())
        .await
        .unwrap();
    assert!(reg.unpublish(&aa, &aa, "svc/api").await.unwrap());

    // A cluster that has not joined cannot publish.
    let cc = id("cc");
    assert!(matches!(
        reg.publish(&cc, &cc, "svc/x", vec![]).await,
        Err(RegistryError::NotJoined(_))
    ));
}

pub async fn view_and_watch_follow_the_fleet(store: Arc<dyn Store>, _: Arc<dyn Store>) {
    let reg = registry(store, FleetLayout::default()).await;
    let (token, _) = reg.create_token(DAY, "t").await.unwrap();
    let aa = id("aa");
    reg.join(&token, request("aa", 1)).await.unwrap();
    reg.publish(&aa, &aa, "svc/one", b"1".to_vec())
        .await
        .unwrap();
    let view = reg.view().await.unwrap();
    assert_eq!(view.clusters.len(), 1);
    assert_eq!(view.records.len(), 1);
    assert_eq!(view.records[0].name, "svc/one");

    let mut events = Box::pin(reg.watch(view.revision).await.unwrap());
    let bb = reg.join(&token, request("bb", 2)).await.unwrap();
    let bb_id = id("bb");
    reg.publish(&bb_id, &bb_id, "svc/two", b"2".to_vec())
        .await
        .unwrap();
    reg.create_token(DAY, "tokens are not member events")
        .await
        .unwrap();
    reg.remove_cluster(&bb_id).await.unwrap();

    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event within 10 s")
            .expect("stream open")
            .unwrap()
    };
    match next().await {
        RegistryEvent::ClusterUpserted { record, .. } => assert_eq!(record, bb),
        e => panic!("{e:?}"),
    }
    match next().await {
        RegistryEvent::RecordPut {
            owner, name, value, ..
        } => {
            assert_eq!(
                (owner.as_str(), name.as_str(), value.as_slice()),
                ("bb", "svc/two", &b"2"[..])
            )
        }
        e => panic!("{e:?}"),
    }
    // Removal: the cluster and its records go in one revision.
    let mut removed = Vec::new();
    for _ in 0..2 {
        removed.push(next().await);
    }
    assert_eq!(removed[0].revision(), removed[1].revision());
    assert!(
        removed
            .iter()
            .any(|e| matches!(e, RegistryEvent::ClusterRemoved { id, .. } if id.as_str() == "bb"))
    );
    assert!(
        removed
            .iter()
            .any(|e| matches!(e, RegistryEvent::RecordDeleted { name, .. } if name == "svc/two"))
    );

    // A member that reconnects resumes from the last revision it saw: only what it missed.
    let last = removed[1].revision();
    drop(events);
    let r = reg
        .publish(&aa, &aa, "svc/three", b"3".to_vec())
        .await
        .unwrap();
    let mut resumed = Box::pin(reg.watch(last).await.unwrap());
    let event = tokio::time::timeout(Duration::from_secs(10), resumed.next())
        .await
        .expect("event within 10 s")
        .expect("stream open")
        .unwrap();
    assert!(
        matches!(&event, RegistryEvent::RecordPut { name, revision, .. } if name == "svc/three" && *revision == r),
        "{event:?}"
    );
}

/// What a watcher saw, in short: `cluster <id> live=<b>`, `put <owner>/<name>`, ...
fn brief(event: &RegistryEvent) -> String {
    match event {
        RegistryEvent::ClusterUpserted { record, .. } => {
            format!("cluster {} live={}", record.id, record.controller_live)
        }
        RegistryEvent::ClusterRemoved { id, .. } => format!("removed {id}"),
        RegistryEvent::RecordPut { owner, name, .. } => format!("put {owner}/{name}"),
        RegistryEvent::RecordDeleted { owner, name, .. } => format!("deleted {owner}/{name}"),
        RegistryEvent::RelayUpserted { record, .. } => format!("relay {}", record.id),
        RegistryEvent::RelayRemoved { id, .. } => format!("relay removed {id}"),
    }
}

/// Reads `events` until one reads `until`; every revision must grow.
async fn briefs_until(
    events: &mut (impl futures::Stream<Item = Result<RegistryEvent, RegistryError>> + Unpin),
    until: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut last = 0;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap_or_else(|_| panic!("{until:?} within 10 s; saw {seen:?}"))
            .expect("stream open")
            .unwrap();
        assert!(
            event.revision() > last,
            "revisions grow: {event:?} after {last}"
        );
        last = event.revision();
        seen.push(brief(&event));
        if seen.last().map(String::as_str) == Some(until) {
            return seen;
        }
    }
}

/// A member watch of `own` from `after` answers first with "relist" (`Compacted`).
async fn assert_member_watch_relists(reg: &Registry, after: u64, own: &ClusterId) {
    use fleet_hub::registry::FleetScope;
    let mut events = Box::pin(
        reg.watch_scoped(after, FleetScope::Member, Some(own))
            .await
            .unwrap(),
    );
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an answer within 10 s")
        .expect("stream open");
    assert!(
        matches!(
            first,
            Err(RegistryError::Store(
                fleet_hub::store::StoreError::Compacted { .. }
            ))
        ),
        "{first:?}"
    );
}

pub async fn scoped_watches_show_each_member_its_part_in_order(
    store: Arc<dyn Store>,
    _: Arc<dyn Store>,
) {
    use fleet_hub::registry::FleetScope;
    let reg = registry(store, FleetLayout::default()).await;
    let (token, _) = reg.create_token(DAY, "t").await.unwrap();
    let (aa, bb) = (id("aa"), id("bb"));
    reg.join(&token, request("aa", 1)).await.unwrap();
    reg.join(&token, request("bb", 2)).await.unwrap();
    let view = reg
        .view_scoped(FleetScope::Member, Some(&aa))
        .await
        .unwrap();
    let watch = |scope, own: Option<&ClusterId>| {
        let reg = reg.clone();
        let own = own.cloned();
        async move {
            Box::pin(
                reg.watch_scoped(view.revision, scope, own.as_ref())
                    .await
                    .unwrap(),
            )
        }
    };
    let mut aa_events = watch(FleetScope::Member, Some(&aa)).await;
    let mut bb_events = watch(FleetScope::Member, Some(&bb)).await;
    let mut relay_events = watch(FleetScope::Clusters, None).await;

    reg.publish(&bb, &bb, "gateway", b"bb-1".to_vec())
        .await
        .unwrap();
    reg.publish(&aa, &aa, "gateway", b"aa-1".to_vec())
        .await
        .unwrap();
    reg.publish(&bb, &bb, "export/default/web", b"w".to_vec())
        .await
        .unwrap();
    // A lease renewal is no event; the first grant makes the cluster live (one event).
    for _ in 0..3 {
        assert!(
            reg.acquire_lease(&aa, "controller-0", Duration::from_secs(30))
                .await
                .unwrap()
                .granted
        );
    }
    reg.publish(&aa, &aa, "gateway", b"aa-2".to_vec())
        .await
        .unwrap();
    reg.join(&token, request("cc", 3)).await.unwrap();

    assert_eq!(
        briefs_until(&mut aa_events, "cluster cc live=false").await,
        [
            "put aa/gateway",
            "put bb/export/default/web",
            "cluster aa live=true",
            "put aa/gateway",
            "cluster cc live=false"
        ]
    );
    assert_eq!(
        briefs_until(&mut bb_events, "cluster cc live=false").await,
        [
            "put bb/gateway",
            "put bb/export/default/web",
            "cluster aa live=true",
            "cluster cc live=false"
        ]
    );
    assert_eq!(
        briefs_until(&mut relay_events, "cluster cc live=false").await,
        ["cluster aa live=true", "cluster cc live=false"]
    );

    // A watch from before the replica began following (or far behind a member's bounded
    // history) is told to relist, as from a store watch.
    assert_member_watch_relists(&reg, 0, &aa).await;
    let behind = reg
        .view_scoped(FleetScope::Member, Some(&aa))
        .await
        .unwrap();
    for n in 0..200 {
        reg.publish(&aa, &aa, "gateway", format!("aa-{n}").into_bytes())
            .await
            .unwrap();
    }
    assert_member_watch_relists(&reg, behind.revision, &aa).await;
    // bb, whose ring did not move, resumes from the same revision without relisting.
    let mut bb_resumed = Box::pin(
        reg.watch_scoped(behind.revision, FleetScope::Member, Some(&bb))
            .await
            .unwrap(),
    );
    reg.publish(&bb, &bb, "gateway", b"bb-2".to_vec())
        .await
        .unwrap();
    assert_eq!(
        briefs_until(&mut bb_resumed, "put bb/gateway").await,
        ["put bb/gateway"]
    );
}

pub async fn a_different_layout_is_refused(store: Arc<dyn Store>, replica: Arc<dyn Store>) {
    registry(store, FleetLayout::default()).await;
    let err = Registry::open(replica, small_layout(), Arc::new(SystemClock))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::LayoutMismatch { .. }), "{err}");
    assert!(err.to_string().contains("100.96.0.0/12"), "{err}");
}

async fn lease_layout_registries(
    store: Arc<dyn Store>,
    replica: Arc<dyn Store>,
) -> (Registry, Registry, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000),
    ));
    let one = Registry::open(store, FleetLayout::default(), clock.clone())
        .await
        .unwrap();
    let two = Registry::open(replica, FleetLayout::default(), clock.clone())
        .await
        .unwrap();
    (one, two, clock)
}

/// One lease per cluster, over two replicas: grant, renewal by the holder, refusal to another
/// holder while live (nothing written), takeover after expiry (generation + 1), release.
pub async fn leases_grant_renew_refuse_take_over_and_release(
    store: Arc<dyn Store>,
    replica: Arc<dyn Store>,
) {
    let (one, two, clock) = lease_layout_registries(store.clone(), replica).await;
    let (token, _) = one.create_token(DAY, "t").await.unwrap();
    one.join(&token, request("aa", 1)).await.unwrap();
    one.join(&token, request("bb", 2)).await.unwrap();
    let (aa, bb) = (id("aa"), id("bb"));
    let ttl = Duration::from_secs(3);

    let lease = one.acquire_lease(&aa, "ctl-1", ttl).await.unwrap();
    assert_eq!(
        (
            lease.granted,
            lease.holder.as_str(),
            lease.generation,
            lease.ttl
        ),
        (true, "ctl-1", 1, ttl)
    );
    clock.advance(Duration::from_secs(2));
    let renewed = two.acquire_lease(&aa, "ctl-1", ttl).await.unwrap();
    assert!(renewed.granted && renewed.generation == 1, "{renewed:?}");

    // Another holder while the lease runs: refused, told who holds it and for how long.
    clock.advance(Duration::from_secs(2));
    let before = store.revision().await.unwrap();
    let refused = two.acquire_lease(&aa, "ctl-2", ttl).await.unwrap();
    assert!(!refused.granted, "{refused:?}");
    assert_eq!((refused.holder.as_str(), refused.generation), ("ctl-1", 1));
    assert_eq!(
        refused.ttl,
        Duration::from_secs(1),
        "renewed at t=2 for 3 s"
    );
    assert_eq!(
        store.revision().await.unwrap(),
        before,
        "a refusal writes nothing"
    );

    // Leases are per cluster.
    let other = one.acquire_lease(&bb, "ctl-2", ttl).await.unwrap();
    assert!(other.granted && other.generation == 1, "{other:?}");

    // Expired: another holder takes over with the next generation; the old one is refused.
    clock.advance(Duration::from_millis(1_001));
    let taken = two.acquire_lease(&aa, "ctl-2", ttl).await.unwrap();
    assert!(taken.granted && taken.generation == 2, "{taken:?}");
    let late = one.acquire_lease(&aa, "ctl-1", ttl).await.unwrap();
    assert!(!late.granted && late.holder == "ctl-2", "{late:?}");

    // Release: only by the holder; then free at once, and the generation keeps counting.
    assert!(!one.release_lease(&aa, "ctl-1").await.unwrap());
    assert!(two.release_lease(&aa, "ctl-2").await.unwrap());
    assert!(
        !two.release_lease(&aa, "ctl-2").await.unwrap(),
        "idempotent"
    );
    let next = one.acquire_lease(&aa, "ctl-1", ttl).await.unwrap();
    assert!(next.granted && next.generation == 3, "{next:?}");

    // Bad input: clear errors, no change.
    let before = store.revision().await.unwrap();
    for (holder, ttl) in [
        ("", ttl),
        ("bad\nholder", ttl),
        ("ctl-1", Duration::ZERO),
        ("ctl-1", Duration::from_secs(7200)),
    ] {
        let err = one.acquire_lease(&aa, holder, ttl).await.unwrap_err();
        assert!(
            matches!(
                err,
                RegistryError::InvalidLeaseHolder(_) | RegistryError::InvalidLeaseTtl(_)
            ),
            "{err}"
        );
    }
    let cc = id("cc");
    assert!(matches!(
        one.acquire_lease(&cc, "ctl-1", ttl).await,
        Err(RegistryError::NotJoined(_))
    ));
    assert_eq!(store.revision().await.unwrap(), before);

    // A removed cluster's lease goes with it.
    assert!(store.get("leases/aa").await.unwrap().is_some());
    assert!(two.remove_cluster(&aa).await.unwrap());
    assert!(store.get("leases/aa").await.unwrap().is_none());
    assert!(matches!(
        one.acquire_lease(&aa, "ctl-1", ttl).await,
        Err(RegistryError::NotJoined(_))
    ));
}

/// Many acquirers with different holders at once, over two replicas: exactly one wins, and
/// every loser is told the winner.
pub async fn concurrent_lease_acquirers_exactly_one_wins(
    store: Arc<dyn Store>,
    replica: Arc<dyn Store>,
) {
    let (one, two, _clock) = lease_layout_registries(store, replica).await;
    let (token, _) = one.create_token(DAY, "t").await.unwrap();
    one.join(&token, request("aa", 1)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let reg = if i % 2 == 0 { one.clone() } else { two.clone() };
        tasks.push(tokio::spawn(async move {
            reg.acquire_lease(&id("aa"), &format!("ctl-{i}"), Duration::from_secs(10))
                .await
                .unwrap()
        }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap());
    }
    let winners: Vec<_> = leases.iter().filter(|l| l.granted).collect();
    assert_eq!(winners.len(), 1, "{leases:?}");
    let winner = &winners[0].holder;
    assert!(
        leases
            .iter()
            .all(|l| &l.holder == winner && l.generation == 1),
        "{leases:?}"
    );
}

/// The hub's relay records: in the view (with the fleet CIDR) and in the watch.
pub async fn relays_are_in_the_view_and_the_watch(store: Arc<dyn Store>, replica: Arc<dyn Store>) {
    let one = registry(store.clone(), FleetLayout::default()).await;
    let two = registry(replica, FleetLayout::default()).await;
    let relay = RelayRecord {
        id: RelayRecord::id_for(&key(7)),
        public_key: key(7),
        endpoint: "192.0.2.1:51820".parse().unwrap(),
        expires_at: 0,
        instance: String::new(),
    };
    assert_eq!(relay.id, "070707070707");
    let (_, relay) = one.publish_relay(&relay, RELAY_TTL).await.unwrap();
    assert!(relay.expires_at > 0, "the hub sets the expiry");
    let view = two.view().await.unwrap();
    assert_eq!(view.fleet_cidr, FleetLayout::default().fleet_cidr);
    assert_eq!(view.relays, vec![relay.clone()]);
    assert!(view.clusters.is_empty() && view.records.is_empty());

    let mut events = Box::pin(two.watch(view.revision).await.unwrap());
    let moved = RelayRecord {
        endpoint: "192.0.2.9:51820".parse().unwrap(),
        ..relay.clone()
    };
    let (_, moved) = one.publish_relay(&moved, RELAY_TTL).await.unwrap();
    assert!(one.remove_relay(&relay.id).await.unwrap());
    assert!(!one.remove_relay(&relay.id).await.unwrap());
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event within 10 s")
            .expect("stream open")
            .unwrap()
    };
    match next().await {
        RegistryEvent::RelayUpserted { record, .. } => assert_eq!(record, moved),
        e => panic!("{e:?}"),
    }
    match next().await {
        RegistryEvent::RelayRemoved { id, .. } => assert_eq!(id, relay.id),
        e => panic!("{e:?}"),
    }
    assert!(two.view().await.unwrap().relays.is_empty());

    let before = store.revision().await.unwrap();
    let bad = RelayRecord {
        id: "../x".into(),
        ..relay
    };
    assert!(matches!(
        one.publish_relay(&bad, RELAY_TTL).await,
        Err(RegistryError::InvalidRelayId(_))
    ));
    let good = RelayRecord {
        id: "abc".into(),
        ..bad
    };
    for ttl in [Duration::ZERO, Duration::from_secs(3601)] {
        assert!(matches!(
            one.publish_relay(&good, ttl).await,
            Err(RegistryError::InvalidRelayTtl(_))
        ));
    }
    assert_eq!(store.revision().await.unwrap(), before);
}

const RELAY_TTL: Duration = Duration::from_secs(6);

/// Relay liveness: a relay that stops renewing is swept (by either replica, exactly once) once
/// past its expiry; one that renews every TTL/3 never is; a renewal of a swept relay creates
/// it again; a record without an expiry (an older hub's) is swept at once.
pub async fn expired_relays_are_swept_once_and_renewed_ones_stay(
    store: Arc<dyn Store>,
    replica: Arc<dyn Store>,
) {
    let (one, two, clock) = lease_layout_registries(store.clone(), replica).await;
    let relay = |n: u8| RelayRecord {
        id: RelayRecord::id_for(&key(n)),
        public_key: key(n),
        endpoint: format!("192.0.2.{n}:51820").parse().unwrap(),
        expires_at: 0,
        instance: String::new(),
    };
    let (dead, live) = (relay(1), relay(2));
    // Both replicas' sweepers run from here on.
    let since = one.clock_now();
    one.publish_relay(&dead, RELAY_TTL).await.unwrap();
    one.publish_relay(&live, RELAY_TTL).await.unwrap();
    let start = two.view().await.unwrap();
    assert_eq!(start.relays.len(), 2);
    let mut events = Box::pin(two.watch(start.revision).await.unwrap());

    // 20 s in steps of TTL/3: `live` renews each step, `dead` never; both replicas sweep.
    let mut swept = Vec::new();
    let mut dead_gone_at = None;
    for step in 1..=10 {
        clock.advance(RELAY_TTL / 3);
        one.publish_relay(&live, RELAY_TTL).await.unwrap();
        for _ in 0..3 {
            let (a, b) = tokio::join!(one.sweep_relays(since), two.sweep_relays(since));
            for id in a.unwrap().into_iter().chain(b.unwrap()) {
                if id == dead.id && dead_gone_at.is_none() {
                    dead_gone_at = Some(step);
                }
                swept.push(id);
            }
        }
    }
    assert_eq!(swept, vec![dead.id.clone()], "only the dead relay, once");
    // Expired exactly at TTL (step 3 = 6 s), not before.
    assert_eq!(dead_gone_at, Some(3));
    let view = one.view().await.unwrap();
    assert_eq!(
        view.relays
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        vec![live.id.as_str()]
    );

    // The watch: 10 renewals of `live`, one removal of `dead`, nothing else.
    let (mut removed, mut renewed) = (Vec::new(), 0);
    while renewed + removed.len() < 11 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event within 10 s")
            .expect("stream open")
            .unwrap();
        match event {
            RegistryEvent::RelayUpserted { record, .. } if record.same_relay(&live) => renewed += 1,
            RegistryEvent::RelayRemoved { id, .. } => removed.push(id),
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(removed, vec![dead.id.clone()]);
    assert_eq!(renewed, 10);

    // The dead relay comes back: its next renewal creates the record again.
    let (revision, back) = one.publish_relay(&dead, RELAY_TTL).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        event,
        RegistryEvent::RelayUpserted {
            record: back,
            revision
        }
    );
    assert!(one.sweep_relays(since).await.unwrap().is_empty());

    // A record without an expiry (written by an older hub) counts as expired.
    let legacy = relay(3);
    let mut json = serde_json::to_value(&legacy).unwrap();
    json.as_object_mut().unwrap().remove("expires_at");
    store
        .put(
            &format!("relays/{}", legacy.id),
            serde_json::to_vec(&json).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(two.view().await.unwrap().relays.len(), 3);
    assert_eq!(
        two.sweep_relays(two.clock_now()).await.unwrap(),
        vec![legacy.id.clone()],
        "even a sweeper that just started"
    );
    assert_eq!(one.view().await.unwrap().relays.len(), 2);

    // A hub that was down (nobody swept, renewals failed) comes back with expired records: its
    // new sweeper gives each relay one TTL to renew before judging it.
    clock.advance(RELAY_TTL * 2);
    let restarted = one.clock_now();
    clock.advance(RELAY_TTL - Duration::from_millis(1));
    assert!(one.sweep_relays(restarted).await.unwrap().is_empty());
    one.publish_relay(&live, RELAY_TTL).await.unwrap();
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        one.sweep_relays(restarted).await.unwrap(),
        vec![dead.id.clone()],
        "the relay that did not renew in that TTL goes, the one that did stays"
    );
}

/// Issue 12 item 7: a member with 200 records (etcd takes at most 128 operations per
/// transaction) is removed by the operator, another one leaves: both succeed and leave no
/// record, block, credential or lease behind; a third member's records are untouched.
pub async fn members_with_200_records_are_removed_and_leave(
    store: Arc<dyn Store>,
    replica: Arc<dyn Store>,
) {
    let reg = registry(store.clone(), FleetLayout::default()).await;
    let other = registry(replica, FleetLayout::default()).await;
    let (token, _) = reg.create_token(DAY, "t").await.unwrap();
    for (n, name) in ["aa", "bb", "cc"].iter().enumerate() {
        reg.join(&token, request(name, n as u8 + 1)).await.unwrap();
    }
    for i in 0..200 {
        for name in ["aa", "bb"] {
            reg.publish(
                &id(name),
                &id(name),
                &format!("import/ns/svc-{i}"),
                vec![b'x'; 64],
            )
            .await
            .unwrap();
        }
    }
    reg.publish(&id("cc"), &id("cc"), "gateway", b"cc".to_vec())
        .await
        .unwrap();
    reg.acquire_lease(&id("aa"), "ctl-1", Duration::from_secs(30))
        .await
        .unwrap();

    assert!(
        reg.remove_cluster(&id("aa"))
            .await
            .expect("remove with 200 records")
    );
    assert!(
        other
            .leave(&id("bb"), &id("bb"))
            .await
            .expect("leave with 200 records")
    );

    let left: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .filter(|k| !k.starts_with("tokens/") && (k.contains("/aa") || k.contains("/bb")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let view = reg.view().await.unwrap();
    assert_eq!(view.clusters.len(), 1);
    assert_eq!(view.records.len(), 1, "cc's record stays");
    // The freed blocks are handed out again.
    let again = reg.join(&token, request("dd", 9)).await.unwrap();
    assert_eq!(again.block.to_string(), "100.96.0.0/20");
}

/// Issue 12 item 10: a member's records are held to a count and a byte quota. Past either, a
/// publish is `QuotaExceeded` (the API's `quota_exceeded`, not retried) and writes nothing;
/// replacing, unpublishing and publishing again stay exact; two replicas publishing at once
/// never overshoot; with the default quotas thousands of small records fit.
pub async fn member_quotas_hold_on_count_and_bytes(store: Arc<dyn Store>, replica: Arc<dyn Store>) {
    use fleet_hub::registry::Quotas;
    let quotas = Quotas {
        max_records: 10,
        max_bytes: 2_000,
    };
    let reg = registry(store.clone(), FleetLayout::default())
        .await
        .with_quotas(quotas);
    let other = registry(replica, FleetLayout::default())
        .await
        .with_quotas(quotas);
    let (token, _) = reg.create_token(DAY, "t").await.unwrap();
    reg.join(&token, request("aa", 1)).await.unwrap();
    reg.join(&token, request("bb", 2)).await.unwrap();
    let aa = id("aa");

    // Two replicas, 20 concurrent publishes of distinct records: exactly 10 land.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let reg = if i % 2 == 0 {
            reg.clone()
        } else {
            other.clone()
        };
        let aa = aa.clone();
        tasks.push(tokio::spawn(async move {
            reg.publish(&aa, &aa, &format!("import/ns/s{i:02}"), vec![b'x'; 10])
                .await
        }));
    }
    let mut granted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => granted += 1,
            Err(RegistryError::QuotaExceeded { what, limit, .. }) => {
                assert_eq!((what, limit), ("records", 10))
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(granted, 10);
    let mine = |s: Arc<dyn Store>| async move { s.list("records/aa/").await.unwrap().items };
    assert_eq!(mine(store.clone()).await.len(), 10);

    let before = store.revision().await.unwrap();
    let err = reg
        .publish(&aa, &aa, "import/ns/one-more", b"x".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::QuotaExceeded { .. }), "{err}");
    assert!(err.to_string().contains("--member-max-records"), "{err}");
    assert_eq!(
        fleet_hub::api::error_code(&err),
        fleet_hub::api::ErrorCode::QuotaExceeded
    );
    assert_eq!(store.revision().await.unwrap(), before, "nothing written");

    // Replacing a record is not a new one; a removed one frees its place.
    let name = mine(store.clone()).await[0].key["records/aa/".len()..].to_string();
    reg.publish(&aa, &aa, &name, vec![b'y'; 20]).await.unwrap();
    assert!(reg.unpublish(&aa, &aa, &name).await.unwrap());
    reg.publish(&aa, &aa, "import/ns/new", vec![b'z'; 10])
        .await
        .unwrap();
    // Bytes: a value that would take the member past 2,000 bytes is refused.
    let err = reg
        .publish(&aa, &aa, "import/ns/new", vec![b'z'; 1_900])
        .await
        .unwrap_err();
    match err {
        RegistryError::QuotaExceeded { what, limit, .. } => {
            assert_eq!((what, limit), ("bytes", 2_000))
        }
        other => panic!("expected QuotaExceeded, got {other}"),
    }
    let (usage, _) = reg.usage(&aa).await.unwrap();
    let listed = mine(store.clone()).await;
    assert_eq!(usage.records, listed.len() as u64);
    assert_eq!(
        usage.bytes,
        listed
            .iter()
            .map(|kv| (kv.key.len() - "records/aa/".len() + kv.value.len()) as u64)
            .sum::<u64>()
    );
    // Another member is not affected by aa's usage.
    reg.publish(&id("bb"), &id("bb"), "gateway", b"up".to_vec())
        .await
        .unwrap();

    // Default quotas: 3,000 small import records fit.
    let reg = registry(store.clone(), FleetLayout::default()).await;
    let bb = id("bb");
    for i in 0..3_000 {
        reg.publish(&bb, &bb, &format!("import/ns/svc-{i}"), vec![b'i'; 200])
            .await
            .unwrap();
    }
    // Removing the member removes its usage record with it.
    assert!(reg.remove_cluster(&aa).await.unwrap());
    assert!(store.get("usage/aa").await.unwrap().is_none());
}

#[macro_export]
macro_rules! registry_suite {
    ($setup:path) => {
        mod registry_suite_tests {
            use super::*;
            use $crate::common::registry_suite as suite;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn join_allocates_blocks_and_rejoin_keeps_them() {
                let (store, replica, _guard) = $setup().await;
                suite::join_allocates_blocks_and_rejoin_keeps_them(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn scoped_watches_show_each_member_its_part_in_order() {
                let (store, replica, _guard) = $setup().await;
                suite::scoped_watches_show_each_member_its_part_in_order(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_joins_get_distinct_blocks() {
                let (store, replica, _guard) = $setup().await;
                suite::concurrent_joins_get_distinct_blocks(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_fleet_fills_exactly_under_concurrent_joins() {
                let (store, replica, _guard) = $setup().await;
                suite::a_fleet_fills_exactly_under_concurrent_joins(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn exhausted_fleet_is_a_clear_error_without_change() {
                let (store, replica, _guard) = $setup().await;
                suite::exhausted_fleet_is_a_clear_error_without_change(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tokens_verify_expire_and_revoke() {
                let (store, replica, _guard) = $setup().await;
                suite::tokens_verify_expire_and_revoke(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn members_write_only_their_own_records() {
                let (store, replica, _guard) = $setup().await;
                suite::members_write_only_their_own_records(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn view_and_watch_follow_the_fleet() {
                let (store, replica, _guard) = $setup().await;
                suite::view_and_watch_follow_the_fleet(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_different_layout_is_refused() {
                let (store, replica, _guard) = $setup().await;
                suite::a_different_layout_is_refused(store, replica).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn leases_grant_renew_refuse_take_over_and_release() {
                let (store, replica, _guard) = $setup().await;
                suite::leases_grant_renew_refuse_take_over_and_release(store, replica).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_lease_acquirers_exactly_one_wins() {
                let (store, replica, _guard) = $setup().await;
                suite::concurrent_lease_acquirers_exactly_one_wins(store, replica).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn relays_are_in_the_view_and_the_watch() {
                let (store, replica, _guard) = $setup().await;
                suite::relays_are_in_the_view_and_the_watch(store, replica).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn members_with_200_records_are_removed_and_leave() {
                let (store, replica, _guard) = $setup().await;
                suite::members_with_200_records_are_removed_and_leave(store, replica).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn member_quotas_hold_on_count_and_bytes() {
                let (store, replica, _guard) = $setup().await;
                suite::member_quotas_hold_on_count_and_bytes(store, replica).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_relays_are_swept_once_and_renewed_ones_stay() {
                let (store, replica, _guard) = $setup().await;
                suite::expired_relays_are_swept_once_and_renewed_ones_stay(store, replica).await;
            }
        }
    };
}

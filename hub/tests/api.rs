//! The hub's TLS API over real sockets on 127.0.0.1: joins and tokens, ownership, bad input on
//! the port, CA pinning, an exhausted fleet, watch resume across a hub restart, and two hub
//! replicas on one real etcd with one killed.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::etcd::EtcdServer;
use common::hub::{HubProcess, copy_identity, quick_options};
use fleet_hub::api::server::{HubServer, ServerOptions};
use fleet_hub::api::{CaHash, Credential, ErrorCode, JoinString};
use fleet_hub::registry::{
    ClusterId, ClusterUpdate, FleetLayout, GatewayState, JoinRequest, ManualClock, PublicKey,
    Quotas, Registry, RegistryEvent, RelayRecord,
};
use fleet_hub::store::{EmbeddedStore, Store};
use fleet_hub_api::client::{ClientOptions, HubClient, HubError};
use fleet_hub_api::model::FleetScope;
use futures::{Stream, StreamExt};

/// An in-process hub on an embedded store with a clock the test moves.
struct Hub {
    server: Option<HubServer>,
    registry: Registry,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

impl Hub {
    async fn start(layout: FleetLayout) -> Hub {
        Self::start_with(layout, Quotas::default()).await
    }

    async fn start_with(layout: FleetLayout, quotas: Quotas) -> Hub {
        let dir = tempfile::Builder::new()
            .prefix("fleet-hub-api-")
            .tempdir()
            .unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(dir.path().join("store")).await.unwrap());
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let registry = Registry::open(store, layout, clock.clone())
            .await
            .unwrap()
            .with_quotas(quotas);
        let options = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
        let server = HubServer::start(registry.clone(), options).await.unwrap();
        Hub {
            server: Some(server),
            registry,
            clock,
            dir,
        }
    }

    fn server(&self) -> &HubServer {
        self.server.as_ref().unwrap()
    }

    fn endpoint(&self) -> String {
        self.server().local_addr().to_string()
    }

    fn client(&self) -> HubClient {
        HubClient::new([self.endpoint()], self.server().ca_hash(), quick_options()).unwrap()
    }

    fn admin(&self) -> HubClient {
        let text = std::fs::read_to_string(self.dir.path().join("data/admin.credential")).unwrap();
        self.client()
            .with_credential(Credential::parse(&text).unwrap())
    }

    async fn revision(&self) -> u64 {
        self.registry.store().revision().await.unwrap()
    }
}

fn key(n: u8) -> PublicKey {
    PublicKey::from_bytes([n; 32])
}

fn id(s: &str) -> ClusterId {
    ClusterId::new(s).unwrap()
}

fn request(cluster: &str, n: u8) -> JoinRequest {
    JoinRequest {
        cluster: id(cluster),
        public_key: key(n),
        endpoint: None,
    }
}

/// A join token valid for an hour, from `admin`.
async fn token(admin: &HubClient) -> JoinString {
    admin
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap()
        .0
}

fn code(result: Result<impl std::fmt::Debug, HubError>) -> ErrorCode {
    let e = result.expect_err("the call must fail");
    e.code().unwrap_or_else(|| panic!("not an API error: {e}"))
}

/// The next event, within 10 s.
async fn next_event<S>(watch: &mut S) -> RegistryEvent
where
    S: Stream<Item = Result<RegistryEvent, HubError>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event within 10 s")
        .expect("the watch goes on")
        .expect("no watch error")
}

/// Nothing more arrives within `quiet`.
async fn assert_no_event<S>(watch: &mut S, quiet: Duration)
where
    S: Stream<Item = Result<RegistryEvent, HubError>> + Unpin,
{
    if let Ok(Some(event)) = tokio::time::timeout(quiet, watch.next()).await {
        panic!("unexpected event {event:?}");
    }
}

fn put_name(event: &RegistryEvent) -> String {
    match event {
        RegistryEvent::RecordPut { owner, name, .. } => format!("{owner}/{name}"),
        other => panic!("expected a record put, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_with_a_token_then_rejoin_with_the_credential() {
    let hub = Hub::start(FleetLayout::default()).await;
    let (join, info) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "for aa")
        .await
        .unwrap();
    assert_eq!(
        join.ca_hash,
        hub.server().ca_hash(),
        "the join string pins this hub's CA"
    );
    assert_eq!(hub.admin().list_tokens().await.unwrap()[0].id, info.id);

    let member = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let joined = member.join(&join, request("aa", 1)).await.unwrap();
    assert_eq!(joined.record.id, id("aa"));
    assert_eq!(joined.record.block.to_string(), "100.96.0.0/20");
    assert!(
        matches!(&joined.credential, Credential::Member { cluster, .. } if cluster == &id("aa"))
    );

    // A restarted member: a new client with the stored credential keeps id and block.
    let again = HubClient::new([hub.endpoint()], join.ca_hash, quick_options())
        .unwrap()
        .with_credential(joined.credential.clone());
    let endpoint = "192.0.2.10:51820".parse().unwrap();
    let record = again.rejoin(key(9), Some(endpoint)).await.unwrap();
    assert_eq!(record.block, joined.record.block);
    assert_eq!(record.public_key, key(9));
    let updated = again
        .update(
            &id("aa"),
            ClusterUpdate {
                gateway: Some(GatewayState::Up),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (updated.gateway, updated.endpoint),
        (GatewayState::Up, Some(endpoint))
    );

    // A token alone never takes over an existing cluster.
    let before = hub.revision().await;
    let thief = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    assert_eq!(
        code(thief.join(&join, request("aa", 7)).await),
        ErrorCode::AlreadyJoined
    );
    assert_eq!(hub.revision().await, before);

    // A member reads everyone's records.
    member
        .publish(&id("aa"), "svc/web", b"10.0.0.1")
        .await
        .unwrap();
    let view = member.list().await.unwrap();
    assert_eq!(view.clusters.len(), 1);
    assert_eq!(view.records[0].value, b"10.0.0.1");
    assert!(member.unpublish(&id("aa"), "svc/web").await.unwrap());
    assert!(!member.unpublish(&id("aa"), "svc/web").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_expired_and_revoked_tokens_are_distinct_errors_and_change_nothing() {
    let hub = Hub::start(FleetLayout::default()).await;
    let admin = hub.admin();
    let (good, _) = admin
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let (short, _) = admin
        .create_token(Duration::from_secs(60), "")
        .await
        .unwrap();
    let (revoked, info) = admin
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    admin.revoke_token(&info.id).await.unwrap();
    hub.clock.advance(Duration::from_secs(120));

    let wrong_secret = JoinString::parse(&format!(
        "{}.{}.{}",
        good.token.id(),
        "0".repeat(64),
        good.ca_hash
    ))
    .unwrap();
    let client = HubClient::new([hub.endpoint()], good.ca_hash, quick_options()).unwrap();
    let before = hub.revision().await;
    assert_eq!(
        code(client.join(&wrong_secret, request("aa", 1)).await),
        ErrorCode::TokenInvalid
    );
    assert_eq!(
        code(client.join(&short, request("aa", 1)).await),
        ErrorCode::TokenExpired
    );
    let err = client.join(&revoked, request("aa", 1)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TokenRevoked));
    assert!(err.to_string().contains("revoked"), "{err}");
    assert_eq!(hub.revision().await, before, "failed joins write nothing");
    assert!(hub.registry.list_clusters().await.unwrap().0.is_empty());
    assert!(client.credential().is_none());

    // Calls without, or with a made-up, credential are refused.
    assert!(matches!(client.list().await, Err(HubError::NoCredential)));
    let forged =
        client.with_credential(Credential::parse(&format!("m.aa.{}", "1".repeat(64))).unwrap());
    assert_eq!(
        code(forged.list().await.map(|_| ())),
        ErrorCode::Unauthenticated
    );
    let fake_admin =
        client.with_credential(Credential::parse(&format!("a.{}", "2".repeat(64))).unwrap());
    assert_eq!(
        code(fake_admin.list_tokens().await),
        ErrorCode::Unauthenticated
    );

    client.join(&good, request("aa", 1)).await.unwrap();
    assert_eq!(
        code(client.list_tokens().await),
        ErrorCode::PermissionDenied,
        "members cannot manage tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_write_another_clusters_records() {
    let hub = Hub::start(FleetLayout::default()).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let bb = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    let bb_record = bb.join(&join, request("bb", 2)).await.unwrap().record;
    bb.publish(&id("bb"), "svc", b"mine").await.unwrap();
    let before = hub.revision().await;

    let evil = ClusterUpdate {
        public_key: Some(key(66)),
        ..Default::default()
    };
    assert_eq!(
        code(aa.update(&id("bb"), evil).await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(aa.publish(&id("bb"), "svc", b"stolen").await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(aa.unpublish(&id("bb"), "svc").await),
        ErrorCode::PermissionDenied
    );

    assert_eq!(
        hub.revision().await,
        before,
        "refused writes change nothing"
    );
    let view = bb.list().await.unwrap();
    let stored = view.clusters.iter().find(|c| c.id == id("bb")).unwrap();
    assert_eq!(stored, &bb_record);
    assert_eq!(view.records.len(), 1);
    assert_eq!(view.records[0].value, b"mine");
}

/// Issue 12 item 10 over the API: a publish past the member's quota is `quota_exceeded`
/// (HTTP 403), says which limit and how to raise it, changes nothing, and the client does not
/// resend it (one refusal, not a retry loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_past_the_quota_is_refused_not_retried() {
    let quotas = Quotas {
        max_records: 3,
        max_bytes: 1 << 20,
    };
    let hub = Hub::start_with(FleetLayout::default(), quotas).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    for i in 0..3 {
        aa.publish(&id("aa"), &format!("import/ns/s{i}"), b"x")
            .await
            .unwrap();
    }
    let before = hub.revision().await;
    let started = Instant::now();
    let err = aa
        .publish(&id("aa"), "import/ns/s3", b"x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
    assert_eq!(ErrorCode::QuotaExceeded.http_status(), 403);
    assert!(err.to_string().contains("--member-max-records"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(hub.revision().await, before, "nothing written");
    // Unpublishing frees a place.
    aa.unpublish(&id("aa"), "import/ns/s0").await.unwrap();
    aa.publish(&id("aa"), "import/ns/s3", b"x").await.unwrap();
}

/// Reads until the server closes the connection (EOF or reset), within 5 s.
fn assert_closed_by_server(mut stream: std::net::TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue, // a TLS alert, perhaps
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_plain_http_are_refused_while_others_are_served() {
    let hub = Hub::start(FleetLayout::default()).await;
    let admin = hub.admin();
    admin.list_tokens().await.unwrap();
    let addr = hub.server().local_addr();
    let inputs: [&[u8]; 4] = [
        b"GET /v1/list HTTP/1.1\r\nHost: fleet-hub\r\n\r\n",
        b"POST /v1/join HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        &[
            0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x16, 0x03, 0x01, 0xff, 0xff,
        ],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
    ];
    for input in inputs {
        let stream = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(input).unwrap();
            stream
        })
        .await
        .unwrap();
        tokio::task::spawn_blocking(move || assert_closed_by_server(stream))
            .await
            .unwrap();
    }
    // A client that connects and says nothing is dropped after the handshake timeout, and
    // meanwhile everyone else is served.
    let silent = std::net::TcpStream::connect(addr).unwrap();
    let tokens = admin.list_tokens().await.unwrap();
    assert!(tokens.is_empty());
    drop(silent);
    admin
        .create_token(Duration::from_secs(60), "still serving")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_wrong_ca_pin_refuses_the_hub() {
    let hub = Hub::start(FleetLayout::default()).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let wrong = CaHash([0x42; 32]);
    let client = HubClient::new([hub.endpoint()], wrong, quick_options()).unwrap();
    let before = hub.revision().await;
    let err = client.join(&join, request("aa", 1)).await.unwrap_err();
    assert!(matches!(err, HubError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("pinned"), "{err}");
    assert_eq!(
        hub.revision().await,
        before,
        "the token never reached the hub"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_fleet_cidr_is_a_clear_error_and_changes_nothing() {
    let layout = FleetLayout::new("10.200.0.0/23".parse().unwrap(), 24).unwrap();
    let hub = Hub::start(layout).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    for (i, name) in ["aa", "bb"].into_iter().enumerate() {
        let c = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
        c.join(&join, request(name, i as u8)).await.unwrap();
    }
    let before = hub.revision().await;
    let cc = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let err = cc.join(&join, request("cc", 3)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::FleetExhausted));
    assert!(err.to_string().contains("10.200.0.0/23"), "{err}");
    assert_eq!(hub.revision().await, before);
    assert_eq!(hub.registry.list_clusters().await.unwrap().0.len(), 2);
}

/// A watch open across a hub restart (embedded store, the real `fleet-hub serve`): changes
/// made before, during the watcher's reconnect, and after arrive once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_a_hub_restart_without_gaps_or_duplicates() {
    let mut hub = HubProcess::start(&[]).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let bb = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    bb.join(&join, request("bb", 2)).await.unwrap();
    let view = bb.list().await.unwrap();
    let mut watch = Box::pin(bb.watch(view.revision));

    aa.publish(&id("aa"), "r1", b"1").await.unwrap();
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/r1");

    hub.stop();
    hub.restart().await;
    // Written while the watcher is still reconnecting.
    aa.publish(&id("aa"), "r2", b"2").await.unwrap();
    aa.publish(&id("aa"), "r3", b"3").await.unwrap();
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/r2");
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/r3");

    // A crash this time.
    hub.kill();
    hub.restart().await;
    aa.publish(&id("aa"), "r4", b"4").await.unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!(put_name(&event), "aa/r4");
    assert_no_event(&mut watch, Duration::from_millis(500)).await;
    assert!(hub.log().contains("hub API serving"));
    assert!(
        !hub.log().contains(&join.token.expose_secret()),
        "the hub never logs a token"
    );
}

/// Two `fleet-hub serve` replicas on one real etcd sharing a CA; the one a member uses is
/// killed; the member's client lists, publishes and watches through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_etcd_one_killed_the_member_keeps_working() {
    let etcd = EtcdServer::start().await;
    let store_flags = ["--etcd", &etcd.endpoint()];
    let mut one = HubProcess::start(&store_flags).await;
    let dir_two = tempfile::Builder::new()
        .prefix("fleet-hub-api-")
        .tempdir()
        .unwrap();
    copy_identity(&one.data_dir(), &dir_two.path().join("data"));
    let two = HubProcess::start_in(dir_two, &store_flags).await;
    assert_eq!(one.ca_hash(), two.ca_hash());

    let (join, _) = one
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let endpoints = [one.endpoint(), two.endpoint()];
    let aa = HubClient::new(endpoints.clone(), join.ca_hash, quick_options()).unwrap();
    let bb = HubClient::new(endpoints.clone(), join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    bb.join(&join, request("bb", 2)).await.unwrap();
    let view = bb.list().await.unwrap();
    assert_eq!(view.clusters.len(), 2);
    let mut watch = Box::pin(bb.watch(view.revision));
    aa.publish(&id("aa"), "before", b"x").await.unwrap();
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/before");

    one.kill();
    let started = Instant::now();
    aa.publish(&id("aa"), "after", b"y")
        .await
        .expect("publish through the other replica");
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/after");
    let view = aa.list().await.expect("list through the other replica");
    assert_eq!(view.records.len(), 2);
    bb.update(
        &id("bb"),
        ClusterUpdate {
            gateway: Some(GatewayState::Up),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let event = next_event(&mut watch).await;
    assert!(
        matches!(event, RegistryEvent::ClusterUpserted { ref record, .. } if record.gateway == GatewayState::Up),
        "{event:?}"
    );
    assert_no_event(&mut watch, Duration::from_millis(500)).await;
    eprintln!(
        "fail-over to the second replica took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_is_a_relist_error() {
    let hub = Hub::start(FleetLayout::default()).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    let old = aa.list().await.unwrap().revision;
    for i in 0..5 {
        aa.publish(&id("aa"), &format!("r{i}"), b"v").await.unwrap();
    }
    let now = hub.revision().await;
    hub.registry.store().compact(now).await.unwrap();

    let mut watch = Box::pin(aa.watch(old));
    let err = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an answer within 10 s")
        .expect("an item")
        .unwrap_err();
    assert!(
        matches!(err, HubError::Relist { after } if after == old),
        "{err}"
    );
    assert!(err.to_string().contains("relist"), "{err}");
    assert!(
        watch.next().await.is_none(),
        "the watch ends after a relist error"
    );

    // The way out: list, then watch from the listing's revision.
    let view = aa.list().await.unwrap();
    assert_eq!(view.records.len(), 5);
    let mut watch = Box::pin(aa.watch(view.revision));
    aa.publish(&id("aa"), "r5", b"v").await.unwrap();
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/r5");
}

/// One transaction, several changes at one revision (removing a cluster deletes its record
/// and its published records): all arrive, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_sharing_a_revision_all_arrive_once() {
    let hub = Hub::start(FleetLayout::default()).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let bb = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    bb.join(&join, request("bb", 2)).await.unwrap();
    for name in ["x", "y"] {
        aa.publish(&id("aa"), name, b"v").await.unwrap();
    }
    let mut watch = Box::pin(bb.watch(bb.list().await.unwrap().revision));
    assert!(hub.registry.remove_cluster(&id("aa")).await.unwrap());
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_event(&mut watch).await);
    }
    let revision = seen[0].revision();
    assert!(seen.iter().all(|e| e.revision() == revision), "{seen:?}");
    assert!(
        seen.iter()
            .any(|e| matches!(e, RegistryEvent::ClusterRemoved { id: c, .. } if c == &id("aa")))
    );
    assert_no_event(&mut watch, Duration::from_millis(300)).await;
    // The removed member's credential no longer works.
    assert_eq!(
        code(aa.list().await.map(|_| ())),
        ErrorCode::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_and_changes_nothing() {
    let hub = Hub::start(FleetLayout::default()).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    let before = hub.revision().await;
    let huge = vec![0u8; 2 * 1024 * 1024];
    assert_eq!(
        code(aa.publish(&id("aa"), "big", &huge).await),
        ErrorCode::TooLarge
    );
    assert_eq!(hub.revision().await, before);
    aa.publish(&id("aa"), "small", b"ok").await.unwrap();
}

/// Shutdown ends open watch streams and returns promptly; the watcher keeps retrying (it is
/// not told anything false) until it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_prompt_with_open_watches() {
    let mut hub = Hub::start(FleetLayout::default()).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    let mut watch = Box::pin(aa.watch(aa.list().await.unwrap().revision));
    aa.publish(&id("aa"), "r", b"v").await.unwrap();
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/r");
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        hub.server.take().unwrap().shutdown(),
    )
    .await
    .expect("shutdown within 10 s");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_no_event(&mut watch, Duration::from_millis(300)).await;
    assert!(matches!(aa.list().await, Err(HubError::Unreachable { .. })));
}

/// The lease over the API: a member's lease is its own cluster's; another member's holders
/// do not compete with it; the admin has no lease; release frees it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_over_the_api_are_per_member_cluster() {
    let hub = Hub::start(FleetLayout::default()).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let bb = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    bb.join(&join, request("bb", 2)).await.unwrap();
    let ttl = Duration::from_secs(3);

    let first = aa.acquire_lease("aa-ctl-1", ttl).await.unwrap();
    assert!(first.granted && first.generation == 1, "{first:?}");
    assert_eq!(first.ttl, ttl);
    // A second replica of aa's controller (same credential, another holder): refused.
    let standby = aa.with_credential(aa.credential().unwrap());
    let refused = standby.acquire_lease("aa-ctl-2", ttl).await.unwrap();
    assert!(
        !refused.granted && refused.holder == "aa-ctl-1",
        "{refused:?}"
    );
    // bb's lease is bb's own, whatever the holder is called.
    let bb_lease = bb.acquire_lease("aa-ctl-2", ttl).await.unwrap();
    assert!(bb_lease.granted, "{bb_lease:?}");

    // Expiry by the hub's clock: the standby takes over with the next generation.
    hub.clock.advance(Duration::from_millis(3_001));
    let taken = standby.acquire_lease("aa-ctl-2", ttl).await.unwrap();
    assert!(taken.granted && taken.generation == 2, "{taken:?}");
    standby.release_lease("aa-ctl-2").await.unwrap();
    let back = aa.acquire_lease("aa-ctl-1", ttl).await.unwrap();
    assert!(back.granted && back.generation == 3, "{back:?}");

    // Bad input and the wrong caller: clear errors, no change.
    let before = hub.revision().await;
    assert_eq!(
        code(aa.acquire_lease("", ttl).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(aa.acquire_lease("x", Duration::ZERO).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(hub.admin().acquire_lease("admin", ttl).await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(hub.revision().await, before);
}

/// A member leaves; the admin removes another; a member cannot remove someone else. Watchers
/// see the removals; removed members' credentials and leases are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leave_admins_remove_and_members_cannot_remove_others() {
    let hub = Hub::start(FleetLayout::default()).await;
    let admin = hub.admin();
    let join = token(&admin).await;
    let client = || HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let (aa, bb, cc) = (client(), client(), client());
    aa.join(&join, request("aa", 1)).await.unwrap();
    bb.join(&join, request("bb", 2)).await.unwrap();
    cc.join(&join, request("cc", 3)).await.unwrap();
    bb.publish(&id("bb"), "svc", b"v").await.unwrap();
    aa.acquire_lease("aa-ctl", Duration::from_secs(30))
        .await
        .unwrap();
    let mut watch = Box::pin(cc.watch(cc.list().await.unwrap().revision));

    // A member removing another: refused, clearly, and nothing changes.
    let before = hub.revision().await;
    let err = aa.remove_cluster(&id("bb")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
    assert!(
        err.to_string().contains("aa") && err.to_string().contains("bb"),
        "{err}"
    );
    assert_eq!(hub.revision().await, before);
    assert_eq!(bb.list().await.unwrap().clusters.len(), 3);

    // The admin removes bb: watchers see it, bb's credential is refused afterwards.
    assert!(admin.remove_cluster(&id("bb")).await.unwrap());
    let mut removal = vec![next_event(&mut watch).await, next_event(&mut watch).await];
    removal.sort_by_key(|e| matches!(e, RegistryEvent::RecordDeleted { .. }));
    assert!(
        matches!(&removal[0], RegistryEvent::ClusterRemoved { id: c, .. } if c == &id("bb")),
        "{removal:?}"
    );
    assert!(matches!(&removal[1], RegistryEvent::RecordDeleted { name, .. } if name == "svc"));
    assert_eq!(
        code(bb.list().await.map(|_| ())),
        ErrorCode::Unauthenticated
    );
    assert_eq!(
        code(bb.acquire_lease("bb-ctl", Duration::from_secs(3)).await),
        ErrorCode::Unauthenticated
    );
    assert!(
        !admin.remove_cluster(&id("bb")).await.unwrap(),
        "already gone"
    );

    // aa leaves by itself: record, credential and lease go.
    assert!(
        hub.registry
            .store()
            .get("leases/aa")
            .await
            .unwrap()
            .is_some()
    );
    assert!(aa.leave().await.unwrap());
    let event = next_event(&mut watch).await;
    assert!(
        matches!(&event, RegistryEvent::ClusterRemoved { id: c, .. } if c == &id("aa")),
        "{event:?}"
    );
    assert!(
        hub.registry
            .store()
            .get("leases/aa")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(code(aa.leave().await), ErrorCode::Unauthenticated);
    let view = cc.list().await.unwrap();
    assert_eq!(
        view.clusters
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        ["cc"]
    );
    assert_eq!(code(admin.leave().await), ErrorCode::PermissionDenied);
}

/// The fleet CIDR and the hub's relays reach members through the list reply and the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_and_the_fleet_cidr_reach_members() {
    let layout = FleetLayout::new("10.200.0.0/16".parse().unwrap(), 20).unwrap();
    let hub = Hub::start(layout).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    let relay = RelayRecord {
        id: RelayRecord::id_for(&key(9)),
        public_key: key(9),
        endpoint: "192.0.2.1:51820".parse().unwrap(),
        expires_at: 0,
        instance: String::new(),
    };
    let (_, relay) = hub
        .registry
        .publish_relay(&relay, Duration::from_secs(6))
        .await
        .unwrap();
    let view = aa.list().await.unwrap();
    assert_eq!(view.fleet_cidr.to_string(), "10.200.0.0/16");
    assert_eq!(view.relays, vec![relay.clone()]);

    let mut watch = Box::pin(aa.watch(view.revision));
    let moved = RelayRecord {
        endpoint: "192.0.2.2:51821".parse().unwrap(),
        ..relay.clone()
    };
    let (_, moved) = hub
        .registry
        .publish_relay(&moved, Duration::from_secs(6))
        .await
        .unwrap();
    hub.registry.remove_relay(&relay.id).await.unwrap();
    match next_event(&mut watch).await {
        RegistryEvent::RelayUpserted { record, .. } => assert_eq!(record, moved),
        e => panic!("{e:?}"),
    }
    match next_event(&mut watch).await {
        RegistryEvent::RelayRemoved { id, .. } => assert_eq!(id, relay.id),
        e => panic!("{e:?}"),
    }
    assert!(aa.list().await.unwrap().relays.is_empty());
}

/// Replicas on one etcd share one CA through the store, with nothing copied between data dirs:
/// a member pinned to the join string's CA talks to either, each replica's admin credential
/// (kept in the store only as a hash) works on both, and a replica whose data dir holds
/// another CA refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_etcd_share_one_ca_through_the_store() {
    let etcd = EtcdServer::start().await;
    let store_flags = ["--etcd", &etcd.endpoint()];
    let one = HubProcess::start(&store_flags).await;
    let two = HubProcess::start(&store_flags).await;
    assert_eq!(one.ca_hash(), two.ca_hash(), "one CA for the fleet");
    // Issue 12 item 9: admin credentials are no longer shared in clear through the store;
    // each replica's own is registered by hash and accepted by every replica.
    for admin in [one.admin_credential(), two.admin_credential()] {
        for hub in [&one, &two] {
            HubClient::new([hub.endpoint()], hub.ca_hash(), quick_options())
                .unwrap()
                .with_credential(admin.clone())
                .list_tokens()
                .await
                .expect("every replica accepts every replica's admin credential");
        }
    }

    // A token from one replica; the member joins through the other and calls both.
    let (join, _) = one
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let via_two = HubClient::new([two.endpoint()], join.ca_hash, quick_options()).unwrap();
    let joined = via_two.join(&join, request("aa", 1)).await.unwrap();
    let via_one = HubClient::new([one.endpoint()], join.ca_hash, quick_options())
        .unwrap()
        .with_credential(joined.credential.clone());
    via_one.publish(&id("aa"), "r", b"v").await.unwrap();
    assert_eq!(via_two.list().await.unwrap().records.len(), 1);
    assert_eq!(two.admin().list_tokens().await.unwrap().len(), 1);

    // A data dir with its own, different CA (from an embedded-store hub) is refused.
    let mut other = HubProcess::start(&[]).await;
    other.stop();
    assert_ne!(other.ca_hash(), one.ca_hash());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-hub"))
        .arg("--data-dir")
        .arg(other.data_dir())
        .args(store_flags)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a replica with a different CA kept running");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("share CA"), "{stderr}");
    assert_ne!(other.ca_hash(), one.ca_hash(), "its files are left alone");
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Relay liveness through the API, by the hub's (manual) clock: the admin publishes two relays
/// with a 6 s TTL; one renews every 2 s, the other never again (its process is gone). The
/// serving hub's sweeper (every 1 s, real time) removes the silent one as soon as the clock
/// passes its expiry — a member's watch sees exactly one RelayRemoved — and never the renewing
/// one; a renewal of the swept relay creates it again. A bad TTL is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_that_stop_renewing_are_swept_and_watchers_see_one_removal() {
    let hub = Hub::start(FleetLayout::default()).await;
    let admin = hub.admin();
    let join = token(&admin).await;
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    let relay = |n: u8| RelayRecord {
        id: RelayRecord::id_for(&key(n)),
        public_key: key(n),
        endpoint: format!("192.0.2.{n}:51820").parse().unwrap(),
        expires_at: 0,
        instance: String::new(),
    };
    let (dead, live) = (relay(7), relay(8));
    let ttl = Duration::from_secs(6);
    let before = hub.revision().await;
    assert_eq!(
        code(admin.publish_relay(&dead, Duration::ZERO).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(aa.publish_relay(&dead, ttl).await),
        ErrorCode::PermissionDenied,
        "members do not publish relays"
    );
    assert_eq!(hub.revision().await, before);
    admin.publish_relay(&dead, ttl).await.unwrap();
    admin.publish_relay(&live, ttl).await.unwrap();
    let view = aa.list().await.unwrap();
    let expiry = unix_ms(fleet_hub::registry::Clock::now(hub.clock.as_ref())) + 6_000;
    assert_eq!(view.relays.len(), 2);
    assert!(
        view.relays.iter().all(|r| r.expires_at == expiry),
        "{view:?}"
    );
    let mut watch = Box::pin(aa.watch(view.revision));

    let (mut removed, mut renewed) = (Vec::new(), 0);
    let mut removed_after = None;
    // 8 rounds of 2 s (manual clock): `dead` expires at round 3 (6 s).
    for round in 1..=8 {
        hub.clock.advance(Duration::from_secs(2));
        let t0 = Instant::now();
        admin.publish_relay(&live, ttl).await.unwrap();
        // Let the sweeper (1 s) run at least once at this time.
        let until = t0 + Duration::from_millis(2_500);
        while let Ok(Some(event)) = tokio::time::timeout_at(until.into(), watch.next()).await {
            match event.unwrap() {
                RegistryEvent::RelayUpserted { record, .. } if record.same_relay(&live) => {
                    renewed += 1
                }
                RegistryEvent::RelayRemoved { id, .. } => {
                    removed_after.get_or_insert((round, t0.elapsed()));
                    removed.push(id);
                }
                e => panic!("unexpected {e:?}"),
            }
        }
    }
    assert_eq!(renewed, 8);
    assert_eq!(
        removed,
        vec![dead.id.clone()],
        "exactly one removal, of the dead relay"
    );
    let (round, took) = removed_after.unwrap();
    assert_eq!(
        round, 3,
        "removed once the clock passed its expiry, not before"
    );
    println!("RELAY SWEEP expired relay removed {took:?} after its expiry (sweep interval 1 s)");
    assert!(took < Duration::from_millis(2_000), "{took:?}");
    let view = aa.list().await.unwrap();
    assert_eq!(
        view.relays.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![live.id.clone()]
    );

    // The dead relay renews again (it was only cut off): it is back.
    admin.publish_relay(&dead, ttl).await.unwrap();
    match next_event(&mut watch).await {
        RegistryEvent::RelayUpserted { record, .. } => assert!(record.same_relay(&dead)),
        e => panic!("{e:?}"),
    }
    assert_eq!(aa.list().await.unwrap().relays.len(), 2);
}

/// Two hub replicas on one etcd, each with a (fake) relay renewing through its own replica
/// (TTL 1.5 s). Replica 1 dies with its relay (kill -9 of the API process; its relay stops
/// renewing): replica 2's sweeper removes relay 1's record within TTL + sweep interval, a
/// member watching through replica 2 sees one RelayRemoved and then only relay 2 — whose
/// record the sweeps never touch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_relay_is_swept_by_the_survivor() {
    let etcd = EtcdServer::start().await;
    let store_flags = ["--etcd", &etcd.endpoint()];
    let mut one = HubProcess::start(&store_flags).await;
    let two = HubProcess::start(&store_flags).await;
    let (admin1, admin2) = (one.admin(), two.admin());
    let join = token(&admin2).await;
    let member = HubClient::new([two.endpoint()], join.ca_hash, quick_options()).unwrap();
    member.join(&join, request("aa", 1)).await.unwrap();

    let ttl = Duration::from_millis(1_500);
    let relay = |n: u8| RelayRecord {
        id: RelayRecord::id_for(&key(n)),
        public_key: key(n),
        endpoint: format!("192.0.2.{n}:51820").parse().unwrap(),
        expires_at: 0,
        instance: String::new(),
    };
    // A relay process: renews every TTL/3 through its replica's API, until aborted.
    let renewing = |admin: HubClient, record: RelayRecord| {
        tokio::spawn(async move {
            loop {
                let _ = admin.publish_relay(&record, ttl).await;
                tokio::time::sleep(ttl / 3).await;
            }
        })
    };
    let (r1, r2) = (relay(1), relay(2));
    let relay1 = renewing(admin1, r1.clone());
    let relay2 = renewing(admin2, r2.clone());
    let start = Instant::now();
    loop {
        let view = member.list().await.unwrap();
        if view.relays.len() == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{view:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both live for 4 TTLs: every replica sweeps every second, nobody removes anything.
    let view = member.list().await.unwrap();
    let mut watch = Box::pin(member.watch(view.revision));
    let quiet_until = Instant::now() + 4 * ttl;
    while let Ok(Some(event)) = tokio::time::timeout_at(quiet_until.into(), watch.next()).await {
        match event.unwrap() {
            RegistryEvent::RelayUpserted { .. } => {}
            e => panic!("a live relay was touched: {e:?}"),
        }
    }

    // Host 1 dies: its API process (kill -9) and its relay.
    one.kill();
    relay1.abort();
    let died = Instant::now();
    let mut removed = Vec::new();
    let observe_until = died + ttl + Duration::from_secs(4);
    let mut removed_after = None;
    while let Ok(Some(event)) = tokio::time::timeout_at(observe_until.into(), watch.next()).await {
        match event.unwrap() {
            RegistryEvent::RelayUpserted { record, .. } => assert!(record.same_relay(&r2)),
            RegistryEvent::RelayRemoved { id, .. } => {
                removed_after.get_or_insert(died.elapsed());
                removed.push(id);
            }
            e => panic!("{e:?}"),
        }
    }
    assert_eq!(
        removed,
        vec![r1.id.clone()],
        "relay 1 removed once, relay 2 kept"
    );
    let took = removed_after.unwrap();
    println!(
        "RELAY SWEEP replica 1 killed -> its relay record removed after {took:?} (ttl {ttl:?}, sweep 1 s)"
    );
    assert!(
        took <= ttl + Duration::from_millis(1_000 + 1_000),
        "removed after {took:?}; log of replica 2:\n{}",
        two.log()
    );
    let view = member.list().await.unwrap();
    assert_eq!(
        view.relays.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![r2.id.clone()],
        "members see only relay 2"
    );
    assert!(two.log().contains("relay record expired"), "{}", two.log());
    relay2.abort();
}

/// A lone hub (embedded store) whose API process was killed and restarted: its relay's
/// renewals failed meanwhile, so the record is past its expiry when the hub comes back — but
/// the new sweeper gives the relay one TTL to renew, and it does: members never see it removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_lone_hub_does_not_sweep_its_live_relay() {
    let mut hub = HubProcess::start(&[]).await;
    let admin = hub.admin();
    let ttl = Duration::from_millis(1_500);
    let record = RelayRecord {
        id: RelayRecord::id_for(&key(5)),
        public_key: key(5),
        endpoint: "192.0.2.5:51820".parse().unwrap(),
        expires_at: 0,
        instance: String::new(),
    };
    let relay = {
        let (admin, record) = (admin.clone(), record.clone());
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(ttl / 3, admin.publish_relay(&record, ttl)).await;
                tokio::time::sleep(ttl / 3).await;
            }
        })
    };
    let start = Instant::now();
    while admin.list().await.unwrap().relays.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hub.kill();
    tokio::time::sleep(ttl * 2).await;
    hub.restart().await;
    let view = admin.list().await.unwrap();
    assert_eq!(view.relays.len(), 1, "{view:?}");
    let mut watch = Box::pin(admin.watch(view.revision));
    let until = Instant::now() + ttl * 3;
    let mut renewed = 0;
    while let Ok(Some(event)) = tokio::time::timeout_at(until.into(), watch.next()).await {
        match event.unwrap() {
            RegistryEvent::RelayUpserted { record: r, .. } if r.same_relay(&record) => renewed += 1,
            e => panic!("the live relay was touched: {e:?}; log:\n{}", hub.log()),
        }
    }
    assert!(renewed >= 3, "renewals resumed ({renewed})");
    assert_eq!(admin.list().await.unwrap().relays.len(), 1);
    relay.abort();
}

fn scoped(hub: &Hub, ca: CaHash, scope: FleetScope) -> HubClient {
    HubClient::new(
        [hub.endpoint()],
        ca,
        ClientOptions {
            scope,
            ..quick_options()
        },
    )
    .unwrap()
}

/// Issue 12, item 13: members watch only what they need. A member's scope carries the fleet's
/// shape, every cluster's `export/*` records and its own records — not the others' `gateway`
/// statistics (republished by every member every status interval: O(N²) events per interval
/// with N members), node plans, imports or export specs. Listing and watch agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_watch_carries_the_fleet_shape_exports_and_its_own_records_only() {
    let hub = Hub::start(FleetLayout::default()).await;
    let admin = hub.admin();
    let join = token(&admin).await;
    let aa = scoped(&hub, join.ca_hash, FleetScope::Member);
    let bb = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    aa.join(&join, request("aa", 1)).await.unwrap();
    bb.join(&join, request("bb", 2)).await.unwrap();
    for name in [
        "gateway",
        "node/bb-1",
        "import/default/web",
        "serviceexport/default/web",
        "export/default/web",
    ] {
        bb.publish(&id("bb"), name, b"v").await.unwrap();
    }
    aa.publish(&id("aa"), "gateway", b"v").await.unwrap();
    aa.publish(&id("aa"), "import/default/web", b"v")
        .await
        .unwrap();

    let names = |view: &fleet_hub_api::model::FleetView| {
        let mut n: Vec<String> = view
            .records
            .iter()
            .map(|r| format!("{}/{}", r.owner, r.name))
            .collect();
        n.sort();
        n
    };
    let view = aa.list().await.unwrap();
    assert_eq!(
        names(&view),
        [
            "aa/gateway",
            "aa/import/default/web",
            "bb/export/default/web"
        ]
    );
    assert_eq!(view.clusters.len(), 2, "the fleet's shape is all there");
    assert_eq!(
        names(&bb.list().await.unwrap()).len(),
        7,
        "scope all: everything"
    );
    let clusters_only = scoped(&hub, join.ca_hash, FleetScope::Clusters)
        .with_credential(admin.credential().unwrap());
    let view = clusters_only.list().await.unwrap();
    assert!(
        view.records.is_empty() && view.clusters.len() == 2,
        "{view:?}"
    );
    // The member scope needs a member: an admin asking for it is told so.
    let admin_as_member =
        scoped(&hub, join.ca_hash, FleetScope::Member).with_credential(admin.credential().unwrap());
    assert_eq!(
        code(admin_as_member.list().await),
        ErrorCode::InvalidArgument
    );

    let mut watch = Box::pin(aa.watch(aa.list().await.unwrap().revision));
    for round in 0..3 {
        bb.publish(&id("bb"), "gateway", format!("beat {round}").as_bytes())
            .await
            .unwrap();
        bb.publish(&id("bb"), "node/bb-2", b"v").await.unwrap();
    }
    bb.publish(&id("bb"), "export/default/db", b"v")
        .await
        .unwrap();
    aa.publish(&id("aa"), "gateway", b"beat").await.unwrap();
    bb.unpublish(&id("bb"), "import/default/web").await.unwrap();
    bb.unpublish(&id("bb"), "export/default/web").await.unwrap();
    assert_eq!(
        put_name(&next_event(&mut watch).await),
        "bb/export/default/db"
    );
    assert_eq!(put_name(&next_event(&mut watch).await), "aa/gateway");
    match next_event(&mut watch).await {
        RegistryEvent::RecordDeleted { owner, name, .. } => {
            assert_eq!(format!("{owner}/{name}"), "bb/export/default/web")
        }
        e => panic!("{e:?}"),
    }
    assert_no_event(&mut watch, Duration::from_millis(300)).await;
}

/// Issue 12, item 13: liveness travels on change only. A cluster is live while its controller
/// lease is held; renewals write the lease alone (no event reaches any member), the hub's
/// sweep marks the cluster not live once the lease has gone unrenewed for its TTL (one
/// event), and the next grant marks it live again (one event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_controller_lease_is_one_event_and_renewals_are_none() {
    let hub = Hub::start(FleetLayout::default()).await;
    let admin = hub.admin();
    let join = token(&admin).await;
    let aa = HubClient::new([hub.endpoint()], join.ca_hash, quick_options()).unwrap();
    let bb = scoped(&hub, join.ca_hash, FleetScope::Member);
    aa.join(&join, request("aa", 1)).await.unwrap();
    bb.join(&join, request("bb", 2)).await.unwrap();
    let live = |view: &fleet_hub_api::model::FleetView| {
        view.clusters
            .iter()
            .find(|c| c.id == id("aa"))
            .unwrap()
            .controller_live
    };
    let view = bb.list().await.unwrap();
    assert!(!live(&view), "joined, no controller yet: not live");
    let mut watch = Box::pin(bb.watch(view.revision));
    let ttl = Duration::from_secs(3);

    assert!(aa.acquire_lease("aa-ctl", ttl).await.unwrap().granted);
    match next_event(&mut watch).await {
        RegistryEvent::ClusterUpserted { record, .. } => {
            assert!(record.controller_live && record.id == id("aa"))
        }
        e => panic!("{e:?}"),
    }
    // Renewals every TTL/3 for 6 s (manual clock; the sweeper runs every second): no event.
    for _ in 0..6 {
        hub.clock.advance(Duration::from_secs(1));
        assert!(aa.acquire_lease("aa-ctl", ttl).await.unwrap().granted);
        assert_no_event(&mut watch, Duration::from_millis(1_100)).await;
    }
    // The controller stops: after its TTL, one event says aa is not live.
    let mut lapsed_at = None;
    for second in 1..=6 {
        hub.clock.advance(Duration::from_secs(1));
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(1_500), watch.next()).await
        {
            match event.unwrap() {
                RegistryEvent::ClusterUpserted { record, .. } => {
                    assert!(!record.controller_live && record.id == id("aa"));
                    assert!(lapsed_at.is_none(), "one event");
                    lapsed_at = Some(second);
                }
                e => panic!("{e:?}"),
            }
        }
    }
    println!("LEASE LIVENESS lapsed lease marked at {lapsed_at:?} s of the hub clock (TTL 3 s)");
    assert!(matches!(lapsed_at, Some(3..=4)), "{lapsed_at:?}");
    assert!(!live(&bb.list().await.unwrap()));
    // A standby (or the restarted controller) takes the lease: live again.
    assert!(aa.acquire_lease("aa-ctl-2", ttl).await.unwrap().granted);
    match next_event(&mut watch).await {
        RegistryEvent::ClusterUpserted { record, .. } => assert!(record.controller_live),
        e => panic!("{e:?}"),
    }
    assert_no_event(&mut watch, Duration::from_millis(300)).await;
}

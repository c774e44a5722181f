//! Issue 12 item 8: a replica that is up but cannot serve (its traffic to etcd dropped) must
//! not keep its members. Two `serve` replicas on one etcd, the first one reaching etcd through
//! a TCP relay the test can cut (a blackhole: connections stay open, bytes vanish); a member
//! configured with both, the cut one first. And the watch: a replica cut from its store ends
//! its members' watches, and a replica whose host vanished is left within a few seconds
//! (heartbeats every second, the client's idle timeout three of them).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::etcd::EtcdServer;
use common::hub::{HubProcess, quick_options};
use fleet_hub::registry::{ClusterId, JoinRequest, PublicKey};
use fleet_hub::store::{EtcdStore, Store};
use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::model::RegistryEvent;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to `target` that drops every byte once `cut` is set.
async fn blackhole_relay(target: String, cut: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [(cr, sw), (sr, cw)].map(|(r, w)| (r, w)) {
                let cut = cut.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cut.load(Ordering::SeqCst) {
                            continue; // dropped on the floor
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_from_its_store_loses_its_members_within_a_call() {
    let etcd = EtcdServer::start().await;
    let cut = Arc::new(AtomicBool::new(false));
    let relay = blackhole_relay(
        etcd.endpoint().trim_start_matches("http://").to_string(),
        cut.clone(),
    )
    .await;
    let via_relay = format!("http://{relay}");
    let one = HubProcess::start(&["--etcd", &via_relay]).await;
    let two = HubProcess::start(&["--etcd", &etcd.endpoint()]).await;
    assert_eq!(one.ca_hash(), two.ca_hash());

    let (join, _) = one
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let member = HubClient::new(
        [one.endpoint(), two.endpoint()],
        join.ca_hash,
        quick_options(),
    )
    .unwrap();
    let aa = ClusterId::new("aa").unwrap();
    let joined = member
        .join(
            &join,
            JoinRequest {
                cluster: aa.clone(),
                public_key: PublicKey::from_bytes([1; 32]),
                endpoint: None,
            },
        )
        .await
        .unwrap();
    let member = member.with_credential(joined.credential);
    let ttl = Duration::from_secs(3);
    assert!(member.acquire_lease("h1", ttl).await.unwrap().granted);

    cut.store(true, Ordering::SeqCst);
    // The lease is renewed through the other replica while it still runs.
    let t = Instant::now();
    let lease = member.acquire_lease("h1", ttl).await.unwrap();
    let renewal = t.elapsed();
    assert!(lease.granted);
    assert!(
        renewal < ttl,
        "renewal took {renewal:?}, longer than the {ttl:?} lease"
    );
    // Every other call goes there too.
    let t = Instant::now();
    member.publish(&aa, "r", b"v").await.unwrap();
    let view = member.list().await.unwrap();
    assert_eq!(view.records.len(), 1);
    eprintln!(
        "lease renewal after the cut: {renewal:?}; publish + list: {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop((one, two, etcd));
}

/// Joins `id` through `via` (admin of any replica) with a client of `endpoints`.
async fn member(
    admin: &HubClient,
    endpoints: Vec<String>,
    ca: fleet_hub::api::CaHash,
    options: ClientOptions,
    id: &str,
) -> HubClient {
    let (join, _) = admin
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let client = HubClient::new(endpoints, ca, options).unwrap();
    let joined = client
        .join(
            &join,
            JoinRequest {
                cluster: ClusterId::new(id).unwrap(),
                public_key: PublicKey::from_bytes([id.len() as u8 + id.as_bytes()[0]; 32]),
                endpoint: None,
            },
        )
        .await
        .unwrap();
    client.with_credential(joined.credential)
}

/// Waits (up to 60 s) until the watch delivers `record` of `owner`; how long it took.
async fn until_record(
    events: &mut (
             impl futures::Stream<Item = Result<RegistryEvent, fleet_hub_api::client::HubError>> + Unpin
         ),
    owner: &str,
    record: &str,
    since: Instant,
) -> Duration {
    let deadline = since + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, events.next())
            .await
            .unwrap_or_else(|_| panic!("{owner}/{record} did not arrive within 60 s"));
        match next.expect("the watch never ends").expect("watch event") {
            RegistryEvent::RecordPut { owner: o, name, .. }
                if o.as_str() == owner && name == record =>
            {
                return since.elapsed();
            }
            _ => {}
        }
    }
}

/// Issue 12 item 8: replica 1 up, its etcd traffic blackholed. Before, its watches kept
/// heartbeating and a change written through replica 2 did not reach the member within the
/// 60 s this test waits (the issue: 44.7 s after the cut was *healed*). Now replica 1 ends
/// them (`unavailable`) once its store has been quiet for 5 s, and the member's watch moves to
/// replica 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_replica_cut_from_its_store_moves_to_the_other_replica() {
    let etcd = EtcdServer::start().await;
    let cut = Arc::new(AtomicBool::new(false));
    let relay = blackhole_relay(
        etcd.endpoint().trim_start_matches("http://").to_string(),
        cut.clone(),
    )
    .await;
    let one = HubProcess::start(&["--etcd", &format!("http://{relay}")]).await;
    let two = HubProcess::start(&["--etcd", &etcd.endpoint()]).await;
    // The member's own settings (the controller's): the defaults.
    let aa = member(
        &one.admin(),
        vec![one.endpoint(), two.endpoint()],
        one.ca_hash(),
        ClientOptions::default(),
        "aa",
    )
    .await;
    let bb = member(
        &two.admin(),
        vec![two.endpoint()],
        two.ca_hash(),
        ClientOptions::default(),
        "bb",
    )
    .await;
    let after = aa.list().await.unwrap().revision;
    let mut events = Box::pin(aa.watch(after));
    bb.publish(&ClusterId::new("bb").unwrap(), "before", b"1")
        .await
        .unwrap();
    until_record(&mut events, "bb", "before", Instant::now()).await;

    cut.store(true, Ordering::SeqCst);
    let t = Instant::now();
    bb.publish(&ClusterId::new("bb").unwrap(), "during", b"2")
        .await
        .unwrap();
    let moved = until_record(&mut events, "bb", "during", t).await;
    eprintln!(
        "store cut: a change through the other replica reached the watch {moved:?} after the cut \
         (before: not within the 60 s the test waits; the issue saw it 44.7 s after the cut was healed)"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !one.log().contains("; ending watches") {
        assert!(
            Instant::now() < deadline,
            "replica 1 did not say why it ended the watches; log:\n{}",
            one.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((one, two, etcd));
}

/// Issue 12 item 8: replica 1's host vanishes (every packet to and from it dropped, no
/// reset), simulated by a blackhole in front of its API. Before: the watch moved after 25.2 s
/// (the 20 s idle timeout + a 5 s connect timeout on the same replica; the issue saw 21.1 s).
/// Now: 3 missed heartbeats (3 s), then the next replica, and calls leave it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_replica_host_is_noticed_within_seconds() {
    let etcd = EtcdServer::start().await;
    let one = HubProcess::start(&["--etcd", &etcd.endpoint()]).await;
    let two = HubProcess::start(&["--etcd", &etcd.endpoint()]).await;
    let cut = Arc::new(AtomicBool::new(false));
    let one_via_blackhole = blackhole_relay(one.endpoint(), cut.clone()).await;
    let options = ClientOptions::default();
    let aa = member(
        &one.admin(),
        vec![one_via_blackhole, two.endpoint()],
        one.ca_hash(),
        options.clone(),
        "aa",
    )
    .await;
    let bb = member(
        &two.admin(),
        vec![two.endpoint()],
        two.ca_hash(),
        options.clone(),
        "bb",
    )
    .await;
    let after = aa.list().await.unwrap().revision;
    let mut events = Box::pin(aa.watch(after));
    bb.publish(&ClusterId::new("bb").unwrap(), "before", b"1")
        .await
        .unwrap();
    until_record(&mut events, "bb", "before", Instant::now()).await;

    cut.store(true, Ordering::SeqCst);
    let t = Instant::now();
    bb.publish(&ClusterId::new("bb").unwrap(), "during", b"2")
        .await
        .unwrap();
    let moved = until_record(&mut events, "bb", "during", t).await;
    eprintln!(
        "vanished host: the watch delivered a change through the other replica {moved:?} after \
         the cut (idle timeout {:?}; before: 25.2 s here, 21.1 s in the issue, with a 20 s idle timeout)",
        options.watch_idle_timeout
    );
    // And calls follow: the member's next call is answered by replica 2.
    let t = Instant::now();
    aa.publish(&ClusterId::new("aa").unwrap(), "after", b"3")
        .await
        .unwrap();
    eprintln!("vanished host: the next call took {:?}", t.elapsed());
    drop((one, two, etcd));
}

/// The etcd store's own watch keep-alive: a watch on an etcd that went silent (its traffic
/// blackholed, no reset) asks for a progress notification after `watch_progress_interval`,
/// re-creates itself when none comes within the request timeout, and reports the failure
/// after `watch_retry_for`. Before: `stream.message()` had no deadline and the watch waited
/// for ever (measured with the keep-alive off: nothing within 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_watch_on_a_silent_store_reports_it() {
    let etcd = EtcdServer::start().await;
    let cut = Arc::new(AtomicBool::new(false));
    let relay = blackhole_relay(
        etcd.endpoint().trim_start_matches("http://").to_string(),
        cut.clone(),
    )
    .await;
    let mut options = etcd.options().namespace("/silent/");
    options.endpoints = vec![format!("http://{relay}")];
    options.request_timeout = Duration::from_secs(1);
    options.watch_retry_for = Duration::from_secs(2);
    options.watch_progress_interval = Duration::from_millis(500);
    let cut_off = EtcdStore::connect(options).await.unwrap();
    let direct = etcd.store("/silent/").await;
    let mut changes = cut_off.watch("k/", 0).await.unwrap();
    // Quiet for several progress intervals: the answered progress requests keep it open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    direct.put("k/1", b"v".to_vec()).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .expect("a change after a quiet spell")
        .expect("the watch is open");
    assert!(first.is_ok(), "{first:?}");

    cut.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(30), changes.next())
        .await
        .expect("the watch on a silent etcd must report it within 30 s");
    eprintln!(
        "silent etcd: the store's watch reported {:?} after {:?} (progress every 500 ms, 1 s \
         request timeout, 2 s of retries; before, without progress requests: nothing within 30 s)",
        end.as_ref()
            .map(|r| r.as_ref().map(|_| "a change").map_err(|e| e.to_string())),
        t.elapsed()
    );
    assert!(matches!(end, Some(Err(_))), "{end:?}");
}

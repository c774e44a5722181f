//! Issue 12 item 8: a replica that is up but cannot serve (its traffic to etcd dropped) must
//! not keep its members. Two `serve` replicas on one etcd, the first one reaching etcd through
//! a TCP relay the test can cut (a blackhole: connections stay open, bytes vanish); a member
//! configured with both, the cut one first.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::etcd::EtcdServer;
use common::hub::{HubProcess, quick_options};
use fleet_hub::registry::{ClusterId, JoinRequest, PublicKey};
use fleet_hub_api::client::HubClient;
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

//! Issue 12 item 12: hub replicas whose clocks disagree. Three `fleet-hub serve` replicas on
//! one real etcd, two of them under libfaketime (+30 s and -30 s): a relay renewing through the
//! correct replica must never be swept by the others, a member's live lease must never be taken
//! through a skewed replica, and when the holder stops, a standby asking the slow replica takes
//! over within about one TTL — not 30 s late.

mod common;

use std::time::{Duration, Instant};

use common::etcd::EtcdServer;
use common::hub::{HubProcess, quick_options};
use fleet_hub::registry::{ClusterId, JoinRequest, PublicKey, RegistryEvent, RelayRecord};
use fleet_hub_api::client::HubClient;
use futures::StreamExt;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn skewed(offset: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", offset),
        // Wall-clock skew only: tokio's timers run on the monotonic clock, as on a real host.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_replicas_neither_flap_the_relay_nor_steal_a_lease() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: run scripts/install-deps.sh (Debian's faketime)"
    );
    let etcd = EtcdServer::start().await;
    let store_flags = ["--etcd", &etcd.endpoint()];
    let one = HubProcess::start(&store_flags).await;
    let fast = HubProcess::start_with_env(&store_flags, &skewed("+30s")).await;
    let slow = HubProcess::start_with_env(&store_flags, &skewed("-30s")).await;

    let (join, _) = one
        .admin()
        .create_token(Duration::from_secs(3600), "")
        .await
        .unwrap();
    let member = HubClient::new([one.endpoint()], join.ca_hash, quick_options()).unwrap();
    let joined = member
        .join(
            &join,
            JoinRequest {
                cluster: ClusterId::new("aa").unwrap(),
                public_key: PublicKey::from_bytes([1; 32]),
                endpoint: None,
            },
        )
        .await
        .unwrap();
    let through = |hub: &HubProcess| {
        HubClient::new([hub.endpoint()], join.ca_hash, quick_options())
            .unwrap()
            .with_credential(joined.credential.clone())
    };
    let (via_one, via_fast, via_slow) = (through(&one), through(&fast), through(&slow));

    // The relay renews through the correct replica every TTL/3; every replica sweeps every 1 s.
    let relay_ttl = Duration::from_secs(3);
    let relay = RelayRecord {
        id: RelayRecord::id_for(&PublicKey::from_bytes([7; 32])),
        public_key: PublicKey::from_bytes([7; 32]),
        endpoint: "192.0.2.7:51820".parse().unwrap(),
        expires_at: 0,
        instance: String::new(),
    };
    let admin = one.admin();
    admin.publish_relay(&relay, relay_ttl).await.unwrap();
    let renewing = {
        let (admin, relay) = (admin.clone(), relay.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(relay_ttl / 3).await;
                let _ = admin.publish_relay(&relay, relay_ttl).await;
            }
        })
    };

    // The active controller renews its 3 s lease through the correct replica every TTL/3.
    let lease_ttl = Duration::from_secs(3);
    assert!(
        via_one
            .acquire_lease("active", lease_ttl)
            .await
            .unwrap()
            .granted
    );
    let active = {
        let client = via_one.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease_ttl / 3).await;
                let _ = client.acquire_lease("active", lease_ttl).await;
            }
        })
    };

    // 12 s window: standbys ask through the skewed replicas every 500 ms; the member watches.
    let view = member.list().await.unwrap();
    assert_eq!(view.relays.len(), 1);
    let mut watch = Box::pin(member.watch(view.revision));
    let window = Duration::from_secs(12);
    let until = Instant::now() + window;
    let (mut stolen, mut asks) = (Vec::new(), 0);
    let (mut removed, mut added) = (0, 0);
    while Instant::now() < until {
        for (standby, client) in [("standby-fast", &via_fast), ("standby-slow", &via_slow)] {
            if let Ok(lease) = client.acquire_lease(standby, lease_ttl).await {
                asks += 1;
                if lease.granted {
                    stolen.push(standby);
                }
            }
        }
        let tick = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(event)) = tokio::time::timeout_at(tick, watch.next()).await {
            match event.unwrap() {
                RegistryEvent::RelayRemoved { .. } => removed += 1,
                RegistryEvent::RelayUpserted { .. } => added += 1,
                _ => {}
            }
        }
    }
    println!(
        "SKEW over {window:?}: relay removed {removed} times ({added} upserts); \
         {} of {asks} standby asks granted (stolen) {stolen:?}",
        stolen.len()
    );

    // The holder stops; only the standby on the slow replica asks: it must take over within
    // about one TTL (plus one renewal interval of observation and one ask), not 30 s late.
    active.abort();
    let stopped = Instant::now();
    let mut took = None;
    while stopped.elapsed() < Duration::from_secs(45) {
        if let Ok(lease) = via_slow.acquire_lease("standby-slow", lease_ttl).await
            && lease.holder == "standby-slow"
            && lease.granted
        {
            took = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("SKEW takeover through the slow replica after the holder stopped: {took:?}");
    renewing.abort();

    assert_eq!(removed, 0, "the live relay's record was swept (flapping)");
    assert!(stolen.is_empty(), "a live lease was taken: {stolen:?}");
    let took = took.expect("the standby never got the lease through the slow replica");
    assert!(
        took <= lease_ttl + Duration::from_secs(3),
        "takeover took {took:?}"
    );
}

//! The store suite against a real etcd (Debian's etcd-server), plus what only etcd does:
//! a watch that survives the etcd process dying and coming back.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::EtcdServer;
use common::store_suite::{assert_quiet, next};
use fleet_hub::store::{Change, EtcdOptions, EtcdStore, Store, StoreError};

async fn setup() -> (Arc<dyn Store>, EtcdServer) {
    let etcd = EtcdServer::start().await;
    let store: Arc<dyn Store> = Arc::new(etcd.store("/fleetboard/").await);
    (store, etcd)
}

store_suite!(setup);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_on_one_etcd_do_not_see_each_other() {
    let etcd = EtcdServer::start().await;
    let a = etcd.store("/a/").await;
    let b = etcd.store("/b/").await;
    a.put("k", b"from a".to_vec()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap(), None);
    assert!(b.list("").await.unwrap().items.is_empty());
    let listed = a.list("").await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].key, "k", "the namespace is stripped");
}

/// etcd is killed and restarted under an open watch: the stream resumes from the last
/// revision it delivered, so changes made around the outage arrive once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_an_etcd_restart() {
    let mut etcd = EtcdServer::start().await;
    let store = etcd.store("/fleetboard/").await;
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("w/", start).await.unwrap();
    let r1 = store.put("w/1", b"a".to_vec()).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().revision(), r1);

    etcd.kill();
    // Writes fail while etcd is down, with a clear error rather than a hang.
    let err = store.put("w/down", b"x".to_vec()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Etcd { .. } | StoreError::Timeout { .. }),
        "{err}"
    );
    etcd.restart().await;

    let mut written = Vec::new();
    for i in 2..5 {
        written.push(
            store
                .put(&format!("w/{i}"), b"b".to_vec())
                .await
                .expect("write after restart"),
        );
    }
    let mut got = Vec::new();
    for _ in 0..written.len() {
        match next(&mut watch).await.unwrap() {
            Change::Put(kv) => got.push(kv.mod_revision),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, written);
    assert_quiet(&mut watch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_is_a_clear_error() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut options = EtcdOptions::new([format!("http://127.0.0.1:{port}")]);
    options.request_timeout = Duration::from_secs(1);
    let err = EtcdStore::connect(options).await.unwrap_err();
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

/// Issue 12 item 7: a request etcd refuses as such (here more operations than its
/// `--max-txn-ops`) is a permanent `Refused` error — the API answers `invalid_argument`, which
/// clients do not retry — not an outage (`unavailable`, retried for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_etcd_refuses_is_permanent_not_unavailable() {
    let etcd = EtcdServer::start_with(&["--max-txn-ops=16"]).await;
    let store = etcd.store("/fleetboard/").await;
    let mut txn = fleet_hub::store::Txn::new();
    for i in 0..20 {
        txn = txn.put(format!("k/{i}"), b"x".to_vec());
    }
    let err = store.txn(txn).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("too many operations"), "{err}");
    let code = fleet_hub::api::error_code(&fleet_hub::registry::RegistryError::Store(err));
    assert_eq!(code, fleet_hub::api::ErrorCode::InvalidArgument);
    assert!(store.list("k/").await.unwrap().items.is_empty());
}

/// A listing whose pages would exceed the client's message limit (large records) is fetched
/// in smaller pages instead of failing: 12 values of 200 KiB under a 1 MiB limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_of_large_records_pages_down_instead_of_failing() {
    let etcd = EtcdServer::start().await;
    let mut options = etcd.options().namespace("/fleetboard/");
    options.max_message = 1 << 20;
    let store = EtcdStore::connect(options).await.unwrap();
    for i in 0..12 {
        store
            .put(&format!("big/{i:02}"), vec![b'x'; 200 << 10])
            .await
            .unwrap();
    }
    let listing = store.list("big/").await.expect("paged listing");
    assert_eq!(listing.items.len(), 12);
    assert!(listing.items.iter().all(|kv| kv.value.len() == 200 << 10));
}

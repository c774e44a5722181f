//! The store suite: one set of behaviours every [`Store`] backend must show. Each function
//! takes a fresh, empty store (or namespace).

use std::sync::Arc;
use std::time::Duration;

use fleet_hub::store::{
    Change, Condition, Revision, Store, StoreError, Txn, TxnOutcome, WatchStream,
};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

/// The next item of a watch, within a deadline.
pub async fn next(stream: &mut WatchStream) -> Result<Change, StoreError> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no watch event within 10 s")
        .expect("watch stream ended")
}

/// Asserts nothing more arrives within a short window (the stream is quiet).
pub async fn assert_quiet(stream: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

fn put_of(change: &Change) -> (&str, &[u8], Revision) {
    match change {
        Change::Put(kv) => (&kv.key, &kv.value, kv.mod_revision),
        other => panic!("expected a put, got {other:?}"),
    }
}

pub async fn put_get_delete_revisions(store: Arc<dyn Store>) {
    let start = store.revision().await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), None);
    let r1 = store.put("a", b"one".to_vec()).await.unwrap();
    assert!(r1 > start);
    let kv = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"one"[..], r1, r1)
    );
    let r2 = store.put("a", b"two".to_vec()).await.unwrap();
    assert!(r2 > r1);
    let kv = store.get("a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"two"[..], r1, r2)
    );
    let r3 = store.delete("a").await.unwrap().expect("a existed");
    assert!(r3 > r2);
    assert_eq!(store.get("a").await.unwrap(), None);
    assert_eq!(store.delete("a").await.unwrap(), None, "second delete");
    assert!(store.revision().await.unwrap() >= r3);
}

pub async fn list_returns_prefix_sorted_with_revision(store: Arc<dyn Store>) {
    store.put("p/b", b"2".to_vec()).await.unwrap();
    store.put("p/a", b"1".to_vec()).await.unwrap();
    store.put("q/c", b"3".to_vec()).await.unwrap();
    let last = store.put("p/c", b"4".to_vec()).await.unwrap();
    let listing = store.list("p/").await.unwrap();
    let keys: Vec<_> = listing.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["p/a", "p/b", "p/c"]);
    assert!(listing.revision >= last);
    assert_eq!(store.list("nothing/").await.unwrap().items, vec![]);
}

/// More keys than one etcd page (and one gRPC message at hub scale would hold).
pub async fn list_pages_through_many_keys(store: Arc<dyn Store>) {
    let mut last = 0;
    for batch in 0..12 {
        let mut txn = Txn::new();
        for i in 0..100 {
            txn = txn.put(format!("many/{batch:02}-{i:03}"), vec![b'v'; 32]);
        }
        last = store.txn(txn).await.unwrap().committed().unwrap();
    }
    store
        .put("many0", b"not under many/".to_vec())
        .await
        .unwrap();
    let listing = store.list("many/").await.unwrap();
    assert_eq!(listing.items.len(), 1200);
    assert!(
        listing.items.windows(2).all(|w| w[0].key < w[1].key),
        "sorted"
    );
    assert!(listing.items.iter().all(|kv| kv.mod_revision <= last));
    assert!(listing.revision >= last);
}

pub async fn conditional_writes(store: Arc<dyn Store>) {
    let r1 = store
        .create("k", b"v1".to_vec())
        .await
        .unwrap()
        .expect("created");
    assert_eq!(store.create("k", b"other".to_vec()).await.unwrap(), None);
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v1");
    assert_eq!(
        store
            .compare_and_swap("k", r1 + 1000, b"x".to_vec())
            .await
            .unwrap(),
        None,
        "stale revision must not swap"
    );
    let r2 = store
        .compare_and_swap("k", r1, b"v2".to_vec())
        .await
        .unwrap()
        .expect("current revision swaps");
    assert_eq!(store.get("k").await.unwrap().unwrap().mod_revision, r2);
    assert_eq!(
        store
            .compare_and_swap("absent", r1, b"x".to_vec())
            .await
            .unwrap(),
        None
    );

    // A multi-key transaction is all or nothing, at one revision.
    let failed = store
        .txn(
            Txn::new()
                .when(Condition::Absent("m1".into()))
                .when(Condition::Absent("k".into()))
                .put("m1", b"x".to_vec())
                .put("m2", b"y".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(failed, TxnOutcome::ConditionFailed);
    assert_eq!(store.get("m1").await.unwrap(), None);
    assert_eq!(store.get("m2").await.unwrap(), None);
    let rev = store
        .txn(
            Txn::new()
                .when(Condition::Absent("m1".into()))
                .when(Condition::ModRevision("k".into(), r2))
                .put("m1", b"x".to_vec())
                .put("m2", b"y".to_vec())
                .delete("k"),
        )
        .await
        .unwrap()
        .committed()
        .expect("conditions hold");
    assert_eq!(store.get("m1").await.unwrap().unwrap().mod_revision, rev);
    assert_eq!(store.get("m2").await.unwrap().unwrap().mod_revision, rev);
    assert_eq!(store.get("k").await.unwrap(), None);

    // One key twice in one transaction is refused, not half-applied.
    let err = store
        .txn(Txn::new().put("dup", b"1".to_vec()).delete("dup"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidTxn(_)), "{err}");
}

pub async fn concurrent_cas_exactly_one_wins(store: Arc<dyn Store>) {
    let base = store.put("counter", b"0".to_vec()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .compare_and_swap("counter", base, format!("{i}").into_bytes())
                .await
                .unwrap()
        }));
    }
    let mut wins = 0;
    for task in tasks {
        if task.await.unwrap().is_some() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "exactly one CAS on one revision wins");

    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create("once", format!("{i}").into_bytes())
                .await
                .unwrap()
        }));
    }
    let mut wins = 0;
    for task in tasks {
        if task.await.unwrap().is_some() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "exactly one create-if-absent wins");
}

pub async fn watch_streams_changes_in_order(store: Arc<dyn Store>) {
    store.put("w/before", b"0".to_vec()).await.unwrap();
    let start = store.list("w/").await.unwrap().revision;
    let mut watch = store.watch("w/", start).await.unwrap();
    let r1 = store.put("w/a", b"1".to_vec()).await.unwrap();
    store.put("other/x", b"not watched".to_vec()).await.unwrap();
    let r2 = store.put("w/a", b"2".to_vec()).await.unwrap();
    let r3 = store.delete("w/a").await.unwrap().unwrap();
    let rt = store
        .txn(
            Txn::new()
                .put("w/t1", b"t".to_vec())
                .put("w/t2", b"t".to_vec()),
        )
        .await
        .unwrap()
        .committed()
        .unwrap();

    let c = next(&mut watch).await.unwrap();
    assert_eq!(put_of(&c), ("w/a", &b"1"[..], r1));
    let c = next(&mut watch).await.unwrap();
    assert_eq!(put_of(&c), ("w/a", &b"2"[..], r2));
    match next(&mut watch).await.unwrap() {
        Change::Delete { key, revision } => assert_eq!((key.as_str(), revision), ("w/a", r3)),
        other => panic!("expected delete, got {other:?}"),
    }
    let mut txn_keys = vec![];
    for _ in 0..2 {
        let c = next(&mut watch).await.unwrap();
        assert_eq!(
            c.revision(),
            rt,
            "a transaction's changes share its revision"
        );
        txn_keys.push(c.key().to_string());
    }
    txn_keys.sort();
    assert_eq!(txn_keys, ["w/t1", "w/t2"]);
    assert_quiet(&mut watch).await;
}

pub async fn watch_replays_history_from_a_past_revision(store: Arc<dyn Store>) {
    let r1 = store.put("h/a", b"1".to_vec()).await.unwrap();
    let r2 = store.put("h/b", b"2".to_vec()).await.unwrap();
    let r3 = store.delete("h/a").await.unwrap().unwrap();
    let mut watch = store.watch("h/", r1 - 1).await.unwrap();
    let revs: Vec<Revision> = [
        next(&mut watch).await.unwrap(),
        next(&mut watch).await.unwrap(),
        next(&mut watch).await.unwrap(),
    ]
    .iter()
    .map(Change::revision)
    .collect();
    assert_eq!(revs, [r1, r2, r3]);
    assert_quiet(&mut watch).await;
}

/// The property a member relies on: drop the stream (a reconnect), resume from the last
/// revision seen, and get exactly the changes made meanwhile, then live ones.
pub async fn watch_resumes_after_drop_without_gaps_or_duplicates(store: Arc<dyn Store>) {
    let start = store.list("r/").await.unwrap().revision;
    let mut watch = store.watch("r/", start).await.unwrap();
    for i in 0..3 {
        store.put(&format!("r/{i}"), b"x".to_vec()).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut watch).await.unwrap());
    }
    let last = seen.last().unwrap().revision();
    drop(watch);

    let mut missed = Vec::new();
    for i in 3..8 {
        missed.push(store.put(&format!("r/{i}"), b"y".to_vec()).await.unwrap());
        store.put("elsewhere", b"z".to_vec()).await.unwrap();
    }
    missed.push(store.delete("r/0").await.unwrap().unwrap());

    let mut watch = store.watch("r/", last).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..missed.len() {
        got.push(next(&mut watch).await.unwrap().revision());
    }
    assert_eq!(
        got, missed,
        "resumed watch replays exactly the missed changes"
    );
    let live = store.put("r/live", b"l".to_vec()).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().revision(), live);
    assert_quiet(&mut watch).await;
}

pub async fn compacted_history_asks_for_relist(store: Arc<dyn Store>) {
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(store.put(&format!("c/{i}"), b"v".to_vec()).await.unwrap());
    }
    store.compact(revs[3]).await.unwrap();
    let mut watch = store.watch("c/", revs[0]).await.unwrap();
    match next(&mut watch).await {
        Err(StoreError::Compacted { after, compacted }) => {
            assert_eq!(after, revs[0]);
            assert!(compacted >= revs[3], "compacted at {compacted}");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // The relist path: list, then watch from its revision.
    let listing = store.list("c/").await.unwrap();
    assert_eq!(listing.items.len(), 5, "compaction keeps current values");
    let mut watch = store.watch("c/", listing.revision).await.unwrap();
    let r = store.put("c/new", b"n".to_vec()).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().revision(), r);
    // Watching from the compaction revision itself still works.
    let mut watch = store.watch("c/", revs[3]).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().revision(), revs[4]);
}

/// Many writers and one watcher: every committed revision arrives once, in order.
pub async fn watch_sees_every_concurrent_write_once(store: Arc<dyn Store>) {
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("cc/", start).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..25 {
                revs.push(
                    store
                        .put(&format!("cc/{w}/{i}"), b"v".to_vec())
                        .await
                        .unwrap(),
                );
            }
            revs
        }));
    }
    let mut written = Vec::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    written.sort();
    let mut got = Vec::new();
    for _ in 0..written.len() {
        got.push(next(&mut watch).await.unwrap().revision());
    }
    assert_eq!(got, written);
    assert_quiet(&mut watch).await;
}

/// Instantiates the suite for a backend: `$setup` is an async fn returning
/// `(Arc<dyn Store>, guard)`; the guard keeps the backend alive for the test.
/// Issue 12 item 7: a prefix delete removes any number of keys (250, past etcd's 128
/// operations per transaction) in one transaction at one revision, and nothing outside the
/// prefix (`r/a/` leaves `r/ab/` alone).
pub async fn prefix_delete_removes_any_number_of_keys_at_one_revision(store: Arc<dyn Store>) {
    for i in 0..250 {
        store
            .put(&format!("r/a/{i:03}"), b"x".to_vec())
            .await
            .unwrap();
    }
    store.put("r/ab/keep", b"y".to_vec()).await.unwrap();
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("r/", start).await.unwrap();
    let outcome = store
        .txn(Txn::new().delete("r/ab/none").delete_prefix("r/a/"))
        .await
        .unwrap();
    let revision = outcome.committed().expect("no conditions");
    assert!(revision > start);
    assert!(store.list("r/a/").await.unwrap().items.is_empty());
    let left = store.list("r/").await.unwrap().items;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key, "r/ab/keep");
    let mut deleted = Vec::new();
    for _ in 0..250 {
        match next(&mut watch).await.unwrap() {
            Change::Delete { key, revision: r } => {
                assert_eq!(r, revision, "every delete at the transaction's revision");
                deleted.push(key);
            }
            other => panic!("expected a delete, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted.first().map(String::as_str), Some("r/a/000"));
    assert_eq!(deleted.last().map(String::as_str), Some("r/a/249"));
    assert_quiet(&mut watch).await;

    // A put under a prefix deleted by the same transaction is ambiguous: refused.
    let err = store
        .txn(
            Txn::new()
                .put("r/ab/keep", b"z".to_vec())
                .delete_prefix("r/ab/"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidTxn(_)), "{err}");
}

/// A transaction with more operations than etcd takes (128) is refused the same way by every
/// backend, before anything is written: an invalid transaction, never an outage.
pub async fn oversized_transaction_is_refused_everywhere(store: Arc<dyn Store>) {
    let before = store.revision().await.unwrap();
    let mut txn = Txn::new();
    for i in 0..=fleet_hub::store::MAX_TXN_OPS {
        txn = txn.put(format!("big/{i}"), b"x".to_vec());
    }
    let err = store.txn(txn).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidTxn(_)), "{err}");
    assert!(err.to_string().contains("at most 128"), "{err}");
    assert_eq!(store.revision().await.unwrap(), before);
    assert!(store.list("big/").await.unwrap().items.is_empty());
}

#[macro_export]
macro_rules! store_suite {
    ($setup:path) => {
        mod store_suite_tests {
            use super::*;
            use $crate::common::store_suite as suite;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn put_get_delete_revisions() {
                let (store, _guard) = $setup().await;
                suite::put_get_delete_revisions(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn list_returns_prefix_sorted_with_revision() {
                let (store, _guard) = $setup().await;
                suite::list_returns_prefix_sorted_with_revision(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn list_pages_through_many_keys() {
                let (store, _guard) = $setup().await;
                suite::list_pages_through_many_keys(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn conditional_writes() {
                let (store, _guard) = $setup().await;
                suite::conditional_writes(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_cas_exactly_one_wins() {
                let (store, _guard) = $setup().await;
                suite::concurrent_cas_exactly_one_wins(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_streams_changes_in_order() {
                let (store, _guard) = $setup().await;
                suite::watch_streams_changes_in_order(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_replays_history_from_a_past_revision() {
                let (store, _guard) = $setup().await;
                suite::watch_replays_history_from_a_past_revision(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_resumes_after_drop_without_gaps_or_duplicates() {
                let (store, _guard) = $setup().await;
                suite::watch_resumes_after_drop_without_gaps_or_duplicates(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn compacted_history_asks_for_relist() {
                let (store, _guard) = $setup().await;
                suite::compacted_history_asks_for_relist(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn prefix_delete_removes_any_number_of_keys_at_one_revision() {
                let (store, _guard) = $setup().await;
                suite::prefix_delete_removes_any_number_of_keys_at_one_revision(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn oversized_transaction_is_refused_everywhere() {
                let (store, _guard) = $setup().await;
                suite::oversized_transaction_is_refused_everywhere(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_sees_every_concurrent_write_once() {
                let (store, _guard) = $setup().await;
                suite::watch_sees_every_concurrent_write_once(store).await;
            }
        }
    };
}

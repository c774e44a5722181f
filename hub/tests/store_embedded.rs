//! The store suite on the embedded store, plus what only a file store must prove: reopening
//! keeps everything, a damaged file is refused, a crash loses no acknowledged write and shows
//! no partial one, a second opener is refused, and a data dir of the former log format is
//! imported once.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::store_suite::{assert_quiet, next};
use fleet_hub::store::{EmbeddedOptions, EmbeddedStore, Revision, Store, StoreError, Txn};

async fn setup() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
    (store, dir)
}

store_suite!(setup);

/// Writes `n` keys `k/0..n` and returns their revisions.
async fn fill(store: &EmbeddedStore, n: usize) -> Vec<Revision> {
    let mut revs = Vec::new();
    for i in 0..n {
        revs.push(
            store
                .put(&format!("k/{i}"), vec![i as u8; 40])
                .await
                .unwrap(),
        );
    }
    revs
}

#[tokio::test]
async fn reopen_keeps_data_revision_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let revs = fill(&store, 10).await;
    let del = store.delete("k/3").await.unwrap().unwrap();
    let before = store.list("").await.unwrap();
    drop(store);

    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.list("").await.unwrap(), before);
    assert_eq!(store.revision().await.unwrap(), del);
    // History survives too: a member that saw revs[5] before the hub restarted resumes.
    let mut watch = store.watch("k/", revs[5]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next(&mut watch).await.unwrap().revision());
    }
    assert_eq!(got, [revs[6], revs[7], revs[8], revs[9], del]);
    // New writes continue the revision sequence.
    assert_eq!(store.put("n", vec![]).await.unwrap(), del + 1);
}

#[tokio::test]
async fn a_damaged_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    fill(&store, 50).await;
    drop(store);
    let db = EmbeddedStore::db_path(dir.path());
    let mut bytes = std::fs::read(&db).unwrap();
    // Damage every page past the file's header (the keys, history and meta pages among them),
    // as a disk or a stray writer would: redb's checksums must catch it.
    for page in (1..bytes.len() / 4096).map(|p| p * 4096) {
        bytes[page + 100] ^= 0xff;
    }
    std::fs::write(&db, &bytes).unwrap();
    match EmbeddedStore::open(dir.path()).await {
        Err(StoreError::Corrupt { path, .. }) => assert!(path.ends_with("store.redb")),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// An empty `store.redb` (a truncated copy) would otherwise be taken for a new database: the
/// store must refuse it, and must not retire an old log beside it.
#[tokio::test]
async fn an_empty_database_file_is_refused_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    fill(&store, 5).await;
    drop(store);
    let db = EmbeddedStore::db_path(dir.path());
    std::fs::write(&db, b"").unwrap();
    match EmbeddedStore::open(dir.path()).await {
        Err(StoreError::Corrupt { path, reason, .. }) => {
            assert!(path.ends_with("store.redb"));
            assert!(reason.contains("empty"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        std::fs::metadata(&db).unwrap().len(),
        0,
        "the file is left as it was"
    );

    let dir = tempfile::tempdir().unwrap();
    let log = legacy_log_into(dir.path());
    std::fs::write(EmbeddedStore::db_path(dir.path()), b"").unwrap();
    assert!(matches!(
        EmbeddedStore::open(dir.path()).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(
        std::fs::read(dir.path().join("store.log")).unwrap(),
        log,
        "the old log stays in place, unimported and not renamed"
    );
}

#[tokio::test]
async fn a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    match EmbeddedStore::open(dir.path()).await {
        Err(StoreError::Locked { holder, .. }) => {
            assert_eq!(holder, format!("pid {}", std::process::id()))
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // Another process sees the lock too (util-linux flock, non-blocking).
    let lock = dir.path().join("LOCK");
    let status = Command::new("flock")
        .arg("-n")
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap();
    assert!(
        !status.success(),
        "flock(1) got the lock while the store is open"
    );
    drop(store);
    let status = Command::new("flock")
        .arg("-n")
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap();
    assert!(status.success(), "lock released on drop");
    EmbeddedStore::open(dir.path()).await.unwrap();
}

#[tokio::test]
async fn compaction_survives_reopen_and_the_file_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        history_limit: 100,
        ..Default::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options.clone())
        .await
        .unwrap();
    // Rewrite the same 5 keys many times: the file must not keep every version.
    let mut revs = Vec::new();
    for round in 0..40u8 {
        for i in 0..5 {
            revs.push(
                store
                    .put(&format!("s/{i}"), vec![round; 1000])
                    .await
                    .unwrap(),
            );
        }
    }
    let size_after_200 = std::fs::metadata(EmbeddedStore::db_path(dir.path()))
        .unwrap()
        .len();
    for round in 40..240u8 {
        for i in 0..5 {
            revs.push(
                store
                    .put(&format!("s/{i}"), vec![round; 1000])
                    .await
                    .unwrap(),
            );
        }
    }
    let size_after_1200 = std::fs::metadata(EmbeddedStore::db_path(dir.path()))
        .unwrap()
        .len();
    assert!(
        size_after_1200 <= size_after_200 * 2,
        "file grew from {size_after_200} to {size_after_1200} bytes rewriting 5 keys"
    );
    let at = revs.len() - 50;
    store.compact(revs[at]).await.unwrap();
    let before = store.list("").await.unwrap();
    drop(store);

    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    assert_eq!(store.list("").await.unwrap(), before);
    assert_eq!(store.revision().await.unwrap(), *revs.last().unwrap());
    // The retained history still serves a watch from after the compaction point...
    let mut watch = store.watch("s/", revs[at]).await.unwrap();
    for rev in &revs[at + 1..] {
        assert_eq!(next(&mut watch).await.unwrap().revision(), *rev);
    }
    // ...and the compaction itself survived the reopen.
    let mut old = store.watch("s/", revs[at - 1]).await.unwrap();
    match next(&mut old).await {
        Err(StoreError::Compacted { compacted, .. }) => assert_eq!(compacted, revs[at]),
        other => panic!("expected Compacted, got {other:?}"),
    }
}

#[tokio::test]
async fn history_limit_compacts_and_asks_old_watchers_to_relist() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        history_limit: 5,
        ..Default::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    let revs = fill(&store, 20).await;
    let mut old = store.watch("k/", revs[0]).await.unwrap();
    match next(&mut old).await {
        Err(StoreError::Compacted { compacted, .. }) => assert_eq!(compacted, revs[14]),
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut recent = store.watch("k/", revs[14]).await.unwrap();
    for rev in &revs[15..] {
        assert_eq!(next(&mut recent).await.unwrap().revision(), *rev);
    }
}

/// Issue 12 item 10: the in-memory watch history is bounded in bytes, not only in changes: 50
/// changes of 1 KiB with a 10,000-byte budget keep the newest 9 (64 + key + value = 1,069
/// bytes each); a watcher from before them relists, one from inside them resumes. It holds
/// after a reopen too, and one change larger than the whole budget is still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        history_bytes: 10_000,
        ..Default::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options.clone())
        .await
        .unwrap();
    let start = store.revision().await.unwrap();
    let mut live = store.watch("b/", start).await.unwrap();
    let mut revs = Vec::new();
    for i in 0..50 {
        revs.push(
            store
                .put(&format!("b/{i:02}"), vec![1; 1000])
                .await
                .unwrap(),
        );
    }
    async fn check(store: &EmbeddedStore, revs: &[Revision]) {
        let mut old = store.watch("b/", revs[39]).await.unwrap();
        match next(&mut old).await {
            Err(StoreError::Compacted { compacted, .. }) => assert_eq!(compacted, revs[40]),
            other => panic!("expected Compacted, got {other:?}"),
        }
        let mut recent = store.watch("b/", revs[40]).await.unwrap();
        for rev in &revs[41..] {
            assert_eq!(next(&mut recent).await.unwrap().revision(), *rev);
        }
    }
    check(&store, &revs).await;
    // A live watcher that kept up saw every change (or was told to relist): never a gap.
    let mut seen = 0;
    while seen < 50 {
        match next(&mut live).await {
            Ok(change) => {
                assert_eq!(change.revision(), revs[seen]);
                seen += 1;
            }
            Err(StoreError::Compacted { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    drop(live);
    drop(store);
    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    check(&store, &revs).await;

    let at = store.revision().await.unwrap();
    let mut watch = store.watch("b/", at).await.unwrap();
    let big = store.put("b/big", vec![2; 50_000]).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().revision(), big);
}

/// A watcher that falls behind the live channel catches up from history, in order, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_catches_up_from_history() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        watch_buffer: 2,
        ..Default::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("k/", start).await.unwrap();
    let revs = fill(&store, 50).await;
    for rev in &revs {
        assert_eq!(next(&mut watch).await.unwrap().revision(), *rev);
    }
    assert_quiet(&mut watch).await;
}

const CHILD_DIR_ENV: &str = "FLEET_HUB_CRASH_WRITER_DIR";
const CHILD_ROUND_ENV: &str = "FLEET_HUB_CRASH_WRITER_ROUND";
const WRITERS: u64 = 4;

/// Options that keep the history short, so kills also land in commits that trim it.
fn crash_options() -> EmbeddedOptions {
    EmbeddedOptions {
        history_limit: 200,
        ..Default::default()
    }
}

/// Not a test on its own: the writer process that `kill_9_loses_no_acknowledged_write` runs
/// (this test binary re-executed) and kills. Without the env var it does nothing.
///
/// Each write is one transaction of three keys: `<w>/<i>/a`, `<w>/<i>/b` and `<w>/last` = i.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_writer_child_process() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let round = std::env::var(CHILD_ROUND_ENV).unwrap();
    let store = EmbeddedStore::open_with(&dir, crash_options())
        .await
        .unwrap();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    // Concurrent writers, so the kill also lands inside group commits of several transactions.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, out, round) = (store.clone(), out.clone(), round.clone());
        writers.push(tokio::spawn(async move {
            for i in 0u64.. {
                let base = format!("crash/{round}/{w}");
                let txn = Txn::new()
                    .put(format!("{base}/{i}/a"), vec![7; 64])
                    .put(format!("{base}/{i}/b"), vec![8; 64])
                    .put(format!("{base}/last"), i.to_string().into_bytes());
                let rev = store.txn(txn).await.unwrap().committed().unwrap();
                let mut out = out.lock().unwrap();
                writeln!(out, "acked {w} {i} {rev}").unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

/// A random number in `lo..hi`.
fn random_in(lo: usize, hi: usize) -> usize {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    lo + (u64::from_le_bytes(bytes) % (hi - lo) as u64) as usize
}

/// Five rounds on one data dir: a writer process is SIGKILLed after a random number of
/// acknowledged transactions. After each, the store opens; every transaction it acknowledged
/// (in any round) is there; no transaction is there in part; the revision never goes back and
/// counts on from where it was.
#[tokio::test]
async fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    // (round, writer) -> acknowledged transactions (i -> revision).
    let mut acked: std::collections::BTreeMap<(u64, u64), Vec<(u64, u64)>> = Default::default();
    let mut last_revision = 0u64;
    for round in 0..5u64 {
        let kill_after = random_in(20, 400);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_writer_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let record = |line: &str, acked: &mut std::collections::BTreeMap<_, Vec<_>>| {
            // The first ack shares its line with libtest's "test crash_writer_child_process ... ".
            if let Some((_, rest)) = line.split_once("acked ") {
                let n: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
                acked.entry((round, n[0])).or_default().push((n[1], n[2]));
                return true;
            }
            false
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < kill_after {
            assert!(Instant::now() < deadline, "writer child too slow");
            let Some(Ok(line)) = lines.next() else {
                panic!("writer child exited early")
            };
            seen += usize::from(record(&line, &mut acked));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        // Lines the child wrote before dying are acknowledged writes too.
        for line in lines.map_while(Result::ok) {
            record(&line, &mut acked);
        }

        let store = EmbeddedStore::open_with(dir.path(), crash_options())
            .await
            .unwrap();
        let revision = store.revision().await.unwrap();
        let max_acked = acked.values().flatten().map(|(_, rev)| *rev).max().unwrap();
        assert!(
            revision >= max_acked,
            "round {round}: revision {revision} < acknowledged {max_acked}"
        );
        assert!(
            revision >= last_revision,
            "round {round}: revision went back"
        );
        let items = store.list("crash/").await.unwrap().items;
        let present: std::collections::HashMap<&str, &fleet_hub::store::KeyValue> =
            items.iter().map(|kv| (kv.key.as_str(), kv)).collect();
        for ((r, w), txns) in &acked {
            for (i, rev) in txns {
                for part in ["a", "b"] {
                    let key = format!("crash/{r}/{w}/{i}/{part}");
                    let kv = present
                        .get(key.as_str())
                        .unwrap_or_else(|| panic!("round {round}: acknowledged {key} lost"));
                    assert_eq!(kv.mod_revision, *rev, "{key}");
                }
            }
        }
        // No partial transaction: every `a` has its `b` at the same revision, and `last` is
        // the writer's highest transaction present (it was written by the same transactions).
        let mut highest: std::collections::HashMap<String, u64> = Default::default();
        for kv in &items {
            let Some(base) = kv.key.strip_suffix("/a") else {
                continue;
            };
            let b = present
                .get(format!("{base}/b").as_str())
                .unwrap_or_else(|| panic!("round {round}: {} without its b", kv.key));
            assert_eq!(b.mod_revision, kv.mod_revision);
            let (writer, i) = base.rsplit_once('/').unwrap();
            let i: u64 = i.parse().unwrap();
            let h = highest.entry(writer.to_string()).or_default();
            *h = (*h).max(i);
        }
        for (writer, i) in &highest {
            let last = present[format!("{writer}/last").as_str()];
            assert_eq!(
                String::from_utf8_lossy(&last.value),
                i.to_string(),
                "{writer}/last"
            );
        }
        // At most the transactions in flight at each kill (one per writer and round) are extra.
        let extra = highest.len() as u64; // one `last` per writer
        let txns_present = (items.len() as u64 - extra) / 2;
        let txns_acked = acked.values().map(|t| t.len() as u64).sum::<u64>();
        assert!(
            (txns_acked..=txns_acked + WRITERS * (round + 1)).contains(&txns_present),
            "round {round}: {txns_present} transactions present, {txns_acked} acknowledged, \
             {} keys, {extra} writers",
            items.len()
        );
        // The next write continues the sequence.
        let next_rev = store.put("crash-probe", vec![]).await.unwrap();
        assert_eq!(next_rev, revision + 1);
        last_revision = next_rev;
    }
}

/// Copies the fixture (a `store.log` written by the former log backend: a snapshot with
/// history compacted at revision 4, three commits appended, then a torn frame) into `dir`.
fn legacy_log_into(dir: &std::path::Path) -> Vec<u8> {
    let bytes = include_bytes!("fixtures/legacy-store.log").to_vec();
    std::fs::write(dir.join("store.log"), &bytes).unwrap();
    bytes
}

fn kv(key: &str, value: &[u8], create: Revision, modified: Revision) -> fleet_hub::store::KeyValue {
    fleet_hub::store::KeyValue {
        key: key.into(),
        value: value.to_vec(),
        create_revision: create,
        mod_revision: modified,
    }
}

#[tokio::test]
async fn a_data_dir_of_the_old_log_is_imported_once() {
    use fleet_hub::store::Change;
    let dir = tempfile::tempdir().unwrap();
    let log_bytes = legacy_log_into(dir.path());
    // Leftovers of an import that crashed before its rename are discarded.
    std::fs::write(dir.path().join("store.redb.importing"), b"half an import").unwrap();

    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let listing = store.list("").await.unwrap();
    assert_eq!(listing.revision, 11);
    assert_eq!(
        listing.items,
        vec![
            kv("clusters/c1", b"cluster 1", 2, 2),
            kv("clusters/c2", b"cluster 2 v2", 3, 8),
            kv("clusters/c3", b"cluster 3 v2", 4, 9),
            kv("clusters/c4", b"cluster 4", 5, 5),
            kv("clusters/c5", b"cluster 5", 6, 6),
            kv("leases/c1", &[0, 1, 2, 255], 11, 11),
            kv("records/c1/b", b"rb", 7, 7),
            kv("tokens/t1", b"tok", 10, 10),
        ]
    );
    // The history came along, in operation order within a transaction, and so did the floor.
    let mut watch = store.watch("", 4).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(next(&mut watch).await.unwrap());
    }
    let del = |key: &str, revision| Change::Delete {
        key: key.into(),
        revision,
    };
    assert_eq!(
        got,
        vec![
            Change::Put(kv("clusters/c4", b"cluster 4", 5, 5)),
            Change::Put(kv("clusters/c5", b"cluster 5", 6, 6)),
            Change::Put(kv("records/c1/b", b"rb", 7, 7)),
            Change::Put(kv("records/c1/a", b"ra", 7, 7)),
            del("clusters/c0", 7),
            Change::Put(kv("clusters/c2", b"cluster 2 v2", 3, 8)),
            Change::Put(kv("clusters/c3", b"cluster 3 v2", 4, 9)),
            del("records/c1/a", 10),
            Change::Put(kv("tokens/t1", b"tok", 10, 10)),
            Change::Put(kv("leases/c1", &[0, 1, 2, 255], 11, 11)),
        ]
    );
    assert_quiet(&mut watch).await;
    let mut old = store.watch("", 3).await.unwrap();
    match next(&mut old).await {
        Err(StoreError::Compacted { compacted, .. }) => assert_eq!(compacted, 4),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert_eq!(store.put("after", b"x".to_vec()).await.unwrap(), 12);
    drop(store);

    // The log is kept, renamed, byte for byte; nothing half-built is left.
    assert!(!dir.path().join("store.log").exists());
    assert!(!dir.path().join("store.redb.importing").exists());
    assert_eq!(
        std::fs::read(dir.path().join("store.log.imported")).unwrap(),
        log_bytes
    );
    // Reopening uses the database; it does not import again.
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), 12);
    assert!(store.get("after").await.unwrap().is_some());
    drop(store);

    // A crash between the database's rename and the log's: both files are there. The database
    // wins and the log is renamed.
    legacy_log_into(dir.path());
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), 12);
    assert!(store.get("after").await.unwrap().is_some());
    assert!(!dir.path().join("store.log").exists());
}

#[tokio::test]
async fn a_damaged_old_log_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = legacy_log_into(dir.path());
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(dir.path().join("store.log"), &bytes).unwrap();
    match EmbeddedStore::open(dir.path()).await {
        Err(StoreError::Corrupt { path, .. }) => assert!(path.ends_with("store.log")),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(std::fs::read(dir.path().join("store.log")).unwrap(), bytes);
    assert!(!EmbeddedStore::db_path(dir.path()).exists());
    assert!(!dir.path().join("store.redb.importing").exists());
}

/// The data dir it makes and the store file are private whatever the umask: the directory
/// also holds the CA key and the admin credential, and whoever may write it may replace them.
#[tokio::test]
async fn the_data_dir_and_the_store_file_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a/data");
    let _store = EmbeddedStore::open(&data).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    let files: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "redb"))
        .collect();
    assert!(!files.is_empty());
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

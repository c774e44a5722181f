//! The store suite on the embedded store, plus what only a file store must prove: reopening
//! keeps everything, a torn or damaged tail is handled, a crash loses no acknowledged write,
//! and a second opener is refused.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::store_suite::{assert_quiet, next};
use fleet_hub::store::{EmbeddedOptions, EmbeddedStore, Revision, Store, StoreError};

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

fn log_len(dir: &std::path::Path) -> u64 {
    std::fs::metadata(EmbeddedStore::log_path(dir))
        .unwrap()
        .len()
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
async fn every_torn_tail_is_truncated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let revs = fill(&store, 4).await;
    let without_last = log_len(dir.path());
    store.put("k/4", vec![4; 40]).await.unwrap();
    let with_last = log_len(dir.path());
    drop(store);
    let log = EmbeddedStore::log_path(dir.path());
    let full = std::fs::read(&log).unwrap();
    // Cut the last commit's frame at every length, as a crash mid-write would.
    for cut in without_last..with_last {
        std::fs::write(&log, &full[..cut as usize]).unwrap();
        let store = EmbeddedStore::open(dir.path()).await.unwrap();
        assert_eq!(store.get("k/4").await.unwrap(), None, "cut at {cut}");
        // Everything acknowledged before the torn commit is intact.
        assert_eq!(store.list("k/").await.unwrap().items.len(), 4);
        assert_eq!(store.revision().await.unwrap(), revs[3]);
        drop(store);
        assert_eq!(log_len(dir.path()), without_last, "torn tail truncated");
    }
}

#[tokio::test]
async fn garbage_or_flipped_bytes_at_the_tail_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    let revs = fill(&store, 5).await;
    drop(store);
    let log = EmbeddedStore::log_path(dir.path());
    let intact = std::fs::read(&log).unwrap();

    // Garbage after the last frame (a partially written frame header and body).
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(&[0x13, 0x00, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
        .unwrap();
    drop(f);
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.list("k/").await.unwrap().items.len(), 5);
    assert_eq!(store.revision().await.unwrap(), revs[4]);
    drop(store);
    assert_eq!(std::fs::read(&log).unwrap(), intact);

    // A flipped byte inside the last frame: that commit is dropped, the rest kept.
    let mut damaged = intact.clone();
    let at = damaged.len() - 3;
    damaged[at] ^= 0x55;
    std::fs::write(&log, &damaged).unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    assert_eq!(store.get("k/4").await.unwrap(), None);
    assert_eq!(store.list("k/").await.unwrap().items.len(), 4);
    assert_eq!(store.revision().await.unwrap(), revs[3]);
}

#[tokio::test]
async fn damage_before_intact_records_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).await.unwrap();
    fill(&store, 5).await;
    drop(store);
    let log = EmbeddedStore::log_path(dir.path());
    let mut bytes = std::fs::read(&log).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    match EmbeddedStore::open(dir.path()).await {
        Err(StoreError::Corrupt { path, .. }) => assert!(path.ends_with("store.log")),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Refusing must not have "repaired" the file by cutting committed data.
    assert_eq!(std::fs::read(&log).unwrap(), bytes);
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
async fn snapshots_bound_the_log_and_keep_everything() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        snapshot_every: 10,
        ..Default::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options.clone())
        .await
        .unwrap();
    // Rewrite the same 5 keys many times: the log must not keep all versions' frames.
    let mut revs = Vec::new();
    for round in 0..40u8 {
        for i in 0..5 {
            revs.push(
                store
                    .put(&format!("s/{i}"), vec![round; 100])
                    .await
                    .unwrap(),
            );
        }
    }
    store.compact(revs[150]).await.unwrap();
    let before = store.list("").await.unwrap();
    drop(store);
    assert!(!dir.path().join("store.log.tmp").exists());
    let len = log_len(dir.path());
    assert!(len < 200 * 100, "log of {len} bytes after compaction");

    let store = EmbeddedStore::open_with(dir.path(), options).await.unwrap();
    assert_eq!(store.list("").await.unwrap(), before);
    assert_eq!(store.revision().await.unwrap(), *revs.last().unwrap());
    // The retained history still serves a watch from after the compaction point...
    let mut watch = store.watch("s/", revs[150]).await.unwrap();
    for rev in &revs[151..] {
        assert_eq!(next(&mut watch).await.unwrap().revision(), *rev);
    }
    // ...and the compaction itself survived the reopen.
    let mut old = store.watch("s/", revs[10]).await.unwrap();
    assert!(matches!(
        next(&mut old).await,
        Err(StoreError::Compacted { .. })
    ));
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

/// Options that make the writer child snapshot often, so kills also land mid-snapshot.
fn crash_options() -> EmbeddedOptions {
    EmbeddedOptions {
        snapshot_every: 25,
        history_limit: 200,
        ..Default::default()
    }
}

/// Not a test on its own: the writer process that `kill_9_loses_no_acknowledged_write` runs
/// (this test binary re-executed) and kills. Without the env var it does nothing.
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
    // Concurrent writers, so the kill also lands inside group commits of several frames.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, out, round) = (store.clone(), out.clone(), round.clone());
        writers.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("crash/{round}/{w}/{i}");
                let rev = store.put(&key, vec![7; 64]).await.unwrap();
                let mut out = out.lock().unwrap();
                writeln!(out, "acked {key} {rev}").unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

/// Three rounds on one data dir: a writer process is SIGKILLed mid-stream; on reopen every
/// write it acknowledged is there (including those of earlier rounds).
#[tokio::test]
async fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<String> = Vec::new();
    let mut max_rev = 0u64;
    for round in 0..3 {
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
        let mut record = |line: &str, acked: &mut Vec<String>| {
            if let Some(rest) = line.strip_prefix("acked ") {
                let (key, rev) = rest.split_once(' ').unwrap();
                acked.push(key.to_string());
                max_rev = max_rev.max(rev.parse().unwrap());
            }
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // Kill it mid-stream, after a few hundred acknowledged writes in this round.
        let before = acked.len();
        while acked.len() - before < 200 + 37 * round {
            assert!(Instant::now() < deadline, "writer child too slow");
            let Some(Ok(line)) = lines.next() else {
                panic!("writer child exited early")
            };
            record(&line, &mut acked);
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
        let items = store.list("crash/").await.unwrap().items;
        let present: std::collections::HashSet<&str> =
            items.iter().map(|kv| kv.key.as_str()).collect();
        for key in &acked {
            assert!(
                present.contains(key.as_str()),
                "round {round}: acknowledged {key} lost"
            );
        }
        // At most the writes in flight at each kill (one per writer and round) are extra.
        assert!(items.len() <= acked.len() + 4 * (round + 1));
        assert!(store.revision().await.unwrap() >= max_rev);
        assert!(
            !dir.path().join("store.log.tmp").exists(),
            "a stale snapshot is cleaned up"
        );
    }
}

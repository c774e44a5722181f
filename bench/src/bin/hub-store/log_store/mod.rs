//! The baseline of the `hub-store` bench: fleet-hub's embedded store as it was before it moved
//! onto redb, the append-only log, copied verbatim but for the imports (`check_keys`, private in
//! fleet-hub, is copied into `main.rs`, outside the lines counted for the baseline).
//!
//! The original module doc:
//! The embedded store: the hub's default, one log file in the data dir (`store.log`).
//!
//! Why a log of our own rather than an embedded database: the store must keep *history* (for
//! watch resume) as well as current values, and give every change a revision. A log of
//! committed transactions is exactly that history; the live map and the history are rebuilt
//! from it on open. The format (see [`log`]) is small enough to test exhaustively for torn
//! writes, and snapshotting (temp file + fsync + atomic rename) bounds its size.
//!
//! Concurrency: one committer thread owns the log. Writers queue their transactions to it; it
//! takes everything queued (group commit), checks each transaction in order, appends all their
//! frames with one write and one fsync, then applies them, notifies watchers and answers. So a
//! cancelled caller cannot leave memory and file disagreeing, and concurrent writers share
//! fsyncs. Reads never wait for the disk. A second process opening the same data dir is
//! refused by an exclusive `flock` on `LOCK`, held by the committer until it exits.

mod log;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};

use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{broadcast, oneshot};

use self::log::{LogWriter, Record, io_err, read_log, write_snapshot};
use fleet_hub::store::{
    Change, Condition, KeyValue, Listing, Op, Revision, Store, StoreError, Txn, TxnOutcome,
    WatchStream,
};

use super::check_keys;

const LOG_FILE: &str = "store.log";
const LOCK_FILE: &str = "LOCK";

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How many changes of watch history to keep; older ones are compacted away (watchers
    /// that far behind must relist).
    pub history_limit: usize,
    /// Rewrite the log as a snapshot after this many appended commits.
    pub snapshot_every: u64,
    /// Buffered revisions per live watcher before it falls back to reading history.
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_limit: 100_000,
            snapshot_every: 20_000,
            watch_buffer: 1024,
        }
    }
}

struct State {
    revision: Revision,
    /// Watches need `after >= floor`: history holds every change with a revision above it.
    floor: Revision,
    entries: BTreeMap<String, KeyValue>,
    history: VecDeque<Change>,
}

impl State {
    fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            match change {
                Change::Put(kv) => {
                    self.entries.insert(kv.key.clone(), kv.clone());
                }
                Change::Delete { key, .. } => {
                    self.entries.remove(key);
                }
            }
            self.revision = self.revision.max(change.revision());
            self.history.push_back(change.clone());
        }
    }

    /// Drops whole revisions of history until at most `limit` changes remain.
    fn trim_history(&mut self, limit: usize) {
        while self.history.len() > limit {
            let rev = self.history.front().map(Change::revision).unwrap_or(0);
            while self.history.front().is_some_and(|c| c.revision() == rev) {
                self.history.pop_front();
            }
            self.floor = self.floor.max(rev);
        }
    }

    fn compact(&mut self, revision: Revision) {
        while self
            .history
            .front()
            .is_some_and(|c| c.revision() <= revision)
        {
            self.history.pop_front();
        }
        self.floor = self.floor.max(revision);
    }

    fn replay(&self, prefix: &str, after: Revision) -> Result<Vec<Change>, StoreError> {
        if after < self.floor {
            return Err(StoreError::Compacted {
                after,
                compacted: self.floor,
            });
        }
        Ok(self
            .history
            .iter()
            .filter(|c| c.revision() > after && c.key().starts_with(prefix))
            .cloned()
            .collect())
    }

    fn snapshot_records(&self) -> impl Iterator<Item = Record> + '_ {
        let header = Record::Header {
            revision: self.revision,
            floor: self.floor,
        };
        let entries = self.entries.values().cloned().map(Record::Entry);
        let mut by_revision: Vec<Vec<Change>> = Vec::new();
        for change in &self.history {
            match by_revision.last_mut() {
                Some(batch) if batch[0].revision() == change.revision() => {
                    batch.push(change.clone())
                }
                _ => by_revision.push(vec![change.clone()]),
            }
        }
        std::iter::once(header)
            .chain(entries)
            .chain(by_revision.into_iter().map(Record::History))
    }
}

/// What readers and watchers share with the committer.
struct Shared {
    state: RwLock<State>,
    changes: broadcast::Sender<Arc<Vec<Change>>>,
}

enum Command {
    Txn(Txn, oneshot::Sender<Result<TxnOutcome, StoreError>>),
    Compact(Revision, oneshot::Sender<Result<(), StoreError>>),
}

struct Inner {
    dir: PathBuf,
    shared: Arc<Shared>,
    commands: Option<mpsc::Sender<Command>>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the committer after the work already queued; joining it
        // means the data dir lock is released when the last handle is gone.
        self.commands.take();
        if let Some(handle) = self.committer.take() {
            let _ = handle.join();
        }
    }
}

/// Most transactions one fsync covers.
const MAX_BATCH: usize = 512;

struct Committer {
    shared: Arc<Shared>,
    options: EmbeddedOptions,
    log: LogWriter,
    _lock: Flock<File>,
}

/// The embedded, file-backed [`Store`]. Cheap to clone; clones share one open store.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

fn lock_data_dir(dir: &Path) -> Result<Flock<File>, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let pid = std::process::id();
            lock.set_len(0)
                .and_then(|()| lock.rewind())
                .and_then(|()| writeln!(lock, "{pid}"))
                .map_err(|e| io_err(&path, e))?;
            Ok(lock)
        }
        Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "unknown pid".to_string(),
                pid => format!("pid {pid}"),
            };
            Err(StoreError::Locked {
                dir: dir.display().to_string(),
                holder,
            })
        }
        Err((_, errno)) => Err(io_err(&path, std::io::Error::from(errno))),
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` with default options.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(dir, EmbeddedOptions::default()).await
    }

    pub async fn open_with(
        dir: impl Into<PathBuf>,
        options: EmbeddedOptions,
    ) -> Result<Self, StoreError> {
        let dir = dir.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(dir, options))
            .await
            .map_err(|e| StoreError::Io {
                path: "store open task".into(),
                source: std::io::Error::other(e),
            })?
    }

    fn open_blocking(dir: PathBuf, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let lock = lock_data_dir(&dir)?;
        let path = dir.join(LOG_FILE);
        // A snapshot that crashed before its rename is garbage; the log is still the old one.
        let _ = std::fs::remove_file(path.with_extension("log.tmp"));
        if !path.exists() {
            write_snapshot(
                &path,
                std::iter::once(Record::Header {
                    revision: 0,
                    floor: 0,
                }),
            )?;
        }
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        let contents = read_log(&path, &bytes)?;
        drop(bytes);
        let mut records = contents.records.into_iter();
        let (revision, floor) = match records.next() {
            Some(Record::Header { revision, floor }) => (revision, floor),
            _ => {
                return Err(StoreError::Corrupt {
                    path: path.display().to_string(),
                    offset: 0,
                    reason: "the log does not start with a header".into(),
                });
            }
        };
        let mut state = State {
            revision,
            floor,
            entries: BTreeMap::new(),
            history: VecDeque::new(),
        };
        let mut commits = 0u64;
        for record in records {
            match record {
                Record::Entry(kv) => {
                    state.entries.insert(kv.key.clone(), kv);
                }
                Record::History(changes) => state.history.extend(changes),
                Record::Commit(changes) => {
                    state.apply(&changes);
                    commits += 1;
                }
                Record::Header { .. } => {
                    return Err(StoreError::Corrupt {
                        path: path.display().to_string(),
                        offset: 0,
                        reason: "a second header in the log".into(),
                    });
                }
            }
        }
        state.trim_history(options.history_limit);
        if contents.valid_len < contents.file_len {
            tracing::warn!(
                path = %path.display(),
                valid_len = contents.valid_len,
                file_len = contents.file_len,
                "store log ends in a torn write (a crash mid-commit); dropping the unacknowledged tail"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            file.set_len(contents.valid_len)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err(&path, e))?;
        }
        tracing::info!(
            dir = %dir.display(),
            revision = state.revision,
            keys = state.entries.len(),
            history = state.history.len(),
            "embedded store opened"
        );
        let log = LogWriter::open(&path, contents.valid_len, commits)?;
        let (changes, _) = broadcast::channel(options.watch_buffer.max(1));
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            changes,
        });
        let (commands, queue) = mpsc::channel();
        let committer = Committer {
            shared: shared.clone(),
            options,
            log,
            _lock: lock,
        };
        let handle = std::thread::Builder::new()
            .name("fleet-hub-store".into())
            .spawn(move || committer.run(queue))
            .map_err(|e| io_err(&dir, e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                dir,
                shared,
                commands: Some(commands),
                committer: Some(handle),
            }),
        })
    }

    /// The data dir this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    async fn send<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(command(reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner
            .shared
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// A transaction checked against the state plus the batch's earlier transactions.
struct Pending {
    reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
    outcome: TxnOutcome,
    changes: Vec<Change>,
}

impl Committer {
    fn run(mut self, queue: mpsc::Receiver<Command>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            let mut txns = Vec::new();
            for command in batch {
                match command {
                    Command::Txn(txn, reply) => txns.push((txn, reply)),
                    Command::Compact(revision, reply) => {
                        self.commit(std::mem::take(&mut txns));
                        let _ = reply.send(self.compact(revision));
                    }
                }
            }
            self.commit(txns);
        }
        tracing::debug!(path = %self.log.path().display(), "embedded store committer stopped");
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks, logs (one write, one fsync), applies and answers a batch of transactions.
    fn commit(&mut self, txns: Vec<(Txn, oneshot::Sender<Result<TxnOutcome, StoreError>>)>) {
        if txns.is_empty() {
            return;
        }
        let mut pending = Vec::with_capacity(txns.len());
        {
            let state = self.read();
            // Writes of earlier transactions in this batch, not yet in `state`.
            let mut overlay: HashMap<String, Option<KeyValue>> = HashMap::new();
            let mut revision = state.revision;
            for (txn, reply) in txns {
                if let Err(e) = check_keys(&txn) {
                    let _ = reply.send(Err(e));
                    continue;
                }
                let current = |key: &str| -> Option<KeyValue> {
                    match overlay.get(key) {
                        Some(v) => v.clone(),
                        None => state.entries.get(key).cloned(),
                    }
                };
                let holds = txn.conditions.iter().all(|c| match c {
                    Condition::Absent(key) => current(key).is_none(),
                    Condition::Exists(key) => current(key).is_some(),
                    Condition::ModRevision(key, rev) => {
                        current(key).is_some_and(|kv| kv.mod_revision == *rev)
                    }
                });
                if !holds {
                    pending.push(Pending {
                        reply,
                        outcome: TxnOutcome::ConditionFailed,
                        changes: vec![],
                    });
                    continue;
                }
                let next = revision + 1;
                let changes: Vec<Change> = txn
                    .ops
                    .into_iter()
                    .filter_map(|op| match op {
                        Op::Put { key, value } => {
                            let create_revision =
                                current(&key).map_or(next, |kv| kv.create_revision);
                            Some(Change::Put(KeyValue {
                                key,
                                value,
                                create_revision,
                                mod_revision: next,
                            }))
                        }
                        Op::Delete { key } => current(&key).is_some().then_some(Change::Delete {
                            key,
                            revision: next,
                        }),
                        // Refused by `check_keys` above.
                        Op::DeletePrefix { .. } => None,
                    })
                    .collect();
                if !changes.is_empty() {
                    revision = next;
                    for change in &changes {
                        let value = match change {
                            Change::Put(kv) => Some(kv.clone()),
                            Change::Delete { .. } => None,
                        };
                        overlay.insert(change.key().to_string(), value);
                    }
                }
                pending.push(Pending {
                    reply,
                    outcome: TxnOutcome::Committed { revision },
                    changes,
                });
            }
        }
        let frames: Vec<u8> = pending
            .iter()
            .filter(|p| !p.changes.is_empty())
            .flat_map(|p| Record::Commit(p.changes.clone()).frame())
            .collect();
        if !frames.is_empty() {
            if let Err(error) = self.log.append(&frames) {
                tracing::error!(%error, batch = pending.len(), "store commit failed; nothing of the batch was applied");
                for p in pending {
                    let _ = p.reply.send(Err(StoreError::Io {
                        path: self.log.path().display().to_string(),
                        source: std::io::Error::other(error.to_string()),
                    }));
                }
                return;
            }
            let commits = pending.iter().filter(|p| !p.changes.is_empty()).count();
            self.log.commits_since_snapshot += commits as u64;
            let mut state = self.write();
            for p in &pending {
                if p.changes.is_empty() {
                    continue;
                }
                state.apply(&p.changes);
                // Sent under the state lock: a watcher subscribes under it too, so it sees
                // each revision either in its replay or on the channel, never neither.
                let _ = self.shared.changes.send(Arc::new(p.changes.clone()));
            }
            state.trim_history(self.options.history_limit);
        }
        for p in pending {
            let _ = p.reply.send(Ok(p.outcome));
        }
        // The commits themselves are durable; a failed snapshot only leaves the log longer.
        if self.log.commits_since_snapshot >= self.options.snapshot_every
            && let Err(error) = self.snapshot()
        {
            tracing::warn!(%error, "store snapshot failed; will retry after the next commit");
        }
    }

    fn compact(&mut self, revision: Revision) -> Result<(), StoreError> {
        {
            let mut state = self.write();
            if revision > state.revision {
                return Err(StoreError::InvalidTxn(format!(
                    "cannot compact at revision {revision}: the store is at revision {}",
                    state.revision
                )));
            }
            state.compact(revision);
        }
        self.snapshot()
    }

    /// Rewrites the log as a snapshot of the current state.
    fn snapshot(&mut self) -> Result<(), StoreError> {
        let path = self.log.path().to_path_buf();
        let len = write_snapshot(&path, self.read().snapshot_records())?;
        self.log = LogWriter::open(&path, len, 0)?;
        tracing::debug!(path = %path.display(), len, "store log rewritten as a snapshot");
        Ok(())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.state().entries.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let state = self.state();
        let items = state
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Listing {
            items,
            revision: state.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.send(|reply| Command::Txn(txn, reply)).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        // Watchers hold the store weakly: dropping the store ends their streams.
        let shared = Arc::downgrade(&self.inner.shared);
        let prefix = prefix.to_string();
        let (replay, rx) = {
            let state = self.state();
            (
                state.replay(&prefix, after),
                self.inner.shared.changes.subscribe(),
            )
        };
        Ok(Box::pin(async_stream::stream! {
            let mut rx = rx;
            let mut last = after;
            let mut pending = match replay {
                Ok(changes) => changes,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            loop {
                for change in pending.drain(..) {
                    last = last.max(change.revision());
                    yield Ok(change);
                }
                match rx.recv().await {
                    Ok(batch) => {
                        let revision = batch.first().map_or(0, Change::revision);
                        if revision > last {
                            pending.extend(
                                batch.iter().filter(|c| c.key().starts_with(&prefix)).cloned(),
                            );
                            last = revision;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Too slow for the live channel: catch up from history, resubscribing
                        // under the same lock so nothing falls between the two.
                        tracing::debug!(prefix, missed, last, "watcher lagged; replaying history");
                        let replay = match shared.upgrade() {
                            None => Err(StoreError::Closed),
                            Some(shared) => {
                                let state = shared.state.read().unwrap_or_else(|p| p.into_inner());
                                rx = shared.changes.subscribe();
                                state.replay(&prefix, last)
                            }
                        };
                        match replay {
                            Ok(changes) => pending = changes,
                            Err(e) => {
                                yield Err(e);
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        yield Err(StoreError::Closed);
                        return;
                    }
                }
            }
        }))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.send(|reply| Command::Compact(revision, reply)).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.state().revision)
    }
}

impl EmbeddedStore {
    /// Where the embedded store in `dir` keeps its log (for operators and crash tests).
    pub fn log_path(dir: &Path) -> PathBuf {
        dir.join(LOG_FILE)
    }
}

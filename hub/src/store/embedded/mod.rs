//! The embedded store: the hub's default, one redb database in the data dir (`store.redb`).
//!
//! redb carries crash safety (checksummed copy-on-write B-trees, a durable commit per write);
//! the revisions, the watch history and the watch fan-out are ours. The live keys and the
//! retained history are also held in memory (loaded on open), so reads and watch replays never
//! wait for the disk; the file is written, never read, while the store is open. The tables are
//! described in [`db`]. A data dir still holding the former log (`store.log`) is imported once
//! on open ([`legacy`]) and the log renamed `store.log.imported`.
//!
//! Concurrency: one committer thread owns the database. Writers queue their transactions to
//! it; it takes everything queued (group commit), checks each transaction in order, writes
//! all their changes in one redb transaction with one fsync, then applies them, notifies
//! watchers and answers. So a cancelled caller cannot leave memory and file disagreeing, and
//! concurrent writers share fsyncs. A second process opening the same data dir is refused by
//! an exclusive `flock` on `LOCK`, held by the committer until it exits (redb also locks its
//! file, but the `LOCK` file names the holder's pid).

mod db;
mod legacy;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};

use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{broadcast, oneshot};

use self::db::Db;
use super::{
    Change, Condition, KeyValue, Listing, Op, Revision, Store, StoreError, Txn, TxnOutcome,
    WatchStream,
};

const DB_FILE: &str = "store.redb";
/// Where a new database is built during an import, renamed to `DB_FILE` when complete.
const IMPORTING_FILE: &str = "store.redb.importing";
/// The former log format, imported once.
const LEGACY_FILE: &str = "store.log";
const LEGACY_IMPORTED_FILE: &str = "store.log.imported";
const LOCK_FILE: &str = "LOCK";

pub(super) fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// fsyncs a directory so a create or rename in it is durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How many changes of watch history to keep; older ones are compacted away (watchers
    /// that far behind must relist).
    pub history_limit: usize,
    /// How many bytes of watch history (keys + values + [`CHANGE_OVERHEAD`] per change) to
    /// keep in memory, whatever their number: a member rewriting large records cannot grow
    /// the hub's memory past it. The newest revision is always kept.
    pub history_bytes: usize,
    /// Revision notices buffered per live watcher before it re-reads history (the notices
    /// carry no data: watchers read the changes from the bounded history).
    pub watch_buffer: usize,
}

/// What one change of history costs beyond its key and value (the entry and its bookkeeping),
/// counted so that many empty values are bounded too.
pub const CHANGE_OVERHEAD: usize = 64;

/// What one change costs in a bounded history: key, value and [`CHANGE_OVERHEAD`].
pub(crate) fn change_bytes(change: &Change) -> usize {
    CHANGE_OVERHEAD
        + change.key().len()
        + match change {
            Change::Put(kv) => kv.value.len(),
            Change::Delete { .. } => 0,
        }
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_limit: 100_000,
            history_bytes: 64 << 20,
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
    /// [`change_bytes`] of everything in `history`.
    history_bytes: usize,
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
            self.history_bytes += change_bytes(change);
            self.history.push_back(change.clone());
        }
    }

    /// The floor after adding `added` to the history and dropping whole revisions from its
    /// front until at most `limit` changes and `byte_limit` bytes remain (a count limit of 0
    /// empties it; the byte limit never drops the newest revision).
    fn floor_after<'a>(
        &self,
        added: impl Iterator<Item = &'a Change>,
        limit: usize,
        byte_limit: usize,
    ) -> Revision {
        let added: Vec<&Change> = added.collect();
        let mut remaining = self.history.len() + added.len();
        let mut bytes = self.history_bytes + added.iter().map(|c| change_bytes(c)).sum::<usize>();
        let newest = added
            .last()
            .copied()
            .or(self.history.back())
            .map(Change::revision);
        let mut floor = self.floor;
        let mut changes = self.history.iter().chain(added).peekable();
        while let Some(rev) = changes.peek().map(|c| c.revision()) {
            let over_count = remaining > limit;
            let over_bytes = bytes > byte_limit && Some(rev) != newest;
            if !over_count && !over_bytes {
                break;
            }
            while let Some(c) = changes.next_if(|c| c.revision() == rev) {
                remaining -= 1;
                bytes -= change_bytes(c);
            }
            floor = floor.max(rev);
        }
        floor
    }

    fn compact(&mut self, revision: Revision) {
        while self
            .history
            .front()
            .is_some_and(|c| c.revision() <= revision)
        {
            if let Some(change) = self.history.pop_front() {
                self.history_bytes -= change_bytes(&change);
            }
        }
        self.floor = self.floor.max(revision);
    }

    /// The changes under `prefix` after `after`, and the revision they bring a reader to.
    fn replay(&self, prefix: &str, after: Revision) -> Result<(Vec<Change>, Revision), StoreError> {
        if after < self.floor {
            return Err(StoreError::Compacted {
                after,
                compacted: self.floor,
            });
        }
        let start = self.history.partition_point(|c| c.revision() <= after);
        let changes = self
            .history
            .range(start..)
            .filter(|c| c.key().starts_with(prefix))
            .cloned()
            .collect();
        Ok((changes, self.revision.max(after)))
    }
}

/// What readers and watchers share with the committer.
struct Shared {
    state: RwLock<State>,
    /// The revision of each commit, for live watchers: the changes themselves are read from
    /// `state.history`, so buffered notices hold no values (memory stays the bounded history).
    changes: broadcast::Sender<Revision>,
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
    db: Db,
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
        // The data dir holds the store (and, beside it, the CA key and admin credential): 0700
        // whatever the umask.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .map_err(|e| io_err(&dir, e))?;
        let lock = lock_data_dir(&dir)?;
        import_legacy_log(&dir)?;
        let db = Db::open(&dir.join(DB_FILE))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let file = dir.join(DB_FILE);
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io_err(&file, e))?;
        }
        let mut state = db.load()?;
        // A smaller limit than the one the history was kept with applies from now on.
        state.history_bytes = state.history.iter().map(change_bytes).sum();
        state.compact(state.floor_after(
            std::iter::empty(),
            options.history_limit,
            options.history_bytes,
        ));
        tracing::info!(
            dir = %dir.display(),
            revision = state.revision,
            keys = state.entries.len(),
            history = state.history.len(),
            "embedded store opened"
        );
        let (changes, _) = broadcast::channel(options.watch_buffer.max(1));
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            changes,
        });
        let (commands, queue) = mpsc::channel();
        let committer = Committer {
            shared: shared.clone(),
            options,
            db,
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
        tracing::debug!(path = %self.db.path().display(), "embedded store committer stopped");
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks, writes (one redb transaction, one fsync), applies and answers a batch of
    /// transactions.
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
                if let Err(e) = txn.check_keys() {
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
                let mut changes: Vec<Change> = Vec::new();
                for op in txn.ops {
                    match op {
                        Op::Put { key, value } => {
                            let create_revision =
                                current(&key).map_or(next, |kv| kv.create_revision);
                            changes.push(Change::Put(KeyValue {
                                key,
                                value,
                                create_revision,
                                mod_revision: next,
                            }));
                        }
                        Op::Delete { key } => {
                            if current(&key).is_some() {
                                changes.push(Change::Delete {
                                    key,
                                    revision: next,
                                });
                            }
                        }
                        Op::DeletePrefix { prefix } => {
                            // Live keys under the prefix: the stored ones and this batch's.
                            let keys: std::collections::BTreeSet<&String> = state
                                .entries
                                .range(prefix.clone()..)
                                .take_while(|(k, _)| k.starts_with(&prefix))
                                .map(|(k, _)| k)
                                .chain(overlay.keys().filter(|k| k.starts_with(&prefix)))
                                .collect();
                            for key in keys {
                                if current(key).is_some() {
                                    changes.push(Change::Delete {
                                        key: key.clone(),
                                        revision: next,
                                    });
                                }
                            }
                        }
                    }
                }
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
        let written = || pending.iter().flat_map(|p| p.changes.iter());
        if written().next().is_some() {
            let (revision, floor) = {
                let state = self.read();
                let revision = written().last().map_or(state.revision, Change::revision);
                (
                    revision,
                    state.floor_after(
                        written(),
                        self.options.history_limit,
                        self.options.history_bytes,
                    ),
                )
            };
            if let Err(error) = self.db.commit(written(), revision, floor) {
                tracing::error!(%error, batch = pending.len(), "store commit failed; nothing of the batch was applied");
                for p in pending {
                    let _ = p.reply.send(Err(StoreError::Io {
                        path: self.db.path().display().to_string(),
                        source: std::io::Error::other(error.to_string()),
                    }));
                }
                return;
            }
            let mut state = self.write();
            for p in &pending {
                if p.changes.is_empty() {
                    continue;
                }
                state.apply(&p.changes);
            }
            state.compact(floor);
            // Sent under the state lock: a watcher subscribes under it too, so it sees each
            // revision either in its replay or through a notice, never neither.
            let _ = self.shared.changes.send(state.revision);
        }
        for p in pending {
            let _ = p.reply.send(Ok(p.outcome));
        }
    }

    fn compact(&mut self, revision: Revision) -> Result<(), StoreError> {
        let current = self.read().revision;
        if revision > current {
            return Err(StoreError::InvalidTxn(format!(
                "cannot compact at revision {revision}: the store is at revision {current}"
            )));
        }
        let floor = self.read().floor.max(revision);
        self.db.commit(std::iter::empty(), current, floor)?;
        self.write().compact(floor);
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
            let (mut pending, mut last) = match replay {
                Ok(replayed) => replayed,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            loop {
                for change in pending.drain(..) {
                    yield Ok(change);
                }
                match rx.recv().await {
                    Ok(revision) if revision <= last => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        yield Err(StoreError::Closed);
                        return;
                    }
                }
                // Read what is new from the history (a watcher that lagged behind the notices
                // reads the same way; one that fell behind the history's floor must relist).
                let replay = match shared.upgrade() {
                    None => Err(StoreError::Closed),
                    Some(shared) => {
                        let state = shared.state.read().unwrap_or_else(|p| p.into_inner());
                        rx = rx.resubscribe();
                        state.replay(&prefix, last)
                    }
                };
                match replay {
                    Ok((changes, revision)) => {
                        pending = changes;
                        last = revision;
                    }
                    Err(e) => {
                        yield Err(e);
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
    /// Where the embedded store in `dir` keeps its database (for operators and crash tests).
    pub fn db_path(dir: &Path) -> PathBuf {
        dir.join(DB_FILE)
    }

    /// Whether `dir` holds a store (its database, or the former log still to import), without
    /// creating anything: operator commands may only open one that `serve` started.
    pub fn exists_in(dir: &Path) -> Result<bool, StoreError> {
        for file in [dir.join(DB_FILE), dir.join(LEGACY_FILE)] {
            // Not found is `false`; an unreadable dir is an error, not "no store".
            if file.try_exists().map_err(|e| io_err(&file, e))? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Imports the former log format once: when `store.log` exists and `store.redb` does not, the
/// log is read and written into a new database built beside it and renamed into place; then
/// the log is renamed `store.log.imported`. A crash at any step leaves either the log to import
/// again or the complete database.
fn import_legacy_log(dir: &Path) -> Result<(), StoreError> {
    let db_path = dir.join(DB_FILE);
    let legacy = dir.join(LEGACY_FILE);
    let importing = dir.join(IMPORTING_FILE);
    let imported = dir.join(LEGACY_IMPORTED_FILE);
    // Garbage of an import that crashed before its rename, or of an old log snapshot.
    for stale in [importing.clone(), dir.join("store.log.tmp")] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&stale, e)),
            _ => {}
        }
    }
    if !legacy.exists() {
        return Ok(());
    }
    // Never retire the old log beside a database that holds nothing.
    db::refuse_empty(&db_path)?;
    if !db_path.exists() {
        let started = std::time::Instant::now();
        let state = legacy::read(&legacy)?;
        let db = Db::open(&importing)?;
        db.write_all(&state)?;
        drop(db);
        std::fs::rename(&importing, &db_path).map_err(|e| io_err(&db_path, e))?;
        sync_dir(dir)?;
        tracing::info!(
            from = %legacy.display(),
            to = %db_path.display(),
            revision = state.revision,
            keys = state.entries.len(),
            history = state.history.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "imported the old store log into the database"
        );
    }
    // Also reached when a crash came between the database's rename and this one.
    std::fs::rename(&legacy, &imported).map_err(|e| io_err(&imported, e))?;
    sync_dir(dir)?;
    Ok(())
}

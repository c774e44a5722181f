//! The embedded store's durable half: three tables in one redb file, `store.redb`.
//!
//! ```text
//! keys:    key              -> (create_revision, mod_revision, value)
//! history: (revision, seq)  -> (key, Some((create_revision, value)) | None for a delete)
//! meta:    "format" -> 1, "revision" -> current revision, "floor" -> history floor
//! ```
//! `history` holds every change above `floor` (seq keeps a transaction's operation order), so
//! a watcher can resume from any revision at or above it. Every write is one redb transaction
//! committed with `Durability::Immediate` (fsync before it returns): after a crash the file is
//! the last commit that returned, never part of one. Torn-write detection, checksums and
//! recovery are redb's.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition,
};

use super::super::{Change, KeyValue, Revision, StoreError};
use super::State;

const KEYS: TableDefinition<&str, (u64, u64, &[u8])> = TableDefinition::new("keys");
/// A change of the history: the key, and for a put its create revision and value.
type HistoryChange<'a> = (&'a str, Option<(u64, &'a [u8])>);
const HISTORY: TableDefinition<(u64, u32), HistoryChange> = TableDefinition::new("history");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FORMAT: u64 = 1;

/// Page cache for redb. The store reads the file only when it opens (the live state is in
/// memory), so the cache only has to hold the pages a commit touches.
const CACHE_BYTES: usize = 32 << 20;

/// The open database file.
pub(super) struct Db {
    path: PathBuf,
    db: Database,
}

/// Maps a redb error on `path` to the store's errors: damage is `Corrupt`, the rest `Io`.
fn db_err(path: &Path, error: impl Into<redb::Error>) -> StoreError {
    match error.into() {
        redb::Error::Corrupted(reason) => StoreError::Corrupt {
            path: path.display().to_string(),
            offset: 0,
            reason,
        },
        redb::Error::Io(source) => super::io_err(path, source),
        other => super::io_err(path, std::io::Error::other(other.to_string())),
    }
}

fn open_err(path: &Path, error: DatabaseError) -> StoreError {
    match error {
        // The data dir lock is taken first, so this is a process that ignores it.
        DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
            dir: path.display().to_string(),
            holder: "unknown pid (the database file itself is locked)".into(),
        },
        DatabaseError::Storage(StorageError::Corrupted(reason)) => StoreError::Corrupt {
            path: path.display().to_string(),
            offset: 0,
            reason,
        },
        other => db_err(path, other),
    }
}

/// redb would take an existing empty file for a new database and start a fresh, empty store
/// over what was lost: refuse it instead (a truncated copy, or a crash while creating it).
pub(super) fn refuse_empty(path: &Path) -> Result<(), StoreError> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err(StoreError::Corrupt {
            path: path.display().to_string(),
            offset: 0,
            reason: "the database file is empty (truncated or copied while empty); restore it \
                     from a backup, or, if this hub never stored anything (it crashed while \
                     creating the file), remove it to start an empty store"
                .into(),
        });
    }
    Ok(())
}

impl Db {
    /// Opens (or creates, empty) the database at `path`. The integrity of every page is
    /// checked on open, so a damaged file is refused (`Corrupt`) rather than half-read.
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        refuse_empty(path)?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| open_err(path, e))?;
        let db = Db {
            path: path.to_path_buf(),
            db,
        };
        db.init()?;
        Ok(db)
    }

    /// Writes the format marker and the tables of a new file; checks the marker of an old one.
    fn init(&self) -> Result<(), StoreError> {
        let path = &self.path;
        let txn = self.db.begin_write().map_err(|e| db_err(path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| db_err(path, e))?;
            let format = meta
                .get("format")
                .map_err(|e| db_err(path, e))?
                .map(|v| v.value());
            match format {
                None => {
                    meta.insert("format", FORMAT).map_err(|e| db_err(path, e))?;
                }
                Some(FORMAT) => {}
                Some(other) => {
                    return Err(StoreError::Corrupt {
                        path: path.display().to_string(),
                        offset: 0,
                        reason: format!(
                            "store format {other}, this hub reads {FORMAT}; run the hub version \
                             that wrote it"
                        ),
                    });
                }
            }
            txn.open_table(KEYS).map_err(|e| db_err(path, e))?;
            txn.open_table(HISTORY).map_err(|e| db_err(path, e))?;
        }
        txn.commit().map_err(|e| db_err(path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the whole store: live keys, history, revision and floor.
    pub fn load(&self) -> Result<State, StoreError> {
        let path = &self.path;
        let e = |e: redb::StorageError| db_err(path, e);
        let txn = self.db.begin_read().map_err(|e| db_err(path, e))?;
        let meta = txn.open_table(META).map_err(|e| db_err(path, e))?;
        let get = |name: &str| -> Result<u64, StoreError> {
            Ok(meta.get(name).map_err(e)?.map_or(0, |v| v.value()))
        };
        let mut loaded = State {
            revision: get("revision")?,
            floor: get("floor")?,
            entries: BTreeMap::new(),
            history: VecDeque::new(),
            history_bytes: 0,
        };
        let keys = txn.open_table(KEYS).map_err(|e| db_err(path, e))?;
        for item in keys.iter().map_err(e)? {
            let (key, value) = item.map_err(e)?;
            let key = key.value().to_string();
            let (create_revision, mod_revision, value) = value.value();
            loaded.entries.insert(
                key.clone(),
                KeyValue {
                    key,
                    value: value.to_vec(),
                    create_revision,
                    mod_revision,
                },
            );
        }
        let history = txn.open_table(HISTORY).map_err(|e| db_err(path, e))?;
        for item in history.iter().map_err(e)? {
            let (at, change) = item.map_err(e)?;
            let (revision, _) = at.value();
            let (key, put) = change.value();
            loaded.history.push_back(match put {
                Some((create_revision, value)) => Change::Put(KeyValue {
                    key: key.to_string(),
                    value: value.to_vec(),
                    create_revision,
                    mod_revision: revision,
                }),
                None => Change::Delete {
                    key: key.to_string(),
                    revision,
                },
            });
        }
        Ok(loaded)
    }

    /// Commits, in one durable redb transaction, `changes` (in revision order), the store's new
    /// `revision`, and forgets the history at or below `floor`.
    pub fn commit<'a>(
        &self,
        changes: impl Iterator<Item = &'a Change>,
        revision: Revision,
        floor: Revision,
    ) -> Result<(), StoreError> {
        self.write(None, changes, revision, floor)
    }

    /// Writes a whole state into this (new, empty) database in one transaction: the import.
    pub fn write_all(&self, state: &State) -> Result<(), StoreError> {
        let snapshot = Some(&state.entries);
        self.write(snapshot, state.history.iter(), state.revision, state.floor)
    }

    /// With a `snapshot` the keys are written from it and `changes` are history only (already
    /// reflected in the snapshot); without one the changes update the keys too.
    fn write<'a>(
        &self,
        snapshot: Option<&BTreeMap<String, KeyValue>>,
        changes: impl Iterator<Item = &'a Change>,
        revision: Revision,
        floor: Revision,
    ) -> Result<(), StoreError> {
        let path = &self.path;
        let e = |e: redb::StorageError| db_err(path, e);
        let mut txn = self.db.begin_write().map_err(|e| db_err(path, e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| db_err(path, e))?;
        {
            let mut keys = txn.open_table(KEYS).map_err(|e| db_err(path, e))?;
            let mut history = txn.open_table(HISTORY).map_err(|e| db_err(path, e))?;
            for kv in snapshot.into_iter().flat_map(|s| s.values()) {
                keys.insert(
                    kv.key.as_str(),
                    (kv.create_revision, kv.mod_revision, kv.value.as_slice()),
                )
                .map_err(e)?;
            }
            let mut at = (0u64, 0u32);
            for change in changes {
                // seq numbers a revision's changes in operation order.
                at = match change.revision() {
                    r if r == at.0 => (r, at.1 + 1),
                    r => (r, 0),
                };
                match change {
                    Change::Put(kv) => {
                        if snapshot.is_none() {
                            keys.insert(
                                kv.key.as_str(),
                                (kv.create_revision, kv.mod_revision, kv.value.as_slice()),
                            )
                            .map_err(e)?;
                        }
                        let put = Some((kv.create_revision, kv.value.as_slice()));
                        history.insert(at, (kv.key.as_str(), put)).map_err(e)?;
                    }
                    Change::Delete { key, .. } => {
                        if snapshot.is_none() {
                            keys.remove(key.as_str()).map_err(e)?;
                        }
                        history.insert(at, (key.as_str(), None)).map_err(e)?;
                    }
                }
            }
            // Whole revisions at or below the floor: (floor + 1, 0) is the first key above it.
            history
                .retain_in(..(floor + 1, 0), |_, _| false)
                .map_err(e)?;
            let mut meta = txn.open_table(META).map_err(|e| db_err(path, e))?;
            meta.insert("revision", revision).map_err(e)?;
            meta.insert("floor", floor).map_err(e)?;
        }
        txn.commit().map_err(|e| db_err(path, e))
    }
}

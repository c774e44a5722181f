//! The hub's store: a small revisioned key-value store behind one trait, with two backends.
//!
//! - [`EmbeddedStore`]: the default, one redb database file in the hub's data dir (redb
//!   carries the crash safety; revisions, history and watches are ours);
//! - [`EtcdStore`]: etcd, for several hub replicas sharing one state.
//!
//! Semantics every backend keeps (the shared test suite checks them on both):
//! - every committed write gets one revision, strictly greater than every earlier one; all
//!   operations of one [`Txn`] share that revision;
//! - [`Store::list`] returns the items under a prefix *and* the revision they were read at;
//! - [`Store::watch`]`(prefix, after)` streams every change under `prefix` with a revision
//!   greater than `after`, in revision order, each exactly once. A client that lost its stream
//!   watches again from the last revision it saw and misses nothing. If the store no longer
//!   has the history back to `after` the stream yields [`StoreError::Compacted`]: relist, then
//!   watch from the listing's revision.

mod embedded;
mod etcd;

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub(crate) use embedded::change_bytes;
pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use etcd::{EtcdOptions, EtcdStore};

/// A store revision. 0 means "before the first write".
pub use fleet_hub_api::model::Revision;

/// One key with its value and the revisions that created and last modified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// The items under a prefix, sorted by key, and the store revision they were read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub items: Vec<KeyValue>,
    pub revision: Revision,
}

/// One change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Put(kv) => &kv.key,
            Change::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Change::Put(kv) => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// A condition a [`Txn`] checks before it applies its operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// The key does not exist.
    Absent(String),
    /// The key exists (any revision).
    Exists(String),
    /// The key exists and was last modified at exactly this revision.
    ModRevision(String, Revision),
}

/// One write of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// Deletes every key starting with `prefix` (non-empty), however many: one operation, so
    /// removing a member's records never grows a transaction with the data.
    DeletePrefix {
        prefix: String,
    },
}

/// The most conditions, and the most operations, one [`Txn`] may hold: etcd's default
/// `--max-txn-ops`. Both backends refuse more ([`StoreError::InvalidTxn`]), so code that works
/// on the embedded store cannot fail on etcd; an operation on data of any size uses
/// [`Op::DeletePrefix`] instead of one operation per key.
pub const MAX_TXN_OPS: usize = 128;

/// All-or-nothing: if every condition holds, every operation is applied at one new revision.
/// A key may appear in at most one operation (a prefix delete counts for every key under it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub conditions: Vec<Condition>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, condition: Condition) -> Self {
        self.conditions.push(condition);
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Deletes every key under `prefix` (see [`Op::DeletePrefix`]).
    pub fn delete_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.ops.push(Op::DeletePrefix {
            prefix: prefix.into(),
        });
        self
    }

    fn check_keys(&self) -> Result<(), StoreError> {
        if self.ops.len() > MAX_TXN_OPS || self.conditions.len() > MAX_TXN_OPS {
            return Err(StoreError::InvalidTxn(format!(
                "{} operations and {} conditions in one transaction; at most {MAX_TXN_OPS} of \
                 each (etcd's limit): use a prefix delete for data of any size",
                self.ops.len(),
                self.conditions.len()
            )));
        }
        let prefixes: Vec<&str> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::DeletePrefix { prefix } => Some(prefix.as_str()),
                _ => None,
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for op in &self.ops {
            let key = match op {
                Op::Put { key, .. } | Op::Delete { key } => key,
                Op::DeletePrefix { prefix } => {
                    if prefix.is_empty() {
                        return Err(StoreError::InvalidTxn(
                            "a prefix delete needs a non-empty prefix".into(),
                        ));
                    }
                    if prefixes
                        .iter()
                        .filter(|p| *p != prefix)
                        .any(|p| prefix.starts_with(p))
                    {
                        return Err(StoreError::InvalidTxn(format!(
                            "prefix {prefix:?} lies under another prefix delete of the transaction"
                        )));
                    }
                    if !seen.insert(prefix.as_str()) {
                        return Err(StoreError::InvalidTxn(format!(
                            "prefix {prefix:?} appears in more than one operation of one transaction"
                        )));
                    }
                    continue;
                }
            };
            if prefixes.iter().any(|p| key.starts_with(p)) {
                return Err(StoreError::InvalidTxn(format!(
                    "key {key:?} lies under a prefix delete of the same transaction"
                )));
            }
            if key.is_empty() {
                return Err(StoreError::InvalidTxn(
                    "an operation has an empty key".into(),
                ));
            }
            if !seen.insert(key.as_str()) {
                return Err(StoreError::InvalidTxn(format!(
                    "key {key:?} appears in more than one operation of one transaction"
                )));
            }
        }
        Ok(())
    }
}

/// What became of a [`Txn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied. `revision` is the transaction's revision, or the current revision when the
    /// operations changed nothing (a delete of absent keys).
    Committed { revision: Revision },
    /// A condition did not hold; nothing was written.
    ConditionFailed,
}

impl TxnOutcome {
    pub fn committed(self) -> Option<Revision> {
        match self {
            TxnOutcome::Committed { revision } => Some(revision),
            TxnOutcome::ConditionFailed => None,
        }
    }
}

/// A stream of changes; it ends after yielding an error.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Change, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "changes after revision {after} are no longer in the store's history (compacted up to \
         revision {compacted}); relist and watch from the listing's revision"
    )]
    Compacted {
        after: Revision,
        compacted: Revision,
    },
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    /// The store refused the request as such (etcd's `InvalidArgument`: too many operations,
    /// request too large, ...): sending it again gets the same answer.
    #[error(
        "etcd at {endpoints} refused {operation}: {reason}; the same request will be refused \
         again"
    )]
    Refused {
        endpoints: String,
        operation: &'static str,
        reason: String,
    },
    #[error(
        "store data dir {dir} is in use by another process ({holder}); stop it or pick another \
         data dir"
    )]
    Locked { dir: String, holder: String },
    #[error("store I/O on {path} failed: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "store file {path} is damaged (at byte {offset}; 0 where the database does not say): \
         {reason}; this is not a torn write: restore the data dir from a backup"
    )]
    Corrupt {
        path: String,
        offset: u64,
        reason: String,
    },
    #[error("etcd at {endpoints} failed during {operation}: {source}")]
    Etcd {
        endpoints: String,
        operation: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints} did not answer {operation} within {timeout_ms} ms")]
    Timeout {
        endpoints: String,
        operation: &'static str,
        timeout_ms: u128,
    },
    #[error("etcd settings: {0}")]
    Config(String),
    #[error("etcd watch on {prefix:?} was cancelled by the server: {reason}")]
    WatchCancelled { prefix: String, reason: String },
    #[error("the store was closed")]
    Closed,
}

/// A revisioned key-value store (see the module docs for the guarantees).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix` (sorted) and the revision of the read.
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;

    /// Applies `txn` atomically if all its conditions hold.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Changes under `prefix` with a revision greater than `after` (see the module docs).
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError>;

    /// Forgets the history up to `revision`: watches from before it get
    /// [`StoreError::Compacted`]; current values are kept.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// The store's current revision.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// Unconditional put; returns its revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        match self.txn(Txn::new().put(key, value)).await? {
            TxnOutcome::Committed { revision } => Ok(revision),
            TxnOutcome::ConditionFailed => unreachable!("a txn without conditions cannot fail"),
        }
    }

    /// Deletes `key`; returns the revision of the delete, or `None` if it did not exist.
    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        Ok(self
            .txn(Txn::new().when(Condition::Exists(key.into())).delete(key))
            .await?
            .committed())
    }

    /// Creates `key` only if it does not exist; `None` if it did.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<Revision>, StoreError> {
        Ok(self
            .txn(
                Txn::new()
                    .when(Condition::Absent(key.into()))
                    .put(key, value),
            )
            .await?
            .committed())
    }

    /// Replaces `key` only if it was last modified at `expected`; `None` otherwise.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<Option<Revision>, StoreError> {
        Ok(self
            .txn(
                Txn::new()
                    .when(Condition::ModRevision(key.into(), expected))
                    .put(key, value),
            )
            .await?
            .committed())
    }
}

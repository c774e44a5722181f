//! The importer of the embedded store's former file format, `store.log`: a log of
//! checksummed records written by hubs before the store moved onto redb. It is read once, when
//! a data dir has a `store.log` and no `store.redb` (see `super::open_blocking`).
//!
//! ```text
//! file    := frame*
//! frame   := len:u32le crc32(payload):u32le payload[len]
//! payload := Header | Entry | History | Commit        (first byte is the tag)
//! ```
//! A file is `Header Entry* History* Commit*`: a snapshot (the live keys at the header's
//! revision plus the retained watch history) followed by the commits appended since. Commits
//! were fsynced one at a time, so only the last frame can be torn by a crash: [`read_log`]
//! drops a torn tail and refuses a damaged frame that has intact data after it.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use super::super::{Change, KeyValue, Revision, StoreError};
use super::State;

const MAGIC: &[u8; 8] = b"FLEETHUB";
const VERSION: u32 = 1;
/// Larger frames are treated as damage, not data.
const MAX_FRAME: u32 = 64 << 20;

const TAG_HEADER: u8 = 1;
const TAG_ENTRY: u8 = 2;
const TAG_HISTORY: u8 = 3;
const TAG_COMMIT: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    /// First record of a file: the revision the snapshot was taken at and the history floor
    /// (watches from revisions below it get "compacted").
    Header { revision: Revision, floor: Revision },
    /// A live key of the snapshot.
    Entry(KeyValue),
    /// One retained revision of watch history (already reflected in the entries).
    History(Vec<Change>),
    /// One committed transaction, appended after the snapshot.
    Commit(Vec<Change>),
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        offset,
        reason: reason.into(),
    }
}

/// Reads the old log at `path` into the store's state. A torn tail (the last commit, never
/// acknowledged) is skipped; damage before intact records is refused.
pub(super) fn read(path: &Path) -> Result<State, StoreError> {
    let bytes = std::fs::read(path).map_err(|e| super::io_err(path, e))?;
    let contents = read_log(path, &bytes)?;
    if contents.valid_len < contents.file_len {
        tracing::warn!(
            path = %path.display(),
            valid_len = contents.valid_len,
            file_len = contents.file_len,
            "old store log ends in a torn write (a crash mid-commit); importing without it"
        );
    }
    let mut records = contents.records.into_iter();
    let Some(Record::Header { revision, floor }) = records.next() else {
        return Err(corrupt(path, 0, "the log does not start with a header"));
    };
    let mut state = State {
        revision,
        floor,
        entries: BTreeMap::new(),
        history: VecDeque::new(),
        history_bytes: 0,
    };
    for record in records {
        match record {
            Record::Entry(kv) => {
                state.entries.insert(kv.key.clone(), kv);
            }
            Record::History(changes) => state.history.extend(changes),
            Record::Commit(changes) => {
                for change in changes {
                    match &change {
                        Change::Put(kv) => {
                            state.entries.insert(kv.key.clone(), kv.clone());
                        }
                        Change::Delete { key, .. } => {
                            state.entries.remove(key);
                        }
                    }
                    state.revision = state.revision.max(change.revision());
                    state.history.push_back(change);
                }
            }
            Record::Header { .. } => return Err(corrupt(path, 0, "a second header in the log")),
        }
    }
    Ok(state)
}

// ---- decoding --------------------------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!(
                "record ends early at byte {} of {}",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "key is not UTF-8".to_string())
    }

    fn kv(&mut self) -> Result<KeyValue, String> {
        Ok(KeyValue {
            key: self.string()?,
            value: self.bytes()?,
            create_revision: self.u64()?,
            mod_revision: self.u64()?,
        })
    }

    fn changes(&mut self) -> Result<Vec<Change>, String> {
        let n = self.u32()? as usize;
        let mut changes = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            changes.push(match self.u8()? {
                0 => Change::Put(self.kv()?),
                1 => Change::Delete {
                    key: self.string()?,
                    revision: self.u64()?,
                },
                other => return Err(format!("unknown change kind {other}")),
            });
        }
        Ok(changes)
    }
}

fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let record = match r.u8()? {
        TAG_HEADER => {
            if r.take(8)? != MAGIC {
                return Err("not a fleetboard store log (bad magic)".into());
            }
            let version = r.u32()?;
            if version != VERSION {
                return Err(format!(
                    "store log format version {version}, this hub reads {VERSION}"
                ));
            }
            Record::Header {
                revision: r.u64()?,
                floor: r.u64()?,
            }
        }
        TAG_ENTRY => Record::Entry(r.kv()?),
        TAG_HISTORY => Record::History(r.changes()?),
        TAG_COMMIT => Record::Commit(r.changes()?),
        other => return Err(format!("unknown record tag {other}")),
    };
    if r.pos != payload.len() {
        return Err(format!(
            "{} trailing bytes in record",
            payload.len() - r.pos
        ));
    }
    Ok(record)
}

/// The records of a log file, and where its valid part ends.
struct LogContents {
    pub records: Vec<Record>,
    /// Length of the valid prefix; bytes after it are a torn tail to truncate.
    pub valid_len: u64,
    pub file_len: u64,
}

/// Parses `bytes` (the whole log file at `path`).
fn read_log(path: &Path, bytes: &[u8]) -> Result<LogContents, StoreError> {
    let file_len = bytes.len() as u64;
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let damage = if rest.len() < 8 {
            Some(("incomplete frame header".to_string(), true))
        } else {
            let len = u32::from_le_bytes(rest[0..4].try_into().unwrap());
            let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
            let frame_end = 8u64 + len as u64;
            let reaches_eof = frame_end >= rest.len() as u64;
            if len == 0 || len > MAX_FRAME {
                Some((format!("implausible frame length {len}"), reaches_eof))
            } else if reaches_eof && frame_end > rest.len() as u64 {
                Some(("frame extends past the end of the file".to_string(), true))
            } else {
                let payload = &rest[8..frame_end as usize];
                if crc32fast::hash(payload) != crc {
                    Some(("checksum mismatch".to_string(), reaches_eof))
                } else {
                    let record = decode_payload(payload).map_err(|reason| StoreError::Corrupt {
                        path: path.display().to_string(),
                        offset: pos as u64,
                        reason,
                    })?;
                    records.push(record);
                    pos += frame_end as usize;
                    None
                }
            }
        };
        if let Some((reason, at_tail)) = damage {
            // Only the last frame can be torn by a crash (commits are fsynced one at a time);
            // a zero-filled tail is what some filesystems leave after a crash mid-extension.
            if at_tail || rest.iter().all(|b| *b == 0) {
                return Ok(LogContents {
                    records,
                    valid_len: pos as u64,
                    file_len,
                });
            }
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                offset: pos as u64,
                reason,
            });
        }
    }
    Ok(LogContents {
        records,
        valid_len: pos as u64,
        file_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The old writer's encoding, kept only to build test input.
    fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
        buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        buf.extend_from_slice(b);
    }

    fn put_kv(buf: &mut Vec<u8>, kv: &KeyValue) {
        put_bytes(buf, kv.key.as_bytes());
        put_bytes(buf, &kv.value);
        buf.extend_from_slice(&kv.create_revision.to_le_bytes());
        buf.extend_from_slice(&kv.mod_revision.to_le_bytes());
    }

    fn put_changes(buf: &mut Vec<u8>, changes: &[Change]) {
        buf.extend_from_slice(&(changes.len() as u32).to_le_bytes());
        for change in changes {
            match change {
                Change::Put(kv) => {
                    buf.push(0);
                    put_kv(buf, kv);
                }
                Change::Delete { key, revision } => {
                    buf.push(1);
                    put_bytes(buf, key.as_bytes());
                    buf.extend_from_slice(&revision.to_le_bytes());
                }
            }
        }
    }

    impl Record {
        fn frame(&self) -> Vec<u8> {
            let mut payload = Vec::new();
            match self {
                Record::Header { revision, floor } => {
                    payload.push(TAG_HEADER);
                    payload.extend_from_slice(MAGIC);
                    payload.extend_from_slice(&VERSION.to_le_bytes());
                    payload.extend_from_slice(&revision.to_le_bytes());
                    payload.extend_from_slice(&floor.to_le_bytes());
                }
                Record::Entry(kv) => {
                    payload.push(TAG_ENTRY);
                    put_kv(&mut payload, kv);
                }
                Record::History(changes) => {
                    payload.push(TAG_HISTORY);
                    put_changes(&mut payload, changes);
                }
                Record::Commit(changes) => {
                    payload.push(TAG_COMMIT);
                    put_changes(&mut payload, changes);
                }
            }
            let mut frame = Vec::with_capacity(payload.len() + 8);
            frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            frame.extend_from_slice(&payload);
            frame
        }
    }

    fn kv(key: &str, rev: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: vec![1, 2, 3],
            create_revision: rev,
            mod_revision: rev,
        }
    }

    fn sample() -> Vec<Record> {
        vec![
            Record::Header {
                revision: 3,
                floor: 1,
            },
            Record::Entry(kv("a", 2)),
            Record::History(vec![Change::Put(kv("a", 2))]),
            Record::Commit(vec![
                Change::Put(kv("b", 4)),
                Change::Delete {
                    key: "a".into(),
                    revision: 4,
                },
            ]),
        ]
    }

    fn encode(records: &[Record]) -> Vec<u8> {
        records.iter().flat_map(|r| r.frame()).collect()
    }

    #[test]
    fn records_round_trip() {
        let bytes = encode(&sample());
        let log = read_log(Path::new("t"), &bytes).unwrap();
        assert_eq!(log.records, sample());
        assert_eq!(log.valid_len, bytes.len() as u64);
    }

    #[test]
    fn every_truncation_of_the_last_frame_is_a_torn_tail() {
        let full = encode(&sample());
        let prefix_len = encode(&sample()[..3]).len();
        for cut in prefix_len..full.len() {
            let log = read_log(Path::new("t"), &full[..cut]).unwrap();
            assert_eq!(log.records, sample()[..3], "cut at {cut}");
            assert_eq!(log.valid_len, prefix_len as u64);
        }
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let mut bytes = encode(&sample());
        let len = bytes.len();
        bytes.extend_from_slice(&[0u8; 100]);
        let log = read_log(Path::new("t"), &bytes).unwrap();
        assert_eq!(log.valid_len, len as u64);
    }

    #[test]
    fn damage_before_intact_frames_is_refused() {
        let mut bytes = encode(&sample());
        // flip a byte inside the second frame's payload
        let first = sample()[0].frame().len();
        bytes[first + 10] ^= 0xff;
        match read_log(Path::new("t"), &bytes) {
            Err(StoreError::Corrupt { offset, .. }) => assert_eq!(offset, first as u64),
            other => panic!("expected Corrupt, got {:?}", other.map(|l| l.records)),
        }
    }
}

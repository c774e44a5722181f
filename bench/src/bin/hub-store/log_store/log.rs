//! The embedded store's file format: a log of checksummed records.
//!
//! ```text
//! file    := frame*
//! frame   := len:u32le crc32(payload):u32le payload[len]
//! payload := Header | Entry | History | Commit        (first byte is the tag)
//! ```
//! A file is always `Header Entry* History* Commit*`: a snapshot (the live keys at the
//! header's revision plus the retained watch history) followed by the commits appended since.
//! Snapshots are written to a temp file, fsynced and renamed over the log, so the file is
//! either the old one or the new one. Commits are appended and fsynced before they are
//! acknowledged, so only the last frame can be torn by a crash; [`read_log`] drops a torn
//! tail and refuses a damaged frame that has intact data after it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fleet_hub::store::{Change, KeyValue, Revision, StoreError};

const MAGIC: &[u8; 8] = b"FLEETHUB";
const VERSION: u32 = 1;
/// Larger frames are treated as damage, not data.
const MAX_FRAME: u32 = 64 << 20;

const TAG_HEADER: u8 = 1;
const TAG_ENTRY: u8 = 2;
const TAG_HISTORY: u8 = 3;
const TAG_COMMIT: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record {
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

pub(super) fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

// ---- encoding --------------------------------------------------------------------------

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_u32(buf, b.len() as u32);
    buf.extend_from_slice(b);
}

fn put_kv(buf: &mut Vec<u8>, kv: &KeyValue) {
    put_bytes(buf, kv.key.as_bytes());
    put_bytes(buf, &kv.value);
    put_u64(buf, kv.create_revision);
    put_u64(buf, kv.mod_revision);
}

fn put_changes(buf: &mut Vec<u8>, changes: &[Change]) {
    put_u32(buf, changes.len() as u32);
    for change in changes {
        match change {
            Change::Put(kv) => {
                buf.push(0);
                put_kv(buf, kv);
            }
            Change::Delete { key, revision } => {
                buf.push(1);
                put_bytes(buf, key.as_bytes());
                put_u64(buf, *revision);
            }
        }
    }
}

impl Record {
    fn encode_payload(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        match self {
            Record::Header { revision, floor } => {
                buf.push(TAG_HEADER);
                buf.extend_from_slice(MAGIC);
                put_u32(&mut buf, VERSION);
                put_u64(&mut buf, *revision);
                put_u64(&mut buf, *floor);
            }
            Record::Entry(kv) => {
                buf.push(TAG_ENTRY);
                put_kv(&mut buf, kv);
            }
            Record::History(changes) => {
                buf.push(TAG_HISTORY);
                put_changes(&mut buf, changes);
            }
            Record::Commit(changes) => {
                buf.push(TAG_COMMIT);
                put_changes(&mut buf, changes);
            }
        }
        buf
    }

    /// The record as one frame (length, checksum, payload).
    pub(super) fn frame(&self) -> Vec<u8> {
        let payload = self.encode_payload();
        let mut frame = Vec::with_capacity(payload.len() + 8);
        put_u32(&mut frame, payload.len() as u32);
        put_u32(&mut frame, crc32fast::hash(&payload));
        frame.extend_from_slice(&payload);
        frame
    }
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
pub(super) struct LogContents {
    pub records: Vec<Record>,
    /// Length of the valid prefix; bytes after it are a torn tail to truncate.
    pub valid_len: u64,
    pub file_len: u64,
}

/// Parses `bytes` (the whole log file at `path`).
pub(super) fn read_log(path: &Path, bytes: &[u8]) -> Result<LogContents, StoreError> {
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

/// fsyncs a directory so a create or rename in it is durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// The open log, appended to one fsynced frame at a time.
pub(super) struct LogWriter {
    path: PathBuf,
    file: File,
    len: u64,
    /// Set when a failed append could not be rolled back: the file may end in a partial
    /// frame, so no further frame may follow it until the store is reopened.
    poisoned: bool,
    pub commits_since_snapshot: u64,
}

impl LogWriter {
    pub fn open(path: &Path, len: u64, commits_since_snapshot: u64) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            len,
            poisoned: false,
            commits_since_snapshot,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one frame and fsyncs it; on failure the file is cut back to where it was.
    pub fn append(&mut self, frame: &[u8]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(io_err(
                &self.path,
                std::io::Error::other(
                    "an earlier failed write could not be rolled back; reopen the store",
                ),
            ));
        }
        let result = self
            .file
            .write_all_at(frame, self.len)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                if self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data())
                    .is_err()
                {
                    self.poisoned = true;
                }
                Err(io_err(&self.path, e))
            }
        }
    }
}

/// Writes `records` to `path` as a complete new log: temp file, fsync, rename, fsync dir.
/// Returns the new file's length.
pub(super) fn write_snapshot(
    path: &Path,
    records: impl Iterator<Item = Record>,
) -> Result<u64, StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("log.tmp");
    let mut file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut out = std::io::BufWriter::new(&mut file);
    let mut len = 0u64;
    for record in records {
        let frame = record.frame();
        len += frame.len() as u64;
        out.write_all(&frame).map_err(|e| io_err(&tmp, e))?;
    }
    out.flush().map_err(|e| io_err(&tmp, e))?;
    drop(out);
    file.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(dir)?;
    Ok(len)
}

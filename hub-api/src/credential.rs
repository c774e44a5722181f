//! A member cluster's credential file at rest (`m.<cluster>.<secret>`, mode 0600): written
//! once by whichever controller replica joins first, read by its other replicas and by the
//! cluster's other hub clients (`fleet-dns`, which only reads it).
//!
//! The file is created with `link(2)` from a complete temporary file, so a second writer fails
//! instead of replacing it and a reader never sees half a file. A replica without it (and
//! without a join string) waits for it to appear.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::ClusterId;
use crate::wire::Credential;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read the credential file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the credential file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the credential file {path} is not a member credential (`m.<cluster>.<secret>`); \
         remove it and join again with a token"
    )]
    Malformed { path: PathBuf },
    #[error(
        "the credential file {path} belongs to cluster {found}, but this controller runs \
         --cluster {expected}; point --credential-file at {expected}'s credential"
    )]
    OtherCluster {
        path: PathBuf,
        found: ClusterId,
        expected: ClusterId,
    },
    #[error(
        "the credential file {path} has mode {mode:o}, readable by others; run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "the credential file {path} was created by another replica while this one joined; \
         that replica's join is the one that counts"
    )]
    LostRace { path: PathBuf },
}

/// Reads the member credential in `path`, whichever cluster it belongs to; `Ok(None)` if the
/// file does not exist. Refused: a file others may read, or one that is not a member
/// credential.
pub fn read_member_credential(
    path: &Path,
) -> Result<Option<(ClusterId, Credential)>, CredentialError> {
    let read = |source| CredentialError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    match Credential::parse(&text) {
        Some(Credential::Member { cluster, secret }) => Ok(Some((
            cluster.clone(),
            Credential::Member { cluster, secret },
        ))),
        _ => Err(CredentialError::Malformed {
            path: path.to_owned(),
        }),
    }
}

/// Reads `cluster`'s member credential in `path`; `Ok(None)` if the file does not exist.
pub fn load_credential(
    path: &Path,
    cluster: &ClusterId,
) -> Result<Option<Credential>, CredentialError> {
    match read_member_credential(path)? {
        None => Ok(None),
        Some((found, _)) if &found != cluster => Err(CredentialError::OtherCluster {
            path: path.to_owned(),
            found,
            expected: cluster.clone(),
        }),
        Some((_, credential)) => Ok(Some(credential)),
    }
}

/// Writes `credential` to `path` (0600) unless the file exists; never replaces one.
pub fn store_credential(path: &Path, credential: &Credential) -> Result<(), CredentialError> {
    let write = |source| CredentialError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        // 0700 whatever the umask: whoever may write the directory may replace the file.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(write)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per writer: replicas in other containers may share a PID, threads share one.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write)?;
    let result = (|| {
        f.write_all(format!("{}\n", credential.expose()).as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(CredentialError::LostRace {
            path: path.to_owned(),
        }),
        Err(e) => Err(write(e)),
    }
}

/// Waits until the credential file exists (another replica joins), checking every `poll`.
pub async fn wait_for_credential(
    path: &Path,
    cluster: &ClusterId,
    poll: Duration,
) -> Result<Credential, CredentialError> {
    let mut logged = false;
    loop {
        if let Some(c) = load_credential(path, cluster)? {
            return Ok(c);
        }
        if !logged {
            tracing::info!(path = %path.display(), "no credential file and no --join: waiting for another replica to join");
            logged = true;
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cluster: &str) -> Credential {
        Credential::Member {
            cluster: ClusterId::new(cluster).unwrap(),
            secret: "ab".repeat(32),
        }
    }

    #[test]
    fn credential_is_written_0600_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/aa.credential");
        let aa = ClusterId::new("aa").unwrap();
        assert!(load_credential(&path, &aa).unwrap().is_none());
        store_credential(&path, &member("aa")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700, "a directory it creates is private too");
        assert_eq!(load_credential(&path, &aa).unwrap(), Some(member("aa")));
        // A second writer loses and changes nothing.
        let other = Credential::Member {
            cluster: aa.clone(),
            secret: "cd".repeat(32),
        };
        assert!(matches!(
            store_credential(&path, &other),
            Err(CredentialError::LostRace { .. })
        ));
        assert_eq!(load_credential(&path, &aa).unwrap(), Some(member("aa")));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn racing_writers_leave_exactly_one_credential() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aa.credential");
        let aa = ClusterId::new("aa").unwrap();
        let results: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let path = path.clone();
                    let aa = aa.clone();
                    s.spawn(move || {
                        let c = Credential::Member {
                            cluster: aa,
                            secret: format!("{i:x}").repeat(64),
                        };
                        store_credential(&path, &c).is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
        assert!(load_credential(&path, &aa).unwrap().is_some());
    }

    #[test]
    fn wrong_cluster_garbage_and_open_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let aa = ClusterId::new("aa").unwrap();
        let path = dir.path().join("bb.credential");
        store_credential(&path, &member("bb")).unwrap();
        let err = load_credential(&path, &aa).unwrap_err();
        assert!(matches!(err, CredentialError::OtherCluster { .. }), "{err}");
        // Read without knowing the cluster: the file says whose it is.
        assert_eq!(
            read_member_credential(&path).unwrap(),
            Some((ClusterId::new("bb").unwrap(), member("bb")))
        );
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "not a credential").unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_credential(&garbage, &aa),
            Err(CredentialError::Malformed { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_credential(&path, &ClusterId::new("bb").unwrap()),
            Err(CredentialError::Permissions { mode: 0o644, .. })
        ));
    }

    #[tokio::test]
    async fn a_replica_without_the_file_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aa.credential");
        let aa = ClusterId::new("aa").unwrap();
        let waiter = tokio::spawn({
            let path = path.clone();
            let aa = aa.clone();
            async move { wait_for_credential(&path, &aa, Duration::from_millis(20)).await }
        });
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!waiter.is_finished());
        store_credential(&path, &member("aa")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, member("aa"));
    }
}

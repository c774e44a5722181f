//! Unix sockets and directories only root can reach, from their first instant, whatever the
//! process umask: a socket is bound inside a fresh 0700 staging directory, set to 0600 there,
//! then renamed onto its final path (an atomic replace of a stale one). A plain `bind` then
//! `chmod` leaves a window in which anyone may connect (issue 12, item 11).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Creates `dir` and its missing parents with `mode` (the umask can only take bits away, and
/// `mode` is set again explicitly on `dir` if this call made it). An existing `dir` is left as
/// it is, except that write access for group and others is removed: whoever may write to a
/// directory may replace the sockets and files in it. A sticky directory (`/tmp`) is left
/// alone: there only the owner may remove or rename an entry.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) => {
            let current = meta.permissions().mode() & 0o7777;
            if current & 0o022 != 0 && current & 0o1000 == 0 {
                tracing::warn!(dir = %dir.display(), mode = format!("{current:o}"), "directory writable by others; removing group/other write");
                fs::set_permissions(dir, fs::Permissions::from_mode(current & !0o022))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        }
        Err(e) => Err(e),
    }
}

/// Binds a unix socket at `path` that only its owner (root) can connect to, at no instant
/// wider than 0600. A socket already at `path` is replaced; the caller decides beforehand
/// whether that one is still served. Missing parent directories are made 0755.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name")
    })?;
    ensure_dir(parent, 0o755)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let staging = parent.join(format!(
        ".{}.bind-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // create() (not recursive) fails if the name exists: nobody can have prepared it for us.
    fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = (|| {
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))?;
        let staged = staging.join(name);
        let listener = UnixListener::bind(&staged)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = fs::remove_dir_all(&staging);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_0600_and_dirs_are_private_under_umask_000() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("made").join("s.sock");
        // The umask is process-wide: this is the only test in this crate that changes it.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let listener = bind_private(&path);
        let priv_dir = dir.path().join("private");
        let made = ensure_dir(&priv_dir, 0o700);
        nix::sys::stat::umask(old);
        let _listener = listener.unwrap();
        made.unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o755);
        assert_eq!(mode(&priv_dir), 0o700);
        // Nothing but the socket is left in its directory.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("s.sock")]);
        // A stale socket is replaced.
        drop(_listener);
        let _again = bind_private(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        // A group/other-writable directory is tightened.
        fs::set_permissions(&priv_dir, fs::Permissions::from_mode(0o777)).unwrap();
        ensure_dir(&priv_dir, 0o700).unwrap();
        assert_eq!(mode(&priv_dir), 0o755);
        // A sticky one is not.
        fs::set_permissions(&priv_dir, fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_dir(&priv_dir, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&priv_dir).unwrap().permissions().mode() & 0o7777,
            0o1777
        );
    }
}

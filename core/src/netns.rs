//! Network namespaces: run netlink work inside a netns on a dedicated OS thread, and create or
//! delete the named netns (`/run/netns/<name>`) that holds a node's fleet datapath.
//!
//! `setns` changes only the calling thread, so namespace work never runs on a tokio worker:
//! each call gets a fresh thread that enters the netns, opens its netlink sockets there (a
//! netlink socket stays bound to the netns it was opened in) and exits when the work is done.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::Handle;

pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} does not exist: {source}")]
    NotFound {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot open a netlink socket in {path}: {source}")]
    Netlink {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create network namespace {path}: {reason}")]
    Create { path: PathBuf, reason: String },
    #[error("netns worker thread for {path} failed: {reason}")]
    Thread { path: PathBuf, reason: String },
}

/// Path of a named netns.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Opens a netns file, telling a missing netns apart from other failures.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            NetnsError::NotFound {
                path: path.to_owned(),
                source,
            }
        } else {
            NetnsError::Open {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Runs `work` with a netlink handle opened inside each of `netns` (in order), on a dedicated
/// thread with its own single-threaded runtime. The caller's thread and runtime never change
/// namespace. A missing netns is reported before any thread is started.
pub async fn with_netlink<T, F, Fut>(netns: Vec<PathBuf>, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce(Vec<Handle>) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let files = netns
        .iter()
        .map(|p| open(p).map(|f| (p.clone(), f)))
        .collect::<Result<Vec<_>, _>>()?;
    let label = netns.first().cloned().unwrap_or_default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fleet-netns".into())
        .spawn(move || {
            let _ = tx.send(run_on_this_thread(files, work));
        })
        .map_err(|e| NetnsError::Thread {
            path: label.clone(),
            reason: e.to_string(),
        })?;
    rx.await.map_err(|_| NetnsError::Thread {
        path: label,
        reason: "worker panicked".into(),
    })?
}

/// Runs blocking `work` on a dedicated thread that has entered `netns`, for programs spawned
/// there (a child process starts in the netns of the thread that spawns it, e.g. `nft`). The
/// caller's thread and runtime never change namespace. A missing netns is reported before any
/// thread is started.
pub async fn run_in<T, F>(netns: &Path, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = open(netns)?;
    let path = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let label = path.clone();
    std::thread::Builder::new()
        .name("fleet-netns".into())
        .spawn(move || {
            let entered = setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Enter { path, source });
            let _ = tx.send(entered.map(|()| work()));
        })
        .map_err(|e| NetnsError::Thread {
            path: label.clone(),
            reason: e.to_string(),
        })?;
    rx.await.map_err(|_| NetnsError::Thread {
        path: label,
        reason: "worker panicked".into(),
    })?
}

fn run_on_this_thread<T, F, Fut>(files: Vec<(PathBuf, File)>, work: F) -> Result<T, NetnsError>
where
    F: FnOnce(Vec<Handle>) -> Fut,
    Fut: Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NetnsError::Thread {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?;
    let _guard = rt.enter();
    let mut handles = Vec::with_capacity(files.len());
    for (path, file) in &files {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: path.clone(),
            source,
        })?;
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetnsError::Netlink {
                path: path.clone(),
                source,
            })?;
        rt.spawn(conn);
        handles.push(handle);
    }
    Ok(rt.block_on(work(handles)))
}

/// Creates the named netns `name` unless it exists; returns its path. Mirrors `ip netns add`:
/// a fresh netns is bind-mounted onto `/run/netns/<name>` so it outlives this process.
pub fn ensure_named(name: &str) -> Result<PathBuf, NetnsError> {
    let path = named_path(name);
    if is_netns_mount(&path) {
        return Ok(path);
    }
    let err = |reason: String| NetnsError::Create {
        path: path.clone(),
        reason,
    };
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| err(format!("mkdir {NETNS_DIR}: {e}")))?;
    File::create(&path).map_err(|e| err(format!("create mount point: {e}")))?;
    let target = path.clone();
    let result = std::thread::spawn(move || -> Result<(), String> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount: {e}"))
    })
    .join()
    .map_err(|_| err("worker panicked".into()))?;
    if let Err(reason) = result {
        let _ = std::fs::remove_file(&path);
        return Err(err(reason));
    }
    Ok(path)
}

/// Deletes the named netns (unmount + remove); a missing one is not an error.
pub fn delete_named(name: &str) -> Result<(), NetnsError> {
    let path = named_path(name);
    if !path.exists() {
        return Ok(());
    }
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    std::fs::remove_file(&path).map_err(|e| NetnsError::Create {
        path: path.clone(),
        reason: format!("remove: {e}"),
    })
}

/// True when `path` is a mounted netns (and not just a leftover empty file).
fn is_netns_mount(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(target), Ok(parent)) = (std::fs::metadata(path), std::fs::metadata(NETNS_DIR)) else {
        return false;
    };
    // A bind-mounted nsfs file lives on a different device than the directory holding it.
    target.dev() != parent.dev()
}

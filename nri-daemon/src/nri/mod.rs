//! NRI: the ttrpc plugin transport towards containerd / CRI-O.
//!
//! [`run`] keeps fleet-nri registered as an NRI plugin: it connects to the runtime's NRI
//! socket, multiplexes it ([`mux`]), serves the Plugin service ([`plugin`]) and registers on
//! the Runtime service, and reconnects whenever the runtime goes away. The node logic sees
//! only [`handler::NriHandler`] calls.

pub mod convert;
pub mod handler;
pub mod mux;
pub mod plugin;
mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

pub use handler::{ContainerAdjust, ContainerInfo, NriHandler, PodSandboxInfo};

/// Where and as what fleet-nri registers.
#[derive(Debug, Clone)]
pub struct NriConfig {
    /// The runtime's NRI socket (containerd: `/var/run/nri/nri.sock`).
    pub socket: PathBuf,
    /// Plugin name the runtime shows in its logs.
    pub plugin_name: String,
    /// Two-digit invocation index; plugins are called in ascending order.
    pub plugin_idx: String,
    /// Pause between connection attempts while the runtime is down.
    pub reconnect_interval: Duration,
}

impl Default for NriConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/nri/nri.sock"),
            plugin_name: "fleetboard".to_string(),
            plugin_idx: "10".to_string(),
            reconnect_interval: Duration::from_millis(100),
        }
    }
}

/// Registration state, shared with the node API's status report. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct NriStatus(Arc<StatusInner>);

#[derive(Debug, Default)]
struct StatusInner {
    registered: AtomicBool,
    registrations: AtomicU64,
}

impl NriStatus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the runtime currently has us registered.
    pub fn registered(&self) -> bool {
        self.0.registered.load(Ordering::Acquire)
    }

    /// Successful registrations since start; grows by one per runtime (re)start.
    pub fn registrations(&self) -> u64 {
        self.0.registrations.load(Ordering::Acquire)
    }

    pub(crate) fn set_registered(&self) {
        self.0.registrations.fetch_add(1, Ordering::AcqRel);
        self.0.registered.store(true, Ordering::Release);
    }

    pub(crate) fn set_unregistered(&self) {
        self.0.registered.store(false, Ordering::Release);
    }
}

/// Stays registered with the runtime until `shutdown` becomes true: connects, registers,
/// serves, and after the connection drops (runtime restart) or while the socket is absent,
/// retries every `reconnect_interval`.
pub async fn run(
    cfg: NriConfig,
    handler: Arc<dyn NriHandler>,
    status: NriStatus,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tracing::info!(socket = %cfg.socket.display(), plugin = %cfg.plugin_name, idx = %cfg.plugin_idx, "NRI plugin starting");
    let mut last_error = String::new();
    while !*shutdown.borrow() {
        match session::serve(&cfg, handler.clone(), &status, &mut shutdown).await {
            Ok(()) => last_error.clear(),
            Err(e) => {
                // While the runtime is down the same error repeats every interval: log changes.
                let msg = format!("{e:#}");
                if msg != last_error {
                    tracing::warn!(socket = %cfg.socket.display(), error = %msg, "NRI connection failed; retrying");
                    last_error = msg;
                } else {
                    tracing::trace!(socket = %cfg.socket.display(), error = %msg, "NRI connection failed; retrying");
                }
            }
        }
        status.set_unregistered();
        tokio::select! {
            _ = tokio::time::sleep(cfg.reconnect_interval) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    status.set_unregistered();
    tracing::info!("NRI plugin stopped");
    Ok(())
}

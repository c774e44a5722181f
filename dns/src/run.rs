//! The daemon: follows the hub with the fleet mirror and serves this cluster's imports.
//!
//! ```text
//!  hub ──list+watch──▶ FleetMirror ──changed()──▶ own cluster's import/* records
//!        (HubClient with the cluster's credential)      │ (only when their revisions moved)
//!                      imports_from_records (live clusters only) ─▶ DnsTable::build
//!                                                        │
//!  client ─UDP/TCP─▶ server::serve ◀── watch<Arc<DnsTable>> (whole table swapped)
//! ```
//!
//! The sockets are bound first (inside `--netns` if given, on a thread of their own), so a
//! port that cannot be had fails the start. Until the first listing the table is empty (SOA and
//! `dns-version` only); while the hub is unreachable the mirror keeps the last fleet and the
//! last table keeps being served. Nothing is ever fetched per query.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::credential::{CredentialError, read_member_credential};
use fleet_hub_api::mirror::{Fleet, FleetMirror, MirrorReader, WatcherConfig};
use fleet_hub_api::model::{ClusterId, Revision};
use fleet_hub_api::records::IMPORT_RECORD_PREFIX;
use fleet_hub_api::wire::CaHash;
use fleet_services::import::imports_from_records;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::metrics::DnsMetrics;
use crate::server::{ServerConfig, serve};
use crate::table::{DnsConfig, DnsTable, TableError};

/// Everything the daemon needs (the binary's flags, parsed).
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The hub's API addresses, `host:port`, tried in turn.
    pub hubs: Vec<String>,
    /// The hub CA's SHA-256 (pinned).
    pub ca: CaHash,
    /// The cluster's credential file, written by its controller at the join; only read.
    pub credential_file: PathBuf,
    /// The cluster whose imports are served; must match the credential if given.
    pub cluster: Option<ClusterId>,
    pub dns: DnsConfig,
    /// UDP and TCP address to serve on.
    pub listen: SocketAddr,
    /// A named netns (`/run/netns/<name>`) to bind the sockets in.
    pub netns: Option<String>,
    pub server: ServerConfig,
    /// Serve `/metrics` here (`--metrics-address`); `None`: no metrics endpoint.
    pub metrics_address: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(
        "no credential file at {0}: start fleet-dns after the cluster's controller has joined \
         the hub (it writes that file), or point --credential at it"
    )]
    NoCredential(PathBuf),
    #[error(
        "the credential file {path} belongs to cluster {found}, not --cluster {expected}: point \
         --credential at {expected}'s credential or drop --cluster"
    )]
    OtherCluster {
        path: PathBuf,
        found: ClusterId,
        expected: ClusterId,
    },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("cannot set up the hub client: {0}")]
    Client(String),
    #[error("cannot enter the netns {netns} (/run/netns/{netns}): {source}")]
    Netns {
        netns: String,
        source: std::io::Error,
    },
    #[error(
        "cannot bind {proto} {addr}{where_}: {source} (another DNS server on that port? choose \
         another with --listen)"
    )]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        where_: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Metrics(std::io::Error),
    #[error("the DNS server stopped: {0}")]
    Serve(std::io::Error),
}

/// Reads the credential, binds the sockets, then serves until `stop` turns true (or its
/// sender goes away).
pub async fn run(config: DaemonConfig, mut stop: watch::Receiver<bool>) -> Result<(), DaemonError> {
    let (cluster, client) = hub_client(&config)?;
    let empty = DnsTable::empty(&config.dns)?;
    let (udp, tcp) = bind(config.listen, config.netns.as_deref())?;
    tracing::info!(%cluster, listen = %config.listen, netns = config.netns.as_deref().unwrap_or("-"), zones = ?config.dns.zones, "fleet-dns serving");

    let metrics = config.server.metrics.clone();
    let metrics_server = match config.metrics_address {
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            fleet_metrics::register_build_info(
                &mut registry,
                "fleet-dns",
                env!("CARGO_PKG_VERSION"),
            );
            registry.register_collector(metrics.collector());
            let (_, task) = fleet_metrics::serve(addr, Arc::new(registry))
                .await
                .map_err(DaemonError::Metrics)?;
            Some(task)
        }
        None => None,
    };
    metrics.table_built(empty.len());
    let (tables_tx, tables) = watch::channel(Arc::new(empty));
    let server = tokio::spawn(serve(udp, tcp, tables, config.server.clone(), stop.clone()));
    let mirror = FleetMirror::spawn(Arc::new(client), WatcherConfig::default());
    let mut follower = Follower::new(cluster, config.dns.clone(), metrics);
    let mut reader = mirror.reader();
    loop {
        follower.apply(&mut reader, &tables_tx);
        tokio::select! {
            changed = reader.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    drop(mirror);
    if let Some(task) = metrics_server {
        task.abort();
    }
    // The server watches the same stop signal; if the mirror ended instead, stop it too.
    let _ = stop.wait_for(|s| *s).await;
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(DaemonError::Serve(e)),
        Err(e) => Err(DaemonError::Serve(std::io::Error::other(e))),
    }
}

/// The cluster (from the credential) and a hub client that speaks as it.
fn hub_client(config: &DaemonConfig) -> Result<(ClusterId, HubClient), DaemonError> {
    let path = &config.credential_file;
    let (found, credential) =
        read_member_credential(path)?.ok_or_else(|| DaemonError::NoCredential(path.clone()))?;
    if let Some(expected) = &config.cluster
        && *expected != found
    {
        return Err(DaemonError::OtherCluster {
            path: path.clone(),
            found,
            expected: expected.clone(),
        });
    }
    let client = HubClient::new(
        config.hubs.clone(),
        config.ca,
        // Only its own cluster's `import/*` records are read: the member scope.
        ClientOptions {
            scope: fleet_hub_api::model::FleetScope::Member,
            ..ClientOptions::default()
        },
    )
    .map_err(|e| DaemonError::Client(e.to_string()))?
    .with_credential(credential);
    Ok((found, client))
}

/// Rebuilds the table from the cluster's own `import/*` records whenever they change.
struct Follower {
    cluster: ClusterId,
    dns: DnsConfig,
    /// (name, revision) of the import records the current table was built from.
    built_from: Option<Vec<(String, Revision)>>,
    /// Unreadable records already logged (logged once each while they stay).
    logged_unreadable: BTreeSet<(String, Revision)>,
    hub_down: bool,
    metrics: DnsMetrics,
}

impl Follower {
    fn new(cluster: ClusterId, dns: DnsConfig, metrics: DnsMetrics) -> Self {
        Follower {
            cluster,
            dns,
            built_from: None,
            logged_unreadable: BTreeSet::new(),
            hub_down: false,
            metrics,
        }
    }

    fn apply(&mut self, reader: &mut MirrorReader, tables: &watch::Sender<Arc<DnsTable>>) {
        let state = reader.mark_seen();
        match (&state.error, self.hub_down) {
            (Some(error), false) => {
                tracing::warn!(%error, "hub unreachable: serving the last table until it is back");
                self.hub_down = true;
            }
            (None, true) => {
                tracing::info!("hub reachable again: following it");
                self.hub_down = false;
            }
            _ => {}
        }
        self.metrics.set_hub_reachable(state.error.is_none());
        let Some(fleet) = state.fleet else { return };
        if let Some(table) = self.rebuild(&fleet) {
            self.metrics.table_built(table.len());
            drop(tables.send_replace(Arc::new(table)));
            release_free_memory();
        }
    }

    /// The new table, or `None` when the import records did not change.
    fn rebuild(&mut self, fleet: &Fleet) -> Option<DnsTable> {
        let empty = Default::default();
        let records = fleet.records.get(&self.cluster).unwrap_or(&empty);
        let versions: Vec<(String, Revision)> = records
            .range(IMPORT_RECORD_PREFIX.to_string()..)
            .take_while(|(name, _)| name.starts_with(IMPORT_RECORD_PREFIX))
            .map(|(name, r)| (name.clone(), r.revision))
            .collect();
        if self.built_from.as_ref() == Some(&versions) {
            return None;
        }
        let (imports, vips, unreadable) = imports_from_records(records);
        let mut still_unreadable = BTreeSet::new();
        for bad in &unreadable {
            let revision = records.get(&bad.record).map_or(0, |r| r.revision);
            let key = (bad.record.clone(), revision);
            if !self.logged_unreadable.contains(&key) {
                tracing::warn!(cluster = %bad.cluster, record = %bad.record, error = %bad.error, "import record left out of the DNS table");
            }
            still_unreadable.insert(key);
        }
        self.logged_unreadable = still_unreadable;
        let table = match DnsTable::build(&self.dns, &imports, &vips) {
            Ok(table) => table,
            Err(error) => {
                // The zones were valid at start; nothing in the records can make them invalid.
                tracing::error!(%error, "DNS table not rebuilt");
                return None;
            }
        };
        tracing::info!(
            services = imports.len(),
            names = table.len(),
            unreadable = unreadable.len(),
            "DNS table rebuilt"
        );
        self.built_from = Some(versions);
        Some(table)
    }
}

/// Hands memory freed by a rebuild (the previous table, the parsed records) back to the system:
/// glibc keeps freed heap otherwise, and a large table's rebuild would leave the process at
/// its peak size.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator; it takes no pointers.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Binds UDP and TCP on `addr`, inside `/run/netns/<netns>` when given. The sockets stay in
/// that netns whatever thread later uses them.
pub fn bind(
    addr: SocketAddr,
    netns: Option<&str>,
) -> Result<(UdpSocket, TcpListener), DaemonError> {
    let (udp, tcp) = match netns {
        None => bind_std(addr, "")?,
        Some(netns) => {
            let path = Path::new("/run/netns").join(netns);
            let netns = netns.to_string();
            // setns never on a tokio worker: a thread of its own, which ends right after.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(&path).map_err(|source| DaemonError::Netns {
                        netns: netns.clone(),
                        source,
                    })?;
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                        |e| DaemonError::Netns {
                            netns: netns.clone(),
                            source: e.into(),
                        },
                    )?;
                    bind_std(addr, &format!(" in netns {netns}"))
                })
                .join()
                .expect("the netns thread does not panic")
            })?
        }
    };
    let bind_error = |proto, source| DaemonError::Bind {
        proto,
        addr,
        where_: String::new(),
        source,
    };
    Ok((
        UdpSocket::from_std(udp).map_err(|e| bind_error("UDP", e))?,
        TcpListener::from_std(tcp).map_err(|e| bind_error("TCP", e))?,
    ))
}

fn bind_std(
    addr: SocketAddr,
    where_: &str,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), DaemonError> {
    let bind_error = |proto, source| DaemonError::Bind {
        proto,
        addr,
        where_: where_.to_string(),
        source,
    };
    let udp = std::net::UdpSocket::bind(addr).map_err(|e| bind_error("UDP", e))?;
    // Port 0: TCP takes the port UDP got, so both serve one address.
    let tcp_addr = SocketAddr::new(
        addr.ip(),
        udp.local_addr().map_err(|e| bind_error("UDP", e))?.port(),
    );
    let tcp = std::net::TcpListener::bind(tcp_addr).map_err(|e| bind_error("TCP", e))?;
    udp.set_nonblocking(true)
        .map_err(|e| bind_error("UDP", e))?;
    tcp.set_nonblocking(true)
        .map_err(|e| bind_error("TCP", e))?;
    Ok((udp, tcp))
}

/// The runtime the daemon runs on: `threads == 1` is a current-thread runtime (the UDP loop is
/// one task; this is how the benchmark runs it), otherwise a multi-thread one with `threads`
/// workers (0: one per core).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            builder.worker_threads(threads);
        }
        builder.enable_all().build()
    }
}

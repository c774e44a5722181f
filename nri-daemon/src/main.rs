//! fleet-nri: parses flags, wires the node together, runs until SIGTERM/SIGINT.
//!
//! Stopping the daemon leaves every pod's link and address in place: pods keep working while
//! it restarts, and the next start picks the allocations up from the data dir. A userspace
//! WireGuard gateway stops with the process and is re-created from the data dir at the next
//! start, before the node API serves (a kernel one stays up).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use fleet_nri::config::DaemonConfig;
use fleet_nri::node::{Node, NodeEvents};
use fleet_nri::{api, nri};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "fleet-nri",
    version,
    about = "fleetboard node daemon (NRI plugin, node IPAM, node API)"
)]
struct Flags {
    /// Config file (JSON); see docs/node-api.md.
    #[arg(long, default_value = "/etc/fleetboard/node.json")]
    config: PathBuf,
    /// Override the runtime's NRI socket from the config.
    #[arg(long)]
    nri_socket: Option<PathBuf>,
    /// Override the node API socket from the config.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Run without NRI (no runtime to talk to): only the node API for fleet-cni.
    #[arg(long)]
    no_nri: bool,
    /// Serve Prometheus metrics on http://ADDRESS/metrics (e.g. 127.0.0.1:9641); off if unset.
    #[arg(long, value_name = "IP:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Also serve the node API on TCP at IP:PORT with mutual TLS (for a cluster controller on
    /// another node); needs --node-api-tls. Off if unset.
    #[arg(long, value_name = "IP:PORT", requires = "node_api_tls")]
    node_api_listen: Option<std::net::SocketAddr>,
    /// Directory with ca.crt (the node-API CA), tls.crt and tls.key (this daemon's serverAuth
    /// certificate for fleet-nri.fleetboard.internal), e.g. a mounted Secret.
    #[arg(long, value_name = "DIR", requires = "node_api_listen")]
    node_api_tls: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let flags = Flags::parse();
    let mut cfg = DaemonConfig::load(&flags.config)?;
    if let Some(s) = flags.nri_socket {
        cfg.nri_socket = s;
    }
    if let Some(s) = flags.socket {
        cfg.socket = s;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(
            cfg,
            !flags.no_nri,
            flags.metrics_address,
            flags.node_api_listen.zip(flags.node_api_tls),
        ))
}

async fn run(
    cfg: DaemonConfig,
    with_nri: bool,
    metrics_address: Option<std::net::SocketAddr>,
    node_api_tcp: Option<(std::net::SocketAddr, PathBuf)>,
) -> anyhow::Result<()> {
    // A bad TLS directory fails before anything is touched.
    let tls = match &node_api_tcp {
        Some((_, dir)) => Some(
            fleet_core::node_tls::server_config(dir)
                .context("cannot load the node API's TLS files (--node-api-tls)")?,
        ),
        None => None,
    };
    let status = nri::NriStatus::new();
    let node = Arc::new(Node::new(
        cfg.local.clone(),
        cfg.network.clone(),
        status.clone(),
    ));
    node.restore(cfg.node_plan()?)
        .await
        .context("cannot restore the node's state")?;
    let metrics_task = match metrics_address {
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            fleet_metrics::register_build_info(
                &mut registry,
                "fleet-nri",
                env!("CARGO_PKG_VERSION"),
            );
            fleet_nri::metrics::register(&mut registry, node.clone());
            Some(fleet_metrics::serve(addr, Arc::new(registry)).await?.1)
        }
        None => None,
    };
    let listener = api::bind(&cfg.socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let node_subnet = node.status().node_subnet;
    tracing::info!(socket = %cfg.socket.display(), node_subnet = %node_subnet, plan_set = !node_subnet.is_empty(), peers = node.peers().len(), allocated = node.list().len(), "fleet-nri serving");

    let api_task = tokio::spawn(api::serve(listener, node.clone(), stop_rx.clone()));
    let tcp_task = match (node_api_tcp, tls) {
        (Some((addr, _)), Some(tls)) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--node-api-listen)"))?;
            tracing::info!(address = %tcp.local_addr()?, "node API also on TCP, mutual TLS");
            Some(tokio::spawn(api::serve_tls(
                tcp,
                tls,
                node.clone(),
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    // Pods that vanished without a CNI DEL or an NRI event: reclaimed within the interval.
    let reclaim_task = tokio::spawn(node.clone().reclaim_periodically(
        std::time::Duration::from_secs(cfg.reclaim_interval_secs),
        stop_rx.clone(),
    ));
    let nri_task = with_nri.then(|| {
        let nri_cfg = nri::NriConfig {
            socket: cfg.nri_socket.clone(),
            plugin_idx: cfg.plugin_idx.clone(),
            ..nri::NriConfig::default()
        };
        tokio::spawn(nri::run(
            nri_cfg,
            Arc::new(NodeEvents(node.clone())),
            status,
            stop_rx.clone(),
        ))
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping; pods keep their links and addresses");
    let _ = stop_tx.send(true);
    let _ = api_task.await;
    if let Some(t) = tcp_task {
        let _ = t.await;
    }
    let _ = reclaim_task.await;
    if let Some(t) = nri_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), t).await;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(t) = metrics_task {
        t.abort();
    }
    Ok(())
}

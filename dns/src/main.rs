//! fleet-dns: parses flags, serves the cluster's clusterset DNS until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fleet_dns::run::{DaemonConfig, run, runtime};
use fleet_dns::{DEFAULT_TTL, DEFAULT_ZONE, DnsConfig, ServerConfig};
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::wire::CaHash;

#[derive(Parser, Debug)]
#[command(
    name = "fleet-dns",
    version,
    about = "fleetboard's authoritative DNS for clusterset.local (MCS DNS 1.0.0): serves this \
             cluster's service imports, followed from the hub"
)]
struct Flags {
    /// The hub's API addresses, host[:port] (7443 when none is given); repeat the flag or
    /// separate with commas. Checked before anything dials them (fleet_hub_api::address).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_parser = fleet_hub_api::address::hub_address
    )]
    hub: Vec<String>,
    /// The hub CA's SHA-256 (hex), as given to the controller.
    #[arg(long)]
    ca: String,
    /// The cluster's credential file, written by its controller when it joined (only read).
    #[arg(long)]
    credential_file: PathBuf,
    /// This cluster's id; checked against the credential (which names it).
    #[arg(long)]
    cluster: Option<String>,
    /// A zone to serve; repeat for several.
    #[arg(long = "zone", default_values_t = [DEFAULT_ZONE.to_string()])]
    zones: Vec<String>,
    /// TTL of every record and of negative answers: seconds, e.g. 5 or 5s.
    #[arg(long, default_value_t = DEFAULT_TTL.to_string())]
    ttl: String,
    /// Address to serve UDP and TCP on.
    #[arg(long, default_value = "0.0.0.0:53")]
    listen: SocketAddr,
    /// A named network namespace (/run/netns/NAME) to bind the sockets in, e.g. a node's CNF
    /// netns; the hub is still reached from the netns fleet-dns runs in.
    #[arg(long)]
    netns: Option<String>,
    /// The largest UDP reply, and the EDNS payload size advertised (512-65535).
    #[arg(long, default_value_t = fleet_dns::handler::DEFAULT_UDP_PAYLOAD)]
    max_udp_payload: u16,
    /// Runtime threads: 1 runs everything on one thread (the UDP loop is one task anyway);
    /// 0 is one worker per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Serve Prometheus metrics on http://ADDRESS/metrics (e.g. 127.0.0.1:9643); off if unset.
    #[arg(long, value_name = "IP:PORT")]
    metrics_address: Option<SocketAddr>,
}

fn config(f: Flags) -> anyhow::Result<DaemonConfig> {
    let ca =
        f.ca.parse::<CaHash>()
            .map_err(|_| anyhow::anyhow!("--ca: expected the hub CA's SHA-256 in hex"))?;
    let ttl = f
        .ttl
        .strip_suffix('s')
        .unwrap_or(&f.ttl)
        .parse::<u32>()
        .with_context(|| format!("--ttl {:?}: expected seconds, e.g. 5 or 5s", f.ttl))?;
    let cluster = f
        .cluster
        .map(ClusterId::new)
        .transpose()
        .context("--cluster")?;
    anyhow::ensure!(
        f.max_udp_payload >= 512,
        "--max-udp-payload {}: at least 512 (RFC 1035)",
        f.max_udp_payload
    );
    Ok(DaemonConfig {
        hubs: f.hub,
        ca,
        credential_file: f.credential_file,
        cluster,
        dns: DnsConfig {
            zones: f.zones,
            ttl,
        },
        listen: f.listen,
        netns: f.netns,
        server: ServerConfig {
            max_udp_payload: f.max_udp_payload,
            ..ServerConfig::default()
        },
        metrics_address: f.metrics_address,
    })
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let threads = flags.threads;
    let cfg = config(flags)?;
    runtime(threads)
        .context("cannot start the async runtime")?
        .block_on(async move {
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    tracing::error!("cannot install signal handlers");
                    return;
                };
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
                let _ = stop_tx.send(true);
            });
            run(cfg, stop_rx).await
        })?;
    tracing::info!("fleet-dns stopped");
    Ok(())
}

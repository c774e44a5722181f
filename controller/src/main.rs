//! fleet-controller: parses flags, runs the controller until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_controller::config::{
    DEFAULT_LEASE_NAME, DEFAULT_LEASE_NAMESPACE, LeaderElectionMode, RunConfig, parse_duration,
};
use fleet_controller::identity::default_holder;
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::wire::{CaHash, JoinString};
use fleet_proto::node::WireguardBackend;

#[derive(Parser, Debug)]
#[command(
    name = "fleet-controller",
    version,
    about = "fleetboard cluster controller: hub membership, node subnets, WireGuard gateway"
)]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (one of the cluster's replicas; the lease holder is active).
    Run(Box<RunFlags>),
    /// Make a cluster's node-API CA and its certificates (fleet-nri's serverAuth, the
    /// controller's clientAuth) into a new directory: ca.crt, ca.key, node/, controller/.
    NodeApiCerts(CertsFlags),
}

#[derive(clap::Args, Debug)]
struct CertsFlags {
    /// A directory to create (existing files are never replaced).
    #[arg(long)]
    out: PathBuf,
    /// Validity in years (1 to 100), from now (backdated an hour for clock skew).
    #[arg(
        long,
        default_value_t = 5,
        value_parser = clap::value_parser!(u16)
            .range(1..=i64::from(fleet_controller::node_api_certs::MAX_YEARS))
    )]
    years: u16,
}

#[derive(clap::Args, Debug)]
struct RunFlags {
    /// Serve Prometheus metrics on http://ADDRESS/metrics (e.g. 127.0.0.1:9640); off if unset.
    #[arg(long, value_name = "IP:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// This cluster's id (a DNS label).
    #[arg(long)]
    cluster: String,
    /// The hub's API addresses, host[:port] (7443 when none is given), comma-separated; checked
    /// before anything dials them (fleet_hub_api::address).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_parser = fleet_hub_api::address::hub_address
    )]
    hub: Vec<String>,
    /// The cluster's credential (0600), shared by its replicas; written at the first join.
    #[arg(long, required_unless_present = "credential_secret")]
    credential_file: Option<PathBuf>,
    /// Keep the credential in this Secret instead of the file ([<namespace>/]<name>, the
    /// namespace defaults to --lease-namespace): read at start, created at the first join.
    /// Needs --kubernetes on.
    #[arg(long, value_name = "[NAMESPACE/]NAME")]
    credential_secret: Option<String>,
    /// Join string `<token>.<CA sha256>`; used only while the credential file does not exist.
    /// Also read from the environment variable FLEET_JOIN (keeps it out of `ps`).
    #[arg(long)]
    join: Option<String>,
    /// The hub CA's SHA-256 (hex); needed when there is no --join.
    #[arg(long)]
    ca: Option<String>,
    /// Node-local state of this replica. Holds nothing today: the WireGuard key lives with the
    /// gateway node's fleet-nri (a `wg.key` left here by an older version is not used).
    #[arg(long)]
    data_dir: PathBuf,
    /// nodes.json: [{"name","socket","underlay_ip","netns"}, ...]; socket is a unix socket
    /// path or tcp://<ip>:<port> (needs --node-api-tls).
    #[arg(long, required_unless_present = "nodes_from_kubernetes")]
    nodes: Option<PathBuf>,
    /// The nodes from the Kubernetes API's Node objects instead of --nodes: each fleet-nri at
    /// tcp://<InternalIP>:PORT (its --node-api-listen), followed as nodes come and go. Needs
    /// --kubernetes on and --node-api-tls.
    #[arg(long, value_name = "PORT", conflicts_with = "nodes")]
    nodes_from_kubernetes: Option<u16>,
    /// Directory with ca.crt (the node-API CA), tls.crt and tls.key (the controller's
    /// clientAuth certificate) for node daemons reached over TCP.
    #[arg(long, value_name = "DIR")]
    node_api_tls: Option<PathBuf>,
    /// The node whose fleet-nri runs the WireGuard interface (in its CNF netns).
    #[arg(long)]
    gateway_node: String,
    /// Public endpoint ip:port of the gateway (other clusters tunnel to it directly).
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// WireGuard interface name on the gateway node (also names a userspace device's UAPI
    /// socket: unique per host).
    #[arg(long, default_value = "fleet-wg")]
    wg_name: String,
    /// auto, kernel or userspace (passed to the gateway node's fleet-nri).
    #[arg(long, default_value = "auto")]
    wg_backend: String,
    /// Lease holder id (default: hostname-pid).
    #[arg(long)]
    holder: Option<String>,
    #[arg(long, default_value = "3s")]
    lease_ttl: String,
    /// Where the leadership lease lives: hub (a lock in the hub's store), kubernetes (a
    /// coordination.k8s.io/v1 Lease), or auto (kubernetes when KUBERNETES_SERVICE_HOST is set).
    #[arg(long, default_value = "auto")]
    leader_election: LeaderElectionMode,
    /// Namespace of the Kubernetes Lease.
    #[arg(long, default_value = DEFAULT_LEASE_NAMESPACE)]
    lease_namespace: String,
    /// Name of the Kubernetes Lease.
    #[arg(long, default_value = DEFAULT_LEASE_NAME)]
    lease_name: String,
    /// The member cluster's Kubernetes API: on (ServiceExports are exported, their status
    /// written, Nodes followed), off, or auto (on when KUBERNETES_SERVICE_HOST is set).
    #[arg(long, default_value = "auto")]
    kubernetes: fleet_controller::config::KubernetesMode,
    /// A kubeconfig for the Kubernetes Lease and API instead of the in-cluster configuration.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Persistent keepalive towards peers we dial, seconds.
    #[arg(long, default_value_t = 25)]
    keepalive: u16,
    /// Prefix length of each node's subnet of the cluster block.
    #[arg(long, default_value_t = 24)]
    node_prefix: u8,
    #[arg(long, default_value = "5s")]
    status_interval: String,
    /// The cluster's service VIP range handed to nodes.
    #[arg(long, default_value = fleet_core::config::DEFAULT_VIP_RANGE)]
    vip_range: ipnetwork::Ipv4Network,
    /// A fleet-dns server of this cluster, put behind the DNS VIP (the VIP range's first usable
    /// address, UDP and TCP 53) on every node: ip:port, or <node>:<port> for a fleet-dns bound
    /// to that node's fleet gateway address in its CNF netns. Repeatable.
    #[arg(long = "dns-backend")]
    dns_backend: Vec<fleet_controller::config::DnsBackend>,
    /// How often the nodes' pods are read for export endpoints.
    #[arg(long, default_value = "1s")]
    endpoint_poll_interval: String,
    /// Damping: a cluster that dies a second time within 5 minutes returns only after it has
    /// been alive this long (doubling with each further death, up to 120s); 0s turns it off.
    #[arg(long, default_value = "2s")]
    liveness_hold_down: String,
}

fn config(f: RunFlags) -> anyhow::Result<RunConfig> {
    let join = f
        .join
        .or_else(|| std::env::var("FLEET_JOIN").ok().filter(|j| !j.is_empty()))
        .as_deref()
        .map(JoinString::parse)
        .transpose()
        .context("--join: expected <token id>.<token secret>.<CA sha256>")?;
    let ca =
        f.ca.as_deref()
            .map(|c| c.parse::<CaHash>())
            .transpose()
            .map_err(|_| anyhow::anyhow!("--ca: expected the hub CA's SHA-256 in hex"))?;
    let wg_backend = match f.wg_backend.as_str() {
        "auto" => None,
        other => Some(
            other
                .parse::<WireguardBackend>()
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty());
    let credential_secret = f.credential_secret.map(|s| match s.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (f.lease_namespace.clone(), s),
    });
    Ok(RunConfig {
        cluster: ClusterId::new(f.cluster)?,
        hubs: f.hub,
        credential_file: f.credential_file.unwrap_or_default(),
        credential_secret,
        node_api_tls: f.node_api_tls,
        nodes_from_api: f.nodes_from_kubernetes,
        join,
        ca,
        data_dir: f.data_dir,
        nodes_file: f.nodes.unwrap_or_default(),
        gateway_node: f.gateway_node,
        endpoint: f.endpoint,
        listen_port: f.listen_port,
        wg_name: f.wg_name,
        wg_backend,
        holder: f.holder.unwrap_or_else(default_holder),
        lease_ttl: parse_duration(&f.lease_ttl).context("--lease-ttl")?,
        leader_election: f.leader_election.resolve(
            in_cluster,
            f.lease_namespace,
            f.lease_name,
            f.kubeconfig.clone(),
        ),
        kubernetes: f.kubernetes.resolve(in_cluster, f.kubeconfig),
        keepalive: f.keepalive,
        node_prefix: f.node_prefix,
        status_interval: parse_duration(&f.status_interval).context("--status-interval")?,
        vip_range: f.vip_range,
        dns_backends: f.dns_backend,
        endpoint_poll_interval: parse_duration(&f.endpoint_poll_interval)
            .context("--endpoint-poll-interval")?,
        liveness_hold_down: parse_hold_down(&f.liveness_hold_down)?,
    })
}

/// `0s` (damping off) or a duration.
fn parse_hold_down(text: &str) -> anyhow::Result<std::time::Duration> {
    if matches!(text.trim(), "0" | "0s" | "0ms") {
        return Ok(std::time::Duration::ZERO);
    }
    parse_duration(text).context("--liveness-hold-down")
}

fn main() -> anyhow::Result<()> {
    let flags = match Flags::parse().command {
        Command::Run(flags) => *flags,
        Command::NodeApiCerts(c) => {
            let certs = fleet_controller::node_api_certs::generate(c.years)
                .context("generating the node-API certificates")?;
            fleet_controller::node_api_certs::write(&c.out, &certs)
                .with_context(|| format!("writing into {}", c.out.display()))?;
            println!(
                "{0}/node: the fleet-nri Secret; {0}/controller: the controller's Secret; \
                 {0}/ca.key: keep it outside the cluster",
                c.out.display()
            );
            return Ok(());
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| "info,gotatun=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let metrics_address = flags.metrics_address;
    let cfg = config(flags)?;
    cfg.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
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
            let metrics = fleet_controller::metrics::ControllerMetrics::default();
            let _metrics_server = match metrics_address {
                Some(addr) => {
                    let mut registry = prometheus_client::registry::Registry::default();
                    fleet_metrics::register_build_info(
                        &mut registry,
                        "fleet-controller",
                        env!("CARGO_PKG_VERSION"),
                    );
                    metrics.register(&mut registry);
                    Some(
                        fleet_metrics::serve(addr, std::sync::Arc::new(registry))
                            .await?
                            .1,
                    )
                }
                None => None,
            };
            fleet_controller::run::run_with_metrics(cfg, stop_rx, metrics).await?;
            anyhow::Ok(())
        })?;
    Ok(())
}

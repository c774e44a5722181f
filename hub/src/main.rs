//! fleet-hub: parses flags, opens the hub's store, runs an operator command.
//!
//! `serve` runs the TLS API (see `fleet_hub::api`); the other commands manage join tokens and
//! list clusters directly on the store (with the embedded store, only on a data dir `serve`
//! made and only while no hub holds it; against a serving hub use the API's admin calls).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_hub::admin::{self, StoreLocation};
use fleet_hub::api::server::{ServerOptions, serve_with_relay_until_signal};
use fleet_hub::registry::{DEFAULT_BLOCK_PREFIX, FleetLayout};
use fleet_hub::relay::RelayOptions;
use fleet_hub::store::EtcdOptions;

#[derive(Parser, Debug)]
#[command(
    name = "fleet-hub",
    version,
    about = "fleetboard hub: registry of member clusters"
)]
struct Flags {
    /// Data dir of the embedded store (ignored with --etcd): `serve` creates it; the other
    /// commands refuse a dir without the store `serve` made.
    #[arg(long, default_value = "/var/lib/fleetboard/hub")]
    data_dir: PathBuf,
    /// etcd client URLs (comma-separated) for a replicated hub, instead of the embedded store.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key namespace in etcd.
    #[arg(long, default_value = "/fleetboard/")]
    etcd_namespace: String,
    /// CA certificate (PEM) that verifies etcd's server certificate; for https:// endpoints.
    #[arg(long)]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client certificate authentication.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user (etcd `auth enable`); the password comes from --etcd-password-file.
    #[arg(long, requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (first line; keep it 0600).
    #[arg(long, requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Allow plain http:// to an etcd that is not on this host's loopback (the store holds
    /// the fleet's CA key and credentials: only on a network you trust).
    #[arg(long)]
    etcd_allow_insecure: bool,
    /// The fleet CIDR that cluster blocks are cut from (fixed for the life of a fleet).
    #[arg(long, default_value = fleet_core::config::DEFAULT_FLEET_CIDR)]
    fleet_cidr: ipnetwork::Ipv4Network,
    /// Operator commands (token, clusters, cluster) go through this serving hub's API
    /// (host:port), with the admin credential and CA from --data-dir, instead of opening the
    /// store. Port 7443 when none is given; an `https://` prefix is dropped; any other URL, or
    /// a port outside 1–65535, is refused before any connection.
    #[arg(long, value_parser = fleet_hub_api::address::hub_address)]
    hub: Option<String>,
    /// Prefix length of each cluster's block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_PREFIX)]
    block_prefix: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List member clusters (and, through --hub, the relays).
    Clusters,
    /// Manage one member cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print a one-time login link to the fleet board of the serving hub at --hub (minted with
    /// the admin credential of --data-dir; open it within 60 s, once).
    BoardUrl,
    /// Run the relay on its own, following the hub at --hub with the admin credential and CA
    /// of --data-dir (what `serve --relay-listen` starts; it outlives a killed API process).
    Relay {
        #[command(flatten)]
        relay: RelayFlags,
    },
    /// Serve the hub's TLS API (CA, server certificate and admin credential in --data-dir).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: std::net::SocketAddr,
        /// How often this replica deletes relay records whose relay stopped renewing them
        /// (every replica sweeps, relay or not): <n>ms or <n>s.
        #[arg(long, default_value = "1s", value_parser = fleet_hub::relay::parse_interval)]
        relay_sweep_interval: std::time::Duration,
        /// Most records one member may publish (node/*, gateway, export/*, import/*, ...); a
        /// publish past it is refused with `quota_exceeded`.
        #[arg(long, default_value_t = fleet_hub::registry::DEFAULT_MEMBER_MAX_RECORDS)]
        member_max_records: u64,
        /// Most bytes (record names + values) one member's records may hold together.
        #[arg(long, default_value_t = fleet_hub::registry::DEFAULT_MEMBER_MAX_BYTES)]
        member_max_bytes: u64,
        /// Serve Prometheus metrics on http://ADDRESS/metrics (e.g. 127.0.0.1:9642); off if
        /// unset.
        #[arg(long, value_name = "IP:PORT")]
        metrics_address: Option<std::net::SocketAddr>,
        /// How often a watch with nothing to say gets a heartbeat (members give up on a watch
        /// after 3 missed ones: keep their `watch_idle_timeout` in step): <n>ms or <n>s.
        #[arg(long, default_value = "1s", value_parser = fleet_hub::relay::parse_interval)]
        watch_heartbeat: std::time::Duration,
        /// End every watch (members fail over) once the store has not answered for this long.
        #[arg(long, default_value = "5s", value_parser = fleet_hub::relay::parse_interval)]
        store_quiet_after: std::time::Duration,
        /// Most API connections at once (each member holds ~3); further ones are closed at
        /// accept. Default: the open-file limit (raised to its hard limit) less 1,024.
        // Negative numbers reach the range check (a clear "not in 1.." error), not clap's
        // "unexpected argument".
        #[arg(
            long,
            value_name = "N",
            allow_negative_numbers = true,
            value_parser = clap::value_parser!(i64).range(1..)
        )]
        max_connections: Option<i64>,
        #[command(flatten)]
        relay: RelayFlags,
    },
}

#[derive(clap::Args, Debug)]
struct RelayFlags {
    /// Serve the relay process's Prometheus metrics (per-member session age and bytes,
    /// datagrams forwarded and dropped) on http://ADDRESS/metrics, in the netns the relay
    /// process runs in; off if unset.
    #[arg(long, value_name = "IP:PORT", requires = "relay_listen")]
    relay_metrics_address: Option<std::net::SocketAddr>,
    /// Run the relay: it forwards members' WireGuard datagrams from this UDP address (its IP
    /// is the default --relay-endpoint).
    #[arg(long)]
    relay_listen: Option<std::net::SocketAddr>,
    /// What members dial to reach the relay (default: --relay-listen).
    #[arg(long, requires = "relay_listen")]
    relay_endpoint: Option<std::net::SocketAddr>,
    /// Lifetime of the relay's record at the hub (<n>ms or <n>s, at least 300ms): the relay
    /// renews it every third of that; if it stops (its host died), any serving replica
    /// removes the record after this long and members switch to another relay.
    #[arg(long, default_value = "6s", value_parser = fleet_hub::relay::parse_relay_ttl)]
    relay_ttl: std::time::Duration,
}

impl RelayFlags {
    fn options(&self, data_dir: &std::path::Path) -> anyhow::Result<Option<RelayOptions>> {
        let Some(listen) = self.relay_listen else {
            return Ok(None);
        };
        let mut options = RelayOptions::new(listen, data_dir);
        options.endpoint = self.relay_endpoint.unwrap_or(listen);
        options.ttl = self.relay_ttl;
        options.metrics_address = self.relay_metrics_address;
        Ok(Some(options))
    }
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Remove a cluster: its record, block, credential, lease and published records.
    Remove { id: String },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token and print it (once) on stdout.
    Create {
        /// Lifetime: 90m, 24h, 7d...
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    // A serving hub reports what it does; an operator command only its warnings.
    let default_level = match flags.command {
        Command::Serve { .. } | Command::Relay { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: `> hub.log` and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(flags))
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    let location = if flags.etcd.is_empty() {
        StoreLocation::Embedded(flags.data_dir.clone())
    } else {
        let mut options =
            EtcdOptions::new(flags.etcd.clone()).namespace(flags.etcd_namespace.clone());
        options.ca_cert = flags.etcd_cacert.clone();
        options.client_cert = flags.etcd_cert.clone();
        options.client_key = flags.etcd_key.clone();
        options.user = flags.etcd_user.clone();
        options.allow_insecure = flags.etcd_allow_insecure;
        if let Some(path) = &flags.etcd_password_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --etcd-password-file {}", path.display()))?;
            options.password = Some(text.lines().next().unwrap_or_default().to_string());
        }
        StoreLocation::Etcd(options)
    };
    if let Command::Relay { relay } = &flags.command {
        let hub = flags
            .hub
            .as_deref()
            .context("`relay` follows a serving hub: give --hub HOST:PORT")?;
        let options = relay
            .options(&flags.data_dir)?
            .context("`relay` needs --relay-listen IP:PORT")?;
        // The relay needs the members' keys and the relays, not their records.
        let client = admin::admin_client_with(
            hub,
            &flags.data_dir,
            fleet_hub_api::client::ClientOptions {
                scope: fleet_hub_api::model::FleetScope::Clusters,
                ..Default::default()
            },
        )?;
        fleet_hub::relay::process::run_until_signal(client, options, &flags.data_dir).await?;
        return Ok(());
    }
    if let Command::BoardUrl = &flags.command {
        let hub = flags
            .hub
            .as_deref()
            .context("`board-url` asks a serving hub: give --hub HOST:PORT")?;
        let client = admin::admin_client(hub, &flags.data_dir)?;
        let login = client.board_login().await?;
        println!("https://{hub}{}", login.path);
        eprintln!(
            "open it within {} s; it works once and gives that browser a session of 8 h \
             (the hub's certificate is signed by the CA in {}/ca.pem)",
            login.expires_in_secs,
            flags.data_dir.display()
        );
        return Ok(());
    }
    if let Some(hub) = &flags.hub
        && !matches!(flags.command, Command::Serve { .. })
    {
        let client = admin::admin_client(hub, &flags.data_dir)?;
        let mut out = std::io::stdout().lock();
        match &flags.command {
            Command::Serve { .. } | Command::Relay { .. } | Command::BoardUrl => {
                unreachable!("handled above")
            }
            Command::Token(TokenCommand::Create { ttl, description }) => {
                let ttl = admin::parse_duration(ttl)?;
                admin::api_token_create(&client, ttl, description, &mut out, &mut std::io::stderr())
                    .await?
            }
            Command::Token(TokenCommand::List) => admin::api_token_list(&client, &mut out).await?,
            Command::Token(TokenCommand::Revoke { id }) => {
                admin::api_token_revoke(&client, id, &mut out).await?
            }
            Command::Clusters => admin::api_clusters(&client, &mut out).await?,
            Command::Cluster(ClusterCommand::Remove { id }) => {
                admin::api_cluster_remove(&client, id, &mut out).await?
            }
        }
        return Ok(());
    }
    let layout = FleetLayout::new(flags.fleet_cidr, flags.block_prefix)?;
    // Only `serve` starts a new store; the operator commands need the one it made.
    let registry = if matches!(flags.command, Command::Serve { .. }) {
        admin::open_registry(&location, layout)
            .await
            .map_err(anyhow::Error::from)
    } else {
        admin::open_existing_registry(&location, layout)
            .await
            .map_err(anyhow::Error::from)
    }
    .with_context(|| format!("opening the hub store ({location:?})"))?;
    if let Command::Serve {
        listen,
        relay_sweep_interval,
        member_max_records,
        member_max_bytes,
        metrics_address,
        watch_heartbeat,
        store_quiet_after,
        max_connections,
        relay,
    } = &flags.command
    {
        let nofile = match fleet_hub::limits::raise_nofile_limit() {
            Ok(limit) => {
                tracing::info!(limit, "open-file limit (soft) raised to the hard limit");
                limit
            }
            Err(e) => {
                tracing::warn!("could not raise the open-file limit: {e}");
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .map_or(1024, |(soft, _)| soft)
            }
        };
        let max_connections = max_connections.map_or_else(
            || fleet_hub::limits::connection_budget(nofile),
            // ≥ 1 by the range check.
            |n| usize::try_from(n).unwrap_or(usize::MAX),
        );
        tracing::info!(max_connections, "API connections accepted at once");
        let registry = registry.with_quotas(fleet_hub::registry::Quotas {
            max_records: *member_max_records,
            max_bytes: *member_max_bytes,
        });
        let mut options = ServerOptions::new(*listen, flags.data_dir.clone());
        options.relay_sweep_interval = Some(*relay_sweep_interval);
        options.metrics_address = *metrics_address;
        options.heartbeat = *watch_heartbeat;
        options.store_quiet_after = *store_quiet_after;
        options.max_connections = max_connections;
        // Replicas on etcd share one CA (members pin it) and admin credential.
        options.share_identity = !flags.etcd.is_empty();
        let relay = relay.options(&flags.data_dir)?;
        return serve_with_relay_until_signal(registry, options, relay).await;
    }
    let mut out = std::io::stdout().lock();
    match flags.command {
        Command::Serve { .. } | Command::Relay { .. } | Command::BoardUrl => {
            unreachable!("handled above")
        }
        Command::Token(TokenCommand::Create { ttl, description }) => {
            let ttl = admin::parse_duration(&ttl)?;
            admin::token_create(
                &registry,
                ttl,
                &description,
                &flags.data_dir,
                &mut out,
                &mut std::io::stderr(),
            )
            .await?
        }
        Command::Token(TokenCommand::List) => admin::token_list(&registry, &mut out).await?,
        Command::Token(TokenCommand::Revoke { id }) => {
            admin::token_revoke(&registry, &id, &mut out).await?
        }
        Command::Clusters => admin::clusters(&registry, &mut out).await?,
        Command::Cluster(ClusterCommand::Remove { id }) => {
            admin::cluster_remove(&registry, &id, &mut out).await?
        }
    }
    Ok(())
}

//! fleetctl: operator commands against the hub. `status` and `services` list the fleet with a
//! member's credential or the hub's admin credential; `export` and `unexport` act for the
//! member credential's cluster.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::records::{ServiceExportSpec, service_export_record_name};
use fleet_hub_api::wire::{CaHash, Credential};

#[derive(Parser, Debug)]
#[command(name = "fleetctl", version, about = "fleetboard operator CLI")]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

/// Where the hub is and who we are to it.
#[derive(clap::Args, Debug)]
struct HubArgs {
    /// The hub's API addresses, host:port, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    hub: Vec<String>,
    /// The SHA-256 of the hub CA certificate's DER form, in hex (what the hub logs as
    /// `ca_sha256` and what a join string ends with; not `sha256sum ca.pem`); default: from
    /// ca.pem beside the credential file (the hub's data dir, with its admin.credential).
    #[arg(long)]
    ca: Option<String>,
    /// A member cluster's credential file, or the hub's admin.credential.
    #[arg(long)]
    credential_file: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Clusters, blocks, tunnel state and nodes, then exports and imports, as the hub lists them.
    Status {
        #[command(flatten)]
        hub: HubArgs,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Exports a service of the credential's cluster (node-first: its endpoints are the pods of
    /// the namespace whose labels match --selector, as the cluster's node daemons see them).
    /// Exporting again changes the export and keeps its age (the oldest export wins conflicts).
    Export {
        /// The service's name (a DNS label): <name>.<namespace>.svc.clusterset.local.
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// key=value[,key=value...]; repeatable.
        #[arg(long, required = true)]
        selector: Vec<String>,
        /// [name:]protocol:port[:targetPort], e.g. http:tcp:80 or http:tcp:80:8080; repeatable.
        #[arg(long)]
        port: Vec<String>,
        /// No VIP: the name resolves to the ready endpoints themselves.
        #[arg(long)]
        headless: bool,
        /// sessionAffinity ClientIP with this timeout in seconds (Kubernetes' default is 10800).
        #[arg(long)]
        client_ip_affinity: Option<u32>,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Withdraws a service exported with `fleetctl export` from the credential's cluster.
    Unexport {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Join tokens (the hub's admin credential): create one for a new member, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The member clusters as the hub knows them (blocks, gateways, records, join tokens).
    Clusters {
        #[command(flatten)]
        hub: HubArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Removes a member (the hub's admin credential): its block, records and tunnels go from
    /// every other cluster; its controller clears its gateway and stops.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Every export with its KEP-1645 conditions, and every cluster's imports (VIP, ports,
    /// exporting clusters and their ready endpoints).
    Services {
        #[command(flatten)]
        hub: HubArgs,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Creates a join token and prints the join string (token + the hub CA's hash) once on
    /// stdout: give it to the new member's controller (`--join`).
    Create {
        /// Lifetime: 90m, 24h, 7d...
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Lists the tokens (never their secrets).
    List {
        #[command(flatten)]
        hub: HubArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revokes a token by id: no new member can join with it (members that joined stay).
    Revoke {
        id: String,
        #[command(flatten)]
        hub: HubArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Removes the member cluster <id>.
    Remove {
        id: String,
        #[command(flatten)]
        hub: HubArgs,
    },
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ca_hash(ca: Option<&str>, credential_file: &std::path::Path) -> anyhow::Result<CaHash> {
    if let Some(ca) = ca {
        return ca
            .parse()
            .map_err(|_| anyhow::anyhow!("--ca: expected the hub CA's SHA-256 in hex"));
    }
    let pem_path = credential_file
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("ca.pem");
    let pem = std::fs::read_to_string(&pem_path).with_context(|| {
        format!(
            "no --ca given and no hub CA at {}: pass --ca <sha256>",
            pem_path.display()
        )
    })?;
    CaHash::of_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", pem_path.display()))
}

fn client(args: &HubArgs) -> anyhow::Result<(HubClient, Credential)> {
    let text = std::fs::read_to_string(&args.credential_file)
        .with_context(|| format!("cannot read {}", args.credential_file.display()))?;
    let credential = Credential::parse(&text).with_context(|| {
        format!(
            "{} holds no credential (a member's `m.<cluster>.<secret>` or the hub's `a.<secret>`)",
            args.credential_file.display()
        )
    })?;
    let ca = ca_hash(args.ca.as_deref(), &args.credential_file)?;
    let client = HubClient::new(args.hub.clone(), ca, ClientOptions::default())?
        .with_credential(credential.clone());
    Ok((client, credential))
}

/// The cluster a member credential speaks for; exports need one.
fn member_cluster(credential: &Credential, file: &std::path::Path) -> anyhow::Result<ClusterId> {
    match credential {
        Credential::Member { cluster, .. } => Ok(cluster.clone()),
        Credential::Admin(_) => anyhow::bail!(
            "{} is the hub's admin credential: export and unexport act for one cluster; pass that \
             cluster's credential file (the one its controller joined with)",
            file.display()
        ),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    use std::io::Write;
    writeln!(out)?;
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Status { hub, json } => {
            let (client, _) = client(&hub)?;
            let view = client
                .list()
                .await
                .context("listing the fleet at the hub")?;
            let status = fleetctl::status(&view);
            let services = fleetctl::services::services_view(&view);
            if json {
                // The fleet's fields at the top (as before), the services beside them.
                let mut value = serde_json::to_value(&status)?;
                value["services"] = serde_json::to_value(&services)?;
                print_json(&value)?;
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let mut out = std::io::stdout().lock();
                fleetctl::render_table(&status, now, &mut out)?;
                use std::io::Write;
                writeln!(out)?;
                fleetctl::services::render_services(&services, &mut out)?;
            }
        }
        Command::Token(TokenCommand::Create {
            ttl,
            description,
            hub,
        }) => {
            let lifetime = fleet_hub_api::model::parse_lifetime(&ttl).with_context(|| {
                format!("--ttl {ttl:?}: expected a positive number with s, m, h or d (e.g. 24h)")
            })?;
            let (client, _) = client(&hub)?;
            let (join, info) = client
                .create_token(lifetime, &description)
                .await
                .context("creating a join token at the hub (needs the hub's admin credential)")?;
            println!("{}", join.expose_secret());
            eprintln!(
                "join token {} created, valid until unix time {}; it is shown only now: pass it to \
                 the new member's fleet-controller as --join",
                info.id, info.expires_at
            );
        }
        Command::Token(TokenCommand::List { hub, json }) => {
            let (client, _) = client(&hub)?;
            let now = unix_now();
            let tokens: Vec<_> = client
                .list_tokens()
                .await
                .context("listing join tokens (needs the hub's admin credential)")?
                .iter()
                .map(|t| fleetctl::admin::token_view(t, now))
                .collect();
            if json {
                print_json(&tokens)?;
            } else {
                fleetctl::admin::render_tokens(&tokens, now, &mut std::io::stdout().lock())?;
            }
        }
        Command::Token(TokenCommand::Revoke { id, hub }) => {
            let (client, _) = client(&hub)?;
            client
                .revoke_token(&id)
                .await
                .with_context(|| format!("revoking join token {id} (see `fleetctl token list`)"))?;
            println!("join token {id} revoked");
        }
        Command::Clusters { hub, json } => {
            let (client, _) = client(&hub)?;
            let view = client
                .list()
                .await
                .context("listing the fleet at the hub")?;
            let clusters = fleetctl::admin::cluster_views(&view);
            if json {
                print_json(&clusters)?;
            } else {
                fleetctl::admin::render_clusters(
                    &clusters,
                    unix_now(),
                    &mut std::io::stdout().lock(),
                )?;
            }
        }
        Command::Cluster(ClusterCommand::Remove { id, hub }) => {
            let cluster =
                ClusterId::new(&id).map_err(|e| anyhow::anyhow!("cluster id {id:?}: {e}"))?;
            let (client, _) = client(&hub)?;
            let removed = client.remove_cluster(&cluster).await.with_context(|| {
                format!("removing cluster {id} (needs the hub's admin credential)")
            })?;
            if removed {
                println!("cluster {id} removed; its controller clears its gateway and stops");
            } else {
                anyhow::bail!("cluster {id} is not a member (see `fleetctl clusters`)");
            }
        }
        Command::Services { hub, json } => {
            let (client, _) = client(&hub)?;
            let view = client
                .list()
                .await
                .context("listing the fleet at the hub")?;
            let services = fleetctl::services::services_view(&view);
            if json {
                print_json(&services)?;
            } else {
                fleetctl::services::render_services(&services, &mut std::io::stdout().lock())?;
            }
        }
        Command::Export {
            name,
            namespace,
            selector,
            port,
            headless,
            client_ip_affinity,
            hub,
        } => {
            let (client, credential) = client(&hub)?;
            let cluster = member_cluster(&credential, &hub.credential_file)?;
            let record = service_export_record_name(&namespace, &name);
            let args = fleetctl::services::ExportArgs {
                namespace: namespace.clone(),
                name: name.clone(),
                selector,
                ports: port,
                headless,
                client_ip_affinity,
            };
            // Checked before any call, then again with the kept creation time.
            fleetctl::services::export_spec(&args, 0)?;
            let view = client
                .list()
                .await
                .context("listing the fleet at the hub")?;
            let created_at_ms = view
                .records
                .iter()
                .find(|r| r.owner == cluster && r.name == record)
                .and_then(|r| serde_json::from_slice::<ServiceExportSpec>(&r.value).ok())
                .map_or_else(unix_ms, |old| old.created_at_ms);
            let spec = fleetctl::services::export_spec(&args, created_at_ms)?;
            let value = serde_json::to_vec(&spec)?;
            client
                .publish(&cluster, &record, &value)
                .await
                .with_context(|| format!("publishing {record} at the hub"))?;
            println!(
                "exported {namespace}/{name} from cluster {cluster}: {name}.{namespace}.svc.clusterset.local \
                 (its controller publishes the endpoints; see `fleetctl services`)"
            );
        }
        Command::Unexport {
            name,
            namespace,
            hub,
        } => {
            let (client, credential) = client(&hub)?;
            let cluster = member_cluster(&credential, &hub.credential_file)?;
            let record = service_export_record_name(&namespace, &name);
            let existed = client
                .unpublish(&cluster, &record)
                .await
                .with_context(|| format!("deleting {record} at the hub"))?;
            if existed {
                println!("unexported {namespace}/{name} from cluster {cluster}");
            } else {
                anyhow::bail!(
                    "cluster {cluster} does not export {namespace}/{name} with fleetctl export \
                     (see `fleetctl services`)"
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = Flags::parse().command;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(command))
}

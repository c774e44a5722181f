//! fleetctl: operator commands against the hub. `status`, `services` and `doctor` read the
//! fleet with a member's credential or the hub's admin credential; `export` and `unexport` act
//! for the member credential's cluster; `token` and `cluster remove` need the admin credential.
//! Every command prints a table (`-o table`, the default) or JSON (`-o json`, alias `--json`);
//! progress and errors go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_hub_api::client::{ClientOptions, HubClient, HubError};
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::records::{ServiceExportSpec, service_export_record_name};
use fleet_hub_api::wire::{CaHash, Credential};
use fleetctl::doctor::{self, CredentialKind, Facts};
use fleetctl::errors::{CallContext, Caller, explain};
use fleetctl::gather;

#[derive(Parser, Debug)]
#[command(name = "fleetctl", version, about = "fleetboard operator CLI")]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

/// Where the hub is and who we are to it.
#[derive(clap::Args, Debug)]
struct HubArgs {
    /// The hub's API addresses, host[:port] or [IPv6]:port (port 7443 when none is given),
    /// comma-separated; an `https://` prefix is dropped, any other URL refused. Checked before
    /// any connection.
    #[arg(long, value_delimiter = ',', required = true, value_parser = fleetctl::cli::hub_address)]
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

/// `-o table|json`, and `--json` as before.
#[derive(clap::Args, Debug, Clone, Copy)]
struct OutputArgs {
    /// Output format: `table` for people, `json` for scripts (stable; shapes in
    /// fleetctl/README.md). Progress and errors always go to stderr.
    /// (default: table)
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<Format>,
    /// Same as `-o json`.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

impl OutputArgs {
    fn json(&self) -> bool {
        self.json || self.output == Some(Format::Json)
    }

    /// `--json` asks for JSON: with `-o table` the two contradict each other.
    fn check(&self) -> anyhow::Result<()> {
        if self.json && self.output == Some(Format::Table) {
            anyhow::bail!(
                "--json and -o table contradict each other: pass one (`--json` is `-o json`)"
            );
        }
        Ok(())
    }
}

impl Command {
    fn output(&self) -> Option<&OutputArgs> {
        match self {
            Command::Status { out, .. }
            | Command::Export { out, .. }
            | Command::Unexport { out, .. }
            | Command::Clusters { out, .. }
            | Command::Services { out, .. }
            | Command::Doctor { out, .. }
            | Command::Token(
                TokenCommand::Create { out, .. }
                | TokenCommand::List { out, .. }
                | TokenCommand::Revoke { out, .. },
            )
            | Command::Cluster(ClusterCommand::Remove { out, .. }) => Some(out),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Clusters, blocks, tunnel state and nodes, then exports and imports, as the hub lists them.
    Status {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        out: OutputArgs,
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
        /// Wait (up to this long: 30s, 2m...) until the cluster's controller has published the
        /// export with its endpoints, saying on stderr what it waits for.
        #[arg(long)]
        wait: Option<String>,
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Withdraws a service exported with `fleetctl export` from the credential's cluster.
    Unexport {
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Join tokens (the hub's admin credential): create one for a new member, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The member clusters as the hub knows them (blocks, gateways, records, join tokens).
    Clusters {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        out: OutputArgs,
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
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Looks for known problems and says what to do about each (exit status 1 if any).
    ///
    /// The checks: the hub down, a credential it refuses, its CA expired or expiring within
    /// 30 days, this machine's clock (or a member's) more than 30 s from the hub's, a cluster
    /// whose controller holds no lease, a node without a plan, a tunnel without a handshake
    /// for 3 minutes (or a stale gateway record), imports of withdrawn clusters, exports
    /// without endpoints for a minute or in conflict, and — run on a node — its fleet-nri's
    /// plan and MTUs that do not fit the underlay.
    ///
    /// Exit status: 0 no problem found, 1 problems found (each listed with its fix), 2 doctor
    /// could not run (bad flags, unreadable credential).
    Doctor {
        #[command(flatten)]
        hub: HubArgs,
        /// This node's fleet-nri socket, to check its plan; default: /run/fleetboard/node.sock
        /// when it exists (on a node), else the check is skipped.
        #[arg(long)]
        node_socket: Option<PathBuf>,
        /// The node's CNF netns (a name in /run/netns or a path) whose MTUs to check; default:
        /// the one fleet-nri reports, or fleet-cnf when /run/netns/fleet-cnf exists, else the
        /// MTU check is skipped.
        #[arg(long)]
        cnf_netns: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
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
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Lists the tokens (never their secrets).
    List {
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Revokes a token by id: no new member can join with it (members that joined stay).
    Revoke {
        id: String,
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Removes the member cluster <id>.
    Remove {
        id: String,
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        out: OutputArgs,
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

/// A client of the hub, and how the command reached it (for the errors' advice).
struct Hub {
    client: HubClient,
    credential: Credential,
    ca: CaHash,
    cx: CallContext,
}

fn client(args: &HubArgs) -> anyhow::Result<Hub> {
    let text = std::fs::read_to_string(&args.credential_file).with_context(|| {
        format!(
            "cannot read the credential file {} (a member's is written at join, the hub's is \
             admin.credential in its data dir)",
            args.credential_file.display()
        )
    })?;
    let credential = Credential::parse(&text).with_context(|| {
        format!(
            "{} holds no credential (a member's `m.<cluster>.<secret>` or the hub's `a.<secret>`)",
            args.credential_file.display()
        )
    })?;
    let ca = ca_hash(args.ca.as_deref(), &args.credential_file)?;
    // Already `host:port`, checked by `cli::hub_address` when the flags were parsed.
    let endpoints = args.hub.clone();
    let client = HubClient::new(endpoints.clone(), ca, ClientOptions::default())?
        .with_credential(credential.clone());
    let cx = CallContext {
        endpoints: endpoints.join(","),
        credential_file: args.credential_file.display().to_string(),
        caller: match &credential {
            Credential::Admin(_) => Caller::Admin,
            Credential::Member { cluster, .. } => Caller::Member(cluster.to_string()),
        },
    };
    Ok(Hub {
        client,
        credential,
        ca,
        cx,
    })
}

impl Hub {
    /// Awaits a hub call, saying on stderr what it waits for when it is slow, and turns a
    /// failure into a message with the next step.
    async fn call<T>(
        &self,
        doing: &str,
        fut: impl std::future::Future<Output = Result<T, HubError>>,
    ) -> anyhow::Result<T> {
        let what = format!("the hub at {} ({doing})", self.cx.endpoints);
        gather::with_progress(
            &what,
            PROGRESS_AFTER,
            PROGRESS_EVERY,
            &mut std::io::stderr(),
            fut,
        )
        .await
        .map_err(|e| anyhow::anyhow!(explain(doing, &e, &self.cx)))
    }
}

/// Where fleet-nri serves the node API by default (nri-daemon's config).
const DEFAULT_NODE_SOCKET: &str = "/run/fleetboard/node.sock";

/// A call slower than this says what it waits for, then again every [`PROGRESS_EVERY`].
const PROGRESS_AFTER: Duration = Duration::from_secs(1);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Polls the hub until `cluster`'s controller has published the export for `spec`, saying on
/// stderr what it waits for; its endpoints and ready endpoints.
async fn wait_for_export(
    hub: &Hub,
    cluster: &ClusterId,
    namespace: &str,
    name: &str,
    spec: &fleet_hub_api::records::ServiceExportSpec,
    limit: Duration,
) -> anyhow::Result<(usize, usize)> {
    let record = fleet_hub_api::records::export_record_name(namespace, name);
    let started = std::time::Instant::now();
    let mut said = Duration::ZERO;
    loop {
        let view = hub.call("listing the fleet", hub.client.list()).await?;
        if let Some(found) =
            fleetctl::services::export_converged(&view, cluster, namespace, name, spec)
        {
            return Ok(found);
        }
        let waited = started.elapsed();
        if waited >= limit {
            anyhow::bail!(
                "cluster {cluster}'s controller has not published {record} within {limit:?}: \
                 check that it runs and is active (`fleetctl status` shows its gateway record's \
                 age) and its log; the export spec stays published"
            );
        }
        if waited >= said {
            eprintln!(
                "fleetctl: waiting for cluster {cluster}'s controller to publish {record} ({} s)…",
                waited.as_secs()
            );
            said = waited + PROGRESS_EVERY;
        }
        tokio::time::sleep(Duration::from_secs(1).min(limit - waited)).await;
    }
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
    writeln!(out)?;
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a command ended with: success, or doctor's findings (exit status 1).
enum Outcome {
    Done,
    ProblemsFound,
}

async fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Status { hub, out } => {
            let hub = client(&hub)?;
            let view = hub.call("listing the fleet", hub.client.list()).await?;
            let status = fleetctl::status(&view);
            let services = fleetctl::services::services_view(&view);
            if out.json() {
                // The fleet's fields at the top (as before), the services beside them.
                let mut value = serde_json::to_value(&status)?;
                value["services"] = serde_json::to_value(&services)?;
                print_json(&value)?;
            } else {
                let mut out = std::io::stdout().lock();
                fleetctl::render_table(&status, unix_now(), &mut out)?;
                writeln!(out)?;
                fleetctl::services::render_services(&services, &mut out)?;
            }
        }
        Command::Token(TokenCommand::Create {
            ttl,
            description,
            hub,
            out,
        }) => {
            let lifetime = fleetctl::cli::token_ttl(&ttl).map_err(anyhow::Error::msg)?;
            let hub = client(&hub)?;
            let (join, info) = hub
                .call(
                    "creating a join token",
                    hub.client.create_token(lifetime, &description),
                )
                .await?;
            if out.json() {
                print_json(&serde_json::json!({
                    "join": join.expose_secret(),
                    "token": fleetctl::admin::token_view(&info, unix_now()),
                }))?;
            } else {
                writeln!(std::io::stdout(), "{}", join.expose_secret())?;
            }
            eprintln!(
                "join token {} created, valid until {}; it is shown only now: pass it to the new \
                 member's fleet-controller as --join",
                info.id,
                fleetctl::cli::rfc3339(info.expires_at)
            );
        }
        Command::Token(TokenCommand::List { hub, out }) => {
            let hub = client(&hub)?;
            let now = unix_now();
            let tokens: Vec<_> = hub
                .call("listing join tokens", hub.client.list_tokens())
                .await?
                .iter()
                .map(|t| fleetctl::admin::token_view(t, now))
                .collect();
            if out.json() {
                print_json(&tokens)?;
            } else {
                fleetctl::admin::render_tokens(&tokens, now, &mut std::io::stdout().lock())?;
            }
        }
        Command::Token(TokenCommand::Revoke { id, hub, out }) => {
            let hub = client(&hub)?;
            let info = hub
                .call(
                    &format!("revoking join token {id}"),
                    hub.client.revoke_token(&id),
                )
                .await?;
            if out.json() {
                print_json(&fleetctl::admin::token_view(&info, unix_now()))?;
            } else {
                writeln!(std::io::stdout(), "join token {id} revoked")?;
            }
        }
        Command::Clusters { hub, out } => {
            let hub = client(&hub)?;
            let view = hub.call("listing the fleet", hub.client.list()).await?;
            let clusters = fleetctl::admin::cluster_views(&view);
            if out.json() {
                print_json(&clusters)?;
            } else {
                fleetctl::admin::render_clusters(
                    &clusters,
                    unix_now(),
                    &mut std::io::stdout().lock(),
                )?;
            }
        }
        Command::Cluster(ClusterCommand::Remove { id, hub, out }) => {
            let cluster =
                ClusterId::new(&id).map_err(|e| anyhow::anyhow!("cluster id {id:?}: {e}"))?;
            let hub = client(&hub)?;
            let removed = hub
                .call(
                    &format!("removing cluster {id}"),
                    hub.client.remove_cluster(&cluster),
                )
                .await?;
            if !removed {
                anyhow::bail!(
                    "cluster {id} is not a member: `fleetctl clusters` lists the members"
                );
            }
            if out.json() {
                print_json(&serde_json::json!({ "removed": id }))?;
            } else {
                writeln!(
                    std::io::stdout(),
                    "cluster {id} removed; its controller clears its gateway and stops"
                )?;
            }
        }
        Command::Services { hub, out } => {
            let hub = client(&hub)?;
            let view = hub.call("listing the fleet", hub.client.list()).await?;
            let services = fleetctl::services::services_view(&view);
            if out.json() {
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
            wait,
            hub,
            out,
        } => {
            let wait = wait
                .map(|w| {
                    fleet_hub_api::model::parse_lifetime(&w).with_context(|| {
                        format!(
                            "--wait {w:?}: expected a positive number with s, m or h (e.g. 30s)"
                        )
                    })
                })
                .transpose()?;
            let hub_args = hub;
            let hub = client(&hub_args)?;
            let cluster = member_cluster(&hub.credential, &hub_args.credential_file)?;
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
            let view = hub.call("listing the fleet", hub.client.list()).await?;
            let created_at_ms = view
                .records
                .iter()
                .find(|r| r.owner == cluster && r.name == record)
                .and_then(|r| serde_json::from_slice::<ServiceExportSpec>(&r.value).ok())
                .map_or_else(unix_ms, |old| old.created_at_ms);
            let spec = fleetctl::services::export_spec(&args, created_at_ms)?;
            let value = serde_json::to_vec(&spec)?;
            hub.call(
                &format!("publishing {record}"),
                hub.client.publish(&cluster, &record, &value),
            )
            .await?;
            let dns = format!("{name}.{namespace}.svc.clusterset.local");
            let endpoints = match wait {
                Some(limit) => {
                    Some(wait_for_export(&hub, &cluster, &namespace, &name, &spec, limit).await?)
                }
                None => None,
            };
            if let Some((0, _)) = endpoints {
                eprintln!(
                    "{}",
                    fleetctl::services::no_endpoints_warning(
                        &cluster,
                        &namespace,
                        &name,
                        &args.selector
                    )
                );
            }
            if out.json() {
                let mut exported = serde_json::json!({
                    "cluster": cluster.to_string(), "namespace": namespace, "name": name,
                    "dns_name": dns,
                });
                if let Some((all, ready)) = endpoints {
                    exported["endpoints"] = all.into();
                    exported["ready_endpoints"] = ready.into();
                }
                print_json(&serde_json::json!({ "exported": exported }))?;
            } else if let Some((all, ready)) = endpoints {
                writeln!(
                    std::io::stdout(),
                    "exported {namespace}/{name} from cluster {cluster}: {dns}; its controller \
                     published it with {all} endpoints, {ready} ready (see `fleetctl services`)"
                )?;
            } else {
                writeln!(
                    std::io::stdout(),
                    "exported {namespace}/{name} from cluster {cluster}: {dns} (its controller \
                     publishes the endpoints; see `fleetctl services`)"
                )?;
            }
        }
        Command::Unexport {
            name,
            namespace,
            hub,
            out,
        } => {
            let hub_args = hub;
            let hub = client(&hub_args)?;
            let cluster = member_cluster(&hub.credential, &hub_args.credential_file)?;
            let record = service_export_record_name(&namespace, &name);
            let existed = hub
                .call(
                    &format!("deleting {record}"),
                    hub.client.unpublish(&cluster, &record),
                )
                .await?;
            if !existed {
                anyhow::bail!(
                    "cluster {cluster} does not export {namespace}/{name} with fleetctl export \
                     (see `fleetctl services`)"
                );
            }
            if out.json() {
                print_json(&serde_json::json!({
                    "unexported": { "cluster": cluster.to_string(), "namespace": namespace,
                                    "name": name },
                }))?;
            } else {
                writeln!(
                    std::io::stdout(),
                    "unexported {namespace}/{name} from cluster {cluster}"
                )?;
            }
        }
        Command::Doctor {
            hub,
            node_socket,
            cnf_netns,
            out,
        } => {
            let addresses = hub.hub.clone();
            let hub = client(&hub)?;
            // Every address on its own: a dead replica shows even when another answers.
            let (hub_facts, unreachable) = gather::with_progress(
                &format!("the hub at {} (probing each address)", hub.cx.endpoints),
                PROGRESS_AFTER,
                PROGRESS_EVERY,
                &mut std::io::stderr(),
                gather::hub_facts_per_address(
                    &addresses,
                    hub.ca,
                    &hub.credential,
                    ClientOptions::default(),
                ),
            )
            .await?;
            let node = node_socket
                .or_else(|| {
                    let default = PathBuf::from(DEFAULT_NODE_SOCKET);
                    default.exists().then_some(default)
                })
                .map(|socket| gather::local_node(&socket))
                .ok_or_else(|| {
                    format!("not on a node (no {DEFAULT_NODE_SOCKET}; pass --node-socket)")
                });
            let reported = node
                .as_ref()
                .ok()
                .and_then(|n| n.status.as_ref().ok())
                .map(|s| s.cnf_netns.clone())
                .filter(|ns| !ns.is_empty());
            let cnf = cnf_netns.or(reported).or_else(|| {
                std::path::Path::new("/run/netns/fleet-cnf")
                    .exists()
                    .then(|| "fleet-cnf".to_string())
            });
            let mtu = match cnf {
                None => Err("not on a node (no /run/netns/fleet-cnf; pass --cnf-netns)".into()),
                Some(ns) => match hub.cx.endpoints.split(',').next().and_then(gather::hub_ip) {
                    Some(ip) => gather::mtu_facts(&ns, ip),
                    None => Err(format!(
                        "cannot resolve the hub address {}",
                        hub.cx.endpoints
                    )),
                },
            };
            let facts = Facts {
                now: unix_now(),
                endpoints: hub.cx.endpoints.clone(),
                unreachable,
                credential_file: hub.cx.credential_file.clone(),
                credential: match &hub.cx.caller {
                    Caller::Admin => CredentialKind::Admin,
                    Caller::Member(c) => CredentialKind::Member(c.clone()),
                },
                hub: hub_facts,
                mtu,
                node,
            };
            let report = doctor::diagnose(&facts);
            if out.json() {
                print_json(&report)?;
            } else {
                doctor::render_report(&report, &mut std::io::stdout().lock())?;
            }
            if report.problems > 0 {
                return Ok(Outcome::ProblemsFound);
            }
        }
    }
    Ok(Outcome::Done)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: `> hub.log` and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let command = Flags::parse().command;
    let doctor = matches!(command, Command::Doctor { .. });
    let result = command
        .output()
        .map_or(Ok(()), OutputArgs::check)
        .and_then(|()| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
        })
        .and_then(|rt| rt.block_on(run(command)));
    match result {
        Ok(Outcome::Done) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::ProblemsFound) => std::process::ExitCode::from(1),
        // The reader of stdout went away (`fleetctl services | head`): stop quietly.
        Err(e) if fleetctl::cli::is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            // doctor: 1 means "problems found"; it could not run at all.
            std::process::ExitCode::from(if doctor { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn output_of(args: &[&str]) -> bool {
        let hub = ["--hub", "h:7443", "--credential-file", "c"];
        let flags = Flags::try_parse_from(["fleetctl"].iter().chain(args).chain(&hub)).unwrap();
        match flags.command {
            Command::Status { out, .. }
            | Command::Clusters { out, .. }
            | Command::Services { out, .. }
            | Command::Doctor { out, .. }
            | Command::Token(TokenCommand::List { out, .. }) => out.json(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_printing_command_takes_o_json_and_keeps_the_json_alias() {
        Flags::command().debug_assert();
        for cmd in [
            &["status"][..],
            &["clusters"],
            &["services"],
            &["doctor"],
            &["token", "list"],
        ] {
            let with = |extra: &[&str]| {
                let args: Vec<&str> = cmd.iter().chain(extra).copied().collect();
                output_of(&args)
            };
            assert!(!with(&[]), "{cmd:?}: table by default");
            assert!(with(&["-o", "json"]), "{cmd:?}");
            assert!(with(&["--output", "json"]), "{cmd:?}");
            assert!(with(&["--json"]), "{cmd:?}");
            assert!(!with(&["-o", "table"]), "{cmd:?}");
        }
        let hub = ["--hub", "h:7443", "--credential-file", "c"];
        for cmd in [
            &["token", "create", "-o", "json"][..],
            &["token", "revoke", "x", "-o", "json"],
            &["cluster", "remove", "aa", "-o", "json"],
            &["export", "web", "--selector", "app=web", "-o", "json"],
            &["unexport", "web", "-o", "json"],
        ] {
            let args = ["fleetctl"].iter().chain(cmd).chain(&hub);
            assert!(Flags::try_parse_from(args).is_ok(), "{cmd:?}");
        }
        assert!(
            Flags::try_parse_from(["fleetctl", "status", "-o", "yaml"].iter().chain(&hub)).is_err()
        );
    }

    #[test]
    fn json_with_o_table_is_a_clear_error() {
        let hub = ["--hub", "h", "--credential-file", "c"];
        let parse = |args: &[&str]| {
            Flags::try_parse_from(["fleetctl"].iter().chain(args).chain(&hub))
                .unwrap()
                .command
        };
        let both = parse(&["status", "--json", "-o", "table"]);
        let err = both.output().unwrap().check().unwrap_err().to_string();
        assert!(err.contains("--json and -o table"), "{err}");
        for ok in [
            &["status", "--json", "-o", "json"][..],
            &["status", "--json"],
            &["token", "create", "-o", "table"],
        ] {
            assert!(parse(ok).output().unwrap().check().is_ok(), "{ok:?}");
        }
    }
}

//! fleetctl: operator commands against the hub. `fleetctl status` lists the fleet with a
//! member's credential or the hub's admin credential.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::wire::{CaHash, Credential};

#[derive(Parser, Debug)]
#[command(name = "fleetctl", version, about = "fleetboard operator CLI")]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Clusters, blocks, tunnel state and nodes, as the hub lists them.
    Status {
        /// The hub's API addresses, host:port, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        hub: Vec<String>,
        /// The hub CA's SHA-256; default: from ca.pem beside the credential file (the hub's
        /// data dir, when using its admin.credential).
        #[arg(long)]
        ca: Option<String>,
        /// A member cluster's credential file, or the hub's admin.credential.
        #[arg(long)]
        credential_file: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Status {
        hub,
        ca,
        credential_file,
        json,
    } = Flags::parse().command;
    let text = std::fs::read_to_string(&credential_file)
        .with_context(|| format!("cannot read {}", credential_file.display()))?;
    let credential = Credential::parse(&text).with_context(|| {
        format!(
            "{} holds no credential (a member's `m.<cluster>.<secret>` or the hub's `a.<secret>`)",
            credential_file.display()
        )
    })?;
    let ca = ca_hash(ca.as_deref(), &credential_file)?;
    let view = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            HubClient::new(hub, ca, ClientOptions::default())?
                .with_credential(credential)
                .list()
                .await
        })
        .context("listing the fleet at the hub")?;
    let status = fleetctl::status(&view);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &status)?;
        use std::io::Write;
        writeln!(out)?;
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        fleetctl::render_table(&status, now, &mut out)?;
    }
    Ok(())
}

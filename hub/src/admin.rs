//! Operator commands on the registry (what `fleet-hub token ...` and `fleet-hub clusters` do),
//! writing human-readable output; the binary only parses flags and opens the store.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{CaHash, Credential, JoinString};
use crate::registry::{ClusterId, FleetLayout, Registry, RegistryError, SystemClock, TokenInfo};
use crate::store::{EmbeddedStore, EtcdOptions, EtcdStore, Store};
use fleet_hub_api::client::{ClientOptions, HubClient, HubError};

/// Where the hub's state lives.
#[derive(Debug, Clone)]
// Built once per process: the size of the etcd settings does not matter.
#[allow(clippy::large_enum_variant)]
pub enum StoreLocation {
    /// The embedded store in this data dir (only one process may open it).
    Embedded(std::path::PathBuf),
    /// etcd: client URLs, key namespace, TLS and credentials.
    Etcd(EtcdOptions),
}

/// Opens the store and the registry on it.
pub async fn open_registry(
    location: &StoreLocation,
    layout: FleetLayout,
) -> Result<Registry, RegistryError> {
    let store: Arc<dyn Store> = match location {
        StoreLocation::Embedded(dir) => Arc::new(EmbeddedStore::open(dir.clone()).await?),
        StoreLocation::Etcd(options) => Arc::new(EtcdStore::connect(options.clone()).await?),
    };
    Registry::open(store, layout, Arc::new(SystemClock)).await
}

/// Opens the store of a hub that `serve` started, and the registry on it, for the operator
/// commands: a data dir without a store is refused and left untouched (only `serve` creates
/// one; a store made here would hold tokens no running hub knows).
pub async fn open_existing_registry(
    location: &StoreLocation,
    layout: FleetLayout,
) -> Result<Registry, AdminError> {
    if let StoreLocation::Embedded(dir) = location
        && !EmbeddedStore::exists_in(dir).map_err(RegistryError::from)?
    {
        return Err(AdminError::NoStore {
            dir: dir.display().to_string(),
        });
    }
    Ok(open_registry(location, layout).await?)
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "no hub store in {dir}: start the hub there first (`fleet-hub serve --data-dir {dir}`), \
         or pass the running hub's data dir as --data-dir; nothing was created"
    )]
    NoStore { dir: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Model(#[from] fleet_hub_api::model::ModelError),
    #[error("writing output failed: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(
        "reading the hub's {what} from {path}: {reason} (run this where the hub's data dir is)"
    )]
    Identity {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("invalid duration {0:?}: use a number with s, m, h or d (e.g. 90m, 24h, 7d)")]
    Duration(String),
    #[error("no cluster {0} in the fleet (see `fleet-hub clusters`)")]
    NoSuchCluster(ClusterId),
}

/// Parses `90s`, `30m`, `24h`, `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, AdminError> {
    fleet_hub_api::model::parse_lifetime(text).ok_or_else(|| AdminError::Duration(text.to_string()))
}

/// Creates a join token; the token text is the only thing on `out` (for scripts), the rest
/// goes to `info`. With the hub's CA in `data_dir` the text is the join string (token + CA
/// hash) a member needs; without it, the bare token.
pub async fn token_create(
    registry: &Registry,
    ttl: Duration,
    description: &str,
    data_dir: &std::path::Path,
    out: &mut impl Write,
    info: &mut impl Write,
) -> Result<(), AdminError> {
    let (token, meta) = registry.create_token(ttl, description).await?;
    // The CA of this data dir, else the one replicas share through the store.
    let shared_ca = match registry
        .store()
        .get(crate::api::tls::SHARED_IDENTITY_KEY)
        .await
        .map_err(RegistryError::from)?
    {
        Some(kv) => serde_json::from_slice::<crate::api::tls::SharedIdentity>(&kv.value)
            .ok()
            .and_then(|identity| identity.ca_hash().ok()),
        None => None,
    };
    match std::fs::read_to_string(data_dir.join("ca.pem"))
        .ok()
        .and_then(|pem| CaHash::of_pem(&pem).ok())
        .or(shared_ca)
    {
        Some(ca_hash) => writeln!(out, "{}", JoinString { token, ca_hash }.expose_secret())?,
        None => {
            writeln!(out, "{}", token.expose_secret())?;
            writeln!(
                info,
                "no hub CA in {} yet (start `fleet-hub serve` once): this is the bare token; a \
                 member needs it followed by `.<CA SHA-256>`",
                data_dir.display()
            )?;
        }
    }
    writeln!(
        info,
        "join token {} created; expires at unix time {}; it is shown only now",
        meta.id, meta.expires_at
    )?;
    Ok(())
}

pub async fn token_list(registry: &Registry, out: &mut impl Write) -> Result<(), AdminError> {
    print_tokens(&registry.list_tokens().await?, out)
}

fn print_tokens(tokens: &[TokenInfo], out: &mut impl Write) -> Result<(), AdminError> {
    writeln!(
        out,
        "{:<14} {:<12} {:<12} {:<8} DESCRIPTION",
        "ID", "CREATED", "EXPIRES", "STATE"
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for t in tokens {
        let state = match t.revoked_at {
            Some(_) => "revoked",
            None if now >= t.expires_at => "expired",
            None => "valid",
        };
        writeln!(
            out,
            "{:<14} {:<12} {:<12} {:<8} {}",
            t.id, t.created_at, t.expires_at, state, t.description
        )?;
    }
    Ok(())
}

pub async fn token_revoke(
    registry: &Registry,
    id: &str,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    registry.revoke_token(id).await?;
    writeln!(out, "join token {id} revoked")?;
    Ok(())
}

/// A client of a serving hub with the admin credential and CA from its data dir.
pub fn admin_client(hub: &str, data_dir: &std::path::Path) -> Result<HubClient, AdminError> {
    admin_client_with(hub, data_dir, ClientOptions::default())
}

/// [`admin_client`] with other client options (the relay lists and watches only the
/// clusters and relays: [`fleet_hub_api::model::FleetScope::Clusters`]).
pub fn admin_client_with(
    hub: &str,
    data_dir: &std::path::Path,
    options: ClientOptions,
) -> Result<HubClient, AdminError> {
    let read = |name: &str, what: &'static str| {
        let path = data_dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| AdminError::Identity {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    let bad = |what: &'static str, name: &str, reason: String| AdminError::Identity {
        what,
        path: data_dir.join(name).display().to_string(),
        reason,
    };
    let ca = CaHash::of_pem(&read("ca.pem", "CA certificate")?)
        .map_err(|e| bad("CA certificate", "ca.pem", e.to_string()))?;
    let credential = Credential::parse(&read("admin.credential", "admin credential")?)
        .ok_or_else(|| bad("admin credential", "admin.credential", "malformed".into()))?;
    Ok(HubClient::new([hub], ca, options)?.with_credential(credential))
}

/// `token create` against a serving hub: the join string on `out`.
pub async fn api_token_create(
    client: &HubClient,
    ttl: Duration,
    description: &str,
    out: &mut impl Write,
    info: &mut impl Write,
) -> Result<(), AdminError> {
    let (join, meta) = client.create_token(ttl, description).await?;
    writeln!(out, "{}", join.expose_secret())?;
    writeln!(
        info,
        "join token {} created; expires at unix time {}; it is shown only now",
        meta.id, meta.expires_at
    )?;
    Ok(())
}

pub async fn api_token_list(client: &HubClient, out: &mut impl Write) -> Result<(), AdminError> {
    print_tokens(&client.list_tokens().await?, out)
}

pub async fn api_token_revoke(
    client: &HubClient,
    id: &str,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    client.revoke_token(id).await?;
    writeln!(out, "join token {id} revoked")?;
    Ok(())
}

pub async fn clusters(registry: &Registry, out: &mut impl Write) -> Result<(), AdminError> {
    let (clusters, revision) = registry.list_clusters().await?;
    print_clusters(&clusters, revision, out)
}

/// `clusters` against a serving hub.
pub async fn api_clusters(client: &HubClient, out: &mut impl Write) -> Result<(), AdminError> {
    let view = client.list().await?;
    print_clusters(&view.clusters, view.revision, out)?;
    for relay in &view.relays {
        writeln!(
            out,
            "relay {} at {} (public key {})",
            relay.id, relay.endpoint, relay.public_key
        )?;
    }
    Ok(())
}

/// `cluster remove <id>` on the store.
pub async fn cluster_remove(
    registry: &Registry,
    id: &str,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let id = ClusterId::new(id)?;
    let removed = registry.remove_cluster(&id).await?;
    report_removal(&id, removed, out)
}

/// `cluster remove <id>` against a serving hub.
pub async fn api_cluster_remove(
    client: &HubClient,
    id: &str,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    let id = ClusterId::new(id)?;
    let removed = client.remove_cluster(&id).await?;
    report_removal(&id, removed, out)
}

fn report_removal(id: &ClusterId, removed: bool, out: &mut impl Write) -> Result<(), AdminError> {
    if removed {
        writeln!(
            out,
            "cluster {id} removed: its block, credential, lease and records are gone"
        )?;
        Ok(())
    } else {
        Err(AdminError::NoSuchCluster(id.clone()))
    }
}

fn print_clusters(
    clusters: &[crate::registry::ClusterRecord],
    revision: crate::store::Revision,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    writeln!(
        out,
        "{:<20} {:<18} {:<9} {:<22} PUBLIC KEY",
        "CLUSTER", "BLOCK", "GATEWAY", "ENDPOINT"
    )?;
    for c in clusters {
        let endpoint = c.endpoint.map_or("-".to_string(), |e| e.to_string());
        let gateway = format!("{:?}", c.gateway).to_lowercase();
        writeln!(
            out,
            "{:<20} {:<18} {:<9} {:<22} {}",
            c.id.as_str(),
            c.block.to_string(),
            gateway,
            endpoint,
            c.public_key
        )?;
    }
    writeln!(out, "(store revision {revision})")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "h", "0h", "10", "5w", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

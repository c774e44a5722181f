//! The hub's relay: a WireGuard device that forwards member-to-member traffic for members
//! without a direct tunnel (the default: members behind NAT).
//!
//! ```text
//! member A gateway --WireGuard/UDP--> hub netns :<relay port> (the device's UDP socket)
//!   -> relay netns: <relay if> decrypts, dst in B's block
//!   -> route <B's block> dev <relay if> (one per peer, added by fleet-gateway)
//!   -> <relay if> encrypts for B (allowed IPs = B's block) -> UDP to B's last-seen endpoint
//! ```
//! The interface lives in its own netns (default: named netns `fleet-hub-relay`) with
//! `ip_forward=1` and `send_redirects=0` (packets leave by the interface they came in on; a
//! redirect would be wrong), so the hub's own netns needs no forwarding and holds no fleet
//! routes; its UDP socket lives in the hub's netns (`DeviceConfig::underlay_netns`).
//!
//! Peers = every cluster in the registry: its public key, allowed IPs = its block, its public
//! endpoint if it has one (else learnt from its handshakes), keepalive 25 s. The relay follows
//! the hub's API (list + watch with the admin credential), so joins, key changes and removals
//! reach the device within one event, and it publishes its [`RelayRecord`] (key + endpoint)
//! there and renews it every TTL/3 (`--relay-ttl`, default 6 s): every serving replica sweeps
//! records past their expiry, so a relay that died with its host leaves members' views within
//! TTL + one sweep interval. On a clean stop it withdraws its record and deletes the device.
//!
//! It runs as its own process (`fleet-hub relay`, see [`process`]): `fleet-hub serve
//! --relay-listen` starts one and stops it on SIGTERM, but a killed API process leaves it
//! running — relayed traffic keeps flowing while the registry is away, and the restarted hub
//! adopts it. While the API is unreachable the device keeps its last peers.

pub mod metrics;
pub mod process;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_gateway::{BackendKind, DeviceConfig, Peer, PrivateKey, WireguardDevice};
use ipnetwork::IpNetwork;
use tokio::sync::watch;

use crate::registry::{ClusterRecord, RelayRecord};
use fleet_hub_api::client::{HubClient, HubError};
use fleet_hub_api::mirror::{FleetMirror, WatcherConfig};

/// The named netns the relay's interface goes into unless told otherwise.
pub const DEFAULT_RELAY_NETNS: &str = "fleet-hub-relay";
pub const DEFAULT_RELAY_NAME: &str = "fleet-relay";
pub const RELAY_MTU: u32 = 1420;
/// Keepalive towards members: keeps their NAT mappings open from our side too.
pub const RELAY_KEEPALIVE_SECS: u16 = 25;
/// The relay's private key in the hub's data dir (0600, kept across restarts).
pub const RELAY_KEY_FILE: &str = "relay.key";
/// How long a relay record lives without renewal unless told otherwise (`--relay-ttl`); the
/// relay renews it every third of that.
pub const DEFAULT_RELAY_TTL: Duration = Duration::from_secs(6);
/// The shortest `--relay-ttl` accepted.
pub const MIN_RELAY_TTL: Duration = Duration::from_millis(300);

/// Parses `<n>ms` or `<n>s` (a positive duration of at most an hour).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("invalid duration {text:?}: use e.g. 1s or 500ms");
    let d = if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else if let Some(s) = text.strip_suffix('s') {
        Duration::from_secs(s.parse().map_err(|_| bad())?)
    } else {
        return Err(bad());
    };
    if d.is_zero() || d > crate::registry::MAX_RELAY_TTL {
        return Err(bad());
    }
    Ok(d)
}

/// Parses a relay TTL: `<n>ms` or `<n>s`, between [`MIN_RELAY_TTL`] and an hour.
pub fn parse_relay_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let ttl = parse_interval(text)
        .map_err(|_| format!("invalid relay TTL {text:?}: use e.g. 6s or 1500ms"))?;
    if ttl < MIN_RELAY_TTL || ttl > crate::registry::MAX_RELAY_TTL {
        return Err(format!(
            "invalid relay TTL {text:?}: it must be between {} ms and an hour",
            MIN_RELAY_TTL.as_millis()
        ));
    }
    Ok(ttl)
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay WireGuard device: {0}")]
    Gateway(#[from] fleet_gateway::GatewayError),
    #[error("relay key: {0}")]
    Key(#[from] fleet_gateway::KeyError),
    #[error("relay netns: {0}")]
    Netns(#[from] fleet_core::netns::NetnsError),
    #[error("relay netns {netns}: cannot set {sysctl}: {source}")]
    Sysctl {
        netns: PathBuf,
        sysctl: &'static str,
        source: std::io::Error,
    },
    #[error("relay: the hub API: {0}")]
    Hub(#[from] HubError),
    #[error("relay: {0}")]
    Process(String),
}

/// How the relay runs (`fleet-hub serve --relay-*`).
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// UDP port of the device (its IP is the default endpoint: WireGuard binds every address).
    pub listen: SocketAddr,
    /// What members dial.
    pub endpoint: SocketAddr,
    /// The netns of the relay's interface; `None`: named netns [`DEFAULT_RELAY_NETNS`], made
    /// (and on stop removed) by the hub.
    pub netns: Option<PathBuf>,
    /// Interface name, host-unique (it names the userspace device's UAPI socket).
    pub name: String,
    /// `None`: kernel WireGuard where the relay netns has it, else userspace.
    pub backend: Option<BackendKind>,
    /// Where the relay's private key is kept.
    pub key_path: PathBuf,
    /// The lifetime of its record at the hub; renewed every third of it.
    pub ttl: Duration,
    /// Serve the relay's Prometheus metrics here (`--relay-metrics-address`); `None`: not.
    pub metrics_address: Option<SocketAddr>,
}

impl RelayOptions {
    pub fn new(listen: SocketAddr, data_dir: &Path) -> Self {
        RelayOptions {
            listen,
            endpoint: listen,
            netns: None,
            name: DEFAULT_RELAY_NAME.into(),
            backend: None,
            key_path: data_dir.join(RELAY_KEY_FILE),
            ttl: DEFAULT_RELAY_TTL,
            metrics_address: None,
        }
    }
}

/// The relay's peers for these clusters: one per cluster (its block), each public key once
/// (a key claimed by two clusters goes to the first by id, with a warning).
pub fn relay_peers<'a>(clusters: impl IntoIterator<Item = &'a ClusterRecord>) -> Vec<Peer> {
    let mut seen = HashSet::new();
    let mut peers = Vec::new();
    for c in clusters {
        if !seen.insert(c.public_key) {
            tracing::warn!(cluster = %c.id, public_key = %c.public_key, "two clusters use one WireGuard key; the relay serves only the first");
            continue;
        }
        peers.push(Peer {
            public_key: fleet_gateway::PublicKey::from_bytes(*c.public_key.as_bytes()),
            endpoint: c.endpoint,
            allowed_ips: vec![IpNetwork::V4(c.block)],
            persistent_keepalive: Some(RELAY_KEEPALIVE_SECS),
        });
    }
    peers
}

/// A running relay; [`Relay::stop`] takes it down.
pub struct Relay {
    device: Arc<dyn WireguardDevice>,
    record: RelayRecord,
    client: HubClient,
    owned_netns: Option<String>,
    stop: watch::Sender<bool>,
    follower: tokio::task::JoinHandle<()>,
    renewer: tokio::task::JoinHandle<()>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// Same netns? (Both paths name nsfs files; one netns is one inode.)
fn same_netns(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Forwarding on, redirects off, in `netns`.
async fn prepare_netns(netns: &Path) -> Result<(), RelayError> {
    let path = netns.to_path_buf();
    fleet_core::netns::with_netlink(vec![path.clone()], move |_| async move {
        // `default` first: it applies to the relay interface created afterwards.
        for (sysctl, value) in [
            ("net/ipv4/conf/default/send_redirects", "0"),
            ("net/ipv4/conf/all/send_redirects", "0"),
            ("net/ipv4/ip_forward", "1"),
        ] {
            std::fs::write(format!("/proc/sys/{sysctl}"), value).map_err(|source| {
                RelayError::Sysctl {
                    netns: path.clone(),
                    sysctl,
                    source,
                }
            })?;
        }
        Ok(())
    })
    .await?
}

impl Relay {
    /// Creates the relay's device and starts following the hub through `client` (admin
    /// credential): peers from its clusters, its record published there. The hub may be down
    /// at first; the relay keeps trying. A failure here leaves no device behind.
    pub async fn start(client: HubClient, options: RelayOptions) -> Result<Relay, RelayError> {
        let (netns, owned_netns) = match &options.netns {
            Some(path) => (path.clone(), None),
            None => (
                fleet_core::netns::ensure_named(DEFAULT_RELAY_NETNS)?,
                Some(DEFAULT_RELAY_NETNS.to_string()),
            ),
        };
        let device = match Self::create_device(&options, &netns).await {
            Ok(device) => device,
            Err(e) => {
                if let Some(name) = owned_netns {
                    let _ = fleet_core::netns::delete_named(&name);
                }
                return Err(e);
            }
        };
        let public_key = crate::registry::PublicKey::from_bytes(*device.public_key().as_bytes());
        let record = RelayRecord {
            id: RelayRecord::id_for(&public_key),
            public_key,
            endpoint: options.endpoint,
            expires_at: 0,
        };
        tracing::info!(relay = %record.id, device = %options.name, backend = %device.backend(), netns = %netns.display(), endpoint = %record.endpoint, public_key = %record.public_key, "relay up");
        let metrics_server = match options.metrics_address {
            Some(addr) => {
                let metrics = metrics::RelayMetrics::default();
                let mut registry = prometheus_client::registry::Registry::default();
                fleet_metrics::register_build_info(
                    &mut registry,
                    "fleet-hub-relay",
                    env!("CARGO_PKG_VERSION"),
                );
                registry.register_collector(Box::new(metrics.clone()));
                let refresh = metrics.refresh(device.clone());
                match fleet_metrics::serve_with_refresh(addr, Arc::new(registry), Some(refresh))
                    .await
                {
                    Ok((_, task)) => Some(task),
                    Err(e) => {
                        let _ = device.delete().await;
                        if let Some(name) = &owned_netns {
                            let _ = fleet_core::netns::delete_named(name);
                        }
                        return Err(RelayError::Process(e.to_string()));
                    }
                }
            }
            None => None,
        };
        let (stop, stopped) = watch::channel(false);
        let follower = tokio::spawn(follow(client.clone(), device.clone(), stopped.clone()));
        let renewer = tokio::spawn(renew(client.clone(), record.clone(), options.ttl, stopped));
        Ok(Relay {
            device,
            record,
            client,
            owned_netns,
            stop,
            follower,
            renewer,
            metrics_server,
        })
    }

    async fn create_device(
        options: &RelayOptions,
        netns: &Path,
    ) -> Result<Arc<dyn WireguardDevice>, RelayError> {
        prepare_netns(netns).await?;
        let key = PrivateKey::load_or_generate(&options.key_path)?;
        let own = PathBuf::from("/proc/self/ns/net");
        let underlay = (!same_netns(&own, netns)).then(|| own.clone());
        let kind = fleet_gateway::select_backend(options.backend, netns).await;
        let config = DeviceConfig {
            name: options.name.clone(),
            netns: netns.to_path_buf(),
            underlay_netns: underlay,
            private_key: key,
            listen_port: options.listen.port(),
            mtu: RELAY_MTU,
            addresses: Vec::new(),
        };
        Ok(Arc::from(fleet_gateway::create_device(kind, config).await?))
    }

    pub fn record(&self) -> &RelayRecord {
        &self.record
    }

    /// Stops following, withdraws the relay record (members drop this relay; skipped after
    /// 5 s when the hub is away), deletes the device (and the netns the relay made for it).
    pub async fn stop(self) {
        if let Some(task) = &self.metrics_server {
            task.abort();
        }
        let _ = self.stop.send(true);
        let _ = self.follower.await;
        // No renewal after this point: the withdrawal below is final.
        let _ = self.renewer.await;
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.client.remove_relay(&self.record.id),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(relay = %self.record.id, error = %e, "could not withdraw the relay record")
            }
            Err(_) => {
                tracing::warn!(relay = %self.record.id, "the hub did not answer; the relay record stays")
            }
        }
        if let Err(e) = self.device.delete().await {
            tracing::warn!(relay = %self.record.id, error = %e, "could not delete the relay device");
        }
        if let Some(name) = self.owned_netns
            && let Err(e) = fleet_core::netns::delete_named(&name)
        {
            tracing::warn!(netns = %name, error = %e, "could not delete the relay netns");
        }
        tracing::info!(relay = %self.record.id, "relay stopped");
    }
}

/// Publishes the relay's record at once and renews it every `ttl`/3 until stopped. A failed
/// renewal (the hub API away) is retried every `ttl`/3 too, each call bounded by `ttl`/3 so a
/// hanging hub cannot delay the next; meanwhile the relay keeps relaying. If the record
/// expired meanwhile (another replica swept it), the next renewal publishes it again.
async fn renew(
    client: HubClient,
    record: RelayRecord,
    ttl: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let every = ttl / 3;
    let mut failing = false;
    let mut published = false;
    loop {
        let outcome = tokio::select! {
            _ = stopped.changed() => return,
            outcome = tokio::time::timeout(every, client.publish_relay(&record, ttl)) => outcome,
        };
        match outcome {
            Ok(Ok(revision)) => {
                if !published || failing {
                    tracing::info!(relay = %record.id, revision, ttl_ms = ttl.as_millis() as u64, "relay record published");
                }
                published = true;
                failing = false;
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(relay = %record.id, error = %e, "could not renew the relay record; retrying (the relay keeps relaying)");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!(relay = %record.id, timeout_ms = every.as_millis() as u64, "the hub did not answer a relay renewal; retrying (the relay keeps relaying)");
            }
            Ok(Err(e)) => {
                tracing::debug!(relay = %record.id, error = %e, "relay renewal failed again")
            }
            Err(_) => tracing::debug!(relay = %record.id, "relay renewal timed out again"),
        }
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Keeps the device's peers equal to the hub's clusters, read from the fleet mirror (which
/// lists, watches, relists after the history is gone and rides out hub restarts and
/// fail-overs; meanwhile the device keeps its peers). A failed update is retried.
async fn follow(
    client: HubClient,
    device: Arc<dyn WireguardDevice>,
    mut stopped: watch::Receiver<bool>,
) {
    let mirror = FleetMirror::spawn(Arc::new(client), WatcherConfig::default());
    let mut reader = mirror.reader();
    let mut applied: Option<Vec<Peer>> = None;
    let mut last_error: Option<String> = None;
    let retry = Duration::from_secs(1);
    loop {
        let state = reader.mark_seen();
        let error = state.error.as_ref().map(ToString::to_string);
        if error.is_some() && error != last_error {
            tracing::warn!(reason = ?error, "relay lost the hub; following it again");
        }
        last_error = error;
        let mut failed = false;
        if let Some(fleet) = state.fleet {
            let peers = relay_peers(fleet.clusters.values());
            if applied.as_ref() != Some(&peers) {
                match device.set_peers(&peers).await {
                    Ok(()) => {
                        tracing::debug!(peers = peers.len(), "relay peers set");
                        applied = Some(peers);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, peers = peers.len(), "setting the relay's peers failed; retrying");
                        failed = true;
                    }
                }
            }
        }
        tokio::select! {
            _ = stopped.changed() => return,
            changed = reader.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(retry), if failed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClusterId, GatewayState, PublicKey};

    fn cluster(id: &str, key: u8, block: &str, endpoint: Option<&str>) -> ClusterRecord {
        ClusterRecord {
            id: ClusterId::new(id).unwrap(),
            block: block.parse().unwrap(),
            public_key: PublicKey::from_bytes([key; 32]),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            gateway: GatewayState::Up,
            controller_live: true,
            joined_at: 0,
            token_id: String::new(),
        }
    }

    #[test]
    fn one_peer_per_cluster_with_its_block_and_public_endpoint() {
        let aa = cluster("aa", 1, "100.96.0.0/20", None);
        let bb = cluster("bb", 2, "100.96.16.0/20", Some("203.0.113.5:51820"));
        let peers = relay_peers([&aa, &bb]);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].public_key.as_bytes(), &[1; 32]);
        assert_eq!(peers[0].allowed_ips, vec!["100.96.0.0/20".parse().unwrap()]);
        assert_eq!(peers[0].endpoint, None);
        assert_eq!(
            peers[1].endpoint,
            Some("203.0.113.5:51820".parse().unwrap())
        );
        assert!(peers.iter().all(|p| p.persistent_keepalive == Some(25)));
    }

    #[test]
    fn relay_ttls_parse_in_ms_or_s_within_bounds() {
        assert_eq!(parse_relay_ttl("6s"), Ok(Duration::from_secs(6)));
        assert_eq!(parse_relay_ttl("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_relay_ttl("300ms"), Ok(MIN_RELAY_TTL));
        for bad in ["", "6", "s", "-1s", "1.5s", "299ms", "0s", "3601s", "6m"] {
            assert!(parse_relay_ttl(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_interval("0ms").is_err());
    }

    #[test]
    fn a_key_claimed_twice_is_served_once() {
        let aa = cluster("aa", 1, "100.96.0.0/20", None);
        let bb = cluster("bb", 1, "100.96.16.0/20", None);
        let peers = relay_peers([&aa, &bb]);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].allowed_ips, vec!["100.96.0.0/20".parse().unwrap()]);
    }

    #[test]
    fn only_peer_relevant_changes_change_the_peers() {
        let aa = cluster("aa", 1, "100.96.0.0/20", None);
        let mut down = aa.clone();
        down.gateway = GatewayState::Down;
        down.joined_at = 7;
        assert_eq!(
            relay_peers([&aa]),
            relay_peers([&down]),
            "gateway state is not a peer change"
        );
        let rekeyed = cluster("aa", 3, "100.96.0.0/20", None);
        assert_ne!(relay_peers([&aa]), relay_peers([&rekeyed]));
        let public = cluster("aa", 1, "100.96.0.0/20", Some("203.0.113.5:51820"));
        assert_ne!(relay_peers([&aa]), relay_peers([&public]));
    }
}

//! The cluster's WireGuard gateway while this controller is active: the device in the gateway
//! node's CNF netns (its UDP socket in the node's own netns), its peers, and its status record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_gateway::{
    BackendKind, DeviceConfig, GatewayError, Peer, PrivateKey, PublicKey, WireguardDevice,
    create_device, select_backend,
};

/// A peer we dial that has not completed a handshake this long after it was set is re-added.
const KICK_AFTER: Duration = Duration::from_millis(1000);
/// ... but only this long after it was set: later, a silent peer is simply down.
const KICK_WINDOW: Duration = Duration::from_secs(15);

use crate::records::{GatewayRecord, peer_record, unix_secs};

/// How the device is made.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub name: String,
    pub listen_port: u16,
    pub mtu: u32,
    /// `None`: kernel where available, else userspace.
    pub backend: Option<BackendKind>,
    pub private_key: PrivateKey,
    /// The gateway node's own netns (the device's underlay).
    pub underlay_netns: PathBuf,
    pub node: String,
    pub holder: String,
}

/// The device, once made.
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    device: Option<Box<dyn WireguardDevice>>,
    netns: Option<PathBuf>,
    peers: Option<Vec<Peer>>,
    /// When each peer we dial was set on this device, until its first handshake.
    awaiting: HashMap<PublicKey, Instant>,
    last_kick: Option<Instant>,
    /// The own-block unreachable route installed beside the device.
    own_block: Option<ipnetwork::Ipv4Network>,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Self {
        Gateway {
            config,
            device: None,
            netns: None,
            peers: None,
            awaiting: HashMap::new(),
            last_kick: None,
            own_block: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.device.is_some()
    }

    /// Makes the device in `cnf_netns` unless it exists there. A device or UAPI socket of the
    /// same name left by a killed instance is removed first.
    pub async fn ensure(&mut self, cnf_netns: &Path) -> Result<bool, GatewayError> {
        if self.device.is_some() && self.netns.as_deref() == Some(cnf_netns) {
            return Ok(false);
        }
        self.delete().await?;
        remove_stale(&self.config.name, cnf_netns).await?;
        let kind = select_backend(self.config.backend, cnf_netns).await;
        let device = create_device(
            kind,
            DeviceConfig {
                name: self.config.name.clone(),
                netns: cnf_netns.to_owned(),
                underlay_netns: Some(self.config.underlay_netns.clone()),
                private_key: self.config.private_key.clone(),
                listen_port: self.config.listen_port,
                mtu: self.config.mtu,
                addresses: Vec::new(),
            },
        )
        .await?;
        tracing::info!(device = %self.config.name, netns = %cnf_netns.display(), backend = %kind, port = self.config.listen_port, "WireGuard gateway up");
        self.device = Some(device);
        self.netns = Some(cnf_netns.to_owned());
        self.peers = None;
        self.awaiting.clear();
        Ok(true)
    }

    /// Makes `peers` the device's peers (no call when they are what was set last).
    pub async fn set_peers(&mut self, peers: Vec<Peer>) -> Result<(), GatewayError> {
        let Some(device) = &self.device else {
            return Ok(());
        };
        if self.peers.as_ref() == Some(&peers) {
            return Ok(());
        }
        device.set_peers(&peers).await?;
        let before: Vec<PublicKey> = self.peers.iter().flatten().map(|p| p.public_key).collect();
        let now = Instant::now();
        self.awaiting
            .retain(|k, _| peers.iter().any(|p| p.public_key == *k));
        for p in peers.iter().filter(|p| p.endpoint.is_some()) {
            if !before.contains(&p.public_key) {
                self.awaiting.insert(p.public_key, now);
            }
        }
        let shown: Vec<String> = peers
            .iter()
            .map(|p| {
                let allowed: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
                let endpoint = p
                    .endpoint
                    .map_or("(dials us)".to_string(), |e| e.to_string());
                format!("{} {} {}", p.public_key, endpoint, allowed.join(","))
            })
            .collect();
        tracing::info!(device = %self.config.name, peers = ?shown, "gateway peers set");
        self.peers = Some(peers);
        Ok(())
    }

    /// Keeps `unreachable <block>` beside the device (see [`crate::own_block`]).
    pub async fn set_own_block(
        &mut self,
        block: ipnetwork::Ipv4Network,
    ) -> Result<(), crate::own_block::OwnBlockError> {
        let Some(netns) = &self.netns else {
            return Ok(());
        };
        // Checked every pass: another replica stepping down on this node removes its own.
        crate::own_block::sync(netns, Some(block)).await?;
        if self.own_block != Some(block) {
            tracing::info!(%block, netns = %netns.display(), "unreachable route for the own block installed");
        }
        self.own_block = Some(block);
        Ok(())
    }

    /// Whether a peer we dial still awaits its first handshake (within the kick window).
    pub fn awaiting_handshakes(&self) -> bool {
        self.awaiting.values().any(|t| t.elapsed() < KICK_WINDOW)
    }

    /// Re-adds peers we dial that have had no handshake [`KICK_AFTER`] after being set. A
    /// peer learns our new key through the hub at about the moment we first dial it; if our
    /// first initiation arrived before that, WireGuard would retry only after its 5 s rekey
    /// timeout. A re-added peer initiates again at once.
    pub async fn kick_stalled_handshakes(&mut self) -> Result<(), GatewayError> {
        let (Some(device), Some(peers)) = (&self.device, &self.peers) else {
            return Ok(());
        };
        self.awaiting.retain(|_, t| t.elapsed() < KICK_WINDOW);
        if self.awaiting.is_empty() || self.last_kick.is_some_and(|k| k.elapsed() < KICK_AFTER) {
            return Ok(());
        }
        let stats = device.stats().await?;
        let mut stalled = Vec::new();
        for (key, since) in &self.awaiting {
            let shook = stats
                .iter()
                .any(|s| s.public_key == *key && s.last_handshake.is_some());
            if shook {
                continue;
            }
            if since.elapsed() >= KICK_AFTER {
                stalled.push(*key);
            }
        }
        // Peers with a handshake are done.
        self.awaiting.retain(|k, _| {
            !stats
                .iter()
                .any(|s| s.public_key == *k && s.last_handshake.is_some())
        });
        if stalled.is_empty() {
            return Ok(());
        }
        let without: Vec<Peer> = peers
            .iter()
            .filter(|p| !stalled.contains(&p.public_key))
            .cloned()
            .collect();
        device.set_peers(&without).await?;
        device.set_peers(peers).await?;
        self.last_kick = Some(Instant::now());
        tracing::info!(device = %self.config.name, peers = ?stalled.iter().map(|k| k.to_base64()).collect::<Vec<_>>(), "no handshake yet: peers re-added to initiate again");
        Ok(())
    }

    /// The `gateway` record from the device's statistics.
    pub async fn record(&self) -> Result<Option<GatewayRecord>, GatewayError> {
        let Some(device) = &self.device else {
            return Ok(None);
        };
        let stats = device.stats().await?;
        Ok(Some(GatewayRecord {
            node: self.config.node.clone(),
            holder: self.config.holder.clone(),
            backend: device.backend().to_string(),
            public_key: device.public_key().to_base64(),
            listen_port: device.listen_port(),
            updated_at: unix_secs(std::time::SystemTime::now()),
            peers: stats.iter().map(peer_record).collect(),
        }))
    }

    /// Removes the device (and its routes and UAPI socket).
    pub async fn delete(&mut self) -> Result<(), GatewayError> {
        self.peers = None;
        self.awaiting.clear();
        if let (Some(netns), Some(_)) = (self.netns.take(), self.own_block.take())
            && let Err(e) = crate::own_block::sync(&netns, None).await
        {
            tracing::warn!(error = %e, "removing the own-block route failed");
        }
        if let Some(device) = self.device.take() {
            device.delete().await?;
            tracing::info!(device = %self.config.name, "WireGuard gateway removed");
        }
        Ok(())
    }
}

/// Removes a link called `name` in `netns` and a UAPI socket of that name nobody serves: what
/// a killed instance leaves (a kernel device survives its process; a userspace one leaves its
/// socket file).
async fn remove_stale(name: &str, netns: &Path) -> Result<(), GatewayError> {
    let socket = fleet_gateway::userspace::uapi_socket(name);
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            tracing::warn!(socket = %socket.display(), "a live process serves this WireGuard device's UAPI socket; replacing its device");
        }
        let _ = std::fs::remove_file(&socket);
    }
    let link = name.to_string();
    let found = fleet_core::netns::with_netlink(vec![netns.to_owned()], move |h| async move {
        let h = &h[0];
        match fleet_core::netlink::find_link(h, &link).await {
            Ok(Some(_)) => fleet_core::netlink::delete_link(h, &link)
                .await
                .map(|_| true),
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await?
    .map_err(|source| GatewayError::Netlink {
        op: format!("remove a stale link {name}"),
        source,
    })?;
    if found {
        tracing::warn!(device = %name, netns = %netns.display(), "removed a stale WireGuard link left by an earlier instance");
    }
    Ok(())
}

//! The cluster's WireGuard gateway, as the active controller sees it: a client of the gateway
//! node's `fleet-nri`, which owns the device (in its CNF netns, the UDP socket in the node's
//! own netns), its peers, the own-block route and the private key.
//!
//! The controller sends the whole desired state (`set_gateway`) on every pass — the daemon
//! changes nothing when it is what it has — reads the device's state back for the `gateway`
//! record (`gateway_status`) and asks for the public key to join or re-join at the hub
//! (`gateway_key`). Stopping or stepping down leaves the device as it is: the data plane stays
//! up across controller restarts and take-overs. Only a cluster removed from the fleet clears
//! it (`clear_gateway`).

use std::time::Duration;

use std::sync::Arc;

use fleet_proto::node::{
    GatewayPeer, GatewayRelay, NodeError, SetGatewayRequest, WireguardBackend, code,
};
use fleet_proto::wireguard::PublicKey;
use ipnetwork::Ipv4Network;
use tokio::sync::watch;

use crate::nodes::NodeApi;
use fleet_hub_api::records::{GatewayPeerRecord, GatewayRecord, unix_secs};

/// How the device is made (passed through to the gateway node).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub name: String,
    pub listen_port: u16,
    pub mtu: u32,
    /// `None`: kernel where available, else userspace (the gateway node decides).
    pub backend: Option<WireguardBackend>,
    /// The gateway node (its name in nodes.json).
    pub node: String,
    pub holder: String,
}

/// The gateway node's device, driven over the node API.
pub struct Gateway {
    config: GatewayConfig,
    api: Arc<dyn NodeApi>,
    own_block: Option<Ipv4Network>,
    /// The last `set_gateway` succeeded.
    up: bool,
    /// What was last sent and accepted (to log changes once).
    sent: Option<SetGatewayRequest>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("own_block", &self.own_block)
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(config: GatewayConfig, api: Arc<dyn NodeApi>) -> Self {
        Gateway {
            config,
            api,
            own_block: None,
            up: false,
            sent: None,
        }
    }

    /// Whether the gateway node last confirmed the device.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The gateway's public key, from the gateway node (which makes the key on first use and
    /// never hands out the private half).
    pub async fn public_key(&self) -> Result<PublicKey, NodeError> {
        Ok(self.api.gateway_key().await?.public_key)
    }

    /// [`Gateway::public_key`], retried while the gateway node's `fleet-nri` is not reachable
    /// (it may start after the controller). `None` when stopped first.
    pub async fn wait_public_key(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<PublicKey>, NodeError> {
        let mut backoff = Duration::from_millis(200);
        let mut logged = false;
        loop {
            match self.public_key().await {
                Ok(k) => return Ok(Some(k)),
                Err(e) if e.code == code::TRY_AGAIN_LATER => {
                    if !logged {
                        tracing::warn!(node = %self.config.node, error = %e, "the gateway node's fleet-nri is not reachable: waiting for it (the WireGuard key lives there; joining the hub waits for it)");
                        logged = true;
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = crate::run::stopped(stop) => return Ok(None),
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The own block, routed `unreachable` beside the device (sent with the next
    /// [`Gateway::set_peers`]).
    pub fn set_own_block(&mut self, block: Ipv4Network) {
        self.own_block = Some(block);
    }

    /// Sends the whole desired state with `peers` and the relay among them (a new relay
    /// instance resets the sessions through it): the gateway node makes the device if it has
    /// none and changes only what differs.
    pub async fn set_peers(
        &mut self,
        peers: Vec<GatewayPeer>,
        relay: Option<GatewayRelay>,
    ) -> Result<(), NodeError> {
        let req = SetGatewayRequest {
            name: self.config.name.clone(),
            listen_port: self.config.listen_port,
            mtu: self.config.mtu,
            backend: self.config.backend,
            own_block: self.own_block.map(|b| b.to_string()),
            peers,
            relay,
        };
        let sent = req.clone();
        let result = self.api.set_gateway(req).await;
        self.up = result.is_ok();
        let r = result?;
        if r.created {
            tracing::info!(device = %r.device.name, node = %self.config.node, backend = ?r.device.backend, public_key = %r.device.public_key, port = r.device.listen_port, "WireGuard gateway made on the gateway node");
        }
        if self.sent.as_ref() != Some(&sent) {
            let shown: Vec<String> = sent
                .peers
                .iter()
                .map(|p| {
                    let endpoint = p
                        .endpoint
                        .map_or("(dials us)".to_string(), |e| e.to_string());
                    format!("{} {} {}", p.public_key, endpoint, p.allowed_ips.join(","))
                })
                .collect();
            tracing::info!(device = %sent.name, node = %self.config.node, peers = ?shown, changed = r.peers_changed, "gateway peers set");
            self.sent = Some(sent);
        }
        Ok(())
    }

    /// The `gateway` record from the gateway node's device state; `None` without a device.
    pub async fn record(&self) -> Result<Option<GatewayRecord>, NodeError> {
        self.reader().record().await
    }

    /// A handle that reads the device's state only (for the heartbeat task).
    pub fn reader(&self) -> GatewayReader {
        GatewayReader {
            config: self.config.clone(),
            api: self.api.clone(),
        }
    }
}

/// Reads the gateway device's state over the gateway node's API; cheap to clone.
#[derive(Clone)]
pub struct GatewayReader {
    config: GatewayConfig,
    api: Arc<dyn NodeApi>,
}

impl GatewayReader {
    /// The `gateway` record from the gateway node's device state; `None` without a device.
    pub async fn record(&self) -> Result<Option<GatewayRecord>, NodeError> {
        let Some(st) = self.api.gateway_status().await? else {
            return Ok(None);
        };
        Ok(Some(GatewayRecord {
            node: self.config.node.clone(),
            holder: self.config.holder.clone(),
            backend: match st.device.backend {
                WireguardBackend::Kernel => "kernel",
                WireguardBackend::Userspace => "userspace",
            }
            .to_string(),
            public_key: st.device.public_key.to_base64(),
            listen_port: st.device.listen_port,
            updated_at: unix_secs(std::time::SystemTime::now()),
            peers: st
                .peers
                .into_iter()
                .map(|p| GatewayPeerRecord {
                    public_key: p.public_key.to_base64(),
                    endpoint: p.endpoint,
                    last_handshake: p.last_handshake,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    path: p.path,
                    path_since: p.path_since,
                })
                .collect(),
        }))
    }
}

impl Gateway {
    /// Removes the device, its own-block route and its persisted state on the gateway node:
    /// only for a cluster removed from the fleet.
    pub async fn delete(&mut self) -> Result<(), NodeError> {
        self.up = false;
        self.sent = None;
        let r = self.api.clear_gateway().await?;
        if r.removed {
            tracing::info!(device = %self.config.name, node = %self.config.node, "WireGuard gateway removed");
        }
        Ok(())
    }
}

//! The cluster's WireGuard gateway, when the controller makes this node the gateway
//! (`set_gateway`): the device in the CNF netns with its UDP socket in the node's own netns,
//! its peers, the own-block `unreachable` route beside it, and the private key.
//!
//! The daemon keeps all of it across restarts of the controller (a stop, a crash, a standby
//! taking over on another node re-sends the same desired state: a no-op) and of itself: the
//! desired state is persisted (`gateway.json`, fsync + rename), so a restarted `fleet-nri`
//! re-creates a userspace device with the same key and peers at start-up, before any
//! controller calls; a kernel device that survived is adopted (reconfigured, not deleted).
//! The private key (`wg.key`, 0600) is made here and never leaves the node: the node API
//! carries only the public key.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_gateway::{
    BackendKind, DeviceConfig, GatewayError, Peer, PeerStats, PrivateKey, PublicKey,
    WireguardDevice, create_device, select_backend,
};
use fleet_proto::node::{
    ClearGatewayResult, GatewayDevice, GatewayKey, GatewayPeerStatus, GatewayStatus, NodeError,
    SetGatewayRequest, SetGatewayResult, WireguardBackend,
};
use ipnetwork::{IpNetwork, Ipv4Network};

use super::paths::{Fallback, Paths};
use super::{Failure, Node, own_block};

/// The gateway's private key in the data dir (0600).
pub const KEY_FILE: &str = "wg.key";
/// The desired gateway state in the data dir.
pub const STATE_FILE: &str = "gateway.json";
/// A peer we dial that has not completed a handshake this long after it was set is re-added.
const KICK_AFTER: Duration = Duration::from_millis(1000);
/// ... but only this long after it was set: later, a silent peer is simply down.
const KICK_WINDOW: Duration = Duration::from_secs(15);
/// How often the kick task looks.
const KICK_POLL: Duration = Duration::from_millis(250);
/// How often the path watcher reads the direct peers' counters.
const PATH_POLL: Duration = Duration::from_millis(500);

/// A `set_gateway` request, checked and parsed.
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    name: String,
    listen_port: u16,
    mtu: u32,
    backend: Option<BackendKind>,
    own_block: Option<Ipv4Network>,
    peers: Vec<Peer>,
    /// Direct peers with the relay's address to fall back to.
    fallbacks: Vec<Fallback>,
}

fn invalid(what: impl Into<String>) -> Failure {
    Failure::InvalidGateway(what.into())
}

fn gateway_failure(op: &'static str) -> impl FnOnce(GatewayError) -> Failure {
    move |e| Failure::Gateway {
        op,
        reason: e.to_string(),
    }
}

fn kind_of(b: WireguardBackend) -> BackendKind {
    match b {
        WireguardBackend::Kernel => BackendKind::Kernel,
        WireguardBackend::Userspace => BackendKind::Userspace,
    }
}

fn wire_of(b: BackendKind) -> WireguardBackend {
    match b {
        BackendKind::Kernel => WireguardBackend::Kernel,
        BackendKind::Userspace => WireguardBackend::Userspace,
    }
}

impl Desired {
    fn parse(req: &SetGatewayRequest) -> Result<Self, Failure> {
        let own_block = req
            .own_block
            .as_deref()
            .map(|b| {
                b.parse::<Ipv4Network>()
                    .map_err(|e| invalid(format!("own_block {b:?} is not an IPv4 CIDR: {e}")))
            })
            .transpose()?;
        if let Some(b) = own_block
            && b.ip() != b.network()
        {
            return Err(invalid(format!(
                "own_block {b} has host bits set: use {}/{}",
                b.network(),
                b.prefix()
            )));
        }
        let mut peers = Vec::with_capacity(req.peers.len());
        let mut fallbacks = Vec::new();
        for p in &req.peers {
            if let Some(fallback) = p.fallback {
                fallbacks.push(Fallback {
                    public_key: p.public_key,
                    direct: p.endpoint,
                    fallback,
                });
            }
            let allowed_ips = p
                .allowed_ips
                .iter()
                .map(|a| {
                    a.parse::<IpNetwork>().map_err(|e| {
                        invalid(format!(
                            "allowed IP {a:?} of peer {} is not a CIDR: {e}",
                            p.public_key
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            peers.push(Peer {
                public_key: p.public_key,
                endpoint: p.endpoint,
                allowed_ips,
                persistent_keepalive: p.keepalive,
            });
        }
        let desired = Desired {
            name: req.name.clone(),
            listen_port: req.listen_port,
            mtu: req.mtu,
            backend: req.backend.map(kind_of),
            own_block,
            peers,
            fallbacks,
        };
        // The device's own checks (name, port, MTU), before anything is made or persisted.
        desired
            .device_config(
                PathBuf::new(),
                PathBuf::new(),
                PrivateKey::from_bytes([0; 32]),
            )
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = desired.peers.iter().find(|p| !seen.insert(p.public_key)) {
            return Err(invalid(format!(
                "peer {} is listed twice; give each peer once",
                dup.public_key
            )));
        }
        // One prefix routes to one place: WireGuard would silently move a prefix named twice to
        // the last peer, and the own block's unreachable route would shadow a peer's route.
        let mut owners: std::collections::HashMap<IpNetwork, &PublicKey> =
            std::collections::HashMap::new();
        for p in &desired.peers {
            for a in &p.allowed_ips {
                let a = IpNetwork::new(a.network(), a.prefix()).unwrap_or(*a);
                if own_block.is_some_and(|b| a == IpNetwork::V4(b)) {
                    return Err(invalid(format!(
                        "allowed IP {a} of peer {} is this cluster's own block, which is routed \
                         unreachable here; it cannot also go to a peer",
                        p.public_key
                    )));
                }
                if let Some(other) = owners.insert(a, &p.public_key)
                    && *other != p.public_key
                {
                    return Err(invalid(format!(
                        "allowed IP {a} is given to two peers ({other} and {}); give each \
                         prefix to one peer",
                        p.public_key
                    )));
                }
            }
        }
        Ok(desired)
    }

    fn device_config(&self, netns: PathBuf, underlay: PathBuf, key: PrivateKey) -> DeviceConfig {
        DeviceConfig {
            name: self.name.clone(),
            netns,
            underlay_netns: Some(underlay),
            private_key: key,
            listen_port: self.listen_port,
            mtu: self.mtu,
            addresses: Vec::new(),
        }
    }
}

/// The device as it is, and what was last set on it.
#[derive(Debug, Default)]
pub(super) struct GatewayState {
    /// The desired state as last accepted (and persisted).
    request: Option<SetGatewayRequest>,
    device: Option<Box<dyn WireguardDevice>>,
    /// Name, port, MTU and netns the device was made with.
    made_as: Option<(String, u16, u32, PathBuf)>,
    /// The peers set on the device.
    peers: Option<Vec<Peer>>,
    /// The own block whose route is installed, and where.
    own_block: Option<(Ipv4Network, PathBuf)>,
    /// When each peer we dial was set on this device, until its first handshake.
    awaiting: HashMap<PublicKey, Instant>,
    last_kick: Option<Instant>,
    kicker: bool,
    /// The path (direct or relay) of each direct peer with a fallback.
    paths: Paths,
    path_watcher: bool,
}

fn device_info(d: &dyn WireguardDevice) -> GatewayDevice {
    GatewayDevice {
        name: d.name().to_owned(),
        backend: wire_of(d.backend()),
        public_key: d.public_key(),
        listen_port: d.listen_port(),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A peer's state; its path from the path watcher, else from where it is sent (the relay's
/// address or not).
fn peer_status(
    s: &PeerStats,
    paths: &Paths,
    relay: Option<std::net::SocketAddr>,
) -> GatewayPeerStatus {
    let (path, since) = match (paths.path(&s.public_key), s.endpoint) {
        (Some((path, since)), _) => (Some(path.as_str()), Some(unix(since))),
        (None, Some(e)) if Some(e) == relay => (Some("relay"), None),
        (None, Some(_)) => (Some("direct"), None),
        (None, None) => (None, None),
    };
    GatewayPeerStatus {
        public_key: s.public_key,
        endpoint: s.endpoint,
        allowed_ips: s.allowed_ips.iter().map(ToString::to_string).collect(),
        last_handshake: s.last_handshake.map(unix),
        rx_bytes: s.rx_bytes,
        tx_bytes: s.tx_bytes,
        path: path.map(str::to_string),
        path_since: since,
    }
}

impl GatewayState {
    /// Brings the device, its peers and the own-block route in line with `want`. Returns
    /// whether the device was made and whether its peers changed.
    async fn apply(
        &mut self,
        want: &Desired,
        cnf: &Path,
        underlay: &Path,
        key: &PrivateKey,
    ) -> Result<(bool, bool), Failure> {
        let created = self.ensure_device(want, cnf, underlay, key).await?;
        self.paths
            .set(&want.fallbacks, Instant::now(), SystemTime::now());
        let peers = self.paths.effective(&want.peers);
        let peers_changed = self.set_peers(&peers).await?;
        self.sync_own_block(want.own_block, cnf).await?;
        Ok((created, peers_changed))
    }

    async fn ensure_device(
        &mut self,
        want: &Desired,
        cnf: &Path,
        underlay: &Path,
        key: &PrivateKey,
    ) -> Result<bool, Failure> {
        let made_as = (
            want.name.clone(),
            want.listen_port,
            want.mtu,
            cnf.to_owned(),
        );
        if let Some(d) = &self.device
            && self.made_as.as_ref() == Some(&made_as)
            && want.backend.is_none_or(|b| b == d.backend())
        {
            return Ok(false);
        }
        self.delete_device().await?;
        let kind = select_backend(want.backend, cnf).await;
        if kind == BackendKind::Userspace {
            // A killed daemon's TUN is gone with it, but its UAPI socket stays; a kernel
            // device of that name is kept and adopted by `KernelDevice::create` instead.
            remove_stale(&want.name, cnf)
                .await
                .map_err(gateway_failure("remove a stale WireGuard device"))?;
        }
        let device = create_device(
            kind,
            want.device_config(cnf.to_owned(), underlay.to_owned(), key.clone()),
        )
        .await
        .map_err(gateway_failure("create the WireGuard device"))?;
        tracing::info!(device = %want.name, netns = %cnf.display(), backend = %kind, port = want.listen_port, public_key = %device.public_key(), "WireGuard gateway up");
        self.device = Some(device);
        self.made_as = Some(made_as);
        self.peers = None;
        self.awaiting.clear();
        Ok(true)
    }

    /// Makes `peers` the device's peers (no call when they are what was set last).
    async fn set_peers(&mut self, peers: &[Peer]) -> Result<bool, Failure> {
        let Some(device) = &self.device else {
            return Ok(false);
        };
        if self.peers.as_deref() == Some(peers) {
            return Ok(false);
        }
        device
            .set_peers(peers)
            .await
            .map_err(gateway_failure("set the WireGuard peers"))?;
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
        tracing::info!(device = %device.name(), peers = ?shown, "gateway peers set");
        self.peers = Some(peers.to_vec());
        Ok(true)
    }

    /// Keeps `unreachable <block>` beside the device (see [`own_block`]); checked on every
    /// request, so a route someone removed comes back.
    async fn sync_own_block(
        &mut self,
        block: Option<Ipv4Network>,
        cnf: &Path,
    ) -> Result<(), Failure> {
        if let Some((old, netns)) = &self.own_block
            && netns != cnf
        {
            if let Err(e) = own_block::sync(netns, None).await {
                tracing::warn!(block = %old, error = %e, "removing the own-block route from the old CNF netns failed");
            }
            self.own_block = None;
        }
        own_block::sync(cnf, block)
            .await
            .map_err(|e| Failure::Gateway {
                op: "keep the own block's unreachable route",
                reason: e.to_string(),
            })?;
        if let Some(b) = block
            && self.own_block.as_ref().map(|(o, _)| *o) != Some(b)
        {
            tracing::info!(block = %b, netns = %cnf.display(), "unreachable route for the own block installed");
        }
        self.own_block = block.map(|b| (b, cnf.to_owned()));
        Ok(())
    }

    fn awaiting_handshakes(&self) -> bool {
        self.awaiting.values().any(|t| t.elapsed() < KICK_WINDOW)
    }

    /// Re-adds peers we dial that have had no handshake [`KICK_AFTER`] after being set. A
    /// peer learns our key through the hub at about the moment we first dial it; if our
    /// first initiation arrived before that, WireGuard would retry only after its 5 s rekey
    /// timeout. A re-added peer initiates again at once.
    async fn kick_stalled_handshakes(&mut self) -> Result<(), GatewayError> {
        let (Some(device), Some(peers)) = (&self.device, &self.peers) else {
            return Ok(());
        };
        self.awaiting.retain(|_, t| t.elapsed() < KICK_WINDOW);
        if self.awaiting.is_empty() || self.last_kick.is_some_and(|k| k.elapsed() < KICK_AFTER) {
            return Ok(());
        }
        let stats = device.stats().await?;
        let shook = |k: &PublicKey| {
            stats
                .iter()
                .any(|s| s.public_key == *k && s.last_handshake.is_some())
        };
        let stalled: Vec<PublicKey> = self
            .awaiting
            .iter()
            .filter(|(k, since)| !shook(k) && since.elapsed() >= KICK_AFTER)
            .map(|(k, _)| *k)
            .collect();
        // Peers with a handshake are done.
        self.awaiting.retain(|k, _| !shook(k));
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
        tracing::info!(device = %device.name(), peers = ?stalled.iter().map(|k| k.to_base64()).collect::<Vec<_>>(), "no handshake yet: peers re-added to initiate again");
        Ok(())
    }

    /// Reads the direct peers' counters and moves each whose path changed (see
    /// [`super::paths`]): re-added with the new endpoint, kicked until it has a handshake.
    async fn watch_paths(&mut self) -> Result<(), GatewayError> {
        let (Some(device), Some(peers)) = (&self.device, &self.peers) else {
            return Ok(());
        };
        let stats = device.stats().await?;
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut moved: Vec<(PublicKey, std::net::SocketAddr)> = Vec::new();
        for s in &stats {
            if let Some(to) = self.paths.observe(
                &s.public_key,
                s.endpoint,
                s.rx_bytes,
                s.last_handshake,
                now,
                wall,
            ) {
                moved.push((s.public_key, to));
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        let keys: Vec<PublicKey> = moved.iter().map(|(k, _)| *k).collect();
        let without: Vec<Peer> = peers
            .iter()
            .filter(|p| !keys.contains(&p.public_key))
            .cloned()
            .collect();
        let now_peers: Vec<Peer> = peers
            .iter()
            .map(|p| match moved.iter().find(|(k, _)| *k == p.public_key) {
                Some((_, to)) => Peer {
                    endpoint: Some(*to),
                    ..p.clone()
                },
                None => p.clone(),
            })
            .collect();
        device.set_peers(&without).await?;
        device.set_peers(&now_peers).await?;
        for (k, to) in &moved {
            self.awaiting.insert(*k, now);
            tracing::info!(device = %device.name(), peer = %k, endpoint = %to, path = ?self.paths.path(k).map(|(p, _)| p.as_str()), "peer path changed");
        }
        self.peers = Some(now_peers);
        Ok(())
    }

    /// Re-adds the relay peer and every peer sent to the relay's endpoint (fresh sessions:
    /// each initiates a handshake at once, so a restarted relay learns our mapped address and
    /// the session indices again), and has the kicker repeat that every [`KICK_AFTER`] until
    /// each has a handshake: the other member may register with the new relay a moment after
    /// our first initiation went out. Without this, a member that only receives would wait
    /// for its next rekey (up to 2 minutes) before the relay could reach it again.
    async fn reset_relayed(&mut self, relay: &PublicKey) -> Result<(), GatewayError> {
        let (Some(device), Some(peers)) = (&self.device, &self.peers) else {
            return Ok(());
        };
        let Some(endpoint) = peers
            .iter()
            .find(|p| p.public_key == *relay)
            .and_then(|p| p.endpoint)
        else {
            return Ok(());
        };
        let through: Vec<PublicKey> = peers
            .iter()
            .filter(|p| p.endpoint == Some(endpoint))
            .map(|p| p.public_key)
            .collect();
        let without: Vec<Peer> = peers
            .iter()
            .filter(|p| !through.contains(&p.public_key))
            .cloned()
            .collect();
        device.set_peers(&without).await?;
        device.set_peers(peers).await?;
        let now = Instant::now();
        for k in &through {
            self.awaiting.insert(*k, now);
        }
        self.last_kick = Some(now);
        tracing::info!(device = %device.name(), relay = %endpoint, peers = through.len(), "the relay restarted: sessions through it reset");
        Ok(())
    }

    async fn delete_device(&mut self) -> Result<(), Failure> {
        self.peers = None;
        self.awaiting.clear();
        self.made_as = None;
        if let Some(device) = self.device.take() {
            let name = device.name().to_owned();
            device
                .delete()
                .await
                .map_err(gateway_failure("remove the WireGuard device"))?;
            tracing::info!(device = %name, "WireGuard gateway removed");
        }
        Ok(())
    }
}

/// While a dialled peer awaits its first handshake: re-adds stalled peers every
/// [`KICK_POLL`]. Ends when no peer awaits one (at the latest [`KICK_WINDOW`] after the last
/// peer change).
fn spawn_kicker(state: Arc<tokio::sync::Mutex<GatewayState>>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(KICK_POLL).await;
            let mut g = state.lock().await;
            if !g.awaiting_handshakes() {
                g.kicker = false;
                return;
            }
            if let Err(e) = g.kick_stalled_handshakes().await {
                tracing::warn!(error = %e, "re-adding peers without a handshake failed");
            }
        }
    });
}

/// While direct peers have a fallback: every [`PATH_POLL`], their paths (see
/// [`super::paths`]). Ends when none has.
fn spawn_path_watcher(state: Arc<tokio::sync::Mutex<GatewayState>>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PATH_POLL).await;
            let mut g = state.lock().await;
            if g.paths.is_empty() || g.device.is_none() {
                g.path_watcher = false;
                return;
            }
            if let Err(e) = g.watch_paths().await {
                tracing::warn!(error = %e, "watching the direct peers' paths failed");
            }
            if g.awaiting_handshakes() && !g.kicker {
                g.kicker = true;
                spawn_kicker(state.clone());
            }
        }
    });
}

/// Removes a link called `name` in `netns` and a UAPI socket of that name nobody serves: what
/// a killed instance leaves (a userspace device leaves its socket file; a device made by an
/// older controller may outlive it).
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

/// Writes `value` to `path` as JSON: a temporary file, fsynced, renamed over `path`, the
/// directory fsynced (like the plan).
fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fleet_core::private_socket::ensure_dir(dir, 0o700)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}.tmp", name.unwrap_or_default()));
    // 0600 whatever the umask: it names the gateway's peers and endpoints.
    let _ = std::fs::remove_file(&tmp);
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?
    };
    f.write_all(&serde_json::to_vec_pretty(value).expect("state serializes"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Node {
    fn gateway_state_path(&self) -> PathBuf {
        self.local.data_dir.join(STATE_FILE)
    }

    /// The gateway's private key, made (0600) on first use and kept in the data dir. One
    /// caller at a time: two controllers asking at once get the same key.
    fn gateway_private_key(&self) -> Result<PrivateKey, Failure> {
        let mut cached = self.gateway_key.lock().expect("gateway key");
        if let Some(k) = cached.as_ref() {
            return Ok(k.clone());
        }
        let key =
            PrivateKey::load_or_generate(&self.local.data_dir.join(KEY_FILE)).map_err(|e| {
                Failure::Gateway {
                    op: "load or create the gateway's private key",
                    reason: e.to_string(),
                }
            })?;
        *cached = Some(key.clone());
        Ok(key)
    }

    /// `set_gateway`: this node is the cluster's gateway. Recorded first (so a failure is
    /// retried at start), then applied; the same state again changes nothing.
    pub async fn set_gateway(&self, req: SetGatewayRequest) -> Result<SetGatewayResult, Failure> {
        let want = Desired::parse(&req)?;
        let planned = self.planned()?;
        let key = self.gateway_private_key()?;
        let mut g = self.gateway.lock().await;
        // A relay that restarted knows no member's address and no session index: sessions
        // through it must start again (see `GatewayState::reset_relayed`).
        let relay_restarted = match (
            g.request.as_ref().and_then(|r| r.relay.as_ref()),
            &req.relay,
        ) {
            (Some(before), Some(now)) => before.instance != now.instance,
            _ => false,
        };
        let relay_key = req.relay.as_ref().map(|r| r.public_key);
        if g.request.as_ref() != Some(&req) {
            save_json(&self.gateway_state_path(), &req).map_err(|e| Failure::Persist {
                what: "gateway state",
                reason: e.to_string(),
            })?;
            g.request = Some(req);
        }
        let (created, peers_changed) = g
            .apply(
                &want,
                &planned.datapath.cnf_path(),
                &self.underlay_netns,
                &key,
            )
            .await?;
        if relay_restarted
            && !created
            && let Some(relay) = relay_key
        {
            g.reset_relayed(&relay).await.map_err(gateway_failure(
                "reset the sessions through the restarted relay",
            ))?;
        }
        if g.awaiting_handshakes() && !g.kicker {
            g.kicker = true;
            spawn_kicker(self.gateway.clone());
        }
        if !g.paths.is_empty() && !g.path_watcher {
            g.path_watcher = true;
            spawn_path_watcher(self.gateway.clone());
        }
        let device = device_info(g.device.as_deref().expect("apply made the device"));
        Ok(SetGatewayResult {
            device,
            created,
            peers_changed,
        })
    }

    /// `gateway_status`: the device and its peers' tunnel state; `None` without a device.
    pub async fn gateway_status(&self) -> Result<Option<GatewayStatus>, Failure> {
        let g = self.gateway.lock().await;
        let (Some(device), Some((_, _, _, netns))) = (&g.device, &g.made_as) else {
            return Ok(None);
        };
        // The relay's address: where the relay peer is sent.
        let relay = g.request.as_ref().and_then(|r| {
            let key = r.relay.as_ref()?.public_key;
            r.peers.iter().find(|p| p.public_key == key)?.endpoint
        });
        let stats = device
            .stats()
            .await
            .map_err(gateway_failure("read the WireGuard statistics"))?;
        Ok(Some(GatewayStatus {
            device: device_info(device.as_ref()),
            cnf_netns: netns.display().to_string(),
            own_block: g.own_block.as_ref().map(|(b, _)| b.to_string()),
            peers: stats
                .iter()
                .map(|s| peer_status(s, &g.paths, relay))
                .collect(),
        }))
    }

    /// `gateway_key`: the public half of the gateway's key (made on first use).
    pub fn gateway_key(&self) -> Result<GatewayKey, Failure> {
        Ok(GatewayKey {
            public_key: self.gateway_private_key()?.public_key(),
        })
    }

    /// `clear_gateway`: the device, its own-block route and the persisted state go; the key
    /// stays (the node keeps its identity if it is made the gateway again).
    pub async fn clear_gateway(&self) -> Result<ClearGatewayResult, Failure> {
        let mut g = self.gateway.lock().await;
        let had = g.device.is_some() || g.request.is_some() || g.own_block.is_some();
        g.delete_device().await?;
        if let Some((block, netns)) = g.own_block.take()
            && let Err(e) = own_block::sync(&netns, None).await
        {
            g.own_block = Some((block, netns));
            return Err(Failure::Gateway {
                op: "remove the own block's unreachable route",
                reason: e.to_string(),
            });
        }
        match std::fs::remove_file(self.gateway_state_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Failure::Persist {
                    what: "gateway state (removal)",
                    reason: e.to_string(),
                });
            }
        }
        g.request = None;
        if had {
            tracing::info!("gateway cleared: device, own-block route and state removed");
        }
        Ok(ClearGatewayResult { removed: had })
    }

    /// Start-up: the persisted gateway state is applied (after the plan, before the node API
    /// serves). Failures are logged; the controller's next `set_gateway` retries.
    pub(super) async fn restore_gateway(&self) -> anyhow::Result<()> {
        let path = self.gateway_state_path();
        let req: SetGatewayRequest = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "the gateway state {} is corrupt ({e}); remove it, the controller sends it again",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => anyhow::bail!("cannot read the gateway state {}: {e}", path.display()),
        };
        let name = req.name.clone();
        self.gateway.lock().await.request = Some(req.clone());
        if self.planned_now().is_none() {
            tracing::warn!(device = %name, "gateway state persisted but no plan: the device waits for set_plan and set_gateway");
            return Ok(());
        }
        match self.set_gateway(req).await {
            Ok(r) => {
                tracing::info!(device = %name, backend = ?r.device.backend, peers_changed = r.peers_changed, "gateway restored from the data dir")
            }
            Err(e) => {
                tracing::error!(device = %name, error = %NodeError::from(e), "cannot restore the gateway; the controller's next set_gateway retries")
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_proto::node::GatewayPeer;

    fn request() -> SetGatewayRequest {
        SetGatewayRequest {
            name: "fleetwg0".into(),
            listen_port: 51820,
            mtu: 1420,
            backend: None,
            own_block: Some("100.96.16.0/20".into()),
            relay: None,
            peers: vec![GatewayPeer {
                public_key: PrivateKey::generate().public_key(),
                endpoint: Some("203.0.113.10:51820".parse().unwrap()),
                allowed_ips: vec!["100.96.0.0/12".into()],
                keepalive: Some(25),
                fallback: None,
            }],
        }
    }

    #[test]
    fn requests_are_parsed_and_checked_before_anything_is_made() {
        let d = Desired::parse(&request()).unwrap();
        assert_eq!(d.own_block, Some("100.96.16.0/20".parse().unwrap()));
        assert_eq!(d.peers[0].persistent_keepalive, Some(25));
        let bad = |f: &dyn Fn(&mut SetGatewayRequest)| {
            let mut r = request();
            f(&mut r);
            NodeError::from(Desired::parse(&r).unwrap_err())
        };
        let e = bad(&|r| r.name = "a-name-that-is-too-long".into());
        assert_eq!(e.code, fleet_proto::node::code::INVALID_CONFIG);
        assert!(e.details.contains("15"), "{e}");
        assert!(bad(&|r| r.listen_port = 0).details.contains("listen_port"));
        assert!(
            bad(&|r| r.peers[0].allowed_ips = vec!["x".into()])
                .details
                .contains("\"x\"")
        );
        assert!(
            bad(&|r| r.own_block = Some("::/0".into()))
                .details
                .contains("own_block")
        );
        let dup = bad(&|r| {
            let p = r.peers[0].clone();
            r.peers.push(p)
        });
        assert!(dup.details.contains("twice"), "{dup}");
    }

    /// Requests that would tear down a working device, or leave a peer's route silently
    /// missing, are refused as invalid (code 7) before anything is changed or saved.
    #[test]
    fn requests_that_can_never_apply_are_invalid() {
        let bad = |f: &dyn Fn(&mut SetGatewayRequest)| {
            let mut r = request();
            f(&mut r);
            NodeError::from(Desired::parse(&r).unwrap_err())
        };
        for name in [".", ".."] {
            let e = bad(&|r| r.name = name.into());
            assert_eq!(
                e.code,
                fleet_proto::node::code::INVALID_CONFIG,
                "{name}: {e}"
            );
        }
        let e = bad(&|r| r.own_block = Some("100.96.16.5/20".into()));
        assert_eq!(e.code, fleet_proto::node::code::INVALID_CONFIG);
        assert!(e.details.contains("use 100.96.16.0/20"), "{e}");
        let e = bad(&|r| r.peers[0].allowed_ips.push("100.96.16.0/20".into()));
        assert!(e.details.contains("own block"), "{e}");
        let e = bad(&|r| {
            r.peers.push(GatewayPeer {
                public_key: PrivateKey::generate().public_key(),
                endpoint: None,
                allowed_ips: vec!["100.96.0.0/12".into()],
                keepalive: None,
                fallback: None,
            })
        });
        assert!(e.details.contains("two peers"), "{e}");
        // The relay's fleet CIDR contains the own block: that is the intended layout.
        Desired::parse(&request()).unwrap();
    }

    #[test]
    fn state_is_written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(STATE_FILE);
        save_json(&path, &request()).unwrap();
        let back: SetGatewayRequest =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.peers.len(), 1);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }
}

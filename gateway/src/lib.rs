//! fleetboard's WireGuard gateway: one [`WireguardDevice`] trait, two backends.
//!
//! - [`kernel`]: kernel WireGuard, the link created over rtnetlink and configured over the
//!   `wireguard` generic netlink family (what `wg` speaks).
//! - [`userspace`]: gotatun in-process, a TUN device in the target netns, driven by its own
//!   thread and tokio runtime (2 worker threads by default, `FLEET_GATEWAY_THREADS`); it
//!   serves the standard UAPI socket so
//!   `wg show <name>` works.
//!
//! Either way the interface lives in [`DeviceConfig::netns`] and the encrypted UDP socket in
//! [`DeviceConfig::underlay_netns`] (the same netns when unset).
//!
//! [`select_backend`] picks one (kernel where the kernel has WireGuard) and honours a forced
//! override, like netavark's firewall drivers. Both backends share [`link`]: MTU, addresses,
//! link up and one route per allowed IP inside the device's netns. [`key`] owns keys.
//!
//! Datapath (a packet from a local pod to a remote cluster):
//! ```text
//! CNF netns: route <remote block> dev <wg> (proto fleet, one per allowed IP)
//!   -> <wg> (TUN + gotatun | kernel wg) encrypts for the peer whose allowed IPs match
//!   -> UDP <listen_port> from the underlay netns (the node's own; default: the CNF netns)
//!      to the peer's endpoint
//! ```

pub mod kernel;
pub mod key;
pub mod link;
pub mod offload_tun;
pub mod udp_gso;
pub mod userspace;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use ipnetwork::IpNetwork;

pub use key::{KeyError, PrivateKey, PublicKey};

/// What a device is created with. `Debug` shows no key.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Interface name (at most 15 bytes); also names the UAPI socket of a userspace device.
    pub name: String,
    /// The netns the device lives in (the node's CNF netns in the product).
    pub netns: PathBuf,
    /// The netns whose network carries the encrypted UDP (the node's own netns in the
    /// product, so the CNF netns needs no route out). `None`: the same as `netns`.
    pub underlay_netns: Option<PathBuf>,
    pub private_key: PrivateKey,
    /// UDP port the device listens on (not 0: peers are told this port).
    pub listen_port: u16,
    pub mtu: u32,
    /// Addresses put on the device, with their prefix.
    pub addresses: Vec<IpNetwork>,
}

/// A peer as the gateway wants it. `endpoint: None` means "learn it from the peer's
/// handshakes" (a NAT'd member dialling in); a set endpoint is where we send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    /// Seconds between keepalives; `Some` for peers behind NAT so their mapping stays open.
    pub persistent_keepalive: Option<u16>,
}

/// Tunnel state of one peer, as `wg show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: PublicKey,
    /// Where the peer was last heard from (or the configured endpoint).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// How long ago `stats`' last handshake was, at `now`; `None` when there was none. A handshake
/// time slightly after `now` (userspace devices derive it from "seconds ago") counts as zero.
pub fn handshake_age(stats: &PeerStats, now: SystemTime) -> Option<Duration> {
    stats
        .last_handshake
        .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Kernel,
    Userspace,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid WireGuard device config for {name:?}: {reason}")]
    InvalidConfig { name: String, reason: String },
    #[error("peer list for {device} names public key {public_key} twice; give each peer once")]
    DuplicatePeer {
        device: String,
        public_key: PublicKey,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Netns(#[from] fleet_core::netns::NetnsError),
    #[error("netlink: cannot {op}: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("wireguard generic netlink: cannot {op}: {reason}")]
    Genetlink { op: String, reason: String },
    #[error("kernel WireGuard is not available for {name}: {reason}; use the userspace backend")]
    KernelUnavailable { name: String, reason: String },
    #[error("userspace WireGuard device {name}: cannot {op}: {reason}")]
    Userspace {
        name: String,
        op: String,
        reason: String,
    },
    #[error("WireGuard device {name} has stopped (its thread exited); create it again")]
    DeviceGone { name: String },
    #[error("unknown WireGuard backend {0:?}; expected \"kernel\" or \"userspace\"")]
    UnknownBackend(String),
}

pub type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// A WireGuard device, whatever runs it.
#[async_trait::async_trait]
pub trait WireguardDevice: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    fn backend(&self) -> BackendKind;
    fn public_key(&self) -> PublicKey;
    /// The UDP port the device listens on (the chosen one when the config said 0).
    fn listen_port(&self) -> u16;
    /// Makes `peers` the device's whole peer set: new peers are added, changed ones updated
    /// in place (sessions kept), missing ones removed together with their routes.
    async fn set_peers(&self, peers: &[Peer]) -> Result<()>;
    async fn stats(&self) -> Result<Vec<PeerStats>>;
    /// Removes the device, its routes and (userspace) its UAPI socket.
    async fn delete(&self) -> Result<()>;
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = GatewayError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            other => Err(GatewayError::UnknownBackend(other.into())),
        }
    }
}

/// Picks the backend: the override when given, else kernel WireGuard where the kernel has it
/// (probed in `netns`), else userspace.
pub async fn select_backend(override_: Option<BackendKind>, netns: &Path) -> BackendKind {
    if let Some(kind) = override_ {
        return kind;
    }
    choose_backend(None, kernel::is_available(netns).await)
}

/// The decision of [`select_backend`], apart from the probe.
pub fn choose_backend(override_: Option<BackendKind>, kernel_available: bool) -> BackendKind {
    match (override_, kernel_available) {
        (Some(kind), _) => kind,
        (None, true) => BackendKind::Kernel,
        (None, false) => BackendKind::Userspace,
    }
}

/// Creates the device with the chosen backend, configured and up, with no peers.
pub async fn create_device(
    kind: BackendKind,
    config: DeviceConfig,
) -> Result<Box<dyn WireguardDevice>> {
    config.validate()?;
    Ok(match kind {
        BackendKind::Kernel => Box::new(kernel::KernelDevice::create(config).await?),
        BackendKind::Userspace => Box::new(userspace::UserspaceDevice::create(config).await?),
    })
}

impl DeviceConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| GatewayError::InvalidConfig {
            name: self.name.clone(),
            reason: reason.into(),
        };
        if self.name.is_empty() || self.name.len() > 15 {
            return Err(bad("the interface name must be 1 to 15 bytes"));
        }
        if self
            .name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(bad("the interface name may not contain '/', ':' or spaces"));
        }
        if self.name == "." || self.name == ".." {
            return Err(bad("the interface name may not be '.' or '..'"));
        }
        if self.listen_port == 0 {
            return Err(bad("listen_port 0: choose a fixed port, peers dial it"));
        }
        if !(576..=65535).contains(&self.mtu) {
            return Err(bad(&format!("mtu {} is outside 576..=65535", self.mtu)));
        }
        Ok(())
    }
}

/// Rejects a peer list that names a key twice.
pub(crate) fn check_peers(device: &str, peers: &[Peer]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for p in peers {
        if !seen.insert(p.public_key) {
            return Err(GatewayError::DuplicatePeer {
                device: device.into(),
                public_key: p.public_key,
            });
        }
    }
    Ok(())
}

/// Every allowed IP of every peer, each once: the routes the device's netns should have.
pub(crate) fn routed_prefixes(peers: &[Peer]) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = Vec::new();
    for net in peers.iter().flat_map(|p| &p.allowed_ips) {
        let net = normalize(*net);
        if !out.contains(&net) {
            out.push(net);
        }
    }
    out
}

/// `10.1.2.3/16` -> `10.1.0.0/16`: routes and allowed IPs are prefixes.
pub(crate) fn normalize(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).expect("prefix of a valid network is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_is_honoured_whatever_the_kernel_has() {
        for kernel in [true, false] {
            assert_eq!(
                choose_backend(Some(BackendKind::Userspace), kernel),
                BackendKind::Userspace
            );
            assert_eq!(
                choose_backend(Some(BackendKind::Kernel), kernel),
                BackendKind::Kernel
            );
        }
    }

    #[test]
    fn auto_prefers_the_kernel_where_it_has_wireguard() {
        assert_eq!(choose_backend(None, true), BackendKind::Kernel);
        assert_eq!(choose_backend(None, false), BackendKind::Userspace);
    }

    #[test]
    fn backend_names_parse_and_print() {
        for k in [BackendKind::Kernel, BackendKind::Userspace] {
            assert_eq!(k.to_string().parse::<BackendKind>().unwrap(), k);
        }
        let err = "boringtun".parse::<BackendKind>().unwrap_err();
        assert!(err.to_string().contains("boringtun"));
    }

    #[test]
    fn config_validation_names_the_device_and_the_problem() {
        let cfg = DeviceConfig {
            name: "a-name-that-is-too-long".into(),
            netns: "/run/netns/x".into(),
            underlay_netns: None,
            private_key: PrivateKey::generate(),
            listen_port: 51820,
            mtu: 1420,
            addresses: vec![],
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("a-name-that-is-too-long") && err.contains("15"),
            "{err}"
        );
        assert!(!format!("{cfg:?}").contains(&cfg.private_key.to_base64()));
    }

    #[test]
    fn handshake_age_is_none_without_a_handshake_and_never_negative() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let mut s = PeerStats {
            public_key: PrivateKey::generate().public_key(),
            endpoint: None,
            allowed_ips: vec![],
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        };
        assert_eq!(handshake_age(&s, now), None);
        s.last_handshake = Some(now - Duration::from_secs(42));
        assert_eq!(handshake_age(&s, now), Some(Duration::from_secs(42)));
        s.last_handshake = Some(now + Duration::from_millis(300));
        assert_eq!(handshake_age(&s, now), Some(Duration::ZERO));
    }

    #[test]
    fn duplicate_peers_are_refused_and_routes_deduplicated() {
        let k = PrivateKey::generate().public_key();
        let p = Peer {
            public_key: k,
            endpoint: None,
            allowed_ips: vec![
                "10.1.2.3/16".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            persistent_keepalive: None,
        };
        assert!(matches!(
            check_peers("wg0", &[p.clone(), p.clone()]),
            Err(GatewayError::DuplicatePeer { .. })
        ));
        assert_eq!(routed_prefixes(&[p]), vec!["10.1.0.0/16".parse().unwrap()]);
    }
}

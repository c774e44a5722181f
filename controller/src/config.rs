//! What `fleet-controller run` is told (the binary parses its flags into [`RunConfig`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleet_gateway::BackendKind;
use fleet_hub::api::{CaHash, JoinString};
use fleet_hub::registry::ClusterId;
use ipnetwork::Ipv4Network;

/// MTU of the gateway's WireGuard interface: 1500 minus the IPv6 + UDP + WireGuard overhead.
pub const GATEWAY_MTU: u32 = 1420;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub cluster: ClusterId,
    /// The hub's addresses (`host:port`), tried in turn.
    pub hubs: Vec<String>,
    /// The cluster's credential (0600), shared by its controller replicas.
    pub credential_file: PathBuf,
    /// Used only when the credential file does not exist yet.
    pub join: Option<JoinString>,
    /// The hub CA's SHA-256; from the join string when not given.
    pub ca: Option<CaHash>,
    /// Node-local state: the WireGuard key.
    pub data_dir: PathBuf,
    pub nodes_file: PathBuf,
    pub gateway_node: String,
    /// A public endpoint: other clusters tunnel to us directly.
    pub endpoint: Option<SocketAddr>,
    pub listen_port: u16,
    pub wg_name: String,
    /// `None`: kernel where available, else userspace.
    pub wg_backend: Option<BackendKind>,
    pub holder: String,
    pub lease_ttl: Duration,
    pub keepalive: u16,
    pub node_prefix: u8,
    pub status_interval: Duration,
    pub vip_range: Ipv4Network,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid duration {0:?}: use a number with ms, s or m (e.g. 500ms, 3s, 1m)")]
pub struct DurationError(String);

/// Parses `500ms`, `3s`, `1m` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_string());
    let t = text.trim();
    let (number, scale_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else {
        (t, 1000)
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = n
        .checked_mul(scale_ms)
        .filter(|ms| *ms > 0)
        .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        for bad in ["", "0s", "s", "-1s", "3h", "x"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

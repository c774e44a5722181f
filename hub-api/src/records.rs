//! The schemas of the records a controller publishes at the hub under its own cluster, in
//! JSON: one `node/<name>` per node (its subnet, so a restarted or standby controller hands out
//! the same ones) and `gateway` (tunnel state, refreshed every status interval). `fleetctl`
//! reads both; the hub stores them as opaque bytes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Record name prefix of the node records.
pub const NODE_RECORD_PREFIX: &str = "node/";
/// Record name of the gateway's status.
pub const GATEWAY_RECORD: &str = "gateway";

pub fn node_record_name(node: &str) -> String {
    format!("{NODE_RECORD_PREFIX}{node}")
}

/// `node/<name>`: the node's subnet of the cluster block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub subnet: Ipv4Network,
    pub underlay_ip: Ipv4Addr,
}

/// `gateway`: who runs the cluster's tunnel and how its peers are doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// The node whose CNF netns holds the WireGuard interface.
    pub node: String,
    /// The active controller's lease holder id.
    pub holder: String,
    /// `kernel` or `userspace`.
    pub backend: String,
    pub public_key: String,
    pub listen_port: u16,
    /// Unix seconds when this record was written.
    pub updated_at: u64,
    pub peers: Vec<GatewayPeerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPeerRecord {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    /// Unix seconds of the last handshake; `null` if none yet.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_the_contract_shape() {
        let n = NodeRecord {
            subnet: "100.96.16.0/24".parse().unwrap(),
            underlay_ip: "198.51.100.11".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"subnet":"100.96.16.0/24","underlay_ip":"198.51.100.11"}"#
        );
        let g = GatewayRecord {
            node: "aa-1".into(),
            holder: "h-1".into(),
            backend: "userspace".into(),
            public_key: "k".into(),
            listen_port: 51820,
            updated_at: 7,
            peers: vec![GatewayPeerRecord {
                public_key: "p".into(),
                endpoint: None,
                last_handshake: None,
                rx_bytes: 1,
                tx_bytes: 2,
            }],
        };
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["listen_port"], 51820);
        assert!(v["peers"][0]["endpoint"].is_null());
        assert!(v["peers"][0]["last_handshake"].is_null());
        assert_eq!(serde_json::from_value::<GatewayRecord>(v).unwrap(), g);
        assert_eq!(node_record_name("aa-1"), "node/aa-1");
    }
}

//! The records this controller publishes (schemas in `fleet_hub_api::records`), and how the
//! gateway's statistics become one.

pub use fleet_hub_api::records::*;

/// A WireGuard peer's statistics as the `gateway` record shows them.
pub fn peer_record(s: &fleet_gateway::PeerStats) -> GatewayPeerRecord {
    GatewayPeerRecord {
        public_key: s.public_key.to_base64(),
        endpoint: s.endpoint,
        last_handshake: s.last_handshake.map(unix_secs),
        rx_bytes: s.rx_bytes,
        tx_bytes: s.tx_bytes,
    }
}

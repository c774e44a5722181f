//! The hub's records: clusters, their fleet blocks and keys, and the fleet's block layout.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::RegistryError;

/// A member cluster's name: a DNS label (`[a-z0-9-]`, 1–63 chars, alphanumeric at both ends),
/// so it is safe in store keys, DNS names and interface names alike.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterId(String);

impl ClusterId {
    pub fn new(id: impl Into<String>) -> Result<Self, RegistryError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-');
        if valid {
            Ok(ClusterId(id))
        } else {
            Err(RegistryError::InvalidClusterId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClusterId {
    type Error = RegistryError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ClusterId::new(s)
    }
}

impl From<ClusterId> for String {
    fn from(id: ClusterId) -> String {
        id.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A WireGuard public key (32 bytes, base64 in text as `wg` prints it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::str::FromStr for PublicKey {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = BASE64
            .decode(s.trim())
            .map_err(|_| RegistryError::InvalidPublicKey(s.to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| RegistryError::InvalidPublicKey(s.to_string()))?;
        Ok(PublicKey(bytes))
    }
}

impl TryFrom<String> for PublicKey {
    type Error = RegistryError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// What the cluster's gateway last reported about its tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayState {
    /// Joined, no tunnel reported yet.
    #[default]
    Pending,
    Up,
    Down,
}

/// A member cluster as the hub knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub id: ClusterId,
    /// The cluster's block of the fleet CIDR; kept across re-joins.
    pub block: Ipv4Network,
    pub public_key: PublicKey,
    /// Set when the cluster's gateway is publicly reachable (direct tunnels to it).
    pub endpoint: Option<SocketAddr>,
    pub gateway: GatewayState,
    /// Unix seconds of the first join.
    pub joined_at: u64,
    /// The join token it joined with (its id only).
    pub token_id: String,
}

/// What a cluster sends to join (or re-join).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub cluster: ClusterId,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
}

/// A member's change to its own record; `None` fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterUpdate {
    pub public_key: Option<PublicKey>,
    pub endpoint: Option<Option<SocketAddr>>,
    pub gateway: Option<GatewayState>,
}

/// How the fleet CIDR is cut into cluster blocks. Stored once per fleet so every hub replica
/// agrees on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetLayout {
    pub fleet_cidr: Ipv4Network,
    /// Prefix length of each cluster's block, e.g. 20 for a /20 per cluster.
    pub block_prefix: u8,
}

impl FleetLayout {
    pub fn new(fleet_cidr: Ipv4Network, block_prefix: u8) -> Result<Self, RegistryError> {
        let fleet_cidr = Ipv4Network::new(fleet_cidr.network(), fleet_cidr.prefix())
            .expect("prefix came from a valid network");
        if block_prefix < fleet_cidr.prefix() || block_prefix > 30 {
            return Err(RegistryError::InvalidLayout {
                fleet_cidr,
                block_prefix,
            });
        }
        Ok(FleetLayout {
            fleet_cidr,
            block_prefix,
        })
    }

    /// How many cluster blocks the fleet CIDR holds.
    pub fn block_count(&self) -> u64 {
        1u64 << (self.block_prefix - self.fleet_cidr.prefix())
    }

    /// The `n`th block, in address order.
    pub fn block(&self, n: u64) -> Option<Ipv4Network> {
        if n >= self.block_count() {
            return None;
        }
        let base = u32::from(self.fleet_cidr.network()) as u64;
        let addr = base + (n << (32 - self.block_prefix));
        Some(Ipv4Network::new(Ipv4Addr::from(addr as u32), self.block_prefix).unwrap())
    }

    pub fn blocks(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        (0..self.block_count()).filter_map(|n| self.block(n))
    }
}

impl Default for FleetLayout {
    fn default() -> Self {
        FleetLayout::new(
            fleet_core::config::DEFAULT_FLEET_CIDR.parse().unwrap(),
            DEFAULT_BLOCK_PREFIX,
        )
        .unwrap()
    }
}

/// A /20 per cluster: 4096 addresses, 16 nodes of /24; 256 clusters in the default /12.
pub const DEFAULT_BLOCK_PREFIX: u8 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_dns_labels() {
        for ok in ["aa", "a", "cluster-1", "0"] {
            ClusterId::new(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a/b", "a.b", &"x".repeat(64)] {
            assert!(ClusterId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_layout_has_256_blocks_of_20() {
        let layout = FleetLayout::default();
        assert_eq!(layout.block_count(), 256);
        assert_eq!(layout.block(0).unwrap().to_string(), "100.96.0.0/20");
        assert_eq!(layout.block(1).unwrap().to_string(), "100.96.16.0/20");
        assert_eq!(layout.block(255).unwrap().to_string(), "100.111.240.0/20");
        assert_eq!(layout.block(256), None);
    }

    #[test]
    fn layout_rejects_blocks_larger_than_the_fleet() {
        let fleet: Ipv4Network = "10.0.0.0/16".parse().unwrap();
        assert!(FleetLayout::new(fleet, 15).is_err());
        assert!(FleetLayout::new(fleet, 31).is_err());
        assert_eq!(FleetLayout::new(fleet, 16).unwrap().block_count(), 1);
    }

    #[test]
    fn public_keys_round_trip_base64() {
        let key = PublicKey::from_bytes([7; 32]);
        let text = key.to_string();
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        assert!("abc".parse::<PublicKey>().is_err());
    }
}

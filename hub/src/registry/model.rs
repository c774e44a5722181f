//! The fleet's block layout: how the fleet CIDR is cut into cluster blocks (hub-side only; the
//! model members see is `fleet_hub_api::model`).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::RegistryError;

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
}

//! The node's network plan: the fleet CIDR, this node's subnet of it, the service VIP range,
//! and where the node's fleet datapath lives.
//!
//! The plan comes from the cluster controller (`set_plan` on the node API, persisted by
//! `state::NodeStateStore`) or, for a node without a controller, from `fleet-nri`'s config.
//! Everything that is *planned* (CIDRs) is separate from what is *local* (netns name, bridge,
//! data dir, overlay VNI/port) so the controller only ever has to send the first half.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Default fleet CIDR: inside 100.64.0.0/10 (shared address space, RFC 6598), which is neither
/// public nor one of the RFC 1918 ranges that pod, service, Docker and home networks use.
pub const DEFAULT_FLEET_CIDR: &str = "100.96.0.0/12";
/// Default service VIP range for ClusterSetIPs; outside the fleet CIDR so routes stay distinct.
pub const DEFAULT_VIP_RANGE: &str = "100.112.0.0/16";
/// VNI of the intra-cluster VXLAN overlay.
pub const DEFAULT_OVERLAY_VNI: u32 = 9600;
/// UDP port of the intra-cluster VXLAN overlay: IANA's VXLAN port.
pub const DEFAULT_OVERLAY_PORT: u16 = 4789;
/// Name of the pod-side interface.
pub const POD_INTERFACE: &str = "eth-fleet";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "node subnet {subnet} is not inside the fleet CIDR {fleet}; give the node a block of the fleet CIDR"
    )]
    SubnetOutsideFleet {
        subnet: Ipv4Network,
        fleet: Ipv4Network,
    },
    #[error(
        "node subnet {0} is too small: it needs a gateway and at least one pod address (/30 or larger)"
    )]
    SubnetTooSmall(Ipv4Network),
    #[error("VIP range {vip} overlaps the fleet CIDR {fleet}; pick a VIP range outside it")]
    VipOverlapsFleet {
        vip: Ipv4Network,
        fleet: Ipv4Network,
    },
}

/// Address plan handed to a node (later by the cluster controller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub fleet_cidr: Ipv4Network,
    pub vip_range: Ipv4Network,
    pub node_subnet: Ipv4Network,
}

impl NodePlan {
    pub fn new(
        fleet_cidr: Ipv4Network,
        vip_range: Ipv4Network,
        node_subnet: Ipv4Network,
    ) -> Result<Self, PlanError> {
        let node_subnet = Ipv4Network::new(node_subnet.network(), node_subnet.prefix())
            .expect("prefix came from a valid network");
        if !fleet_cidr.contains(node_subnet.network()) || node_subnet.prefix() < fleet_cidr.prefix()
        {
            return Err(PlanError::SubnetOutsideFleet {
                subnet: node_subnet,
                fleet: fleet_cidr,
            });
        }
        if node_subnet.prefix() > 30 {
            return Err(PlanError::SubnetTooSmall(node_subnet));
        }
        if vip_range.contains(fleet_cidr.network()) || fleet_cidr.contains(vip_range.network()) {
            return Err(PlanError::VipOverlapsFleet {
                vip: vip_range,
                fleet: fleet_cidr,
            });
        }
        Ok(NodePlan {
            fleet_cidr,
            vip_range,
            node_subnet,
        })
    }

    /// The node's gateway on the CNF bridge: the subnet's first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        nth_host(self.node_subnet, 1)
    }

    /// Addresses pods may get: every host address but the gateway.
    pub fn pod_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let size = 1u32 << (32 - self.node_subnet.prefix());
        (
            nth_host(self.node_subnet, 2),
            nth_host(self.node_subnet, size - 2),
        )
    }

    pub fn pod_capacity(&self) -> usize {
        let size = 1usize << (32 - self.node_subnet.prefix());
        size - 3
    }
}

fn nth_host(net: Ipv4Network, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Where this node's fleet datapath lives; local to the node, never handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeLocal {
    /// Name of the CNF netns (`/run/netns/<name>`) that holds the bridge and pod veth peers.
    pub cnf_netns: String,
    /// Bridge inside the CNF netns.
    pub bridge: String,
    /// MTU of pod interfaces and the bridge; leaves room for WireGuard + overlay headers.
    pub mtu: u32,
    /// Directory of persistent state (IPAM records, the plan, the peers).
    pub data_dir: PathBuf,
    /// VXLAN network identifier of the intra-cluster overlay; the same on every node of a
    /// cluster.
    pub overlay_vni: u32,
    /// UDP port of the intra-cluster overlay (the socket lives in the node's own netns); the
    /// same on every node of a cluster.
    pub overlay_port: u16,
}

impl Default for NodeLocal {
    fn default() -> Self {
        NodeLocal {
            cnf_netns: "fleet-cnf".into(),
            bridge: "fleet0".into(),
            mtu: 1370,
            data_dir: PathBuf::from("/var/lib/fleetboard"),
            overlay_vni: DEFAULT_OVERLAY_VNI,
            overlay_port: DEFAULT_OVERLAY_PORT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn plan_derives_gateway_and_range() {
        let p = NodePlan::new(
            net(DEFAULT_FLEET_CIDR),
            net(DEFAULT_VIP_RANGE),
            net("100.96.3.0/24"),
        )
        .unwrap();
        assert_eq!(p.gateway(), Ipv4Addr::new(100, 96, 3, 1));
        assert_eq!(
            p.pod_range(),
            (Ipv4Addr::new(100, 96, 3, 2), Ipv4Addr::new(100, 96, 3, 254))
        );
        assert_eq!(p.pod_capacity(), 253);
    }

    #[test]
    fn plan_rejects_bad_input() {
        let fleet = net(DEFAULT_FLEET_CIDR);
        let vip = net(DEFAULT_VIP_RANGE);
        assert!(matches!(
            NodePlan::new(fleet, vip, net("10.0.0.0/24")),
            Err(PlanError::SubnetOutsideFleet { .. })
        ));
        assert!(matches!(
            NodePlan::new(fleet, vip, net("100.96.0.0/31")),
            Err(PlanError::SubnetTooSmall(_))
        ));
        assert!(matches!(
            NodePlan::new(fleet, net("100.97.0.0/16"), net("100.96.0.0/24")),
            Err(PlanError::VipOverlapsFleet { .. })
        ));
        // A /30 holds the gateway and one pod.
        let p = NodePlan::new(fleet, vip, net("100.96.0.4/30")).unwrap();
        assert_eq!(p.pod_capacity(), 1);
    }
}

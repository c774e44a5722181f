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
    #[error(
        "the {range_name} {range} overlaps {used} ({seen_as}): fleet routes would take that \
         network's traffic; give the fleet ranges no pod or node network uses (fleet-hub \
         --fleet-cidr, fleet-controller --vip-range) or move the other network out of them"
    )]
    OverlapsUsed {
        range_name: &'static str,
        range: Ipv4Network,
        used: Ipv4Network,
        seen_as: String,
    },
}

/// A network already in use where the fleet routes: a pod's primary network (its prevResult
/// or its netns) or the node's own (the host's addresses and routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedNetwork {
    pub net: Ipv4Network,
    /// Where it was seen, for the error: e.g. `address 100.96.128.7/24 on eth0`.
    pub seen_as: String,
}

/// Routes shorter than this claim nothing specific (a default route, a VPN's `0/1` + `128/1`):
/// the fleet's routes are more specific than them by design.
pub const MIN_CLAIMING_PREFIX: u8 = 8;

impl UsedNetwork {
    /// An address with its prefix: the subnet it makes on-link, and always the address itself.
    pub fn address(addr: Ipv4Addr, prefix: u8, seen_as: String) -> UsedNetwork {
        let prefix = if prefix < MIN_CLAIMING_PREFIX {
            32
        } else {
            prefix.min(32)
        };
        let net = Ipv4Network::new(addr, prefix).expect("prefix is at most 32");
        UsedNetwork {
            net: Ipv4Network::new(net.network(), prefix).expect("same prefix"),
            seen_as,
        }
    }

    /// A route's destination; `None` for routes that claim nothing specific.
    pub fn route(dst: Ipv4Network, seen_as: String) -> Option<UsedNetwork> {
        (dst.prefix() >= MIN_CLAIMING_PREFIX).then(|| UsedNetwork {
            net: Ipv4Network::new(dst.network(), dst.prefix()).expect("same prefix"),
            seen_as,
        })
    }
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
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

    /// Refuses a plan whose fleet CIDR or VIP range overlaps a network in use: a pod's primary
    /// network or the node's own. The first overlap found is the error.
    pub fn check_disjoint(&self, used: &[UsedNetwork]) -> Result<(), PlanError> {
        let ranges = [
            ("fleet CIDR", self.fleet_cidr),
            ("VIP range", self.vip_range),
        ];
        for u in used {
            for (range_name, range) in ranges {
                if overlaps(range, u.net) {
                    return Err(PlanError::OverlapsUsed {
                        range_name,
                        range,
                        used: u.net,
                        seen_as: u.seen_as.clone(),
                    });
                }
            }
        }
        Ok(())
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

    #[test]
    fn overlap_with_used_networks_is_refused_by_name() {
        let p = NodePlan::new(
            net(DEFAULT_FLEET_CIDR),
            net(DEFAULT_VIP_RANGE),
            net("100.96.3.0/24"),
        )
        .unwrap();
        let addr = |a: &str, len| {
            UsedNetwork::address(
                a.parse().unwrap(),
                len,
                format!("address {a}/{len} on eth0"),
            )
        };
        // Issue 12 item 3: kops/Gardener hand out pod addresses inside 100.96.0.0/11.
        let err = p.check_disjoint(&[addr("100.96.128.7", 24)]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("fleet CIDR 100.96.0.0/12") && msg.contains("100.96.128.0/24"),
            "{msg}"
        );
        let err = p.check_disjoint(&[addr("100.112.9.9", 32)]).unwrap_err();
        assert!(
            err.to_string().contains("VIP range 100.112.0.0/16"),
            "{err}"
        );
        // A covering route (kops' whole pod CIDR) overlaps too.
        let kops = UsedNetwork::route(net("100.96.0.0/11"), "route".into()).unwrap();
        assert!(p.check_disjoint(&[kops]).is_err());
        // Ordinary primary networks and default-like routes do not.
        let fine = [
            addr("10.244.1.7", 24),
            addr("192.168.3.2", 32),
            addr("100.64.0.5", 4), // a silly prefix: only the address counts
        ];
        p.check_disjoint(&fine).unwrap();
        assert!(UsedNetwork::route(net("0.0.0.0/0"), "default".into()).is_none());
        assert!(UsedNetwork::route(net("0.0.0.0/1"), "vpn".into()).is_none());
    }
}

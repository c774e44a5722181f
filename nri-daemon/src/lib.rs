//! fleet-nri: the per-node daemon. It owns the node's fleet subnet (IPAM), the CNF netns and
//! everything in it (bridge, pod links, the VXLAN overlay and, on the cluster's gateway node,
//! the WireGuard gateway with its key and routes); serves the node API to `fleet-cni` and the
//! cluster controller; and is an NRI plugin of the container runtime, to repair pods that
//! predate it, inject the fleet IP into containers, and release pods whose CNI DEL never came.

pub mod api;
pub mod config;
pub mod metrics;
pub mod node;
pub mod nri;

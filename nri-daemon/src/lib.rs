//! fleet-nri: the per-node daemon. It owns the node's fleet subnet (IPAM), the CNF netns and
//! its bridge; serves the node API to `fleet-cni` and the cluster controller; and is an NRI
//! plugin of the container runtime, to repair pods that predate it, inject the fleet IP into
//! containers, and release pods whose CNI DEL never came.

pub mod api;
pub mod config;
pub mod node;
pub mod nri;

//! fleetboard's core: the node's network plan, node IPAM, and the netns/netlink datapath that
//! every daemon shares. Wire formats live in `fleet-proto`; this crate holds the model.

pub mod config;
pub mod datapath;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod node_tls;
pub mod overlay;
pub mod private_socket;
pub mod routes;
pub mod state;
pub mod vip;

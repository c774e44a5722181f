//! Node-local wire contracts of fleetboard. Wire formats live here, at the edge; the model lives
//! in `fleet-core`. The members' contract with the hub (its API, records and client) lives in
//! `fleet-hub-api`.
//!
//! - [`node`]: the node API between `fleet-cni` (and the cluster controller) and `fleet-nri`,
//!   JSON lines over a local unix socket;
//! - [`nri`] (feature `nri`): the NRI ttrpc subset `fleet-nri` speaks with containerd;
//! - [`wireguard`]: the WireGuard public key, the one type every wire carries keys in.

pub mod node;
#[cfg(feature = "nri")]
pub mod nri;
pub mod wireguard;

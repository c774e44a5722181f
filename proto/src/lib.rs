//! Wire contracts of fleetboard. Wire formats live here, at the edge; the model lives in
//! `fleet-core`.
//!
//! - [`node`]: the node API between `fleet-cni` (and later the cluster controller) and
//!   `fleet-nri`, JSON lines over a local unix socket.

pub mod node;
#[cfg(feature = "nri")]
pub mod nri;

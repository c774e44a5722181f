//! fleetboard's cluster controller (`fleet-controller run`).
//!
//! One per member cluster (several replicas, one active by the hub's cluster lease). The
//! active replica:
//! - keeps the cluster's identity at the hub (credential file; re-join keeps the block);
//! - gives each node a subnet of the cluster block and hands it to the node's `fleet-nri`
//!   (`set_plan`), then every node the others as overlay peers (`set_peers`), the gateway
//!   node's entry routing the other clusters' blocks;
//! - runs the cluster's WireGuard gateway in the gateway node's CNF netns: the hub's relay
//!   as a peer for the fleet CIDR, direct peers for clusters with a public endpoint;
//! - publishes `node/<name>` and `gateway` records at the hub.
//!
//! Modules: [`plan`] (pure decisions), [`reconcile`] (one pass over the nodes), [`gateway`]
//! (the device), [`leader`] (the lease: the hub's, or a Kubernetes Lease in [`kube_lease`]), [`hub`] and [`nodes`] (the two APIs behind traits),
//! [`identity`] (credential and key), [`records`] (published JSON), [`run`] (the loop).

pub mod config;
pub mod gateway;
pub mod hub;
pub mod identity;
pub mod kube_lease;
pub mod leader;
pub mod nodes;
pub mod own_block;
pub mod plan;
pub mod reconcile;
pub mod records;
pub mod run;

pub use config::RunConfig;
pub use run::{ControllerError, run};

//! fleetboard's cluster controller (`fleet-controller run`).
//!
//! One per member cluster (several replicas, one active by the hub's cluster lease). The
//! active replica:
//! - keeps the cluster's identity at the hub (credential file; re-join keeps the block);
//! - gives each node a subnet of the cluster block and hands it to the node's `fleet-nri`
//!   (`set_plan`), then every node the others as overlay peers (`set_peers`), the gateway
//!   node's entry routing the other clusters' blocks;
//! - tells the gateway node's `fleet-nri` to run the cluster's WireGuard gateway in its CNF
//!   netns: the hub's relay as a peer for the fleet CIDR, direct peers for clusters with a
//!   public endpoint (the device, its key and its own-block route live in `fleet-nri`);
//! - publishes `node/<name>` and `gateway` records at the hub.
//!
//! Modules: [`plan`] (pure decisions), [`reconcile`] (one pass over the nodes), [`gateway`]
//! (the device, over the gateway node's API), [`leader`] (the lease: the hub's, or a Kubernetes Lease in [`kube_lease`]), [`kube_mcs`] (the MCS API
//! and Node discovery with a Kubernetes API), [`hub`] and [`nodes`] (the two APIs behind traits),
//! [`identity`] (the credential), [`run`] (the loop). The record schemas it publishes are
//! `fleet_hub_api::records`.

pub mod config;
pub mod gateway;
pub mod hub;
pub mod identity;
pub mod kube_lease;
pub mod kube_mcs;
pub mod kube_secret;
pub mod leader;
pub mod metrics;
pub mod node_api_certs;
pub mod nodes;
pub mod plan;
pub mod reconcile;
pub mod run;
pub mod services;

pub use config::RunConfig;
pub use run::{ControllerError, run};

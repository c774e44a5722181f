//! The members' contract with the fleet hub: everything a member cluster's controller, the
//! hub's relay, `fleetctl` and `fleet-dns` share with the hub — and nothing of the hub's server,
//! storage or data plane. Split like hickory-dns's `proto` from its `server`, or kube-rs's
//! `kube-core`/`kube-client` from `kube-runtime`.
//!
//! - [`address`]: a hub address as operators type it (`--hub`), checked before any dial;
//! - [`model`]: the fleet as members see it (cluster id, WireGuard public key, cluster and relay
//!   records, gateway state, leases, join tokens, the fleet view, watch events, revisions);
//! - [`records`]: the schemas of the records members publish (`node/<name>`, `gateway`,
//!   `export/<namespace>/<name>`);
//! - [`wire`]: the HTTP/1.1 + JSON protocol (calls, replies, watch lines, credentials, join
//!   strings, error codes);
//! - [`credential`]: a member's credential file (read, written once, waited for);
//! - [`tls`]: CA pinning, the members' trust in the hub;
//! - [`client`]: the client library ([`client::HubClient`]);
//! - [`mirror`]: the one fleet mirror (list → watch → relist, like kube-runtime's watcher +
//!   reflector) that every consumer of the fleet view reads.

pub mod address;
pub mod client;
pub mod credential;
pub mod mirror;
pub mod model;
pub mod records;
pub mod tls;
pub mod wire;

pub use client::{ClientOptions, HubClient, HubError};
pub use model::{ClusterId, FleetView, PublicKey, RegistryEvent, Revision};

//! fleetboard's hub server: the registry of member clusters, their fleet blocks, WireGuard keys and
//! published records, and the join tokens — kept in a revisioned [`store::Store`] (an embedded
//! file by default, etcd for several hub replicas).
//!
//! - [`store`]: the store trait and its two backends;
//! - [`registry`]: the fleet model on top of it (joins, block allocation, tokens, ownership);
//! - [`api`]: the TLS API members and operators call (and `fleet-hub serve`);
//! - [`relay`]: the WireGuard relay that forwards member-to-member traffic;
//! - [`board`]: the fleet board, the read-only live page `serve` shows the admin;
//! - [`admin`]: the operator commands of the `fleet-hub` binary.

pub mod admin;
pub mod api;
pub mod board;
pub mod limits;
pub mod registry;
pub mod relay;
pub mod store;

pub use registry::{Lease, Registry, RegistryError, RelayRecord};
pub use store::{Store, StoreError};

//! The service-discovery model of the fleet (KEP-1645, Multi-Cluster Services API), pure: no
//! I/O, no async. The controller, `fleet-dns` and `fleetctl` feed it what they read and act on
//! what it returns.
//!
//! - [`export`]: one cluster's export of one service (`export/<namespace>/<name>` at the hub,
//!   schema in [`fleet_hub_api::records::ExportRecord`]) and its validation;
//! - [`aggregate`]: all clusters' exports of a service → one [`aggregate::ServiceImport`], with
//!   KEP-1645's conflict rules (the oldest export wins; ports are the union) and the
//!   `Valid` / `Ready` / `Conflict` conditions of every export;
//! - [`import`]: imports on the wire (`import/<namespace>/<name>`, written by the importing
//!   cluster, read by its `fleet-dns`), live clusters only;
//! - [`vip`]: ClusterSetIP VIPs from a cluster's VIP range, stable across re-aggregation;
//! - [`liveness`]: which exporting clusters are resolved and routed to (heartbeats, damping).

pub mod aggregate;
pub mod export;
pub mod import;
pub mod liveness;
pub mod vip;

pub use aggregate::{Aggregation, ServiceImport, aggregate, aggregate_fleet};
pub use export::{Export, ExportError, ExportKey, ServiceKey, ServiceType};
pub use liveness::{Liveness, LivenessConfig};
pub use vip::{VipExhausted, VipTable, allocate_vips, allocate_vips_reserving};

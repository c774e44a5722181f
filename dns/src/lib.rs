//! `fleet-dns`: the fleet's authoritative DNS for `clusterset.local` (MCS DNS specification
//! 1.0.0), in the shape of aardvark-dns and hickory:
//!
//! - [`table`]: a pure [`DnsTable`] (name → records) built from the service imports and the
//!   VIP table, rebuilt on every change and swapped in whole;
//! - [`handler`]: answers one DNS message from a table, synchronously (the fuzz target);
//!   plain queries from answers prebuilt in wire form when the table is built (`wire`);
//! - [`server`]: a thin UDP loop and TCP listener around the handler;
//! - [`run`]: the daemon (`fleet-dns`): follows the hub and serves the cluster's own imports.
//!
//! It never makes a remote call per query: the table is all it reads.

pub mod handler;
pub mod metrics;
pub mod run;
pub mod server;
pub mod table;
mod wire;

pub use handler::{answer, answer_into, answer_tcp};
pub use server::{ServerConfig, serve, serve_tcp, serve_udp};
pub use table::{DEFAULT_TTL, DEFAULT_ZONE, DnsConfig, DnsTable, Lookup, TableError};

//! fleet-nri: the per-node daemon.
pub mod nri;

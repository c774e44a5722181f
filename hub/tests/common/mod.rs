//! Shared test support: the store and registry suites and a real etcd.
#![allow(dead_code)]

pub mod etcd;
pub mod hub;
pub mod registry_suite;
pub mod store_suite;

//! The NRI ttrpc API subset (`proto/nri/api.proto`), generated at build time. The wire format
//! stays here; `fleet-nri` turns these messages into its own handler types.

/// Protobuf messages and enums.
#[allow(
    clippy::all,
    missing_docs,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_attributes,
    unused_mut,
    unused_results,
    trivial_casts
)]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/nri/api.rs"));
}

/// ttrpc bindings: the `Plugin` trait (served by the plugin) and `RuntimeClient`.
#[allow(
    clippy::all,
    missing_docs,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_results,
    trivial_casts
)]
pub mod api_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/nri/api_ttrpc.rs"));
}

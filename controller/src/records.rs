//! The records this controller publishes (schemas in `fleet_hub_api::records`).

pub use fleet_hub_api::records::*;

//! The cluster's identity at the hub: the credential file, shared by the cluster's controller
//! replicas and read by `fleet-dns` (the file's code lives in `fleet_hub_api::credential`).
//! (The gateway's WireGuard key is not the controller's: the gateway node's `fleet-nri` makes
//! and keeps it, and the controller asks it for the public key.)

pub use fleet_hub_api::credential::{
    CredentialError as IdentityError, load_credential, store_credential, wait_for_credential,
};

/// Default lease holder id: host name and process id.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}", std::process::id())
}

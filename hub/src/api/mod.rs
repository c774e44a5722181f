//! The hub's network API server side: the TLS endpoint members and operators call
//! ([`server`]), the hub's identity ([`tls`]), and the mapping of registry errors to the
//! API's error codes. The protocol itself — calls, replies, watch lines, credentials, join
//! strings — is the members' contract and lives in `fleet_hub_api::wire` (re-exported here).

pub mod metrics;
pub mod server;
pub mod tls;

pub use fleet_hub_api::tls::CaHash;
pub use fleet_hub_api::wire::*;
pub use tls::HubIdentity;

use fleet_hub_api::model::ModelError;

use crate::registry::RegistryError;

/// The API's error code for a registry error.
pub fn error_code(error: &RegistryError) -> ErrorCode {
    use crate::store::StoreError;
    match error {
        RegistryError::Model(ModelError::TokenMalformed) => ErrorCode::TokenMalformed,
        RegistryError::TokenInvalid { .. } => ErrorCode::TokenInvalid,
        RegistryError::TokenExpired { .. } => ErrorCode::TokenExpired,
        RegistryError::TokenRevoked { .. } => ErrorCode::TokenRevoked,
        RegistryError::TokenNotFound(_) => ErrorCode::NotFound,
        RegistryError::BadCredential(_) => ErrorCode::Unauthenticated,
        RegistryError::NotOwner { .. } => ErrorCode::PermissionDenied,
        RegistryError::NotJoined(_) => ErrorCode::NotJoined,
        RegistryError::AlreadyJoined(_) => ErrorCode::AlreadyJoined,
        RegistryError::FleetExhausted { .. } => ErrorCode::FleetExhausted,
        RegistryError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        RegistryError::Model(ModelError::InvalidClusterId(_) | ModelError::InvalidPublicKey(_))
        | RegistryError::InvalidRecordName(_)
        | RegistryError::InvalidTokenTtl
        | RegistryError::InvalidLeaseHolder(_)
        | RegistryError::InvalidLeaseTtl(_)
        | RegistryError::InvalidRelayTtl(_)
        | RegistryError::InvalidRelayId(_) => ErrorCode::InvalidArgument,
        RegistryError::Store(StoreError::Compacted { .. }) => ErrorCode::Compacted,
        // The store will refuse the same request again: not worth a retry.
        RegistryError::Store(StoreError::InvalidTxn(_) | StoreError::Refused { .. }) => {
            ErrorCode::InvalidArgument
        }
        RegistryError::Store(_) | RegistryError::Contended { .. } => ErrorCode::Unavailable,
        RegistryError::InvalidLayout { .. }
        | RegistryError::LayoutMismatch { .. }
        | RegistryError::BadRecord { .. }
        | RegistryError::Model(ModelError::Random(_))
        | RegistryError::Random(_) => ErrorCode::Internal,
    }
}

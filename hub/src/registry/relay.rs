//! The hub's relays: `relays/<replica id>` holds a [`RelayRecord`] — the WireGuard identity
//! and endpoint of a hub replica's relay device, which members peer with for the fleet CIDR
//! when they have no direct tunnel. Written by the hub itself, never by members.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{PublicKey, Registry, RegistryError, encode};
use crate::store::Revision;

pub(super) const RELAYS: &str = "relays/";

/// One hub replica's relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRecord {
    /// The replica's relay id (derived from its public key: stable across restarts).
    pub id: String,
    pub public_key: PublicKey,
    /// Where members send their encrypted traffic.
    pub endpoint: SocketAddr,
}

impl RelayRecord {
    /// The id a relay with this key gets: the first 6 bytes of its public key, in hex.
    pub fn id_for(public_key: &PublicKey) -> String {
        super::hex(&public_key.as_bytes()[..6])
    }
}

pub(super) fn relay_key(id: &str) -> String {
    format!("{RELAYS}{id}")
}

fn check_relay_id(id: &str) -> Result<(), RegistryError> {
    if id.is_empty() || id.len() > 63 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(RegistryError::InvalidRelayId(id.to_string()));
    }
    Ok(())
}

impl Registry {
    /// Publishes (or replaces) a relay record. Hub-internal: the API has no call for it.
    pub async fn publish_relay(&self, record: &RelayRecord) -> Result<Revision, RegistryError> {
        check_relay_id(&record.id)?;
        let revision = self
            .store
            .put(&relay_key(&record.id), encode(record))
            .await?;
        tracing::info!(relay = %record.id, endpoint = %record.endpoint, public_key = %record.public_key, "relay published");
        Ok(revision)
    }

    /// Withdraws relay `id`; false if it was not there.
    pub async fn remove_relay(&self, id: &str) -> Result<bool, RegistryError> {
        check_relay_id(id)?;
        let removed = self.store.delete(&relay_key(id)).await?.is_some();
        if removed {
            tracing::info!(relay = %id, "relay withdrawn");
        }
        Ok(removed)
    }
}

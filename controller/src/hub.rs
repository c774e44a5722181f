//! What the controller needs from the hub, behind a narrow trait ([`Hub`]) so the reconciler
//! and the leadership logic are testable with a fake, and the fleet as the controller acts on it
//! ([`FleetSnapshot`]: what it needs of the fleet mirror's [`Fleet`], and what changed).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use fleet_hub_api::client::{HubClient, HubError};
use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::{
    ClusterId, ClusterRecord, ClusterUpdate, GatewayState, PublicKey, RelayRecord,
};
use fleet_hub_api::wire::{CaHash, ErrorCode};

use crate::plan::{ClusterInfo, FleetState, RelayInfo};

/// What a lease call said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAnswer {
    pub granted: bool,
    pub holder: String,
}

/// The hub calls a controller makes, on its own cluster.
#[async_trait::async_trait]
pub trait Hub: Send + Sync {
    /// Re-joins with this replica's key (the block stays); the cluster's record.
    async fn rejoin(
        &self,
        public_key: PublicKey,
        endpoint: Option<SocketAddr>,
    ) -> Result<ClusterRecord, HubError>;
    async fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<LeaseAnswer, HubError>;
    async fn release_lease(&self, holder: &str) -> Result<(), HubError>;
    async fn publish(&self, name: &str, value: &[u8]) -> Result<(), HubError>;
    async fn unpublish(&self, name: &str) -> Result<(), HubError>;
    async fn set_gateway_state(&self, state: GatewayState) -> Result<(), HubError>;
}

/// [`Hub`] over the real client, as member `cluster`.
#[derive(Clone, Debug)]
pub struct MemberHub {
    pub client: HubClient,
    pub cluster: ClusterId,
}

#[async_trait::async_trait]
impl Hub for MemberHub {
    async fn rejoin(
        &self,
        public_key: PublicKey,
        endpoint: Option<SocketAddr>,
    ) -> Result<ClusterRecord, HubError> {
        self.client.rejoin(public_key, endpoint).await
    }

    async fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<LeaseAnswer, HubError> {
        let lease = self.client.acquire_lease(holder, ttl).await?;
        Ok(LeaseAnswer {
            granted: lease.granted,
            holder: lease.holder,
        })
    }

    async fn release_lease(&self, holder: &str) -> Result<(), HubError> {
        self.client.release_lease(holder).await
    }

    async fn publish(&self, name: &str, value: &[u8]) -> Result<(), HubError> {
        self.client
            .publish(&self.cluster, name, value)
            .await
            .map(|_| ())
    }

    async fn unpublish(&self, name: &str) -> Result<(), HubError> {
        self.client.unpublish(&self.cluster, name).await.map(|_| ())
    }

    async fn set_gateway_state(&self, state: GatewayState) -> Result<(), HubError> {
        let update = ClusterUpdate {
            gateway: Some(state),
            ..ClusterUpdate::default()
        };
        self.client.update(&self.cluster, update).await.map(|_| ())
    }
}

/// True when the hub no longer knows this cluster or its credential: it was removed.
pub fn is_removed(e: &HubError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::Unauthenticated | ErrorCode::NotJoined)
    )
}

/// True when the hub could not be reached or could not answer now (worth retrying).
pub fn is_unavailable(e: &HubError) -> bool {
    match e {
        HubError::Unreachable { .. } | HubError::Transport { .. } | HubError::Timeout { .. } => {
            true
        }
        HubError::Api { code, .. } => matches!(
            code,
            ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::Internal
        ),
        _ => false,
    }
}

/// One TLS handshake with each of the hub's addresses (`host:port`) in turn, each within
/// `timeout`, accepting only a hub whose CA has the hash `ca` (the member's pin): see
/// [`fleet_hub_api::HubClient::check_tls`]. Sends no request, so it needs no credential and
/// consumes no join token.
///
/// Returns the first address that passed; else every address's failure (refused, timed out,
/// or the TLS error, e.g. the CA not matching the pin), `"; "`-separated.
pub async fn check_hub_tls(
    hubs: &[String],
    ca: CaHash,
    timeout: Duration,
) -> Result<String, String> {
    let options = fleet_hub_api::ClientOptions {
        connect_timeout: timeout,
        ..Default::default()
    };
    let client = fleet_hub_api::HubClient::new(hubs.iter().cloned(), ca, options)
        .map_err(|e| e.to_string())?;
    match client.check_tls().await {
        Ok(hub) => Ok(hub),
        Err(fleet_hub_api::HubError::Unreachable { errors, .. }) => Err(errors),
        Err(other) => Err(other.to_string()),
    }
}

/// The fleet as the controller follows it: the planning view plus its own cluster's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSnapshot {
    pub fleet: FleetState,
    /// This cluster's published records, by name.
    pub own_records: BTreeMap<String, Vec<u8>>,
    /// The revision the snapshot is at (watch after it).
    pub revision: u64,
}

/// What one watch event meant for the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventEffect {
    /// Clusters or relays changed: recompute peers and routes.
    FleetChanged,
    /// One of this cluster's records changed.
    OwnRecordChanged,
    /// Nothing the controller acts on.
    Nothing,
    /// This cluster was removed from the fleet.
    OwnClusterRemoved,
}

fn cluster_info(c: &ClusterRecord) -> ClusterInfo {
    ClusterInfo {
        id: c.id.clone(),
        block: c.block,
        public_key: c.public_key,
        endpoint: c.endpoint,
    }
}

fn relay_info(r: &RelayRecord) -> RelayInfo {
    RelayInfo {
        id: r.id.clone(),
        public_key: r.public_key,
        endpoint: r.endpoint,
        instance: r.instance.clone(),
    }
}

impl FleetSnapshot {
    /// The controller's view of the mirrored fleet: the planning view and its own records.
    pub fn of(fleet: &Fleet, own: &ClusterId) -> Self {
        FleetSnapshot {
            fleet: FleetState {
                fleet_cidr: fleet.fleet_cidr,
                clusters: fleet
                    .clusters
                    .values()
                    .map(|c| (c.id.clone(), cluster_info(c)))
                    .collect(),
                relays: fleet
                    .relays
                    .values()
                    .map(|r| (r.id.clone(), relay_info(r)))
                    .collect(),
            },
            own_records: fleet
                .records_of(own)
                .map(|r| (r.name.clone(), r.value.clone()))
                .collect(),
            revision: fleet.revision,
        }
    }

    /// What this snapshot means next to `before`, the last one the controller acted on.
    pub fn effect_since(&self, before: Option<&FleetSnapshot>, own: &ClusterId) -> EventEffect {
        if !self.fleet.clusters.contains_key(own) {
            EventEffect::OwnClusterRemoved
        } else if before.map(|b| &b.fleet) != Some(&self.fleet) {
            EventEffect::FleetChanged
        } else if before.map(|b| &b.own_records) != Some(&self.own_records) {
            EventEffect::OwnRecordChanged
        } else {
            EventEffect::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_hub_api::model::{FleetView, MemberRecord, RegistryEvent};
    use fleet_hub_api::tls::HUB_SERVER_NAME;

    /// A TLS server on 127.0.0.1 presenting a `fleet-hub` certificate and its CA (as the hub
    /// does); its address and the CA's hash. Serves handshakes until the test ends.
    async fn tls_hub() -> (String, CaHash) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use tokio_rustls::rustls;
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![HUB_SERVER_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &Issuer::new(ca, &ca_key))
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(fleet_hub_api::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        (addr, CaHash::of_der(ca_cert.der()))
    }

    #[tokio::test]
    async fn the_hub_check_names_a_wrong_ca_and_an_unreachable_hub() {
        let (hub, ca) = tls_hub().await;
        let t = Duration::from_secs(5);
        assert_eq!(
            check_hub_tls(std::slice::from_ref(&hub), ca, t).await,
            Ok(hub.clone())
        );

        let wrong = CaHash([7; 32]);
        let e = check_hub_tls(std::slice::from_ref(&hub), wrong, t)
            .await
            .unwrap_err();
        assert!(e.starts_with(&format!("{hub}: TLS")), "{e}");
        assert!(e.contains("does not match the pinned hash"), "{e}");

        // A closed port first: named, and the next address is tried.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = check_hub_tls(std::slice::from_ref(&closed), ca, t)
            .await
            .unwrap_err();
        assert!(e.starts_with(&format!("{closed}: connect")), "{e}");
        assert_eq!(check_hub_tls(&[closed, hub.clone()], ca, t).await, Ok(hub));
    }

    fn record(id: &str, block: &str, k: u8) -> ClusterRecord {
        ClusterRecord {
            id: ClusterId::new(id).unwrap(),
            block: block.parse().unwrap(),
            public_key: PublicKey::from_bytes([k; 32]),
            endpoint: None,
            gateway: GatewayState::Pending,
            controller_live: true,
            joined_at: 0,
            token_id: "t".into(),
        }
    }

    #[test]
    fn snapshots_of_the_mirror_say_what_changed() {
        let aa = ClusterId::new("aa").unwrap();
        let bb = ClusterId::new("bb").unwrap();
        let view = FleetView {
            clusters: vec![record("aa", "100.96.0.0/20", 1)],
            records: vec![
                MemberRecord {
                    owner: aa.clone(),
                    name: "node/a".into(),
                    value: b"{}".to_vec(),
                    revision: 3,
                },
                MemberRecord {
                    owner: bb.clone(),
                    name: "node/b".into(),
                    value: b"{}".to_vec(),
                    revision: 4,
                },
            ],
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            relays: vec![],
            revision: 5,
        };
        let mut fleet = Fleet::from(view);
        let mut last = FleetSnapshot::of(&fleet, &aa);
        assert_eq!(last.own_records.len(), 1, "only our own records");
        assert_eq!(last.effect_since(None, &aa), EventEffect::FleetChanged);
        let mut step = |event: RegistryEvent| {
            fleet.apply(&event);
            let next = FleetSnapshot::of(&fleet, &aa);
            let effect = next.effect_since(Some(&last), &aa);
            last = next;
            effect
        };
        let up = RegistryEvent::ClusterUpserted {
            record: record("bb", "100.96.16.0/20", 2),
            revision: 6,
        };
        assert_eq!(step(up.clone()), EventEffect::FleetChanged);
        assert_eq!(step(up), EventEffect::Nothing, "same record again");
        let relay = RelayRecord {
            id: "r1".into(),
            public_key: PublicKey::from_bytes([9; 32]),
            endpoint: "203.0.113.1:51820".parse().unwrap(),
            expires_at: 1,
            instance: String::new(),
        };
        assert_eq!(
            step(RegistryEvent::RelayUpserted {
                record: relay.clone(),
                revision: 7,
            }),
            EventEffect::FleetChanged
        );
        // The relay's periodic renewal (only its expiry changes) is no fleet change.
        let renewal = RegistryEvent::RelayUpserted {
            record: RelayRecord {
                expires_at: 2,
                ..relay.clone()
            },
            revision: 8,
        };
        assert_eq!(step(renewal), EventEffect::Nothing);
        // The relay restarted (same key and endpoint, a new instance): the gateway must reset
        // its sessions through it, so it is a fleet change.
        let restarted = RegistryEvent::RelayUpserted {
            record: RelayRecord {
                expires_at: 3,
                instance: "b1".into(),
                ..relay
            },
            revision: 9,
        };
        assert_eq!(step(restarted), EventEffect::FleetChanged);
        let other_record = RegistryEvent::RecordPut {
            owner: bb.clone(),
            name: "x".into(),
            value: vec![],
            revision: 8,
        };
        assert_eq!(step(other_record), EventEffect::Nothing);
        let own_record = RegistryEvent::RecordPut {
            owner: aa.clone(),
            name: "gateway".into(),
            value: vec![1],
            revision: 9,
        };
        assert_eq!(step(own_record), EventEffect::OwnRecordChanged);
        let gone = RegistryEvent::ClusterRemoved {
            id: bb.clone(),
            revision: 10,
        };
        assert_eq!(step(gone), EventEffect::FleetChanged);
        let me_gone = RegistryEvent::ClusterRemoved {
            id: aa.clone(),
            revision: 11,
        };
        assert_eq!(step(me_gone), EventEffect::OwnClusterRemoved);
    }
}

//! The cluster's credential in a Kubernetes Secret (`--credential-secret`, with
//! `--kubernetes on`): read at start, written by the replica whose join succeeded, so the
//! controller's first join works inside the cluster (no join done outside, no file written
//! into a read-only Secret volume). `fleet-dns` mounts the same Secret as its credential file.
//!
//! The Secret (`Opaque`, labelled `app.kubernetes.io/managed-by: fleet-controller`) holds
//! `credential` (the credential file's text) and `ca` (the hub CA's SHA-256, which
//! `fleet-dns --ca` reads). It is created once and never replaced: a second create gets
//! `409 AlreadyExists`, as a second `link(2)` of the credential file gets `EEXIST`.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_hub_api::model::ClusterId;
use fleet_hub_api::wire::{CaHash, Credential};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};

/// The Secret's keys.
pub const CREDENTIAL_KEY: &str = "credential";
pub const CA_KEY: &str = "ca";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the Kubernetes API (Secret {secret}): {reason}")]
    Api { secret: String, reason: String },
    #[error(
        "the Secret {secret} holds no credential of cluster {expected} under the key \
         `credential` ({found}); delete it (and remove the cluster at the hub) to join again"
    )]
    Malformed {
        secret: String,
        expected: ClusterId,
        found: String,
    },
    #[error("the Secret {secret} has a `ca` that is not a SHA-256 in hex")]
    BadCa { secret: String },
    #[error(
        "the Secret {secret} was created by someone else with another credential while this \
         replica joined; this replica's credential is lost: remove the cluster at the hub, \
         delete the Secret, and join again"
    )]
    LostRace { secret: String },
}

/// `<namespace>/<name>` of the credential Secret, through the controller's API client.
#[derive(Clone)]
pub struct CredentialSecret {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for CredentialSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CredentialSecret({}/{})", self.namespace, self.name)
    }
}

impl CredentialSecret {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        CredentialSecret {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    pub fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn api_error(&self, e: &kube::Error) -> SecretError {
        SecretError::Api {
            secret: self.describe(),
            reason: e.to_string(),
        }
    }

    /// The credential in the Secret; `Ok(None)` when the Secret does not exist. An
    /// unreadable API is an error (never "absent": joining again would orphan the cluster).
    pub async fn read(&self, cluster: &ClusterId) -> Result<Option<Credential>, SecretError> {
        let secret = match self.api.get_opt(&self.name).await {
            Ok(s) => s,
            Err(e) => return Err(self.api_error(&e)),
        };
        let Some(secret) = secret else {
            return Ok(None);
        };
        let malformed = |found: &str| SecretError::Malformed {
            secret: self.describe(),
            expected: cluster.clone(),
            found: found.to_string(),
        };
        let text = secret
            .data
            .as_ref()
            .and_then(|d| d.get(CREDENTIAL_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| malformed("no such key"))?;
        match Credential::parse(&text) {
            Some(c @ Credential::Member { .. }) if member_of(&c) == Some(cluster) => Ok(Some(c)),
            Some(Credential::Member { cluster: other, .. }) => {
                Err(malformed(&format!("cluster {other}'s")))
            }
            _ => Err(malformed("not a member credential")),
        }
    }

    /// [`CredentialSecret::read`], retrying API errors with a backoff: never "absent" while
    /// the API cannot be read (a second join would orphan the cluster's block). `Ok(None)`
    /// when stopped.
    pub async fn read_retrying(
        &self,
        cluster: &ClusterId,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Option<Credential>>, SecretError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let read = tokio::select! {
                r = self.read(cluster) => r,
                _ = crate::run::stopped(stop) => return Ok(None),
            };
            match read {
                Ok(c) => return Ok(Some(c)),
                Err(e @ SecretError::Api { .. }) => {
                    tracing::warn!(error = %e, "reading the credential Secret; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = crate::run::stopped(stop) => return Ok(None),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The hub CA's hash the Secret holds (key `ca`); `Ok(None)` without the Secret or the
    /// key.
    pub async fn read_ca(&self) -> Result<Option<CaHash>, SecretError> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.api_error(&e))?;
        let Some(text) = secret.and_then(|s| s.data).and_then(|d| {
            d.get(CA_KEY)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        }) else {
            return Ok(None);
        };
        text.trim()
            .parse()
            .map(Some)
            .map_err(|_| SecretError::BadCa {
                secret: self.describe(),
            })
    }

    /// Creates the Secret with `credential` and the hub CA's hash. `Ok(())` also when it
    /// already holds this very credential (a retried create whose answer was lost).
    pub async fn create(&self, credential: &Credential, ca: &CaHash) -> Result<(), SecretError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "fleet-controller".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (
                    CREDENTIAL_KEY.to_string(),
                    ByteString(format!("{}\n", credential.expose()).into_bytes()),
                ),
                (CA_KEY.to_string(), ByteString(ca.to_string().into_bytes())),
            ])),
            ..Secret::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let Some(cluster) = member_of(credential) else {
                    return Err(SecretError::LostRace {
                        secret: self.describe(),
                    });
                };
                match self.read(cluster).await? {
                    Some(found) if &found == credential => Ok(()),
                    _ => Err(SecretError::LostRace {
                        secret: self.describe(),
                    }),
                }
            }
            Err(e) => Err(self.api_error(&e)),
        }
    }

    /// Writes a fresh join's credential, retrying while the API is unavailable: the credential
    /// exists nowhere else, so the controller does not go on without it. Stopped before it is
    /// written: an error saying what to do.
    pub async fn store_joined(
        &self,
        credential: &Credential,
        ca: &CaHash,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SecretError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.create(credential, ca).await {
                Ok(()) => return Ok(()),
                Err(e @ SecretError::Api { .. }) => {
                    tracing::warn!(error = %e, "writing the credential Secret after the join; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = crate::run::stopped(stop) => {
                            tracing::error!(secret = %self.describe(), "stopped before the joined credential was written: remove the cluster at the hub and join again");
                            return Err(e);
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the Secret holds `cluster`'s credential (another replica joined), reading
    /// every `poll`; API errors are logged once per kind and retried.
    pub async fn wait(
        &self,
        cluster: &ClusterId,
        poll: Duration,
    ) -> Result<Credential, SecretError> {
        let mut last_error: Option<SecretError> = None;
        loop {
            match self.read(cluster).await {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(e @ SecretError::Api { .. }) => {
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "waiting for the credential Secret");
                    }
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(poll).await;
        }
    }
}

fn member_of(c: &Credential) -> Option<&ClusterId> {
    match c {
        Credential::Member { cluster, .. } => Some(cluster),
        Credential::Admin(_) => None,
    }
}

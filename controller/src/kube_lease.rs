//! Leadership by a Kubernetes `coordination.k8s.io/v1` Lease (`--leader-election kubernetes`),
//! with client-go's leader-election semantics:
//!
//! - the Lease `<namespace>/<name>` carries `holderIdentity`, `leaseDurationSeconds`,
//!   `acquireTime`, `renewTime` and `leaseTransitions`;
//! - absent: created with us as holder (a `409 AlreadyExists` means another replica created it
//!   first: [`LeaseEvent::HeldBy`]);
//! - ours: renewed (`renewTime`), by an update carrying the `resourceVersion` we read;
//! - another holder's: taken over only once it has *expired*, judged like client-go by our own
//!   clock: the record has not changed for `leaseDurationSeconds` since we first saw it that
//!   way (no trust in the other replica's clock; a replica that just started therefore waits
//!   one lease duration before taking a stale Lease). Taking over bumps `leaseTransitions`
//!   and sets `acquireTime`; the update carries the `resourceVersion` read, so of two replicas
//!   taking over at once the API server accepts one and answers the other `409 Conflict`
//!   ([`LeaseEvent::HeldBy`]);
//! - a clean stop clears `holderIdentity` ([`LeaseBackend::release`]), so a standby takes over
//!   at its next attempt;
//! - an API server that cannot be reached, times out or answers 5xx/429 gives
//!   [`LeaseEvent::HubUnavailable`]: as with the hub's lease, the active replica stays active.
//!   401/403 (RBAC: the service account needs `get`, `create` and `update` on `leases` in the
//!   namespace) and other refusals give [`LeaseEvent::Failed`].
//!
//! In a pod the client is configured by `kube::Config::infer()` (the service account);
//! `--kubeconfig` points it elsewhere. The tests (`tests/kube_lease.rs`) reach a fake API
//! server (`FakeKubeApi`) through a kubeconfig: there is no real API server in this sandbox;
//! the real path is for the kind script (not written yet).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::leader::{LeaseBackend, LeaseEvent};

#[derive(Debug, thiserror::Error)]
pub enum KubeLeaseError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes client configuration (not in a pod, no KUBECONFIG): {0}; use \
         --leader-election hub outside Kubernetes, or --kubeconfig <path>"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// The [`LeaseBackend`] on a Kubernetes Lease.
pub struct KubeLease {
    api: Api<Lease>,
    namespace: String,
    name: String,
    /// The Lease's spec as we last saw it, and since when (our clock): the expiry clock.
    observed: Mutex<Option<(LeaseSpec, Instant)>>,
}

/// What one API call came to.
enum CallError {
    NotFound,
    Conflict,
    Event(LeaseEvent),
}

impl KubeLease {
    /// A client from `kubeconfig`, or else `Config::infer()` (in a pod: the service account),
    /// with timeouts fit for a lease of `ttl` (a call must fail well within a lease's life).
    pub async fn connect(
        namespace: &str,
        name: &str,
        kubeconfig: Option<&Path>,
        ttl: Duration,
    ) -> Result<Self, KubeLeaseError> {
        let mut config = match kubeconfig {
            Some(path) => {
                let kc =
                    Kubeconfig::read_from(path).map_err(|source| KubeLeaseError::Kubeconfig {
                        path: path.display().to_string(),
                        source,
                    })?;
                Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(|source| KubeLeaseError::Kubeconfig {
                        path: path.display().to_string(),
                        source,
                    })?
            }
            None => Config::infer().await.map_err(KubeLeaseError::Infer)?,
        };
        config.connect_timeout =
            Some((ttl / 3).clamp(Duration::from_millis(300), Duration::from_secs(3)));
        let call = ttl.clamp(Duration::from_millis(500), Duration::from_secs(10));
        config.read_timeout = Some(call);
        config.write_timeout = Some(call);
        // No client-side retries of 429/503/504 (kube's default backs off for minutes): the
        // lease task asks again every ttl/3, and an answer must come within the lease's life.
        config.default_retry = false;
        let client = Client::try_from(config).map_err(KubeLeaseError::Client)?;
        Ok(Self::new(client, namespace, name))
    }

    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        KubeLease {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            observed: Mutex::new(None),
        }
    }

    fn classify(&self, doing: &str, e: kube::Error) -> CallError {
        let what = format!(
            "{doing} the Lease {}/{} at the Kubernetes API server",
            self.namespace, self.name
        );
        match e {
            kube::Error::Api(status) => match status.code {
                404 => CallError::NotFound,
                409 => CallError::Conflict,
                401 | 403 => CallError::Event(LeaseEvent::Failed(format!(
                    "{what}: refused ({} {}: {}); the controller's service account needs get, \
                     create and update on leases.coordination.k8s.io in namespace {}",
                    status.code, status.reason, status.message, self.namespace
                ))),
                429 | 500..=599 => CallError::Event(LeaseEvent::HubUnavailable(format!(
                    "{what}: {} {}: {}",
                    status.code, status.reason, status.message
                ))),
                _ => CallError::Event(LeaseEvent::Failed(format!(
                    "{what}: {} {}: {}",
                    status.code, status.reason, status.message
                ))),
            },
            e @ (kube::Error::HyperError(_)
            | kube::Error::Service(_)
            | kube::Error::HttpError(_)
            | kube::Error::SerdeError(_)
            | kube::Error::ReadEvents(_)
            | kube::Error::FromUtf8(_)) => {
                CallError::Event(LeaseEvent::HubUnavailable(format!("{what}: {e}")))
            }
            e => CallError::Event(LeaseEvent::Failed(format!("{what}: {e}"))),
        }
    }

    /// Notes `spec` as seen now; returns how long it has been seen unchanged.
    fn observe(&self, spec: &LeaseSpec) -> Duration {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match &*observed {
            Some((seen, since)) if seen == spec => since.elapsed(),
            _ => {
                *observed = Some((spec.clone(), Instant::now()));
                Duration::ZERO
            }
        }
    }

    async fn get(&self) -> Result<Option<Lease>, CallError> {
        match self.api.get(&self.name).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => match self.classify("reading", e) {
                CallError::NotFound => Ok(None),
                other => Err(other),
            },
        }
    }

    /// After a `409`: who won (read again; the name only serves the logs).
    async fn lost_race(&self) -> LeaseEvent {
        let winner = match self.get().await {
            Ok(Some(l)) => l.spec.and_then(|s| s.holder_identity),
            _ => None,
        };
        LeaseEvent::HeldBy(
            winner
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "another replica (it won the write race)".into()),
        )
    }

    fn event(e: CallError, fallback: &str) -> LeaseEvent {
        match e {
            CallError::Event(ev) => ev,
            CallError::NotFound | CallError::Conflict => LeaseEvent::HeldBy(fallback.into()),
        }
    }
}

/// `leaseDurationSeconds` for a TTL: whole seconds, rounded up, at least 1.
pub fn lease_seconds(ttl: Duration) -> i32 {
    let ms = ttl.as_millis().max(1);
    i32::try_from(ms.div_ceil(1000)).unwrap_or(i32::MAX)
}

fn holder_of(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())
}

#[async_trait::async_trait]
impl LeaseBackend for KubeLease {
    async fn try_acquire(&self, holder: &str, ttl: Duration) -> LeaseEvent {
        let now = MicroTime(Timestamp::now());
        let seconds = lease_seconds(ttl);
        let current = match self.get().await {
            Ok(c) => c,
            Err(e) => return Self::event(e, "unknown"),
        };
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.to_string()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created.spec.unwrap_or_default());
                    LeaseEvent::Granted
                }
                Err(e) => match self.classify("creating", e) {
                    CallError::Conflict => self.lost_race().await,
                    CallError::NotFound => LeaseEvent::Failed(format!(
                        "creating the Lease {}/{}: not found (does namespace {} exist?)",
                        self.namespace, self.name, self.namespace
                    )),
                    CallError::Event(ev) => ev,
                },
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let unchanged_for = self.observe(&spec);
        let ours = holder_of(&spec) == Some(holder);
        if let Some(other) = holder_of(&spec)
            && !ours
        {
            let duration = spec
                .lease_duration_seconds
                .filter(|s| *s > 0)
                .unwrap_or(seconds);
            let expired = unchanged_for >= Duration::from_secs(u64::from(duration.unsigned_abs()));
            if !expired {
                return LeaseEvent::HeldBy(other.to_string());
            }
            tracing::info!(lease = %self.describe(), previous = %other, "the Lease expired: taking it over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if ours {
                spec.acquire_time.clone().or(Some(now.clone()))
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..spec
        });
        // `lease.metadata.resourceVersion` is the one read: the API server refuses the update
        // with 409 if the Lease changed since.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated.spec.unwrap_or_default());
                LeaseEvent::Granted
            }
            Err(e) => match self.classify("updating", e) {
                CallError::Conflict => self.lost_race().await,
                // Deleted between our read and write: try again at the next renewal.
                CallError::NotFound => {
                    LeaseEvent::HubUnavailable("the Lease was deleted while we updated it".into())
                }
                CallError::Event(ev) => ev,
            },
        }
    }

    async fn release(&self, holder: &str) -> Result<(), String> {
        let describe = |e: CallError| match e {
            CallError::Event(ev) => format!("{ev:?}"),
            CallError::NotFound => "not found".into(),
            CallError::Conflict => "it changed meanwhile; it expires by itself".into(),
        };
        let Some(mut lease) = self.get().await.map_err(describe)? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if holder_of(&spec) != Some(holder) {
            return Ok(());
        }
        let now = MicroTime(Timestamp::now());
        // As client-go: no holder, a one-second duration, the transition count kept.
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..spec
        });
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.classify("releasing", e) {
                CallError::NotFound => Ok(()),
                other => Err(describe(other)),
            },
        }
    }

    fn describe(&self) -> String {
        format!("kubernetes lease {}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(500)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(3)), 3);
        assert_eq!(lease_seconds(Duration::from_millis(3001)), 4);
        assert_eq!(lease_seconds(Duration::ZERO), 1);
    }
}

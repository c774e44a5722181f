//! Leadership by a lease: every replica keeps asking for it (every ttl/3); the one that holds
//! it is active. Where the lease lives is a [`LeaseBackend`]: the hub's cluster lease
//! ([`HubLease`], a lock in the hub's store) or a Kubernetes `coordination.k8s.io/v1` Lease
//! ([`crate::kube_lease::KubeLease`]). The decision is [`on_lease`]; the renewing is
//! [`lease_task`], which never waits for the controller's work, so a long reconcile pass cannot
//! let the lease lapse.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hub::{Hub, is_removed, is_unavailable};

/// Where the lease lives. One call = one attempt to take or renew it for `holder`.
#[async_trait::async_trait]
pub trait LeaseBackend: Send + Sync {
    /// Takes the lease for `holder` (free or expired), renews it (already `holder`'s), or
    /// says who holds it. Never blocks longer than the backend's own call timeouts.
    async fn try_acquire(&self, holder: &str, ttl: Duration) -> LeaseEvent;
    /// Gives the lease up if `holder` holds it (a clean stop), so a standby need not wait for
    /// it to expire.
    async fn release(&self, holder: &str) -> Result<(), String>;
    /// For logs: `hub` or `kubernetes <namespace>/<name>`.
    fn describe(&self) -> String;
}

/// The hub's cluster lease (`acquire_lease` / `release_lease`): a lock in the hub's store.
pub struct HubLease(pub Arc<dyn Hub>);

#[async_trait::async_trait]
impl LeaseBackend for HubLease {
    async fn try_acquire(&self, holder: &str, ttl: Duration) -> LeaseEvent {
        match self.0.acquire_lease(holder, ttl).await {
            Ok(a) if a.granted => LeaseEvent::Granted,
            Ok(a) => LeaseEvent::HeldBy(a.holder),
            Err(e) if is_removed(&e) => LeaseEvent::Removed(e.to_string()),
            Err(e) if is_unavailable(&e) => LeaseEvent::HubUnavailable(e.to_string()),
            Err(e) => LeaseEvent::Failed(e.to_string()),
        }
    }

    async fn release(&self, holder: &str) -> Result<(), String> {
        self.0
            .release_lease(holder)
            .await
            .map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        "hub".into()
    }
}

/// What the last lease call said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Granted,
    HeldBy(String),
    /// The lease's authority (the hub, or the Kubernetes API server) could not be reached or
    /// could not answer: the active replica stays active.
    HubUnavailable(String),
    /// The hub no longer knows this cluster's credential.
    Removed(String),
    /// Any other refusal (a bad holder id or TTL: a configuration error).
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Standby,
    Active,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Stay,
    Activate,
    StepDown,
    /// The cluster is gone: tear down and exit (with the hub's reason).
    Removed(String),
    /// The hub refuses the call itself (a bad holder id or TTL): exit with the reason.
    Fatal(String),
}

/// What a replica in `role` does on `event`. An active replica that cannot reach the hub
/// stays active and keeps its data plane: traffic must survive the hub being down; only a
/// hub that names another holder makes it step down.
pub fn on_lease(role: Role, event: &LeaseEvent) -> Transition {
    match (role, event) {
        (_, LeaseEvent::Removed(reason)) => Transition::Removed(reason.clone()),
        (_, LeaseEvent::Failed(reason)) => Transition::Fatal(reason.clone()),
        (Role::Standby, LeaseEvent::Granted) => Transition::Activate,
        (Role::Active, LeaseEvent::HeldBy(_)) => Transition::StepDown,
        _ => Transition::Stay,
    }
}

/// Asks for the lease every `ttl / 3` while holding it, every `ttl / 6` while another replica
/// does (each call bounded by `ttl`), and publishes each answer on the returned channel; runs
/// until the receiver is dropped. The faster standby poll takes over at most `ttl / 6` after
/// the holder's lease expires: with the 3 s default, a `kill -9` of the active is followed by
/// a takeover within 2.5 s, which leaves room in the 5 s recovery budget on a loaded machine.
pub fn lease_task(
    backend: Arc<dyn LeaseBackend>,
    holder: String,
    ttl: Duration,
) -> (
    watch::Receiver<Option<LeaseEvent>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(None);
    let handle = tokio::spawn(async move {
        let (renew, poll) = (ttl / 3, ttl / 6);
        loop {
            let event = match tokio::time::timeout(ttl, backend.try_acquire(&holder, ttl)).await {
                Err(_) => LeaseEvent::HubUnavailable(format!(
                    "the lease call ({}) did not answer within {} ms",
                    backend.describe(),
                    ttl.as_millis()
                )),
                Ok(event) => event,
            };
            let period = if matches!(event, LeaseEvent::HeldBy(_)) {
                poll
            } else {
                renew
            };
            if tx.send(Some(event)).is_err() {
                return;
            }
            tokio::time::sleep(period).await;
        }
    });
    (rx, handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::fakes::FakeHub;

    #[test]
    fn transitions() {
        use LeaseEvent::*;
        use Role::*;
        assert_eq!(on_lease(Standby, &Granted), Transition::Activate);
        assert_eq!(on_lease(Active, &Granted), Transition::Stay);
        assert_eq!(on_lease(Active, &HeldBy("b".into())), Transition::StepDown);
        assert_eq!(on_lease(Standby, &HeldBy("b".into())), Transition::Stay);
        // The hub down: the active keeps going, the standby keeps waiting.
        assert_eq!(
            on_lease(Active, &HubUnavailable("x".into())),
            Transition::Stay
        );
        assert_eq!(
            on_lease(Standby, &HubUnavailable("x".into())),
            Transition::Stay
        );
        assert_eq!(
            on_lease(Active, &Removed("x".into())),
            Transition::Removed("x".into())
        );
        assert_eq!(
            on_lease(Standby, &Removed("x".into())),
            Transition::Removed("x".into())
        );
        assert_eq!(
            on_lease(Active, &Failed("bad holder".into())),
            Transition::Fatal("bad holder".into())
        );
    }

    async fn next(rx: &mut watch::Receiver<Option<LeaseEvent>>) -> LeaseEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        rx.borrow_and_update().clone().unwrap()
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_the_other_takes_over_after_release() {
        let hub = Arc::new(FakeHub::default());
        let ttl = Duration::from_millis(150);
        let backend: Arc<dyn LeaseBackend> = Arc::new(HubLease(hub.clone()));
        let (mut a, ta) = lease_task(backend.clone(), "a".into(), ttl);
        assert_eq!(next(&mut a).await, LeaseEvent::Granted);
        let (mut b, tb) = lease_task(backend.clone(), "b".into(), ttl);
        assert_eq!(next(&mut b).await, LeaseEvent::HeldBy("a".into()));
        assert_eq!(next(&mut a).await, LeaseEvent::Granted, "renewal");
        ta.abort();
        backend.release("a").await.unwrap();
        loop {
            if next(&mut b).await == LeaseEvent::Granted {
                break;
            }
        }
        *hub.down.lock().unwrap() = true;
        assert!(matches!(next(&mut b).await, LeaseEvent::HubUnavailable(_)));
        tb.abort();
    }
}

//! Leadership by the hub's cluster lease: every replica keeps asking for it (every ttl/3); the
//! one that holds it is active. The decision is [`on_lease`]; the renewing is [`lease_task`],
//! which never waits for the controller's work, so a long reconcile pass cannot let the lease
//! lapse.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hub::{Hub, is_removed, is_unavailable};

/// What the last lease call said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Granted,
    HeldBy(String),
    /// The hub could not be reached or could not answer.
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

/// Asks for the lease every `ttl / 3` (each call bounded by `ttl`) and publishes each answer
/// on the returned channel; runs until the receiver is dropped.
pub fn lease_task(
    hub: Arc<dyn Hub>,
    holder: String,
    ttl: Duration,
) -> (
    watch::Receiver<Option<LeaseEvent>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(None);
    let handle = tokio::spawn(async move {
        let period = ttl / 3;
        loop {
            let event = match tokio::time::timeout(ttl, hub.acquire_lease(&holder, ttl)).await {
                Err(_) => LeaseEvent::HubUnavailable(format!(
                    "the lease call did not answer within {} ms",
                    ttl.as_millis()
                )),
                Ok(Ok(a)) if a.granted => LeaseEvent::Granted,
                Ok(Ok(a)) => LeaseEvent::HeldBy(a.holder),
                Ok(Err(e)) if is_removed(&e) => LeaseEvent::Removed(e.to_string()),
                Ok(Err(e)) if is_unavailable(&e) => LeaseEvent::HubUnavailable(e.to_string()),
                Ok(Err(e)) => LeaseEvent::Failed(e.to_string()),
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
        let (mut a, ta) = lease_task(hub.clone(), "a".into(), ttl);
        assert_eq!(next(&mut a).await, LeaseEvent::Granted);
        let (mut b, tb) = lease_task(hub.clone(), "b".into(), ttl);
        assert_eq!(next(&mut b).await, LeaseEvent::HeldBy("a".into()));
        assert_eq!(next(&mut a).await, LeaseEvent::Granted, "renewal");
        ta.abort();
        hub.release_lease("a").await.unwrap();
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

//! Leadership by a Kubernetes Lease (`fleet_controller::kube_lease::KubeLease`) against
//! `FakeKubeApi`: there is no real Kubernetes API server in this sandbox, so this test runs a
//! fake one — an HTTP server implementing GET / POST / PUT of
//! `coordination.k8s.io/v1` Leases the way the API server does (a `resourceVersion` per write,
//! `404 NotFound`, `409 AlreadyExists` on a create of an existing Lease, `409 Conflict` on an
//! update carrying a stale `resourceVersion`, `401` for a wrong bearer token). The controller's
//! client reaches it through a kubeconfig (plain http), as `--kubeconfig` would. The real
//! API-server path (in-cluster config, TLS, RBAC) is for the kind script, not written yet.
//!
//! No root needed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_controller::kube_lease::KubeLease;
use fleet_controller::leader::{LeaseBackend, LeaseEvent, Role, Transition, lease_task, on_lease};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::{Value, json};

const NS: &str = "fleetboard-system";
const NAME: &str = "fleet-controller";
const TOKEN: &str = "fake-token";
const TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct FakeState {
    /// (namespace, name) → the stored Lease object.
    leases: HashMap<(String, String), Value>,
    revision: u64,
    /// 409s answered (AlreadyExists + Conflict).
    conflicts: u32,
    /// Answer every request with this status (e.g. 503) while set.
    fail_with: Option<u16>,
    /// Hold the next N GETs until all N have arrived (then all read the same state).
    gate: Option<(Arc<tokio::sync::Barrier>, usize)>,
    requests: Vec<String>,
}

/// A fake Kubernetes API server for Leases (see the module doc).
struct FakeKubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    bad_token_kubeconfig: PathBuf,
}

fn status(code: u16, reason: &str, message: String) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn object(code: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .expect("a valid response")
}

async fn handle(
    state: Arc<Mutex<FakeState>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (fail_with, gate) = {
        let mut s = state.lock().unwrap();
        s.requests.push(format!("{method} {path}"));
        let gate = match (&method, s.gate.take()) {
            (&Method::GET, Some((barrier, left))) => {
                if left > 1 {
                    s.gate = Some((barrier.clone(), left - 1));
                }
                Some(barrier)
            }
            (_, g) => {
                s.gate = g;
                None
            }
        };
        (s.fail_with, gate)
    };
    if let Some(code) = fail_with {
        return Ok(status(code, "ServiceUnavailable", "fake outage".into()));
    }
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        return Ok(status(401, "Unauthorized", "Unauthorized".into()));
    }
    let rest = path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/");
    let parts: Vec<&str> = rest.map(|r| r.split('/').collect()).unwrap_or_default();
    let (ns, name) = match parts.as_slice() {
        [ns, "leases"] => (ns.to_string(), None),
        [ns, "leases", name] => (ns.to_string(), Some(name.to_string())),
        _ => return Ok(status(404, "NotFound", format!("no route {path}"))),
    };
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let Ok(body) = body else {
        return Ok(status(400, "BadRequest", "unreadable body".into()));
    };
    if let Some(gate) = gate {
        gate.wait().await;
    }
    let mut s = state.lock().unwrap();
    let parsed = || serde_json::from_slice::<Value>(&body);
    Ok(match (method, name) {
        (Method::GET, Some(name)) => match s.leases.get(&(ns, name.clone())) {
            Some(v) => object(StatusCode::OK, v),
            None => status(404, "NotFound", format!("leases \"{name}\" not found")),
        },
        (Method::POST, None) => {
            let Ok(mut v) = parsed() else {
                return Ok(status(400, "BadRequest", "not JSON".into()));
            };
            let Some(name) = v["metadata"]["name"].as_str().map(str::to_string) else {
                return Ok(status(422, "Invalid", "metadata.name: Required".into()));
            };
            if !v["metadata"]["resourceVersion"].is_null() {
                return Ok(status(
                    422,
                    "Invalid",
                    "resourceVersion should not be set on objects to be created".into(),
                ));
            }
            let key = (ns, name.clone());
            if s.leases.contains_key(&key) {
                s.conflicts += 1;
                status(
                    409,
                    "AlreadyExists",
                    format!("leases \"{name}\" already exists"),
                )
            } else {
                s.revision += 1;
                v["metadata"]["resourceVersion"] = json!(s.revision.to_string());
                v["metadata"]["uid"] = json!(format!("uid-{name}"));
                s.leases.insert(key, v.clone());
                object(StatusCode::CREATED, &v)
            }
        }
        (Method::PUT, Some(name)) => {
            let Ok(mut v) = parsed() else {
                return Ok(status(400, "BadRequest", "not JSON".into()));
            };
            if v["metadata"]["name"].as_str() != Some(name.as_str()) {
                return Ok(status(
                    400,
                    "BadRequest",
                    "the name in the body differs".into(),
                ));
            }
            let revision = s.revision;
            let key = (ns, name.clone());
            let Some(stored) = s.leases.get(&key) else {
                return Ok(status(
                    404,
                    "NotFound",
                    format!("leases \"{name}\" not found"),
                ));
            };
            let sent = v["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_string);
            if let Some(sent) = sent
                && Some(sent.as_str()) != stored["metadata"]["resourceVersion"].as_str()
            {
                s.conflicts += 1;
                return Ok(status(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": \
                         the object has been modified; please apply your changes to the latest \
                         version and try again"
                    ),
                ));
            }
            s.revision = revision + 1;
            v["metadata"]["resourceVersion"] = json!(s.revision.to_string());
            s.leases.insert(key, v.clone());
            object(StatusCode::OK, &v)
        }
        (m, _) => status(405, "MethodNotAllowed", format!("{m} not supported here")),
    })
}

/// A kubeconfig pointing at the fake (plain http) with a bearer token.
fn kubeconfig_yaml(addr: SocketAddr, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
         current-context: fake\nusers:\n- name: fake\n  user:\n    token: {token}\n"
    )
}

impl FakeKubeApi {
    async fn start() -> FakeKubeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let st = state.clone();
        let server = tokio::spawn(async move {
            // Connections live in this set: aborting the server drops them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr, TOKEN)).unwrap();
        let bad_token_kubeconfig = dir.path().join("kubeconfig-bad-token");
        std::fs::write(&bad_token_kubeconfig, kubeconfig_yaml(addr, "wrong")).unwrap();
        FakeKubeApi {
            addr,
            state,
            server: Some(server),
            _dir: dir,
            kubeconfig,
            bad_token_kubeconfig,
        }
    }

    /// A replica's backend (its own client), through the kubeconfig.
    async fn replica(&self) -> KubeLease {
        KubeLease::connect(NS, NAME, Some(&self.kubeconfig), TTL)
            .await
            .unwrap()
    }

    fn lease(&self) -> Option<Lease> {
        let s = self.state.lock().unwrap();
        s.leases
            .get(&(NS.to_string(), NAME.to_string()))
            .map(|v| serde_json::from_value(v.clone()).unwrap())
    }

    /// The next `n` GETs wait for each other: `n` replicas read the same Lease.
    fn hold_next_reads(&self, n: usize) {
        self.state.lock().unwrap().gate = Some((Arc::new(tokio::sync::Barrier::new(n)), n));
    }

    fn conflicts(&self) -> u32 {
        self.state.lock().unwrap().conflicts
    }

    /// The API server goes away: listener closed, open connections dropped.
    async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
        // Nothing listens there any more.
        assert!(tokio::net::TcpStream::connect(self.addr).await.is_err());
    }
}

fn holder(l: &Lease) -> Option<String> {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

fn transitions(l: &Lease) -> i32 {
    l.spec.as_ref().unwrap().lease_transitions.unwrap()
}

#[tokio::test]
async fn first_replica_acquires_the_second_sees_it_held_and_renewals_keep_it() {
    let fake = FakeKubeApi::start().await;
    let (a, b) = (fake.replica().await, fake.replica().await);
    assert!(fake.lease().is_none());
    assert_eq!(a.try_acquire("a", TTL).await, LeaseEvent::Granted);
    let first = fake.lease().expect("created");
    let spec = first.spec.clone().unwrap();
    assert_eq!(holder(&first).as_deref(), Some("a"));
    assert_eq!(spec.lease_duration_seconds, Some(1));
    assert_eq!(spec.lease_transitions, Some(0));
    assert_eq!(spec.acquire_time, spec.renew_time);
    assert_eq!(first.metadata.namespace.as_deref(), Some(NS));

    assert_eq!(
        b.try_acquire("b", TTL).await,
        LeaseEvent::HeldBy("a".into())
    );
    // a renews every ttl/3 for three lease durations; b never gets it.
    let until = Instant::now() + 3 * TTL;
    let mut last_renew = spec.renew_time.clone();
    while Instant::now() < until {
        tokio::time::sleep(TTL / 3).await;
        assert_eq!(a.try_acquire("a", TTL).await, LeaseEvent::Granted);
        let now = fake.lease().unwrap();
        let s = now.spec.clone().unwrap();
        assert!(s.renew_time > last_renew, "renewTime advances");
        assert_eq!(s.acquire_time, spec.acquire_time, "acquireTime stays");
        assert_eq!(s.lease_transitions, Some(0));
        last_renew = s.renew_time.clone();
        assert_eq!(
            b.try_acquire("b", TTL).await,
            LeaseEvent::HeldBy("a".into())
        );
    }
    assert_eq!(holder(&fake.lease().unwrap()).as_deref(), Some("a"));
}

#[tokio::test]
async fn when_the_holder_stops_renewing_the_standby_takes_over_with_one_more_transition() {
    let fake = FakeKubeApi::start().await;
    let (a, b) = (fake.replica().await, fake.replica().await);
    assert_eq!(a.try_acquire("a", TTL).await, LeaseEvent::Granted);
    let before = fake.lease().unwrap();
    // a is "killed": no more renewals. b polls every ttl/3 through the real lease task.
    let b: Arc<dyn LeaseBackend> = Arc::new(b);
    let started = Instant::now();
    let (mut rx, task) = lease_task(b, "b".into(), TTL);
    let took = loop {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let ev = rx.borrow_and_update().clone().unwrap();
        match ev {
            LeaseEvent::HeldBy(h) => assert_eq!(h, "a"),
            LeaseEvent::Granted => break started.elapsed(),
            other => panic!("unexpected {other:?}"),
        }
    };
    task.abort();
    // Expiry is judged by b's own clock: one lease duration after b first saw the record.
    assert!(
        took >= TTL,
        "taken over after {took:?}, before the lease expired"
    );
    assert!(took < 3 * TTL, "taken over only after {took:?}");
    let after = fake.lease().unwrap();
    assert_eq!(holder(&after).as_deref(), Some("b"));
    assert_eq!(transitions(&after), transitions(&before) + 1);
    let (s0, s1) = (before.spec.unwrap(), after.spec.unwrap());
    assert!(s1.acquire_time > s0.acquire_time, "a new acquireTime");
    assert_eq!(s1.acquire_time, s1.renew_time);
    // The old holder comes back: it sees b and (as active) would step down.
    let ev = a.try_acquire("a", TTL).await;
    assert_eq!(ev, LeaseEvent::HeldBy("b".into()));
    assert_eq!(on_lease(Role::Active, &ev), Transition::StepDown);
}

#[tokio::test]
async fn concurrent_creators_exactly_one_wins_the_other_gets_409() {
    let fake = FakeKubeApi::start().await;
    let (a, b) = (fake.replica().await, fake.replica().await);
    // Both read "absent" before either writes.
    fake.hold_next_reads(2);
    let (ea, eb) = tokio::join!(a.try_acquire("a", TTL), b.try_acquire("b", TTL));
    let winner = holder(&fake.lease().unwrap()).unwrap();
    let (won, lost, lost_event) = if winner == "a" {
        (ea, "b", eb)
    } else {
        (eb, "a", ea)
    };
    assert_eq!(won, LeaseEvent::Granted);
    assert_eq!(
        lost_event,
        LeaseEvent::HeldBy(winner.clone()),
        "{lost} lost"
    );
    assert_eq!(
        fake.conflicts(),
        1,
        "the loser's create got 409 AlreadyExists"
    );
    assert_eq!(transitions(&fake.lease().unwrap()), 0);
}

#[tokio::test]
async fn concurrent_takeovers_of_an_expired_lease_exactly_one_wins_the_other_gets_409() {
    let fake = FakeKubeApi::start().await;
    let (c, a, b) = (
        fake.replica().await,
        fake.replica().await,
        fake.replica().await,
    );
    assert_eq!(c.try_acquire("c", TTL).await, LeaseEvent::Granted);
    // a and b see c's record, then c stops renewing and it expires for both.
    assert_eq!(
        a.try_acquire("a", TTL).await,
        LeaseEvent::HeldBy("c".into())
    );
    assert_eq!(
        b.try_acquire("b", TTL).await,
        LeaseEvent::HeldBy("c".into())
    );
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    fake.hold_next_reads(2);
    let (ea, eb) = tokio::join!(a.try_acquire("a", TTL), b.try_acquire("b", TTL));
    let lease = fake.lease().unwrap();
    let winner = holder(&lease).unwrap();
    assert!(winner == "a" || winner == "b");
    let events = [ea, eb];
    assert_eq!(
        events.iter().filter(|e| **e == LeaseEvent::Granted).count(),
        1,
        "{events:?}"
    );
    assert!(
        events.contains(&LeaseEvent::HeldBy(winner.clone())),
        "{events:?}"
    );
    assert_eq!(fake.conflicts(), 1, "the loser's update got 409 Conflict");
    assert_eq!(transitions(&lease), 1, "one transition, not two");
}

#[tokio::test]
async fn release_clears_the_holder_and_a_standby_takes_over_at_once() {
    let fake = FakeKubeApi::start().await;
    let (a, b) = (fake.replica().await, fake.replica().await);
    assert_eq!(a.try_acquire("a", TTL).await, LeaseEvent::Granted);
    assert_eq!(
        b.try_acquire("b", TTL).await,
        LeaseEvent::HeldBy("a".into())
    );
    // Releasing a lease one does not hold changes nothing.
    b.release("b").await.unwrap();
    assert_eq!(holder(&fake.lease().unwrap()).as_deref(), Some("a"));
    a.release("a").await.unwrap();
    let released = fake.lease().unwrap();
    assert_eq!(holder(&released), None, "holderIdentity cleared");
    assert_eq!(transitions(&released), 0, "the count is kept");
    // No waiting for an expiry.
    let t = Instant::now();
    assert_eq!(b.try_acquire("b", TTL).await, LeaseEvent::Granted);
    assert!(t.elapsed() < TTL);
    let taken = fake.lease().unwrap();
    assert_eq!(holder(&taken).as_deref(), Some("b"));
    assert_eq!(transitions(&taken), 1);
}

#[tokio::test]
async fn api_server_down_or_failing_is_unavailable_and_the_active_stays_active() {
    let mut fake = FakeKubeApi::start().await;
    let a = fake.replica().await;
    assert_eq!(a.try_acquire("a", TTL).await, LeaseEvent::Granted);
    // 503 from the API server.
    fake.state.lock().unwrap().fail_with = Some(503);
    let t = Instant::now();
    let ev = a.try_acquire("a", TTL).await;
    assert!(
        t.elapsed() < TTL,
        "no client-side retrying: {:?}",
        t.elapsed()
    );
    assert!(
        matches!(&ev, LeaseEvent::HubUnavailable(m) if m.contains("503")),
        "{ev:?}"
    );
    assert_eq!(on_lease(Role::Active, &ev), Transition::Stay);
    fake.state.lock().unwrap().fail_with = None;
    assert_eq!(a.try_acquire("a", TTL).await, LeaseEvent::Granted);
    // The API server gone altogether.
    fake.stop().await;
    let t = Instant::now();
    let ev = a.try_acquire("a", TTL).await;
    assert!(matches!(&ev, LeaseEvent::HubUnavailable(_)), "{ev:?}");
    assert!(t.elapsed() < 2 * TTL, "fails fast: {:?}", t.elapsed());
    assert_eq!(on_lease(Role::Active, &ev), Transition::Stay);
    assert_eq!(on_lease(Role::Standby, &ev), Transition::Stay);
    assert!(a.release("a").await.is_err());
}

#[tokio::test]
async fn a_refused_token_is_a_clear_failure_and_nothing_is_written() {
    let fake = FakeKubeApi::start().await;
    let bad = KubeLease::connect(NS, NAME, Some(&fake.bad_token_kubeconfig), TTL)
        .await
        .unwrap();
    let ev = bad.try_acquire("a", TTL).await;
    match &ev {
        LeaseEvent::Failed(m) => {
            assert!(m.contains("401"), "{m}");
            assert!(m.contains("leases.coordination.k8s.io"), "{m}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(matches!(on_lease(Role::Standby, &ev), Transition::Fatal(_)));
    assert!(fake.lease().is_none());
    assert!(
        fake.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .all(|r| r.starts_with("GET ")),
        "only a read was tried"
    );
}

#[tokio::test]
async fn a_missing_kubeconfig_is_a_clear_error() {
    let err = KubeLease::connect(NS, NAME, Some("/nonexistent/kubeconfig".as_ref()), TTL)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
}

//! `FakeKubeApi`: an in-memory fake of the Kubernetes API server, shared by the tests that
//! need one (`kube_mcs.rs`, `node_api_tls.rs`); see `kube_mcs.rs`'s module doc for what it
//! serves.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use serde_json::{Value, json};

/// (resource, namespace, name) → object; resource is `<group>/<plural>` (`/services` for core).
type Key = (String, String, String);

/// One change: (revision, resource, namespace, ADDED|MODIFIED|DELETED, the object).
type Change = (u64, String, String, &'static str, Value);

#[derive(Default)]
struct FakeState {
    objects: BTreeMap<Key, Value>,
    revision: u64,
    /// Every write: "METHOD path".
    writes: Vec<String>,
    /// The history watches are served from; a watch from before `compacted` gets 410.
    changes: Vec<Change>,
    compacted: u64,
    /// Bumped to end every open watch.
    generation: u64,
    /// 410s sent.
    expired_watches: u32,
}

impl FakeState {
    fn record(&mut self, key: &Key, kind: &'static str, v: Value) {
        self.changes
            .push((self.revision, key.0.clone(), key.1.clone(), kind, v));
    }
}

/// A fake Kubernetes API server (see the module doc).
pub struct FakeKubeApi {
    state: Arc<Mutex<FakeState>>,
    /// Woken on every change (watches wait on it).
    changed: Arc<tokio::sync::Notify>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

/// Resources whose `status` is a subresource: a patch of the object leaves it alone.
const WITH_STATUS: [&str; 2] = [
    "multicluster.x-k8s.io/serviceexports",
    "multicluster.x-k8s.io/serviceimports",
];

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("a valid response")
}

fn failure(code: u16, reason: &str, message: String) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// `/api/v1/...` or `/apis/<group>/<version>/...` → (resource, namespace, name, subresource).
/// (resource, namespace, name, subresource) of a request path.
type Route = (String, Option<String>, Option<String>, Option<String>);

fn route(path: &str) -> Option<Route> {
    let (group, rest) = if let Some(r) = path.strip_prefix("/api/v1/") {
        ("", r)
    } else {
        let r = path.strip_prefix("/apis/")?;
        let mut it = r.splitn(3, '/');
        let (g, _v, rest) = (it.next()?, it.next()?, it.next()?);
        (g, rest)
    };
    let s: Vec<&str> = rest.split('/').collect();
    let res = |plural: &str| format!("{group}/{plural}");
    Some(match s.as_slice() {
        [plural] => (res(plural), None, None, None),
        ["namespaces", ns, plural] => (res(plural), Some(ns.to_string()), None, None),
        ["namespaces", ns, plural, name] => (
            res(plural),
            Some(ns.to_string()),
            Some(name.to_string()),
            None,
        ),
        ["namespaces", ns, plural, name, sub] => (
            res(plural),
            Some(ns.to_string()),
            Some(name.to_string()),
            Some(sub.to_string()),
        ),
        _ => return None,
    })
}

fn label_matches(v: &Value, selector: &Option<(String, String)>) -> bool {
    selector
        .as_ref()
        .is_none_or(|(k, val)| v["metadata"]["labels"][k] == val.as_str())
}

/// A watch of `resource` from `from`: the recorded changes after it, then new ones, until the
/// client goes, the watch times out or [`FakeKubeApi::delete_and_expire_watches`] ends it.
fn watch(
    state: Arc<Mutex<FakeState>>,
    changed: Arc<tokio::sync::Notify>,
    resource: String,
    selector: Option<(String, String)>,
    from: u64,
    timeout: Duration,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = from;
        let generation = state.lock().unwrap().generation;
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lines: Vec<Value> = {
                let mut s = state.lock().unwrap();
                if s.generation != generation {
                    return;
                }
                if last < s.compacted {
                    s.expired_watches += 1;
                    vec![json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {last} ({})", s.compacted),
                        "reason": "Expired", "code": 410}})]
                } else {
                    let new: Vec<Value> = s
                        .changes
                        .iter()
                        .filter(|(rev, r, _, _, v)| {
                            *rev > last && *r == resource && label_matches(v, &selector)
                        })
                        .map(|(_, _, _, kind, v)| json!({"type": kind, "object": v}))
                        .collect();
                    last = s.revision;
                    new
                }
            };
            for line in &lines {
                if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                    return;
                }
            }
            if lines.iter().any(|l| l["type"] == "ERROR") {
                return;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("a valid response")
}

async fn handle(
    state: Arc<Mutex<FakeState>>,
    changed: Arc<tokio::sync::Notify>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let selector: Option<(String, String)> = query.get("labelSelector").and_then(|s| {
        s.split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
    });
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let Ok(body) = body else {
        return Ok(failure(400, "BadRequest", "unreadable body".into()));
    };
    let Some((resource, ns, name, sub)) = route(&path) else {
        return Ok(failure(404, "NotFound", format!("no route {path}")));
    };
    if method == Method::GET
        && name.is_none()
        && matches!(query.get("watch").map(String::as_str), Some("true" | "1"))
    {
        let from = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(290), Duration::from_secs);
        return Ok(watch(state, changed, resource, selector, from, timeout));
    }
    let mut s = state.lock().unwrap();
    if method != Method::GET {
        s.writes.push(format!("{method} {path}"));
        changed.notify_waiters();
    }
    let key = |name: &str| {
        (
            resource.clone(),
            ns.clone().unwrap_or_default(),
            name.to_string(),
        )
    };
    Ok(match (method, name) {
        (Method::GET, Some(name)) => match s.objects.get(&key(&name)) {
            Some(v) => respond(200, v),
            None => failure(404, "NotFound", format!("{name} not found")),
        },
        (Method::GET, None) => {
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, n, _), _)| *r == resource && ns.as_ref().is_none_or(|ns| ns == n))
                .map(|(_, v)| v)
                .filter(|v| label_matches(v, &selector))
                .cloned()
                .collect();
            respond(
                200,
                &json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": s.revision.to_string()}, "items": items}),
            )
        }
        (Method::POST, None) => {
            let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
                return Ok(failure(400, "BadRequest", "not JSON".into()));
            };
            let Some(name) = v["metadata"]["name"].as_str().map(str::to_string) else {
                return Ok(failure(422, "Invalid", "metadata.name: Required".into()));
            };
            if s.objects.contains_key(&key(&name)) {
                return Ok(failure(
                    409,
                    "AlreadyExists",
                    format!("{name} already exists"),
                ));
            }
            s.revision += 1;
            v["metadata"]["resourceVersion"] = json!(s.revision.to_string());
            v["metadata"]["namespace"] = json!(ns);
            v["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            if WITH_STATUS.contains(&resource.as_str()) {
                v.as_object_mut().unwrap().remove("status");
            }
            s.objects.insert(key(&name), v.clone());
            s.record(&key(&name), "ADDED", v.clone());
            respond(201, &v)
        }
        (Method::PATCH, Some(name)) => {
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return Ok(failure(400, "BadRequest", "not JSON".into()));
            };
            let with_status = WITH_STATUS.contains(&resource.as_str());
            let patch = match sub.as_deref() {
                Some("status") => json!({"status": patch["status"]}),
                None if with_status => {
                    let mut p = patch;
                    p.as_object_mut().map(|o| o.remove("status"));
                    p
                }
                None => patch,
                Some(other) => return Ok(failure(404, "NotFound", format!("no {other}"))),
            };
            s.revision += 1;
            let revision = s.revision.to_string();
            let Some(v) = s.objects.get_mut(&key(&name)) else {
                return Ok(failure(404, "NotFound", format!("{name} not found")));
            };
            merge_patch(v, &patch);
            v["metadata"]["resourceVersion"] = json!(revision);
            let v = v.clone();
            s.record(&key(&name), "MODIFIED", v.clone());
            respond(200, &v)
        }
        (Method::DELETE, Some(name)) => match s.objects.remove(&key(&name)) {
            Some(v) => {
                s.revision += 1;
                s.record(&key(&name), "DELETED", v.clone());
                respond(200, &v)
            }
            None => failure(404, "NotFound", format!("{name} not found")),
        },
        (m, _) => failure(405, "MethodNotAllowed", format!("{m} not supported here")),
    })
}

impl FakeKubeApi {
    pub async fn start() -> FakeKubeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener)
    }

    /// Serves on `listener` (e.g. one bound inside another netns: a socket keeps the netns it
    /// was made in). Needs a tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> FakeKubeApi {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (st, ch) = (state.clone(), changed.clone());
        let server = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (st, ch) = (st.clone(), ch.clone());
                conns.spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| handle(st.clone(), ch.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
            ),
        )
        .unwrap();
        FakeKubeApi {
            state,
            changed,
            server,
            _dir: dir,
            kubeconfig,
        }
    }

    /// Creates or replaces an object (a change watches see).
    pub fn put(&self, resource: &str, ns: &str, v: Value) {
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        let mut s = self.state.lock().unwrap();
        s.revision += 1;
        let mut v = v;
        v["metadata"]["resourceVersion"] = json!(s.revision.to_string());
        let key = (resource.to_string(), ns.to_string(), name);
        let kind = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key.clone(), v.clone());
        s.record(&key, kind, v);
        drop(s);
        self.changed.notify_waiters();
    }

    /// Deletes an object (a change watches see).
    pub fn delete(&self, resource: &str, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let key = (resource.to_string(), ns.to_string(), name.to_string());
        let v = s.objects.remove(&key).expect("the object exists");
        s.revision += 1;
        s.record(&key, "DELETED", v);
        drop(s);
        self.changed.notify_waiters();
    }

    /// Deletes an object, compacts the history past the deletion and ends every watch, as an
    /// API server whose etcd compacted while the watchers were away: their next watch gets
    /// `410 Expired` and only a relist shows the deletion.
    pub fn delete_and_expire_watches(&self, resource: &str, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let key = (resource.to_string(), ns.to_string(), name.to_string());
        s.objects.remove(&key).expect("the object exists");
        s.revision += 1;
        s.compacted = s.revision;
        s.changes.clear();
        s.generation += 1;
        drop(s);
        self.changed.notify_waiters();
    }

    pub fn expired_watches(&self) -> u32 {
        self.state.lock().unwrap().expired_watches
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .get(&(resource.to_string(), ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn names(&self, resource: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.objects
            .keys()
            .filter(|(r, _, _)| r == resource)
            .map(|(_, ns, n)| format!("{ns}/{n}"))
            .collect()
    }

    pub fn take_writes(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().writes)
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

//! The MCS API reconcilers (`fleet_controller::kube_mcs::KubeMcs`) against `FakeKubeApi`, an
//! in-memory fake of the Kubernetes API server (no real one can run in this sandbox; the
//! real path is the kind script's). The fake serves list (all namespaces, with a label
//! selector) and watch (`?watch=true&resourceVersion=N`: the events after N as JSON lines,
//! then new ones as they happen; `410 Expired` as an ERROR event when N is older than the
//! compacted history, as the API server does), create, JSON merge patch (object and `/status`
//! subresource, kept apart as for CRDs with a status subresource) and delete for any resource
//! path, with a `resourceVersion` per write and 404 / 409 like the API server; get by name.
//! The credential Secret (`kube_secret`) is tested against it too.
//!
//! No root needed.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fleet_controller::kube_mcs::nodes::NodeChange;
use fleet_controller::kube_mcs::source::desired_exports;
use fleet_controller::kube_mcs::{KubeMcs, KubeView};
use fleet_controller::services::NodePod;
use fleet_hub_api::records::{
    EndpointRecord, ExportedServiceType, ImportClusterRecord, ImportPortRecord, ImportRecord,
    InternalTrafficPolicy, Protocol, SessionAffinity,
};
use fleet_proto::node::{Attachment, AttachmentKey, Origin, PodMeta};
use fleet_services::aggregate::{Condition, ConditionStatus, ConditionType, ExportStatus};
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
struct FakeKubeApi {
    state: Arc<Mutex<FakeState>>,
    /// Woken on every change (watches wait on it).
    changed: Arc<tokio::sync::Notify>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
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
    async fn start() -> FakeKubeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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
    fn put(&self, resource: &str, ns: &str, v: Value) {
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
    fn delete(&self, resource: &str, ns: &str, name: &str) {
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
    fn delete_and_expire_watches(&self, resource: &str, ns: &str, name: &str) {
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

    fn expired_watches(&self) -> u32 {
        self.state.lock().unwrap().expired_watches
    }

    fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .get(&(resource.to_string(), ns.to_string(), name.to_string()))
            .cloned()
    }

    fn names(&self, resource: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.objects
            .keys()
            .filter(|(r, _, _)| r == resource)
            .map(|(_, ns, n)| format!("{ns}/{n}"))
            .collect()
    }

    fn take_writes(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().writes)
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const EXPORTS: &str = "multicluster.x-k8s.io/serviceexports";
const IMPORTS: &str = "multicluster.x-k8s.io/serviceimports";
const SLICES: &str = "discovery.k8s.io/endpointslices";

fn pod(node: &str, ns: &str, name: &str, ip: &str) -> NodePod {
    NodePod {
        node: node.into(),
        attachment: Attachment {
            key: AttachmentKey {
                container_id: format!("c-{name}"),
                ifname: "eth0".into(),
            },
            network: "fleet".into(),
            netns: "/run/netns/x".into(),
            interface: "eth-fleet".into(),
            mac: String::new(),
            address: ip.parse().unwrap(),
            prefix_len: 24,
            host_veth: "v".into(),
            pod: PodMeta {
                namespace: ns.into(),
                name: name.into(),
                uid: String::new(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
            },
            origin: Origin::Cni,
            created_unix: 0,
        },
    }
}

/// The member cluster `aa`: namespace default, Service web with a slice of two pods, a
/// ServiceExport for it and one for a Service that does not exist, a node, and objects of
/// others (a ServiceImport, an EndpointSlice) that must never be touched.
fn seed(api: &FakeKubeApi) {
    api.put("/namespaces", "", json!({"metadata": {"name": "default"}}));
    api.put(
        "/nodes",
        "",
        json!({"metadata": {"name": "aa-1"},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}),
    );
    api.put(
        "/services",
        "default",
        json!({"metadata": {"namespace": "default", "name": "web"},
               "spec": {"clusterIP": "10.96.0.10",
                        "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}),
    );
    api.put(
        SLICES,
        "default",
        json!({"metadata": {"namespace": "default", "name": "web-x7k2p",
                            "labels": {"kubernetes.io/service-name": "web",
                                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [
                   {"addresses": ["10.244.0.5"], "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": "web-1"}},
                   {"addresses": ["10.244.0.6"], "conditions": {"ready": false, "serving": true,
                                                                "terminating": true},
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": "web-2"}}]}),
    );
    for name in ["web", "gone"] {
        api.put(
            EXPORTS,
            "default",
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                   "metadata": {"namespace": "default", "name": name,
                                "creationTimestamp": "2026-01-01T00:00:01.250Z"}}),
        );
    }
    api.put(
        IMPORTS,
        "default",
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
               "metadata": {"namespace": "default", "name": "theirs"},
               "spec": {"type": "ClusterSetIP", "ports": []}}),
    );
}

fn valid_ready() -> ExportStatus {
    let c = |type_, status, reason: &str| Condition {
        type_,
        status,
        reason: reason.into(),
        message: String::new(),
    };
    ExportStatus {
        conditions: vec![
            c(ConditionType::Valid, ConditionStatus::True, "Valid"),
            c(
                ConditionType::Conflict,
                ConditionStatus::False,
                "NoConflicts",
            ),
            c(ConditionType::Ready, ConditionStatus::True, "Ready"),
        ],
    }
}

fn web_import(bb_live: bool) -> ImportRecord {
    let ep = |ip: &str| EndpointRecord {
        ip: ip.parse().unwrap(),
        hostname: None,
        ready: true,
        serving: true,
        terminating: false,
        node_name: None,
    };
    ImportRecord {
        service_type: ExportedServiceType::ClusterSetIP,
        ips: vec!["100.112.0.2".parse().unwrap()],
        ports: vec![ImportPortRecord {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            app_protocol: None,
            backends: BTreeMap::from([("aa".into(), 8080), ("bb".into(), 80)]),
        }],
        session_affinity: SessionAffinity::None,
        internal_traffic_policy: InternalTrafficPolicy::Cluster,
        traffic_distribution: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        clusters: vec![
            ImportClusterRecord {
                cluster: "aa".into(),
                live: true,
                endpoints: vec![ep("100.96.0.5")],
            },
            ImportClusterRecord {
                cluster: "bb".into(),
                live: bb_live,
                endpoints: vec![ep("100.97.0.5"), ep("100.97.0.6")],
            },
        ],
    }
}

/// Reads until `done` holds (the watches deliver asynchronously), with a deadline.
async fn view_until(kube: &mut KubeMcs, what: &str, done: impl Fn(&KubeView) -> bool) -> KubeView {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(v) = kube.read()
            && done(&v)
        {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn has_conditions(v: &KubeView, name: &str) -> bool {
    v.service_exports
        .iter()
        .any(|e| e.name == name && !e.conditions.is_empty())
}

#[tokio::test]
async fn service_exports_are_read_their_status_written_and_imports_mirrored_as_mcs_objects() {
    let api = FakeKubeApi::start().await;
    seed(&api);
    let mut kube = KubeMcs::connect(Some(&api.kubeconfig)).await.unwrap();

    // Source: the ServiceExport's endpoints at the pods' fleet addresses.
    let view = view_until(&mut kube, "the first listing", |v| {
        v.service_exports.len() == 2 && !v.slices.is_empty() && !v.nodes.is_empty()
    })
    .await;
    assert_eq!(view.namespaces, BTreeSet::from(["default".to_string()]));
    let pods = [
        pod("aa-1", "default", "web-1", "100.96.0.5"),
        pod("aa-1", "default", "web-2", "100.96.0.6"),
    ];
    let exports = desired_exports(&view, &pods, "100.96.0.0/16".parse().unwrap());
    let web = &exports.records["export/default/web"];
    assert_eq!(web.created_at_ms, 1_767_225_601_250);
    assert_eq!(web.ports[0].target_port, Some(8080));
    let eps: Vec<(String, bool, bool)> = web
        .endpoints
        .iter()
        .map(|e| (e.ip.to_string(), e.ready, e.terminating))
        .collect();
    assert_eq!(
        eps,
        [
            ("100.96.0.5".to_string(), true, false),
            ("100.96.0.6".to_string(), false, true)
        ]
    );
    assert_eq!(
        exports.without_service,
        [("default".to_string(), "gone".to_string())]
    );

    // Nodes: aa-1 appears; later aa-2 joins and aa-1 goes.
    assert_eq!(
        kube.follow_nodes(&view),
        [NodeChange::Added {
            name: "aa-1".into(),
            underlay_ip: "172.18.0.2".parse().unwrap()
        }]
    );

    // Status: web is Valid/NoConflicts/Ready, gone is Valid=False/NoService; written once.
    let statuses = BTreeMap::from([(("default".to_string(), "web".to_string()), valid_ready())]);
    api.take_writes();
    assert!(kube.write_statuses(&view, &statuses).await.is_empty());
    let web = api.get(EXPORTS, "default", "web").unwrap();
    let conditions = &web["status"]["conditions"];
    assert_eq!(conditions.as_array().unwrap().len(), 3);
    assert_eq!(conditions[1]["reason"], "NoConflicts");
    let gone = api.get(EXPORTS, "default", "gone").unwrap();
    assert_eq!(gone["status"]["conditions"][0]["reason"], "NoService");
    assert_eq!(api.take_writes().len(), 2);
    assert!(kube.write_statuses(&view, &statuses).await.is_empty());
    let view = view_until(&mut kube, "the statuses watched", |v| {
        has_conditions(v, "web") && has_conditions(v, "gone")
    })
    .await;
    assert!(kube.write_statuses(&view, &statuses).await.is_empty());
    assert_eq!(
        api.take_writes(),
        Vec::<String>::new(),
        "unchanged: no writes"
    );

    // Imports: a ServiceImport and a slice per live cluster, in namespaces that exist.
    let imports = BTreeMap::from([
        (("default".to_string(), "web".to_string()), web_import(true)),
        (("absent".to_string(), "web".to_string()), web_import(true)),
    ]);
    assert!(kube.converge_imports(&view, &imports).await.is_empty());
    let si = api.get(IMPORTS, "default", "web").unwrap();
    assert_eq!(si["spec"]["ips"], json!(["100.112.0.2"]));
    assert_eq!(si["spec"]["ipFamilies"], json!(["IPv4"]));
    assert_eq!(
        si["status"]["clusters"],
        json!([{"cluster": "aa"}, {"cluster": "bb"}])
    );
    assert_eq!(si["status"]["conditions"][0]["status"], "True");
    assert_eq!(
        api.names(IMPORTS),
        ["default/theirs", "default/web"],
        "nothing in the absent namespace"
    );
    let bb = api.get(SLICES, "default", "web-fleet-bb").unwrap();
    assert_eq!(
        bb["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "bb"
    );
    assert_eq!(
        bb["metadata"]["labels"]["multicluster.kubernetes.io/service-name"],
        "web"
    );
    assert_eq!(bb["endpoints"][1]["addresses"], json!(["100.97.0.6"]));
    assert_eq!(bb["ports"][0]["port"], 80);
    let view = view_until(&mut kube, "our objects watched", |v| {
        v.mcs_slices.len() == 2
            && v.service_imports
                .values()
                .any(|o| o.data["status"]["conditions"].is_array())
    })
    .await;
    assert_eq!(view.service_imports.len(), 1, "ours only");
    api.take_writes();
    assert!(kube.converge_imports(&view, &imports).await.is_empty());
    assert_eq!(
        api.take_writes(),
        Vec::<String>::new(),
        "converged: no writes"
    );

    // bb is withdrawn: its slice goes, the import's Ready stays (aa is live).
    let imports = BTreeMap::from([(
        ("default".to_string(), "web".to_string()),
        web_import(false),
    )]);
    assert!(kube.converge_imports(&view, &imports).await.is_empty());
    assert_eq!(
        api.names(SLICES),
        ["default/web-fleet-aa", "default/web-x7k2p"]
    );

    // Unexported everywhere: our objects go, others' stay.
    let view = view_until(&mut kube, "bb's slice gone", |v| v.mcs_slices.len() == 1).await;
    assert!(
        kube.converge_imports(&view, &BTreeMap::new())
            .await
            .is_empty()
    );
    assert_eq!(api.names(IMPORTS), ["default/theirs"]);
    assert_eq!(api.names(SLICES), ["default/web-x7k2p"]);

    // Node changes are followed.
    api.delete("/nodes", "", "aa-1");
    api.put(
        "/nodes",
        "",
        json!({"metadata": {"name": "aa-2"},
               "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.3"}]}}),
    );
    let view = view_until(&mut kube, "the node change", |v| {
        v.nodes.contains_key("aa-2") && !v.nodes.contains_key("aa-1")
    })
    .await;
    assert_eq!(
        kube.follow_nodes(&view),
        [
            NodeChange::Added {
                name: "aa-2".into(),
                underlay_ip: "172.18.0.3".parse().unwrap()
            },
            NodeChange::Removed {
                name: "aa-1".into()
            }
        ]
    );

    // The history is compacted while the watches are away: 410 Expired, a relist, and the
    // deletion nobody saw as an event is seen.
    api.delete_and_expire_watches(EXPORTS, "default", "gone");
    view_until(&mut kube, "the relist after 410", |v| {
        v.service_exports.len() == 1
    })
    .await;
    assert!(api.expired_watches() >= 1);
}

const SECRETS: &str = "/secrets";

fn member_credential(cluster: &str, fill: char) -> fleet_hub_api::wire::Credential {
    let secret: String = std::iter::repeat_n(fill, 64).collect();
    fleet_hub_api::wire::Credential::parse(&format!("m.{cluster}.{secret}")).unwrap()
}

/// `--credential-secret`: absent → `None` (the controller joins); the joining replica's
/// create writes `credential` and `ca`; a restart reads it back; a second create with another
/// credential loses (never replaces); a replica waiting for it sees it once written; a Secret
/// of another cluster is refused, not used.
#[tokio::test]
async fn the_credential_secret_is_created_once_read_back_and_waited_for() {
    use fleet_controller::kube_secret::{CredentialSecret, SecretError};
    use fleet_hub_api::model::ClusterId;
    use fleet_hub_api::wire::CaHash;

    let api = FakeKubeApi::start().await;
    let client = KubeMcs::connect(Some(&api.kubeconfig))
        .await
        .unwrap()
        .client();
    let secret = CredentialSecret::new(client.clone(), "fleetboard-system", "fleet-credential");
    let aa = ClusterId::new("aa").unwrap();
    let ca: CaHash = "ab".repeat(32).parse().unwrap();
    assert_eq!(secret.read(&aa).await.unwrap(), None, "absent: join");

    // A standby waits for it while the first replica joins and writes it.
    let waiter = {
        let s = secret.clone();
        let aa = aa.clone();
        tokio::spawn(async move { s.wait(&aa, Duration::from_millis(50)).await })
    };
    let joined = member_credential("aa", '1');
    secret.create(&joined, &ca).await.unwrap();
    let stored = api
        .get(SECRETS, "fleetboard-system", "fleet-credential")
        .expect("the Secret was created");
    let data = |k: &str| {
        use base64::Engine;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(stored["data"][k].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(data("credential"), format!("{}\n", joined.expose()));
    assert_eq!(data("ca"), "ab".repeat(32));
    assert_eq!(stored["type"], "Opaque");
    assert_eq!(
        stored["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "fleet-controller"
    );
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiting replica sees the Secret")
        .unwrap()
        .unwrap();
    assert_eq!(waited, joined);

    // A restart reads it back; a retried create of the same credential is fine.
    assert_eq!(secret.read(&aa).await.unwrap(), Some(joined.clone()));
    secret.create(&joined, &ca).await.unwrap();
    // Another credential never replaces it.
    let e = secret
        .create(&member_credential("aa", '2'), &ca)
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::LostRace { .. }), "{e}");
    assert_eq!(secret.read(&aa).await.unwrap(), Some(joined.clone()));
    let creates = api
        .take_writes()
        .iter()
        .filter(|w| w.starts_with("POST") && w.contains("/secrets"))
        .count();
    assert_eq!(creates, 3, "creates only; never an update or delete");

    // Another cluster's credential in the Secret is refused, not used.
    let bb = CredentialSecret::new(client, "fleetboard-system", "bb-credential");
    bb.create(&member_credential("bb", '3'), &ca).await.unwrap();
    let other = CredentialSecret::new(
        KubeMcs::connect(Some(&api.kubeconfig))
            .await
            .unwrap()
            .client(),
        "fleetboard-system",
        "bb-credential",
    );
    let e = other.read(&aa).await.unwrap_err();
    assert!(matches!(e, SecretError::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("cluster bb"), "{e}");
}

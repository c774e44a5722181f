//! The MCS API (KEP-1645, `multicluster.x-k8s.io`) and the cluster's nodes, through kube-rs,
//! when the controller runs with a Kubernetes API (`--kubernetes auto|on|off`):
//!
//! - [`source`]: ServiceExport + Service + EndpointSlices → `export/<ns>/<name>` records
//!   (endpoints at the pods' fleet addresses), fed to the same publishing path as the
//!   node-first source ([`crate::services::ServiceSync`]);
//! - [`status`]: the aggregation's conditions for this cluster's exports written to
//!   `ServiceExport.status.conditions` (Valid / Conflict / Ready);
//! - [`imports`]: this cluster's imports as the ServiceImports and MCS EndpointSlices we own;
//! - [`nodes`]: Node names and InternalIPs, followed for additions and removals.
//!
//! ServiceExports and ServiceImports are read as `DynamicObject`s of [`service_export_resource`] and their few
//! fields picked out ([`ServiceExportObject`]): no schema-generating derive (schemars) in the
//! build, and the CRDs stay one source of truth (`deploy/`, as upstream mcs-api ships them).
//! Every kind is followed by a kube-runtime watcher into a reflector store (list, then watch
//! from the listing's `resourceVersion`; `410 Gone` relists); [`KubeMcs::read`] snapshots
//! the stores each endpoint poll of the active controller;
//! the API client is the one the Lease uses (in-cluster configuration or `--kubeconfig`).

pub mod imports;
pub mod nodes;
pub mod source;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use fleet_services::aggregate::ExportStatus;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use serde_json::{Value, json};

/// The mcs-api group and the version we speak (the CRDs serve v1alpha1 and v1beta1 with
/// identical schemas).
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
pub const MCS_VERSION: &str = "v1alpha1";

/// `serviceexports.multicluster.x-k8s.io`.
pub fn service_export_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(MCS_GROUP, MCS_VERSION, "ServiceExport"),
        "serviceexports",
    )
}

/// `serviceimports.multicluster.x-k8s.io`.
pub fn service_import_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(MCS_GROUP, MCS_VERSION, "ServiceImport"),
        "serviceimports",
    )
}

fn owned(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(imports::OWNER_LABEL))
        .map(String::as_str)
        == Some(imports::OWNER)
}

fn object_key(
    m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<imports::ObjectKey> {
    Some((m.namespace.clone()?, m.name.clone()?))
}

/// What the MCS reconcilers use of a ServiceExport.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceExportObject {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`, unix milliseconds (the oldest export wins conflicts).
    pub created_at_ms: u64,
    /// `spec.exportedLabels` / `spec.exportedAnnotations`.
    pub exported_labels: BTreeMap<String, String>,
    pub exported_annotations: BTreeMap<String, String>,
    /// `status.conditions` as found.
    pub conditions: Vec<Value>,
}

impl ServiceExportObject {
    pub fn from_dynamic(o: &DynamicObject) -> Option<Self> {
        let strings = |v: &Value| -> BTreeMap<String, String> {
            serde_json::from_value(v.clone()).unwrap_or_default()
        };
        Some(ServiceExportObject {
            namespace: o.metadata.namespace.clone()?,
            name: o.metadata.name.clone()?,
            created_at_ms: o
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| u64::try_from(t.0.as_millisecond()).unwrap_or(0)),
            exported_labels: strings(&o.data["spec"]["exportedLabels"]),
            exported_annotations: strings(&o.data["spec"]["exportedAnnotations"]),
            conditions: o.data["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// One read of the member cluster's API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KubeView {
    pub service_exports: Vec<ServiceExportObject>,
    /// (namespace, name) → Service.
    pub services: BTreeMap<(String, String), Service>,
    pub slices: Vec<EndpointSlice>,
    pub namespaces: BTreeSet<String>,
    /// Node name → InternalIP.
    pub nodes: BTreeMap<String, Ipv4Addr>,
    /// The ServiceImports we own ([`imports::OWNER_LABEL`]), by (namespace, name).
    pub service_imports: BTreeMap<imports::ObjectKey, DynamicObject>,
    /// The MCS EndpointSlices we own, by (namespace, name).
    pub mcs_slices: BTreeMap<imports::ObjectKey, EndpointSlice>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeMcsError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes client configuration (not in a pod, no KUBECONFIG): {0}; use \
         --kubernetes off outside Kubernetes, or --kubeconfig <path>"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Reflector stores fed by kube-runtime watchers (list, then watch from the listing's
/// `resourceVersion`; a `410 Gone` relists), one per kind; the tasks end with this.
struct Watched {
    exports: Store<DynamicObject>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    /// Ours only (label selector).
    imports: Store<DynamicObject>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn ready<K: kube::Resource + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// Follows `api` into a store (a task; errors back off and retry).
fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    kind: &'static str,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let task = tokio::spawn(async move {
        reflector(writer, watcher(api, config))
            .default_backoff()
            .for_each(|event| async move {
                if let Err(e) = event {
                    tracing::debug!(kind, error = %e, "watching the Kubernetes API; retrying");
                }
            })
            .await;
    });
    (store, task)
}

/// The controller's Kubernetes side: reads the member cluster, writes ServiceExport statuses.
pub struct KubeMcs {
    client: Client,
    watched: Watched,
    exports: ApiResource,
    imports: ApiResource,
    /// The nodes as last read (to log additions and removals).
    nodes: BTreeMap<String, Ipv4Addr>,
    /// Statuses written since the last read (the view still shows the old ones).
    written: BTreeMap<(String, String), ExportStatus>,
    /// The imports' objects as last converged since the last read.
    converged: Option<imports::DesiredObjects>,
}

impl KubeMcs {
    /// A client from `kubeconfig`, or else `Config::infer()` (in a pod: the service account).
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self, KubeMcsError> {
        let mut config = match kubeconfig {
            Some(path) => {
                let bad = |source| KubeMcsError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                };
                let kc = Kubeconfig::read_from(path).map_err(bad)?;
                Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(bad)?
            }
            None => Config::infer().await.map_err(KubeMcsError::Infer)?,
        };
        // A write must not hang a pass on a slow API server: the next pass retries.
        config.connect_timeout = Some(Duration::from_secs(3));
        // Watches sit idle up to the server's watch timeout (290 s): kube's default read
        // timeout, longer than that; writes still fail within 10 s.
        config.read_timeout = Some(Duration::from_secs(295));
        config.write_timeout = Some(Duration::from_secs(10));
        config.default_retry = false;
        Ok(Self::new(
            Client::try_from(config).map_err(KubeMcsError::Client)?,
        ))
    }

    /// Starts following the cluster (needs a tokio runtime).
    pub fn new(client: Client) -> Self {
        let cfg = watcher::Config::default;
        let (exports, t1) = follow(
            Api::<DynamicObject>::all_with(client.clone(), &service_export_resource()),
            cfg(),
            service_export_resource(),
            "serviceexports",
        );
        let (services, t2) = follow(Api::<Service>::all(client.clone()), cfg(), (), "services");
        let (slices, t3) = follow(
            Api::<EndpointSlice>::all(client.clone()),
            cfg(),
            (),
            "endpointslices",
        );
        let (namespaces, t4) = follow(
            Api::<Namespace>::all(client.clone()),
            cfg(),
            (),
            "namespaces",
        );
        let (nodes, t5) = follow(Api::<Node>::all(client.clone()), cfg(), (), "nodes");
        let (imports, t6) = follow(
            Api::<DynamicObject>::all_with(client.clone(), &service_import_resource()),
            cfg().labels(&format!("{}={}", imports::OWNER_LABEL, imports::OWNER)),
            service_import_resource(),
            "serviceimports",
        );
        KubeMcs {
            watched: Watched {
                exports,
                services,
                slices,
                namespaces,
                nodes,
                imports,
                tasks: vec![t1, t2, t3, t4, t5, t6],
            },
            client,
            exports: service_export_resource(),
            imports: service_import_resource(),
            nodes: BTreeMap::new(),
            written: BTreeMap::new(),
            converged: None,
        }
    }

    /// The API client (the credential Secret uses it too).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The latest state of the watched ServiceExports, Services, EndpointSlices, Namespaces,
    /// Nodes and our ServiceImports; an error until every kind has been listed once.
    pub fn read(&mut self) -> Result<KubeView, String> {
        self.written.clear();
        self.converged = None;
        let w = &self.watched;
        let unlisted: Vec<&str> = [
            ("serviceexports", ready(&w.exports)),
            ("services", ready(&w.services)),
            ("endpointslices", ready(&w.slices)),
            ("namespaces", ready(&w.namespaces)),
            ("nodes", ready(&w.nodes)),
            ("serviceimports", ready(&w.imports)),
        ]
        .into_iter()
        .filter(|(_, r)| !r)
        .map(|(k, _)| k)
        .collect();
        if !unlisted.is_empty() {
            return Err(format!(
                "not listed yet (API server unreachable, a CRD missing, or RBAC): {}",
                unlisted.join(", ")
            ));
        }
        let exports = w.exports.state();
        let services = w.services.state();
        let slices = w.slices.state();
        let namespaces = w.namespaces.state();
        let service_imports = w.imports.state();
        let nodes: Vec<Node> = w.nodes.state().iter().map(|n| (**n).clone()).collect();
        let (nodes, without_ip) = nodes::api_nodes(&nodes);
        if !without_ip.is_empty() {
            tracing::debug!(nodes = ?without_ip, "nodes without an IPv4 InternalIP are left out");
        }
        let mut service_exports: Vec<ServiceExportObject> = exports
            .iter()
            .filter_map(|o| ServiceExportObject::from_dynamic(o))
            .collect();
        service_exports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(KubeView {
            service_exports,
            services: services
                .iter()
                .filter_map(|s| Some((object_key(&s.metadata)?, (**s).clone())))
                .collect(),
            mcs_slices: slices
                .iter()
                .filter(|s| owned(s.metadata.labels.as_ref()))
                .filter_map(|s| Some((object_key(&s.metadata)?, (**s).clone())))
                .collect(),
            slices: {
                let mut v: Vec<EndpointSlice> = slices
                    .iter()
                    .filter(|s| !owned(s.metadata.labels.as_ref()))
                    .map(|s| (**s).clone())
                    .collect();
                v.sort_by_key(|a| object_key(&a.metadata));
                v
            },
            service_imports: service_imports
                .iter()
                .filter(|o| owned(o.metadata.labels.as_ref()))
                .filter_map(|o| Some((object_key(&o.metadata)?, (**o).clone())))
                .collect(),
            namespaces: namespaces
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect(),
            nodes,
        })
    }

    /// The cluster's nodes (`--nodes-from-kubernetes`), each `fleet-nri` at
    /// `tcp://<InternalIP>:<port>`, once the Node objects are listed and the gateway node is
    /// among them; `None` when stopped.
    pub async fn wait_nodes(
        &mut self,
        gateway: &str,
        port: u16,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<Vec<crate::plan::NodeSpec>> {
        let mut logged = String::new();
        loop {
            let problem = match self.read() {
                Ok(view) if view.nodes.contains_key(gateway) => {
                    self.follow_nodes(&view);
                    return Some(crate::nodes::api_node_specs(&view.nodes, port));
                }
                Ok(_) => format!(
                    "the gateway node {gateway} is not among the Node objects (with an IPv4 \
                     InternalIP) yet"
                ),
                Err(e) => e,
            };
            if problem != logged {
                tracing::info!(%problem, "waiting for the cluster's nodes from the Kubernetes API");
                logged = problem;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = crate::run::stopped(stop) => return None,
            }
        }
    }

    /// Logs the nodes added, removed or moved since the last read; returns the changes.
    pub fn follow_nodes(&mut self, view: &KubeView) -> Vec<nodes::NodeChange> {
        let changes = nodes::node_changes(&self.nodes, &view.nodes);
        for c in &changes {
            tracing::info!(change = ?c, "cluster nodes (Kubernetes API)");
        }
        self.nodes = view.nodes.clone();
        changes
    }

    /// Writes each ServiceExport's `status.conditions` where they differ from `statuses`
    /// (this cluster's exports, by (namespace, name)); a ServiceExport without a Service gets
    /// `Valid=False/NoService`. Failures are returned as problems.
    pub async fn write_statuses(
        &mut self,
        view: &KubeView,
        statuses: &BTreeMap<(String, String), ExportStatus>,
    ) -> Vec<String> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut problems = Vec::new();
        for export in &view.service_exports {
            let key = (export.namespace.clone(), export.name.clone());
            let missing;
            let wanted = match statuses.get(&key) {
                Some(s) => s,
                None if !view.services.contains_key(&key) => {
                    missing = status::no_service_status();
                    &missing
                }
                // Not aggregated yet (the record is on its way to the hub).
                None => continue,
            };
            if self.written.get(&key) == Some(wanted) {
                continue;
            }
            let Some(conditions) = status::conditions_patch(&export.conditions, wanted, &now)
            else {
                continue;
            };
            let api = Api::<DynamicObject>::namespaced_with(
                self.client.clone(),
                &export.namespace,
                &self.exports,
            );
            let patch = Patch::Merge(json!({"status": {"conditions": conditions}}));
            match api
                .patch_status(&export.name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    self.written.insert(key, wanted.clone());
                }
                Err(e) => problems.push(format!(
                    "ServiceExport {}/{}: writing status.conditions: {e}",
                    export.namespace, export.name
                )),
            }
        }
        problems
    }
}

impl KubeMcs {
    /// Creates, updates and deletes the ServiceImports and MCS EndpointSlices we own so they
    /// match `wanted` (this cluster's imports); objects without our label are never touched.
    /// Returns the problems; the next pass retries.
    pub async fn converge_imports(
        &mut self,
        view: &KubeView,
        wanted: &BTreeMap<imports::ObjectKey, fleet_hub_api::records::ImportRecord>,
    ) -> Vec<String> {
        let desired = imports::desired_objects(wanted, &view.namespaces);
        if self.converged.as_ref() == Some(&desired) {
            return Vec::new();
        }
        let mut problems = Vec::new();
        let pp = PatchParams::default();
        let owner_labels = json!({ imports::OWNER_LABEL: imports::OWNER });
        for ((ns, name), object) in &desired.imports {
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &self.imports);
            let stored = view.service_imports.get(&(ns.clone(), name.clone()));
            let what =
                |doing: &str, e: kube::Error| format!("ServiceImport {ns}/{name}: {doing}: {e}");
            let spec_ok = stored.is_some_and(|s| imports::covers(&s.data["spec"], &object.spec));
            let result = match stored {
                None => {
                    let mut o = DynamicObject::new(name, &self.imports).within(ns);
                    o.metadata.labels = serde_json::from_value(owner_labels.clone()).ok();
                    o.data = json!({ "spec": imports::without_nulls(&object.spec) });
                    api.create(&Default::default(), &o)
                        .await
                        .map(drop)
                        .map_err(|e| what("creating", e))
                }
                Some(_) if !spec_ok => api
                    .patch(name, &pp, &Patch::Merge(json!({ "spec": object.spec })))
                    .await
                    .map(drop)
                    .map_err(|e| what("updating spec", e)),
                Some(_) => Ok(()),
            };
            if let Err(p) = result {
                problems.push(p);
                continue;
            }
            let status_ok = stored.is_some_and(|s| {
                imports::covers(&s.data["status"]["clusters"], &object.status["clusters"])
                    && same_conditions(
                        &s.data["status"]["conditions"],
                        &object.status["conditions"],
                    )
            });
            if !status_ok {
                let mut status = object.status.clone();
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                for c in status["conditions"].as_array_mut().into_iter().flatten() {
                    let since = stored
                        .and_then(|s| s.data["status"]["conditions"].as_array())
                        .and_then(|cs| {
                            cs.iter()
                                .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
                        })
                        .and_then(|o| o["lastTransitionTime"].as_str())
                        .unwrap_or(&now)
                        .to_string();
                    c["lastTransitionTime"] = json!(since);
                }
                if let Err(e) = api
                    .patch_status(name, &pp, &Patch::Merge(json!({ "status": status })))
                    .await
                {
                    problems.push(what("writing status", e));
                }
            }
        }
        for (ns, name) in view
            .service_imports
            .keys()
            .filter(|k| !desired.imports.contains_key(*k))
        {
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &self.imports);
            if let Err(e) = api.delete(name, &Default::default()).await
                && !is_not_found(&e)
            {
                problems.push(format!("ServiceImport {ns}/{name}: deleting: {e}"));
            }
        }
        for ((ns, name), slice) in &desired.slices {
            let api = Api::<EndpointSlice>::namespaced(self.client.clone(), ns);
            let stored = view.mcs_slices.get(&(ns.clone(), name.clone()));
            let result = match stored {
                None => {
                    let mut body = imports::without_nulls(slice);
                    body["metadata"] =
                        json!({ "name": name, "namespace": ns, "labels": body["labels"].take() });
                    body.as_object_mut().map(|o| o.remove("labels"));
                    match serde_json::from_value::<EndpointSlice>(body) {
                        Ok(s) => api.create(&Default::default(), &s).await.map(drop),
                        Err(e) => {
                            problems.push(format!("EndpointSlice {ns}/{name}: {e}"));
                            continue;
                        }
                    }
                }
                Some(s) => {
                    let stored = serde_json::to_value(s).unwrap_or_default();
                    let want = json!({
                        "metadata": { "labels": slice["labels"] },
                        "endpoints": slice["endpoints"],
                        "ports": slice["ports"],
                    });
                    if imports::covers(&stored, &want) {
                        continue;
                    }
                    api.patch(name, &pp, &Patch::Merge(want)).await.map(drop)
                }
            };
            if let Err(e) = result {
                problems.push(format!("EndpointSlice {ns}/{name}: writing: {e}"));
            }
        }
        for (ns, name) in view
            .mcs_slices
            .keys()
            .filter(|k| !desired.slices.contains_key(*k))
        {
            let api = Api::<EndpointSlice>::namespaced(self.client.clone(), ns);
            if let Err(e) = api.delete(name, &Default::default()).await
                && !is_not_found(&e)
            {
                problems.push(format!("EndpointSlice {ns}/{name}: deleting: {e}"));
            }
        }
        if problems.is_empty() {
            self.converged = Some(desired);
        }
        problems
    }
}

/// The same conditions by type, status, reason and message (times aside).
fn same_conditions(stored: &Value, desired: &Value) -> bool {
    let key = |v: &Value| -> Vec<(String, String, String, String)> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("type"), s("status"), s("reason"), s("message"))
            })
            .collect()
    };
    key(stored) == key(desired)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

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
use std::time::{Duration, Instant};

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
use serde_json::json;

mod fake_kube;
use fake_kube::FakeKubeApi;

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
    assert_eq!(secret.read_ca().await.unwrap(), None);

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

    // A restart reads it back (and the CA's hash, when it has no --ca); a retried create of
    // the same credential is fine.
    assert_eq!(secret.read(&aa).await.unwrap(), Some(joined.clone()));
    assert_eq!(secret.read_ca().await.unwrap(), Some(ca));
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

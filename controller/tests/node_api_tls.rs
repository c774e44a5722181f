//! The node API over TCP with mutual TLS (`fleet-nri --node-api-listen`, the controller's
//! `tcp://` nodes): a real `fleet-nri` in a node netns, reached from a second netns (the
//! controller's node) over a veth; the controller's client (`NodeTcp`) and a real
//! `fleet-controller run` with a hub drive it; clients without a certificate of the node-API
//! CA, and a daemon showing another CA's certificate, are refused.
//!
//! Needs root (netns, veth, a userspace WireGuard device).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_controller::node_api_certs;
use fleet_controller::nodes::{NodeApi, NodeTcp};
use fleet_core::node_tls::{self, CA_FILE, CERT_FILE, KEY_FILE};
use fleet_e2e::fleet_nri::{FleetNri, FleetNriOpts};
use fleet_e2e::netns::TestNetns;
use fleet_e2e::process::ManagedProcess;
use fleet_e2e::{poll_until, workspace_bin};
use fleet_proto::node::{NodeError, SetPlanRequest, code};

mod fake_kube;
use fake_kube::FakeKubeApi;

const NODE_IP: &str = "192.0.2.1";
const CTL_IP: &str = "192.0.2.2";
const PORT: u16 = 9650;
const WAIT: Duration = Duration::from_secs(30);

/// Two netns joined by a veth: the node (fleet-nri) and the controller's node.
struct Net {
    node: TestNetns,
    ctl: TestNetns,
}

impl Net {
    fn new() -> Net {
        let node = TestNetns::new("tlsnode");
        let ctl = TestNetns::new("tlsctl");
        node.ip(&[
            "link",
            "add",
            "fe-n",
            "type",
            "veth",
            "peer",
            "name",
            "fe-c",
            "netns",
            ctl.name(),
        ])
        .unwrap();
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "fe-n"])
            .unwrap();
        node.ip(&["link", "set", "fe-n", "up"]).unwrap();
        ctl.ip(&["addr", "add", &format!("{CTL_IP}/24"), "dev", "fe-c"])
            .unwrap();
        ctl.ip(&["link", "set", "fe-c", "up"]).unwrap();
        Net { node, ctl }
    }
}

/// A cluster's node-API CA written out: `<dir>/node`, `<dir>/controller`.
fn certs(dir: &Path) -> PathBuf {
    node_api_certs::write(dir, &node_api_certs::generate(1).unwrap()).unwrap();
    dir.to_owned()
}

/// A TLS dir with `ca`'s ca.crt and the cert/key of `leaf` (another dir).
fn mixed(dir: &Path, ca: &Path, leaf: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca.join(CA_FILE), dir.join(CA_FILE)).unwrap();
    std::fs::copy(leaf.join(CERT_FILE), dir.join(CERT_FILE)).unwrap();
    std::fs::copy(leaf.join(KEY_FILE), dir.join(KEY_FILE)).unwrap();
    dir.to_owned()
}

fn tls_args(tls: &Path) -> Vec<String> {
    vec![
        "--node-api-listen".into(),
        format!("{NODE_IP}:{PORT}"),
        "--node-api-tls".into(),
        tls.display().to_string(),
    ]
}

/// Runs `f` with a client of `tls` on a thread in `netns` (its own runtime: sockets are made in
/// the netns of the thread that makes them).
fn from_netns<T: Send + 'static>(
    netns: &Path,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    f: impl FnOnce(NodeTcp) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    let addr = format!("{NODE_IP}:{PORT}").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(fleet_core::netns::run_in(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f(NodeTcp::new(addr, tls, Duration::from_secs(5))))
    }))
    .unwrap()
}

fn status_over_tcp(
    net: &Net,
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
) -> Result<(), NodeError> {
    from_netns(&net.ctl.path(), tls.clone(), |c| {
        Box::pin(async move { c.status().await.map(|_| ()) })
    })
}

fn plan(subnet: &str) -> SetPlanRequest {
    SetPlanRequest {
        fleet_cidr: "100.96.0.0/12".into(),
        vip_range: "100.112.0.0/16".into(),
        node_subnet: subnet.into(),
    }
}

#[test]
fn the_node_api_over_tcp_serves_only_clients_of_the_node_api_ca_and_the_client_only_its_daemons() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let good = certs(&dir.path().join("good"));
    let other = certs(&dir.path().join("other"));
    let mut nri = FleetNri::start_with_args(
        FleetNriOpts {
            node_subnet: None,
            nri_socket: None,
            netns: Some(net.node.path()),
        },
        tls_args(&good.join("node")),
    )
    .unwrap();
    let controller = node_tls::client_config(&good.join("controller")).unwrap();

    // The controller's client: the same requests as the socket, answered the same.
    poll_until("fleet-nri to serve TCP", WAIT, || {
        status_over_tcp(&net, &controller).ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", nri.log()));
    let (set, got) = from_netns(&net.ctl.path(), controller.clone(), |c| {
        Box::pin(async move {
            let set = c.set_plan(plan("100.96.3.0/24")).await;
            (set, c.get_plan().await)
        })
    });
    set.unwrap();
    assert_eq!(got.unwrap().unwrap().node_subnet, "100.96.3.0/24");
    assert_eq!(
        nri.client().get_plan().unwrap().unwrap().node_subnet,
        "100.96.3.0/24",
        "one Node behind both listeners"
    );
    // A daemon error travels as on the socket: a plan change with no pods is accepted, a bad
    // one is INVALID_CONFIG.
    let bad = from_netns(&net.ctl.path(), controller.clone(), |c| {
        Box::pin(async move { c.set_plan(plan("not-a-cidr")).await })
    });
    assert!(bad.is_err(), "{bad:?}");

    // Refused clients: another CA's controller certificate; the node's own (serverAuth-only)
    // certificate used as a client; no client certificate at all. None changes the plan.
    let refused = |tls: Arc<tokio_rustls::rustls::ClientConfig>, what: &str| {
        let r = from_netns(&net.ctl.path(), tls, |c| {
            Box::pin(async move { c.set_plan(plan("100.96.9.0/24")).await })
        });
        let e = r.expect_err(what);
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{what}: {e:?}");
    };
    refused(
        node_tls::client_config(&mixed(
            &dir.path().join("other-ctl"),
            &good.join("controller"),
            &other.join("controller"),
        ))
        .unwrap(),
        "a controller certificate of another CA",
    );
    refused(
        node_tls::client_config(&mixed(
            &dir.path().join("node-as-client"),
            &good.join("controller"),
            &good.join("node"),
        ))
        .unwrap(),
        "the node's serverAuth certificate as a client",
    );
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&good.join("controller").join(CA_FILE)) {
        roots.add(c).unwrap();
    }
    let anonymous = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    refused(Arc::new(anonymous), "no client certificate");
    assert_eq!(
        nri.client().get_plan().unwrap().unwrap().node_subnet,
        "100.96.3.0/24",
        "refused clients changed nothing"
    );
    assert!(
        nri.log().contains("TLS handshake refused"),
        "the daemon logs refusals:\n{}",
        nri.log()
    );

    // The wrong server: the daemon restarted with another CA's node certificate; the
    // controller's client refuses it (and so never sends its request).
    nri.stop();
    nri.set_extra_args(tls_args(&mixed(
        &dir.path().join("other-node"),
        &other.join("node"),
        &other.join("node"),
    )));
    nri.spawn().unwrap();
    let other_controller = node_tls::client_config(&other.join("controller")).unwrap();
    poll_until("the restarted fleet-nri to serve TCP", WAIT, || {
        status_over_tcp(&net, &other_controller).ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", nri.log()));
    let e = status_over_tcp(&net, &controller).expect_err("a daemon of another CA");
    assert_eq!(e.code, code::TRY_AGAIN_LATER);
    assert!(e.msg.contains("TLS handshake"), "{e:?}");
}

fn rustls_pemfile_certs(
    path: &Path,
) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A real controller in its own netns, its nodes.json naming the node at `tcp://…`: it joins
/// (asking the gateway node's key over TCP), plans the node and makes its gateway.
#[test]
fn a_controller_on_another_node_drives_fleet_nri_over_tcp() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(&dir.path().join("certs"));
    let nri = FleetNri::start_with_args(
        FleetNriOpts {
            node_subnet: None,
            nri_socket: None,
            netns: Some(net.node.path()),
        },
        tls_args(&tls.join("node")),
    )
    .unwrap();

    let (_hub, join) = hub_in(&net, dir.path());

    let nodes = dir.path().join("nodes.json");
    std::fs::write(
        &nodes,
        serde_json::json!([{
            "name": "n1",
            "socket": format!("tcp://{NODE_IP}:{PORT}"),
            "underlay_ip": NODE_IP,
            "netns": net.node.path(),
        }])
        .to_string(),
    )
    .unwrap();
    let wg_name = format!("fwt{}", std::process::id() % 100_000);
    let mut controller = ManagedProcess::new(
        "fleet-controller",
        workspace_bin("fleet-controller"),
        os(&[
            "run",
            "--cluster",
            "aa",
            "--hub",
            HUB_ADDR,
            "--join",
            &join,
            "--credential-file",
            dir.path().join("aa.credential").to_str().unwrap(),
            "--data-dir",
            dir.path().join("ctl").to_str().unwrap(),
            "--nodes",
            nodes.to_str().unwrap(),
            "--node-api-tls",
            tls.join("controller").to_str().unwrap(),
            "--gateway-node",
            "n1",
            "--wg-name",
            &wg_name,
            "--wg-backend",
            "userspace",
            "--leader-election",
            "hub",
            "--kubernetes",
            "off",
            "--status-interval",
            "1s",
        ]),
        &net.ctl.path(),
        dir.path().join("controller.log"),
    )
    .env("FLEET_LOG", "info");
    controller.spawn().unwrap();

    let client = nri.client();
    let subnet = poll_until("the controller to plan the node over TCP", WAIT, || {
        client.get_plan().ok().flatten().map(|p| p.node_subnet)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.log()));
    assert!(subnet.starts_with("100.9"), "{subnet}");
    let gw = poll_until("the gateway made over TCP", WAIT, || {
        client.gateway_status().ok().flatten()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.log()));
    assert_eq!(gw.device.name, wg_name);
    assert!(dir.path().join("aa.credential").exists());
    controller.terminate(Duration::from_secs(10));
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{wg_name}.sock"));
    drop(nri);
}

const HUB_ADDR: &str = "127.0.0.1:7443";

/// A hub in the controller's netns; its process and a join string.
fn hub_in(net: &Net, dir: &Path) -> (ManagedProcess, String) {
    let hub_dir = dir.join("hub");
    let mut hub = ManagedProcess::new(
        "fleet-hub",
        workspace_bin("fleet-hub"),
        os(&[
            "--data-dir",
            hub_dir.join("data").to_str().unwrap(),
            "serve",
            "--listen",
            HUB_ADDR,
        ]),
        &net.ctl.path(),
        dir.join("hub.log"),
    );
    hub.spawn().unwrap();
    let join = poll_until("a join token from the hub", WAIT, || {
        let out = net
            .ctl
            .command(workspace_bin("fleet-hub").to_str().unwrap())
            .args(["--hub", HUB_ADDR, "--data-dir"])
            .arg(hub_dir.join("data"))
            .args(["token", "create", "--ttl", "1h"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).unwrap().trim().to_string())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", hub.log()));
    (hub, join)
}

/// `--kubernetes on` as in a pod: the nodes from Node objects (each `fleet-nri` at
/// `tcp://<InternalIP>:9650`), the credential created in the Secret at the first join (no
/// credential file), read back by the next start (which gets neither --join nor --ca and does
/// not join again), and a Node added
/// later followed. The fake API server listens in the controller's netns.
#[test]
fn with_the_kubernetes_api_nodes_come_from_node_objects_and_the_credential_from_a_secret() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(&dir.path().join("certs"));
    let nri = FleetNri::start_with_args(
        FleetNriOpts {
            node_subnet: None,
            nri_socket: None,
            netns: Some(net.node.path()),
        },
        tls_args(&tls.join("node")),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(fleet_core::netns::run_in(&net.ctl.path(), || {
            std::net::TcpListener::bind("127.0.0.1:0")
        }))
        .unwrap()
        .unwrap();
    let api = {
        let _guard = rt.enter();
        FakeKubeApi::start_on(listener)
    };
    let node = |name: &str, ip: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    };
    api.put("/nodes", "", node("n1", NODE_IP));
    let (hub, join) = hub_in(&net, dir.path());
    let ca = fleet_hub_api::wire::CaHash::of_pem(
        &std::fs::read_to_string(dir.path().join("hub/data/ca.pem")).unwrap(),
    )
    .unwrap()
    .to_string();

    let wg_name = format!("fwk{}", std::process::id() % 100_000);
    let args = |first: bool| {
        let mut a = vec![
            "run",
            "--cluster",
            "aa",
            "--hub",
            HUB_ADDR,
            "--kubernetes",
            "on",
            "--kubeconfig",
            api.kubeconfig.to_str().unwrap(),
            "--credential-secret",
            "fleetboard-system/fleet-credential",
            "--data-dir",
            dir.path().join("ctl").to_str().unwrap(),
            "--nodes-from-kubernetes",
            "9650",
            "--node-api-tls",
            tls.join("controller").to_str().unwrap(),
            "--gateway-node",
            "n1",
            "--wg-name",
            &wg_name,
            "--wg-backend",
            "userspace",
            "--leader-election",
            "hub",
            "--status-interval",
            "1s",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        // The next start has neither --join nor --ca: the Secret holds the CA's hash.
        if first {
            a.extend(["--join".to_string(), join.clone()]);
        }
        a.into_iter().map(OsString::from).collect::<Vec<_>>()
    };
    let start = |first: bool, log: &str| {
        let mut c = ManagedProcess::new(
            "fleet-controller",
            workspace_bin("fleet-controller"),
            args(first),
            &net.ctl.path(),
            dir.path().join(log),
        )
        .env("FLEET_LOG", "info");
        c.spawn().unwrap();
        c
    };

    let mut first = start(true, "controller-1.log");
    let client = nri.client();
    poll_until(
        "the node from its Node object planned over TCP",
        WAIT,
        || client.get_plan().ok().flatten(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", first.log(), hub.log()));
    let secret = poll_until("the credential Secret", WAIT, || {
        api.get("/secrets", "fleetboard-system", "fleet-credential")
    })
    .unwrap();
    let text = {
        use base64::Engine;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(secret["data"]["credential"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    assert!(text.starts_with("m.aa."), "the cluster's credential");
    assert_eq!(secret["data"]["ca"], {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&ca)
    });
    first.await_log("joined the fleet", WAIT).unwrap();

    // A Node added later is followed (its daemon is not there: the pass reports it, n1 stays).
    // The pass then tries to plan it at tcp://192.0.2.9:9650 (no route there: not converged).
    api.put("/nodes", "", node("n2", "192.0.2.9"));
    poll_until("the added Node followed and driven", WAIT, || {
        let log = first.log();
        (log.contains(r#"Added { name: "n2""#) && log.contains("192.0.2.9:9650")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", first.log()));
    assert!(client.get_plan().unwrap().is_some());

    // The next start reads the credential and the CA's hash back from the Secret: active
    // without a join string.
    first.terminate(Duration::from_secs(10));
    let mut second = start(false, "controller-2.log");
    second
        .await_log("active: holding the cluster lease", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    assert!(
        !second.log().contains("joined the fleet"),
        "{}",
        second.log()
    );
    second.terminate(Duration::from_secs(10));
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{wg_name}.sock"));
    drop(api);
    drop(rt);
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

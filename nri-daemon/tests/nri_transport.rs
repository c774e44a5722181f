//! The NRI transport against the real runtime: a private containerd 1.7 (NRI v0.6.1) started
//! by `fleet-e2e` in its own netns, driven through CRI. A second part talks to the plugin
//! over its own socket with a fake runtime written here, for what containerd 1.7 never sends
//! (split synchronization, unknown methods, garbage).
//!
//! The containerd tests need root and fail loudly without it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_e2e::{BridgeNetwork, Containerd, ContainerdOpts, PodSpec, TestNetns, poll_until};
use fleet_nri::nri::{
    self, ContainerAdjust, ContainerInfo, NriConfig, NriHandler, NriStatus, PodSandboxInfo,
};

const EXEC: Duration = Duration::from_secs(10);
const EVENT_WAIT: Duration = Duration::from_secs(10);
/// The requirement: registered again within 2 s of containerd being back.
const REREGISTER_DEADLINE: Duration = Duration::from_secs(2);
const ENV_KEY: &str = "FLEET_NRI_TEST_POD";

#[derive(Debug, Clone)]
enum Seen {
    Sync(Vec<PodSandboxInfo>, Vec<ContainerInfo>),
    Started(PodSandboxInfo),
    Stopped(PodSandboxInfo),
    Removed(PodSandboxInfo),
    Create(PodSandboxInfo, ContainerInfo),
}

/// Records every call; injects `FLEET_NRI_TEST_POD=<sandbox id>` into each container.
#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
    fn push(&self, s: Seen) {
        self.0.lock().unwrap().push(s);
    }
    fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&Seen) -> Option<T>) -> T {
        poll_until(what, EVENT_WAIT, || self.seen().iter().find_map(&mut pick))
            .unwrap_or_else(|e| panic!("{e}; recorded: {:#?}", self.seen()))
    }
    fn syncs(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| matches!(s, Seen::Sync(..)))
            .count()
    }
}

#[async_trait::async_trait]
impl NriHandler for Recorder {
    async fn synchronize(&self, pods: Vec<PodSandboxInfo>, containers: Vec<ContainerInfo>) {
        self.push(Seen::Sync(pods, containers));
    }
    async fn pod_started(&self, pod: PodSandboxInfo) {
        self.push(Seen::Started(pod));
    }
    async fn pod_stopped(&self, pod: PodSandboxInfo) {
        self.push(Seen::Stopped(pod));
    }
    async fn pod_removed(&self, pod: PodSandboxInfo) {
        self.push(Seen::Removed(pod));
    }
    async fn create_container(&self, pod: PodSandboxInfo, c: ContainerInfo) -> ContainerAdjust {
        let adjust = ContainerAdjust {
            env: vec![(ENV_KEY.to_string(), pod.id.clone())],
            annotations: [("fleetboard.io/test".to_string(), "yes".to_string())].into(),
        };
        self.push(Seen::Create(pod, c));
        adjust
    }
}

/// `nri::run` on its own tokio runtime, so the blocking CRI client can drive the test.
struct Plugin {
    rt: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    stop: tokio::sync::watch::Sender<bool>,
    status: NriStatus,
    recorder: Arc<Recorder>,
}

impl Plugin {
    fn start(socket: &Path, name: &str, idx: &str) -> Plugin {
        // RUST_LOG=fleet_nri=debug shows the transport's view of the runtime.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let status = NriStatus::default();
        let recorder = Arc::new(Recorder::default());
        let cfg = NriConfig {
            socket: socket.to_path_buf(),
            plugin_name: name.to_string(),
            plugin_idx: idx.to_string(),
            reconnect_interval: Duration::from_millis(100),
        };
        let task = rt.spawn(nri::run(cfg, recorder.clone(), status.clone(), stop_rx));
        Plugin {
            rt,
            task: Some(task),
            stop,
            status,
            recorder,
        }
    }

    fn wait_registered(&self, count: u64, within: Duration) -> Duration {
        let t0 = Instant::now();
        poll_until("NRI plugin registration", within, || {
            (self.status.registrations() >= count && self.status.registered()).then_some(())
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: registrations {} (wanted {count}), registered {}",
                self.status.registrations(),
                self.status.registered()
            )
        });
        t0.elapsed()
    }

    /// Signals shutdown and checks that `run` returns promptly and cleanly.
    fn stop(mut self) {
        self.stop.send(true).unwrap();
        let task = self.task.take().unwrap();
        let result = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await })
            .expect("nri::run did not stop within 5 s of shutdown")
            .expect("nri::run panicked");
        result.expect("nri::run returned an error");
        assert!(!self.status.registered());
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn sandbox_netns(cri: &fleet_e2e::Cri, sandbox: &str) -> PathBuf {
    cri.pod_netns_path(sandbox).unwrap()
}

#[test]
fn containerd_pod_lifecycle_env_injection_late_sync_and_reregistration() {
    fleet_e2e::require_root("containerd_pod_lifecycle_env_injection_late_sync_and_reregistration");
    let node = TestNetns::new("fnri-node");
    let mut containerd = Containerd::start(ContainerdOpts::new("nri").netns(&node)).unwrap();
    BridgeNetwork::new("podnet", "fnri-br0", "10.244.31.0/24")
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(10)).unwrap();

    // Registration.
    let plugin = Plugin::start(&containerd.nri_socket(), "fleetboard", "10");
    plugin.wait_registered(1, Duration::from_secs(10));
    assert_eq!(plugin.status.registrations(), 1);
    plugin
        .recorder
        .wait_for("initial Synchronize", |s| match s {
            Seen::Sync(pods, _) => Some(pods.len()),
            _ => None,
        });

    // A pod through CRI: RunPodSandbox (StateChange in NRI v0.6), then CreateContainer with
    // our adjustment applied.
    let pod = PodSpec::new("web").namespace("shop").label("app", "web");
    let (sandbox, container) = cri.run_busybox_pod(&pod).unwrap();
    let netns = sandbox_netns(&cri, &sandbox);
    let started = plugin.recorder.wait_for("pod_started", |s| match s {
        Seen::Started(p) if p.id == sandbox => Some(p.clone()),
        _ => None,
    });
    assert_eq!(
        (started.name.as_str(), started.namespace.as_str()),
        ("web", "shop")
    );
    assert_eq!(started.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(started.netns.as_deref(), Some(netns.to_str().unwrap()));
    let (create_pod, created) = plugin.recorder.wait_for("create_container", |s| match s {
        Seen::Create(p, c) if c.id == container => Some((p.clone(), c.clone())),
        _ => None,
    });
    assert_eq!(create_pod.id, sandbox);
    assert_eq!(created.pod_sandbox_id, sandbox);
    let out = cri.exec_sync(&container, &["env"], EXEC).unwrap();
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l == format!("{ENV_KEY}={sandbox}")),
        "adjusted env var missing in the container: {}",
        out.stdout
    );

    // A plugin started after the pod exists learns it from Synchronize, with its netns.
    let late = Plugin::start(&containerd.nri_socket(), "fleetboard-late", "20");
    late.wait_registered(1, Duration::from_secs(10));
    let (pods, containers) = late.recorder.wait_for("late Synchronize", |s| match s {
        Seen::Sync(pods, containers) => Some((pods.clone(), containers.clone())),
        _ => None,
    });
    let synced = pods
        .iter()
        .find(|p| p.id == sandbox)
        .unwrap_or_else(|| panic!("pod {sandbox} missing from Synchronize: {pods:#?}"));
    assert_eq!(synced.netns.as_deref(), Some(netns.to_str().unwrap()));
    assert_eq!(synced.name, "web");
    assert!(
        containers
            .iter()
            .any(|c| c.id == container && c.pod_sandbox_id == sandbox),
        "{containers:#?}"
    );
    late.stop();

    // containerd restart: the plugin must be registered again within 2 s of containerd
    // being back, and resynchronized with the running pod.
    let syncs_before = plugin.recorder.syncs();
    drop(cri);
    let t_stop = Instant::now();
    containerd.restart().unwrap();
    let restart_took = t_stop.elapsed();
    let reregistered_after = plugin.wait_registered(2, REREGISTER_DEADLINE);
    eprintln!(
        "containerd restart (stop + start until CRI and NRI answer) took {} ms; \
         plugin registered again {} ms after that ({} ms after the stop began)",
        restart_took.as_millis(),
        reregistered_after.as_millis(),
        t_stop.elapsed().as_millis()
    );
    assert_eq!(plugin.status.registrations(), 2);
    let resynced = plugin.recorder.wait_for("Synchronize after restart", |s| {
        if plugin.recorder.syncs() <= syncs_before {
            return None;
        }
        match s {
            Seen::Sync(pods, _) => pods.iter().find(|p| p.id == sandbox).cloned(),
            _ => None,
        }
    });
    assert_eq!(resynced.netns.as_deref(), Some(netns.to_str().unwrap()));

    // Events flow again through the new registration: a second pod's whole lifecycle.
    let cri = containerd.cri().unwrap();
    let pod2 = PodSpec::new("api").namespace("shop");
    let (sandbox2, container2) = cri.run_busybox_pod(&pod2).unwrap();
    let started2 = plugin
        .recorder
        .wait_for("pod_started after restart", |s| match s {
            Seen::Started(p) if p.id == sandbox2 => Some(p.clone()),
            _ => None,
        });
    assert_eq!(
        started2.netns.as_deref(),
        Some(sandbox_netns(&cri, &sandbox2).to_str().unwrap())
    );
    let out = cri.exec_sync(&container2, &["env"], EXEC).unwrap();
    assert!(
        out.stdout
            .lines()
            .any(|l| l == format!("{ENV_KEY}={sandbox2}")),
        "adjusted env var missing after restart: {}",
        out.stdout
    );
    cri.stop_pod(&sandbox2).unwrap();
    plugin.recorder.wait_for("pod_stopped", |s| match s {
        Seen::Stopped(p) if p.id == sandbox2 => Some(()),
        _ => None,
    });
    cri.remove_pod(&sandbox2).unwrap();
    plugin.recorder.wait_for("pod_removed", |s| match s {
        Seen::Removed(p) if p.id == sandbox2 => Some(()),
        _ => None,
    });
    // The first pod predates the restart. containerd 1.7 keeps NRI pod state in memory only
    // and relays no Stop/RemovePodSandbox for it after a restart (its internal/nri
    // needsStopping/needsRemoval): the node logic must reconcile from Synchronize.
    cri.stop_pod(&sandbox).unwrap();
    cri.remove_pod(&sandbox).unwrap();
    plugin.stop();
    drop(cri);
    drop(containerd);
}

#[test]
fn plugin_waits_for_an_absent_socket_and_registers_when_containerd_appears() {
    fleet_e2e::require_root(
        "plugin_waits_for_an_absent_socket_and_registers_when_containerd_appears",
    );
    let node = TestNetns::new("fnri-late");
    // Start the plugin first on the path containerd will use: run() retries meanwhile.
    let mut containerd = Containerd::start(ContainerdOpts::new("nri-late").netns(&node)).unwrap();
    let socket = containerd.nri_socket();
    containerd.stop().unwrap();
    let _ = std::fs::remove_file(&socket);
    let plugin = Plugin::start(&socket, "fleetboard", "10");
    std::thread::sleep(Duration::from_millis(300)); // let a few attempts fail
    assert_eq!(plugin.status.registrations(), 0);
    containerd.restart().unwrap();
    let took = plugin.wait_registered(1, REREGISTER_DEADLINE);
    eprintln!(
        "registered {} ms after containerd came up",
        took.as_millis()
    );
    plugin.stop();
    drop(containerd);
}

/// What containerd 1.7 cannot exercise, against a fake runtime written here: split
/// synchronization over the wire, an unknown method (must be UNIMPLEMENTED, connection kept),
/// then garbage (the plugin drops the connection and reconnects). No root needed.
mod fake_runtime {
    use super::*;
    use fleet_nri::nri::mux;
    use fleet_proto::nri::{api, api_ttrpc};
    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::UnixListener;
    use ttrpc::r#async::transport::{Listener, Socket};
    use ttrpc::r#async::{Client, Server, TtrpcContext};

    /// The Runtime service as the fake runtime serves it: records registrations.
    struct Registrar(tokio::sync::mpsc::UnboundedSender<api::RegisterPluginRequest>);

    #[async_trait::async_trait]
    impl api_ttrpc::Runtime for Registrar {
        async fn register_plugin(
            &self,
            _ctx: &TtrpcContext,
            req: api::RegisterPluginRequest,
        ) -> ttrpc::Result<api::Empty> {
            let _ = self.0.send(req);
            Ok(api::Empty::default())
        }
    }

    fn pod(id: &str) -> api::PodSandbox {
        api::PodSandbox {
            id: id.into(),
            linux: protobuf::MessageField::some(api::LinuxPodSandbox {
                namespaces: vec![api::LinuxNamespace {
                    type_: "network".into(),
                    path: format!("/run/netns/{id}"),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_sync_unknown_method_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nri.sock");
        let listener = UnixListener::bind(&socket).unwrap();

        let recorder = Arc::new(Recorder::default());
        let status = NriStatus::default();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let cfg = NriConfig {
            socket: socket.clone(),
            plugin_name: "fleetboard".into(),
            plugin_idx: "10".into(),
            reconnect_interval: Duration::from_millis(50),
        };
        let run = tokio::spawn(nri::run(cfg, recorder.clone(), status.clone(), stop_rx));

        // Accept the plugin, serve Runtime on conn 2, call Plugin on conn 1.
        let (conn, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("plugin did not connect")
            .unwrap();
        let mut m = mux::spawn(conn);
        let (reg_tx, mut reg_rx) = tokio::sync::mpsc::unbounded_channel();
        let runtime_conn = m.runtime.take().unwrap();
        let mut server = Server::new()
            .add_listener(Listener::new(
                futures::stream::once(async move { Ok(runtime_conn) })
                    .chain(futures::stream::pending()),
            ))
            .register_service(api_ttrpc::create_runtime(Arc::new(Registrar(reg_tx))));
        server.start().await.unwrap();
        let reg = tokio::time::timeout(WAIT, reg_rx.recv())
            .await
            .expect("no RegisterPlugin")
            .unwrap();
        assert_eq!(
            (reg.plugin_name.as_str(), reg.plugin_idx.as_str()),
            ("fleetboard", "10")
        );
        let client = Client::new(Socket::new(m.plugin.take().unwrap()));
        let plugin = api_ttrpc::PluginClient::new(client.clone());
        let ctx = || ttrpc::context::with_timeout(WAIT.as_nanos() as i64);

        let cfg = plugin.configure(ctx(), &Default::default()).await.unwrap();
        assert_eq!(cfg.events, 0b1111);

        // Split synchronization: two parts, one handler call with everything.
        let part1 = api::SynchronizeRequest {
            pods: vec![pod("a"), pod("b")],
            more: true,
            ..Default::default()
        };
        let part2 = api::SynchronizeRequest {
            pods: vec![pod("c")],
            containers: vec![api::Container {
                id: "c-1".into(),
                pod_sandbox_id: "c".into(),
                ..Default::default()
            }],
            more: false,
            ..Default::default()
        };
        assert!(plugin.synchronize(ctx(), &part1).await.unwrap().more);
        assert_eq!(recorder.syncs(), 0);
        assert!(!plugin.synchronize(ctx(), &part2).await.unwrap().more);
        let seen = recorder.seen();
        let Seen::Sync(pods, containers) = &seen[0] else {
            panic!("{seen:?}")
        };
        let ids: Vec<_> = pods.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(pods[2].netns.as_deref(), Some("/run/netns/c"));
        assert_eq!(containers.len(), 1);

        // A method of a newer NRI we do not implement: UNIMPLEMENTED, and the plugin lives on.
        let req = ttrpc::Request {
            service: "nri.pkg.api.v1alpha1.Plugin".into(),
            method: "ValidateContainerAdjustment".into(),
            timeout_nano: WAIT.as_nanos() as i64,
            ..Default::default()
        };
        match client.request(req).await {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED, "{s:?}")
            }
            other => panic!("expected UNIMPLEMENTED, got {other:?}"),
        }
        let big = api::StateChangeEvent {
            event: api::Event::RUN_POD_SANDBOX.into(),
            pod: protobuf::MessageField::some(api::PodSandbox {
                // Larger than one frame in both directions of the mux.
                annotations: [("big".to_string(), "x".repeat(20_000))].into(),
                ..pod("d")
            }),
            ..Default::default()
        };
        plugin.state_change(ctx(), &big).await.unwrap();
        recorder
            .wait_for_async(
                "pod_started d",
                |s| matches!(s, Seen::Started(p) if p.id == "d"),
            )
            .await;
        assert!(status.registered());

        // Garbage on the trunk: the plugin drops the connection and connects again.
        drop(plugin);
        drop(client);
        drop(m);
        drop(server);
        let (mut conn2, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("plugin did not reconnect after the runtime went away")
            .unwrap();
        conn2
            .write_all(b"\x00\x00\x00\x01\xff\xff\xff\xffnot a frame")
            .await
            .unwrap();
        let (conn3, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("plugin did not reconnect after garbage")
            .unwrap();

        // Well-framed garbage inside connection 1: a ttrpc request whose payload is not a
        // protobuf Request. The plugin answers with an error status and keeps serving.
        let mut m = mux::spawn(conn3);
        let mut plugin_conn = m.plugin.take().unwrap();
        let garbage = [0xffu8, 0xff, 0xff];
        let mut msg = (garbage.len() as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&1u32.to_be_bytes()); // stream id 1
        msg.extend_from_slice(&[1, 0]); // type request, no flags
        msg.extend_from_slice(&garbage);
        plugin_conn.write_all(&msg).await.unwrap();
        let mut header = [0u8; 10];
        tokio::time::timeout(WAIT, plugin_conn.read_exact(&mut header))
            .await
            .expect("no answer to a malformed request")
            .unwrap();
        assert_eq!(&header[4..8], &1u32.to_be_bytes(), "answer for stream 1");
        assert_eq!(header[8], 2, "a response message");
        let len = u32::from_be_bytes(header[0..4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        plugin_conn.read_exact(&mut body).await.unwrap();
        let resp = <ttrpc::Response as protobuf::Message>::parse_from_bytes(&body).unwrap();
        assert_ne!(resp.status.code(), ttrpc::Code::OK, "{resp:?}");
        let client = Client::new(Socket::new(plugin_conn));
        let plugin = api_ttrpc::PluginClient::new(client);
        let cfg = plugin.configure(ctx(), &Default::default()).await.unwrap();
        assert_eq!(
            cfg.events, 0b1111,
            "plugin still serves after the malformed request"
        );
        drop(plugin);
        drop(m);
        assert_eq!(status.registrations(), 1);
        assert!(!run.is_finished(), "run ended on garbage");

        stop.send(true).unwrap();
        tokio::time::timeout(WAIT, run)
            .await
            .expect("run did not stop")
            .unwrap()
            .unwrap();
    }

    impl Recorder {
        /// `wait_for` for async tests: polls without blocking the runtime.
        async fn wait_for_async(&self, what: &str, pick: impl Fn(&Seen) -> bool) {
            let deadline = Instant::now() + WAIT;
            while !self.seen().iter().any(&pick) {
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}: {:?}",
                    self.seen()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

//! The `fleet-nri` image of `scripts/build-images.sh`, run as `deploy/member/fleet-nri.yaml`'s
//! DaemonSet pod would run it, on a sandbox node: the archive imported with `ctr images
//! import` (what `kind load image-archive` does), a host-network privileged pod through CRI,
//! the init container running `install.sh` into the node's CNI dirs, the daemon container
//! with the DaemonSet's host paths. The node then gives an ordinary pod `eth-fleet`.
//!
//! Host paths differ from the DaemonSet's only where the sandbox node keeps things elsewhere
//! (each path below says so): the node's CNI dirs, NRI socket and pod netns dir are the
//! sandbox containerd's, the data, socket and config dirs live in its instance dir, and the
//! CNF netns gets a test name. The container paths are the DaemonSet's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleet_e2e::cluster_node::{PRIMARY_POD_CIDR, inet_of};
use fleet_e2e::images::{build_deploy_image, deploy_image, import_archive};
use fleet_e2e::{
    BridgeNetwork, ContainerSpec, ContainerState, Containerd, ContainerdOpts, Cri, PodSpec,
    Propagation, TestNetns, poll_until, require_root, run_command,
};
use fleet_proto::node::NodeClient;

const NODE_SUBNET: &str = "100.96.7.0/24";
const EXEC: Duration = Duration::from_secs(10);

/// Undoes what the test made outside the containerd instance, even when it fails: pods first
/// (CNI DEL reaches the live daemon), then the shared bind mount and the CNF netns.
struct Cleanup<'a> {
    cri: &'a Cri,
    pods: Vec<String>,
    shared_mount: Option<PathBuf>,
    cnf_netns: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for pod in self.pods.iter().rev() {
            let _ = self.cri.stop_pod(pod);
            let _ = self.cri.remove_pod(pod);
        }
        if let Some(m) = &self.shared_mount {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        if Path::new("/run/netns").join(&self.cnf_netns).exists() {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.cnf_netns])
                .status();
        }
    }
}

#[test]
fn the_fleet_nri_image_runs_as_the_daemonset_pod_and_serves_the_node() {
    require_root("the_fleet_nri_image_runs_as_the_daemonset_pod_and_serves_the_node");
    let archive = build_deploy_image("fleet-nri").unwrap();
    let image = deploy_image("fleet-nri");

    let node_ns = TestNetns::new("imgnode");
    let containerd = Containerd::start(ContainerdOpts::new("imgnode").netns(&node_ns)).unwrap();
    // Only the primary CNI: fleet-cni gets into the node's CNI dirs by the init container.
    BridgeNetwork::new("podnet", "fe2e-imgbr", PRIMARY_POD_CIDR)
        .write_to(&containerd)
        .unwrap();
    import_archive(&containerd.grpc_socket(), &archive).unwrap();
    if let Some(dir) = archive.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(15)).unwrap();
    assert!(
        cri.list_images().unwrap().contains(&image),
        "{image} not among {:?}",
        cri.list_images()
    );

    // The DaemonSet's hostPath volumes, on the sandbox node.
    let host = containerd.dir().join("fleet-nri-pod");
    let (data_dir, socket_dir, config_dir) =
        (host.join("data"), host.join("run"), host.join("config"));
    for d in [&data_dir, &socket_dir, &config_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let cnf_netns = format!("fe2e-imgcnf-{}-0", std::process::id());
    // The ConfigMap's node.json with a test CNF netns name and, with no controller here, a plan.
    std::fs::write(
        config_dir.join("node.json"),
        serde_json::json!({
            "local": {"cnf_netns": cnf_netns, "data_dir": "/var/lib/fleetboard"},
            "socket": "/run/fleetboard/node.sock",
            "nri_socket": "/var/run/nri/nri.sock",
            "plan": {"node_subnet": NODE_SUBNET},
        })
        .to_string(),
    )
    .unwrap();
    // containerd's default pod netns dir is /run/netns (the DaemonSet's mount); the sandbox
    // containerd keeps them under its state dir, so that dir is mounted at the same path. A
    // HostToContainer mount needs a shared host mount: bind it onto itself, shared, as
    // `ip netns` does with /run/netns.
    let pod_netns_dir = containerd
        .state_dir()
        .join("io.containerd.grpc.v1.cri/netns");
    std::fs::create_dir_all(&pod_netns_dir).unwrap();
    let mut cleanup = Cleanup {
        cri: &cri,
        pods: Vec::new(),
        shared_mount: None,
        cnf_netns: cnf_netns.clone(),
    };
    run_command(
        Command::new("mount")
            .arg("--bind")
            .arg(&pod_netns_dir)
            .arg(&pod_netns_dir),
    )
    .unwrap();
    cleanup.shared_mount = Some(pod_netns_dir.clone());
    run_command(
        Command::new("mount")
            .arg("--make-shared")
            .arg(&pod_netns_dir),
    )
    .unwrap();

    let pod = PodSpec::new("fleet-nri-x7k2p")
        .namespace("fleetboard-system")
        .host_network()
        .privileged();
    let sandbox = cri.run_pod(&pod).unwrap();
    cleanup.pods.push(sandbox.clone());

    // The init container: install.sh from the image into the node's CNI dirs. The conflist
    // names the socket by its host path (fleet-cni runs on the host); in the DaemonSet host
    // and container path are both /run/fleetboard/node.sock.
    let host_socket = socket_dir.join("node.sock");
    let install = ContainerSpec::image("install-cni", &image, &[])
        .command(&[
            "/bin/sh",
            "/opt/fleetboard/install.sh",
            "--bin-dir",
            "/host/opt/cni/bin",
            "--conf-dir",
            "/host/etc/cni/net.d",
            "--socket",
            &host_socket.display().to_string(),
        ])
        // As the DaemonSet's: root without any capability (it writes root-owned dirs).
        .drop_capability("ALL")
        .mount(
            containerd.cni_bin_dir(),
            "/host/opt/cni/bin",
            Propagation::Private,
        )
        .mount(
            containerd.cni_conf_dir(),
            "/host/etc/cni/net.d",
            Propagation::Private,
        );
    let init = cri.create_container(&sandbox, &pod, &install).unwrap();
    cri.start_container(&init).unwrap();
    let code = poll_until("install-cni to exit", Duration::from_secs(30), || match cri
        .container_state(&init)
        .ok()?
    {
        ContainerState::Exited(code) => Some(code),
        _ => None,
    })
    .unwrap();
    assert_eq!(code, 0, "install-cni failed:\n{}", logs(&containerd));
    assert!(containerd.cni_bin_dir().join("fleet-cni").is_file());
    let conflist = std::fs::read_to_string(containerd.cni_conf_dir().join("10-podnet.conflist"))
        .unwrap_or_default();
    assert!(conflist.contains("fleet-cni"), "{conflist}");

    // The daemon container: the DaemonSet's mounts (host path → container path).
    let daemon = ContainerSpec::image("fleet-nri", &image, &["--config=/etc/fleetboard/node.json"])
        .env("FLEET_LOG", "debug")
        .privileged()
        .add_capability("NET_ADMIN")
        .add_capability("SYS_ADMIN")
        // DaemonSet: /var/run/nri; the sandbox containerd's socket is in its instance dir.
        .mount(
            containerd.nri_socket(),
            "/var/run/nri/nri.sock",
            Propagation::Private,
        )
        .mount("/run/netns", "/run/netns", Propagation::Bidirectional)
        .mount(&pod_netns_dir, &pod_netns_dir, Propagation::HostToContainer)
        .mount(&data_dir, "/var/lib/fleetboard", Propagation::Private)
        .mount(&socket_dir, "/run/fleetboard", Propagation::Private)
        .mount(&config_dir, "/etc/fleetboard", Propagation::Private);
    let daemon = cri.create_container(&sandbox, &pod, &daemon).unwrap();
    cri.start_container(&daemon).unwrap();

    let node = NodeClient::new(&host_socket, Duration::from_secs(5));
    poll_until(
        "the containerized fleet-nri to register over NRI",
        Duration::from_secs(30),
        || node.status().ok().filter(|s| s.nri_registered),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&containerd)));
    // The DaemonSet's readinessProbe passes in the image.
    let probe = cri
        .exec_sync(
            &daemon,
            &["/bin/test", "-S", "/run/fleetboard/node.sock"],
            EXEC,
        )
        .unwrap();
    assert!(probe.success(), "readinessProbe: {probe:?}");
    // The CNF netns was made inside the container and reached the host (Bidirectional).
    assert!(
        Path::new("/run/netns").join(&cnf_netns).exists(),
        "CNF netns {cnf_netns} not on the host\n{}",
        logs(&containerd)
    );

    // An ordinary pod on that node gets its fleet address on eth-fleet.
    let workload = PodSpec::new("web");
    let (web, web_main) = cri.run_busybox_pod(&workload).unwrap();
    cleanup.pods.insert(0, web.clone());
    let out = cri
        .exec_sync(
            &web_main,
            &["ip", "-4", "-o", "addr", "show", "eth-fleet"],
            EXEC,
        )
        .unwrap();
    let fleet_ip = inet_of(&out.stdout)
        .unwrap_or_else(|| panic!("no eth-fleet address: {out:?}\n{}", logs(&containerd)));
    assert!(fleet_ip.starts_with("100.96.7."), "{fleet_ip}");
    // The datapath the containerized daemon built answers: the pod reaches its node's fleet
    // gateway (the CNF netns' bridge) over eth-fleet.
    let ping = cri
        .exec_sync(
            &web_main,
            &["ping", "-c", "1", "-W", "2", "100.96.7.1"],
            EXEC,
        )
        .unwrap();
    assert!(
        ping.success() && ping.stdout.contains("1 packets received"),
        "{ping:?}\n{}",
        logs(&containerd)
    );
    drop(cleanup);
}

/// Every container log of the sandbox node (for failure messages).
fn logs(containerd: &Containerd) -> String {
    let mut out = String::new();
    let mut dirs = vec![containerd.pod_log_dir()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                out.push_str(&format!("--- {}\n{text}\n", p.display()));
            }
        }
    }
    out
}

/// Every image of `scripts/build-images.sh` imports with `ctr` under its `deploy/` name and
/// its binary runs in it (`--version`): the libraries `ldd` listed are all there.
#[test]
fn every_image_imports_and_its_binary_runs() {
    require_root("every_image_imports_and_its_binary_runs");
    let containerd = Containerd::start(ContainerdOpts::new("imgall")).unwrap();
    BridgeNetwork::new("podnet", "fe2e-imgbr2", PRIMARY_POD_CIDR)
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(15)).unwrap();
    let pod = PodSpec::new("versions");
    let sandbox = cri.run_pod(&pod).unwrap();
    for name in [
        "fleet-nri",
        "fleet-controller",
        "fleet-dns",
        "fleet-hub",
        "fleetctl",
    ] {
        let archive = build_deploy_image(name).unwrap();
        import_archive(&containerd.grpc_socket(), &archive).unwrap();
        if let Some(dir) = archive.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let image = deploy_image(name);
        let c = cri
            .create_container(
                &sandbox,
                &pod,
                &ContainerSpec::image(name, &image, &["--version"]),
            )
            .unwrap();
        cri.start_container(&c).unwrap();
        let code = poll_until(
            &format!("{name} --version to exit"),
            Duration::from_secs(20),
            || match cri.container_state(&c).ok()? {
                ContainerState::Exited(code) => Some(code),
                _ => None,
            },
        )
        .unwrap();
        let log = logs(&containerd);
        assert_eq!(code, 0, "{image}: {name} --version\n{log}");
        assert!(log.contains(name), "{log}");
    }
    let _ = cri.stop_pod(&sandbox);
    let _ = cri.remove_pod(&sandbox);
}

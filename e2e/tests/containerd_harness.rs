//! Proves the harness against the real containerd: pods get addresses from the conflist's
//! subnet, survive a containerd restart, are torn down cleanly, and Drop leaves nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleet_e2e::{
    BridgeNetwork, Containerd, ContainerdOpts, PodSpec, TestNetns, process_alive, require_root,
};

const EXEC: Duration = Duration::from_secs(10);

fn pid_alive(pid: u32) -> bool {
    process_alive(pid)
}

fn host_links() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn busybox_pod_gets_subnet_address_survives_restart_and_is_cleaned_up() {
    require_root("busybox_pod_gets_subnet_address_survives_restart_and_is_cleaned_up");
    let node = TestNetns::new("fe2e-node");
    let mut containerd = Containerd::start(ContainerdOpts::new("harness").netns(&node)).unwrap();
    BridgeNetwork::new("podnet", "fe2e-br0", "10.244.7.0/24")
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(10)).unwrap();

    let pod = PodSpec::new("web").namespace("shop");
    let (sandbox, container) = cri.run_busybox_pod(&pod).unwrap();

    let out = cri
        .exec_sync(&container, &["ip", "-4", "addr", "show", "eth0"], EXEC)
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains("inet 10.244.7."),
        "eth0 has no 10.244.7.x address: {}",
        out.stdout
    );
    assert!(cri.pod_ip(&sandbox).unwrap().starts_with("10.244.7."));

    // The bridge and the pod's veth are in the node's netns, not on the host.
    let links = node.ip(&["-o", "link"]).unwrap();
    assert!(links.contains("fe2e-br0"), "{links}");
    assert!(links.contains("veth"), "{links}");
    assert!(
        !host_links().contains("fe2e-br0"),
        "bridge leaked onto the host"
    );
    let netns = cri.pod_netns_path(&sandbox).unwrap();
    assert!(
        netns.starts_with(containerd.state_dir()),
        "{}",
        netns.display()
    );

    let old_pid = containerd.pid().unwrap();
    drop(cri);
    containerd.restart().unwrap();
    assert!(!pid_alive(old_pid) || containerd.pid() == Some(old_pid));
    let cri = containerd.cri().unwrap();
    let pods = cri.list_pods().unwrap();
    assert!(
        pods.iter().any(|p| p.id == sandbox),
        "sandbox {sandbox} not listed after restart: {pods:?}"
    );
    let out = cri
        .exec_sync(&container, &["cat", "/proc/self/net/dev"], EXEC)
        .unwrap();
    assert!(out.stdout.contains("eth0"), "{out:?}");

    cri.stop_pod(&sandbox).unwrap();
    cri.remove_pod(&sandbox).unwrap();
    assert!(cri.list_pods().unwrap().is_empty());
    assert!(!netns.exists(), "pod netns {} still there", netns.display());
    let links = node.ip(&["-o", "link"]).unwrap();
    assert!(
        !links.contains("veth"),
        "veth left after RemovePodSandbox: {links}"
    );

    let dir = containerd.dir().to_path_buf();
    let pid = containerd.pid().unwrap();
    drop(cri);
    drop(containerd);
    assert!(!pid_alive(pid), "containerd {pid} still running");
    assert!(fleet_e2e::mounts::mounts_under(&dir).unwrap().is_empty());
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[test]
fn drop_removes_running_pods_shims_mounts_and_own_netns() {
    require_root("drop_removes_running_pods_shims_mounts_and_own_netns");
    let containerd = Containerd::start(ContainerdOpts::new("dropper")).unwrap();
    let netns = containerd.own_netns().expect("own netns by default").path();
    BridgeNetwork::new("podnet", "fe2e-br1", "10.244.8.0/24")
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(10)).unwrap();
    let (_, container) = cri.run_busybox_pod(&PodSpec::new("left-running")).unwrap();
    let out = cri
        .exec_sync(&container, &["sh", "-c", "echo hello"], EXEC)
        .unwrap();
    assert_eq!(out.stdout.trim(), "hello");
    assert!(
        !containerd.shim_pids().is_empty(),
        "expected a running shim"
    );

    let dir = containerd.dir().to_path_buf();
    let pid = containerd.pid().unwrap();
    let shims = containerd.shim_pids();
    drop(cri);
    drop(containerd);
    assert!(!pid_alive(pid), "containerd {pid} still running");
    for shim in shims {
        assert!(!pid_alive(shim as u32), "shim {shim} still running");
    }
    assert!(fleet_e2e::mounts::mounts_under(&dir).unwrap().is_empty());
    assert!(!dir.exists(), "{} not removed", dir.display());
    assert!(!netns.exists(), "own netns {} not removed", netns.display());
}

#[test]
fn failed_start_reports_the_exit_and_log_and_cleans_up() {
    require_root("failed_start_reports_the_exit_and_log_and_cleans_up");
    let mut opts = ContainerdOpts::new("broken");
    opts.netns = fleet_e2e::containerd::NetnsChoice::Path("/run/netns/fe2e-no-such-netns".into());
    opts.start_timeout = Duration::from_secs(5);
    let err = Containerd::start(opts).unwrap_err().to_string();
    assert!(err.contains("exited with"), "{err}");
    assert!(err.contains("fe2e-no-such-netns"), "{err}");
    // The instance dir (named in the error, with its log) is removed by Drop.
    let log = err
        .split("; log ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap();
    let dir = Path::new(log).parent().unwrap();
    assert!(dir.starts_with(std::env::temp_dir()), "{}", dir.display());
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn missing_cni_plugin_binary_is_named() {
    require_root("missing_cni_plugin_binary_is_named");
    let opts = ContainerdOpts::new("noplugin").cni_plugin("/nonexistent/fleet-cni");
    let err = Containerd::start(opts).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/fleet-cni"), "{err}");
    assert!(err.contains("cargo build --workspace --bins"), "{err}");
}

#[test]
fn chained_plugin_entries_run_after_bridge() {
    require_root("chained_plugin_entries_run_after_bridge");
    let containerd = Containerd::start(ContainerdOpts::new("chain")).unwrap();
    // Debian's `tuning` as the chained plugin: its effect (the MAC) is visible in the pod.
    BridgeNetwork::new("podnet", "fe2e-br4", "10.244.11.0/24")
        .chain(serde_json::json!({"type": "tuning", "mac": "02:fe:e2:00:00:42"}))
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(10)).unwrap();
    let (_, container) = cri.run_busybox_pod(&PodSpec::new("tuned")).unwrap();
    let out = cri
        .exec_sync(&container, &["ip", "link", "show", "eth0"], EXEC)
        .unwrap();
    assert!(out.stdout.contains("02:fe:e2:00:00:42"), "{out:?}");
}

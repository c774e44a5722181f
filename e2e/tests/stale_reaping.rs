//! A test process killed with SIGKILL runs no Drop: the next harness user reaps what it left
//! (containerd, shims, containers, mounts, dir, netns), found by the dead owner's PID.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_e2e::{
    BridgeNetwork, Containerd, ContainerdOpts, PodSpec, process_alive, reap, require_root,
};

const CHILD_ENV: &str = "FLEET_E2E_CRASHING_OWNER";

/// Helper run in a child process by the test below; does nothing when run directly.
#[test]
fn helper_owner_that_dies_without_drop() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let containerd = Containerd::start(ContainerdOpts::new("crashed")).unwrap();
    BridgeNetwork::new("podnet", "fe2e-br9", "10.244.99.0/24")
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(10)).unwrap();
    cri.run_busybox_pod(&PodSpec::new("orphan")).unwrap();
    let netns = containerd.own_netns().unwrap().name().to_string();
    println!("DIR={}", containerd.dir().display());
    println!("NETNS={netns}");
    std::io::stdout().flush().unwrap();
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[test]
fn leftovers_of_a_killed_test_process_are_reaped() {
    require_root("leftovers_of_a_killed_test_process_are_reaped");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_owner_that_dies_without_drop",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v))
            .unwrap_or_else(|| panic!("child printed no {key}: {stdout}"))
            .to_string()
    };
    let dir = PathBuf::from(field("DIR="));
    let netns = PathBuf::from("/run/netns").join(field("NETNS="));
    assert!(
        dir.exists() && netns.exists(),
        "child left nothing to reap?"
    );
    let containerd = reap::containerd_pids(&dir);
    let shims = reap::shim_pids(&dir.join("containerd.sock"));
    assert_eq!(containerd.len(), 1, "orphaned containerd expected");
    assert!(!shims.is_empty(), "orphaned shim expected");

    reap::reap_stale_instances();

    for pid in containerd.iter().chain(&shims) {
        assert!(!process_alive(*pid as u32), "pid {pid} survived reaping");
    }
    assert!(fleet_e2e::mounts::mounts_under(&dir).unwrap().is_empty());
    assert!(!dir.exists(), "{} not reaped", dir.display());
    assert!(!netns.exists(), "{} not reaped", netns.display());
}

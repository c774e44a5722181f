//! The fleet-cni binary against the real fleet-nri and the real kernel (no containerd): the
//! runtime's side of CNI is played by this test, exec'ing the plugin as a runtime does.
//! Needs root.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};

use fleet_e2e::{FleetNri, TestNetns, require_root, workspace_bin};
use serde_json::{Value, json};

/// A prevResult as a primary plugin (bridge + host-local) would hand it over.
fn prev_result(i: usize) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:00:00:01", "sandbox": "x"}],
        "ips": [{"address": format!("10.244.9.{}/24", i + 2), "gateway": "10.244.9.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn config(nri: &FleetNri, prev: Option<Value>, extra: Value) -> String {
    let mut cfg = json!({"cniVersion": "1.1.0", "name": "podnet", "type": "fleet-cni", "socket": nri.socket()});
    if let Some(p) = prev {
        cfg["prevResult"] = p;
    }
    if let Value::Object(m) = extra {
        for (k, v) in m {
            cfg[k] = v;
        }
    }
    cfg.to_string()
}

/// Runs fleet-cni as a runtime does; returns (exit ok, parsed stdout).
fn cni(command: &str, id: &str, netns: &str, stdin: &str) -> (bool, Value) {
    let mut child = Command::new(workspace_bin("fleet-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let parsed = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), parsed)
}

#[test]
fn sixty_four_concurrent_adds_get_distinct_addresses_check_and_release() {
    require_root("sixty_four_concurrent_adds_get_distinct_addresses_check_and_release");
    let nri = FleetNri::start("100.96.30.0/24", None).unwrap();
    let pods: Vec<TestNetns> = (0..64).map(|_| TestNetns::new("c64")).collect();
    let results: Vec<(bool, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let stdin = config(&nri, Some(prev_result(i)), json!({}));
                let path = ns.path().display().to_string();
                s.spawn(move || cni("ADD", &format!("pod{i}"), &path, &stdin))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut addrs = HashSet::new();
    for (i, (ok, result)) in results.iter().enumerate() {
        assert!(ok, "ADD {i} failed: {result}");
        // prevResult passed through, ours appended.
        assert_eq!(result["interfaces"][0]["name"], "eth0");
        assert_eq!(result["interfaces"][1]["name"], "eth-fleet");
        assert_eq!(
            result["ips"][0]["address"],
            format!("10.244.9.{}/24", i + 2)
        );
        let ours = result["ips"][1]["address"].as_str().unwrap().to_string();
        assert!(ours.starts_with("100.96.30."), "{ours}");
        addrs.insert(ours);
    }
    assert_eq!(addrs.len(), 64, "all addresses distinct");
    assert_eq!(nri.host_veths().len(), 64);

    // CHECK with the result each ADD returned.
    for (i, ns) in pods.iter().enumerate().step_by(16) {
        let stdin = config(&nri, Some(results[i].1.clone()), json!({}));
        let (ok, out) = cni(
            "CHECK",
            &format!("pod{i}"),
            &ns.path().display().to_string(),
            &stdin,
        );
        assert!(ok, "CHECK {i}: {out}");
    }

    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            let stdin = config(&nri, Some(results[i].1.clone()), json!({}));
            let path = ns.path().display().to_string();
            s.spawn(move || {
                let (ok, out) = cni("DEL", &format!("pod{i}"), &path, &stdin);
                assert!(ok, "DEL {i}: {out}");
            });
        }
    });
    assert_eq!(nri.status().unwrap().allocated, 0);
    nri.await_host_veths(0).unwrap();
    for ns in &pods {
        let links = ns.ip(&["-o", "link"]).unwrap();
        assert!(!links.contains("eth-fleet"), "{links}");
    }
}

#[test]
fn exhausted_subnet_and_daemon_down_are_cni_errors_that_leave_nothing() {
    require_root("exhausted_subnet_and_daemon_down_are_cni_errors_that_leave_nothing");
    // A /30 holds exactly one pod.
    let mut nri = FleetNri::start("100.96.31.0/30", None).unwrap();
    let (a, b) = (TestNetns::new("exh-a"), TestNetns::new("exh-b"));
    let (ok, _) = cni(
        "ADD",
        "a",
        &a.path().display().to_string(),
        &config(&nri, Some(prev_result(0)), json!({})),
    );
    assert!(ok);
    let (ok, err) = cni(
        "ADD",
        "b",
        &b.path().display().to_string(),
        &config(&nri, Some(prev_result(1)), json!({})),
    );
    assert!(!ok);
    assert_eq!(err["code"], 100, "{err}");
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("no free fleet address"),
        "{err}"
    );
    assert!(!b.ip(&["-o", "link"]).unwrap().contains("eth-fleet"));
    assert_eq!(nri.status().unwrap().allocated, 1);

    // Daemon down: try again later, nothing created.
    nri.kill9();
    let (ok, err) = cni(
        "ADD",
        "b",
        &b.path().display().to_string(),
        &config(&nri, Some(prev_result(1)), json!({})),
    );
    assert!(!ok);
    assert_eq!(err["code"], 11, "{err}");
    assert!(!b.ip(&["-o", "link"]).unwrap().contains("eth-fleet"));
    nri.spawn().unwrap();
    assert_eq!(
        nri.status().unwrap().allocated,
        1,
        "the daemon's state is unchanged"
    );

    // GC (CNI 1.1) releases what the runtime no longer lists.
    let gc = config(&nri, None, json!({"cni.dev/valid-attachments": []}));
    let (ok, out) = cni("GC", "", "", &gc);
    assert!(ok, "{out}");
    assert_eq!(nri.status().unwrap().allocated, 0);
    nri.await_host_veths(0).unwrap();
}

/// Issue 12 item 3: a pod whose primary network overlaps the fleet CIDR or the VIP range would
/// get fleet routes that take over part of it. ADD is refused, naming both ranges, and leaves
/// no allocation and no link — whether prevResult says so or only the pod's netns shows it.
#[test]
fn primary_network_overlapping_the_fleet_is_refused_and_leaves_nothing() {
    require_root("primary_network_overlapping_the_fleet_is_refused_and_leaves_nothing");
    let nri = FleetNri::start("100.96.32.0/24", None).unwrap();
    let pod = TestNetns::new("ovl");
    let netns = pod.path().display().to_string();
    let refused = |prev: Value| {
        let (ok, err) = cni("ADD", "ovl", &netns, &config(&nri, Some(prev), json!({})));
        assert!(!ok, "ADD must fail: {err}");
        assert_eq!(err["code"], 7, "{err}");
        assert_eq!(nri.status().unwrap().allocated, 0, "nothing allocated");
        assert!(nri.host_veths().is_empty(), "no host veth");
        assert!(!pod.ip(&["-o", "link"]).unwrap().contains("eth-fleet"));
        err
    };

    // kops/Gardener hand out pod addresses from 100.96.0.0/11.
    let mut prev = prev_result(0);
    prev["ips"][0]["address"] = json!("100.96.128.7/24");
    let err = refused(prev);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("100.96.128.0/24") && msg.contains("fleet CIDR 100.96.0.0/12"),
        "{err}"
    );

    // A primary route into the VIP range.
    let mut prev = prev_result(0);
    prev["routes"] = json!([{"dst": "0.0.0.0/0"}, {"dst": "100.112.4.0/24", "gw": "10.244.9.1"}]);
    let err = refused(prev);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("VIP range 100.112.0.0/16"),
        "{err}"
    );

    // prevResult without addresses (or an older fleet-cni, or NRI repair): the pod's netns is
    // read instead.
    pod.ip(&["link", "add", "eth0", "type", "bridge"]).unwrap();
    pod.ip(&["addr", "add", "100.96.128.7/24", "dev", "eth0"])
        .unwrap();
    let mut prev = prev_result(0);
    prev["ips"] = json!([]);
    prev["routes"] = json!([]);
    let err = refused(prev);
    assert!(
        err["details"].as_str().unwrap().contains("on eth0"),
        "{err}"
    );

    // Once the primary network is outside the fleet's ranges the same pod attaches.
    pod.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    let (ok, out) = cni(
        "ADD",
        "ovl",
        &netns,
        &config(&nri, Some(prev_result(0)), json!({})),
    );
    assert!(ok, "{out}");
    assert_eq!(nri.status().unwrap().allocated, 1);
}

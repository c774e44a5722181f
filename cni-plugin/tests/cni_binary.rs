//! Runs the built `fleet-cni` binary the way a container runtime does: CNI_* env, config on
//! stdin, result or CNI error JSON on stdout. The node daemon is `ScriptedNodeDaemon`, a test
//! double that speaks the node API's JSON-lines protocol from a table; it checks only the
//! plugin's wire behaviour. The real fleet-nri path is covered by the e2e tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_fleet-cni");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// A path that exists in every process: stands in for a pod netns (the daemon is scripted).
const NETNS: &str = "/proc/self/ns/net";

/// Test double of fleet-nri's node API: answers each `op` with a scripted reply line and
/// records every request it received.
struct ScriptedNodeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedNodeDaemon {
    fn start(replies: &[(&str, Value)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("node.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let replies: HashMap<String, Value> = replies
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let mut stream = stream.unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let req: Value = serde_json::from_str(&line).expect("plugin sent a JSON line");
                let op = req["op"].as_str().unwrap().to_string();
                reqs.lock().unwrap().push(req);
                let reply = replies.get(&op).cloned().unwrap_or_else(
                    || json!({"error": {"code": 999, "msg": format!("unscripted op {op}")}}),
                );
                stream.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        });
        ScriptedNodeDaemon {
            _dir: dir,
            socket,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for ScriptedNodeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn attach_ok() -> Value {
    json!({"ok": {
        "interface": "eth-fleet", "mac": "0a:58:64:60:01:05", "address": "100.96.1.5",
        "prefix_len": 24, "gateway": "100.96.1.1", "mtu": 1420,
        "routes": [{"dst": "100.96.0.0/12", "gw": "100.96.1.1"}, {"dst": "100.112.0.0/16", "gw": "100.96.1.1"}]
    }})
}

struct Outcome {
    exit: i32,
    stdout: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts the CNI error shape and code, and returns the error object.
    fn cni_error(&self, code: u64) -> Value {
        assert_eq!(self.exit, 1, "exit status; stdout {}", self.stdout);
        let v = self.json();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["cniVersion", "code", "msg", "details"], "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(!v["msg"].as_str().unwrap().is_empty());
        v
    }
}

fn fleet_cni(env: &[(&str, &str)], stdin: &str) -> Outcome {
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
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
    Outcome {
        exit: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
    }
}

fn cni_env<'a>(cmd: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "a1b2c3"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=uid-7",
        ),
    ]
}

fn config(version: &str, socket: &Path, prev: Option<Value>) -> String {
    let mut c = json!({"cniVersion": version, "name": "fleet-test", "type": "fleet-cni",
                       "socket": socket, "timeoutMs": 2000, "x-unknown": [1]});
    if let Some(p) = prev {
        c["prevResult"] = p;
    }
    c.to_string()
}

fn fixture(version: &str) -> Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}/bridge-result-{version}.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A socket path nothing listens on.
fn dead_socket() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nobody.sock");
    (dir, p)
}

// ---- bad input: each answers CNI error JSON with the right code and exit 1 ----

#[test]
fn malformed_json_is_6() {
    fleet_cni(&cni_env("ADD", NETNS), "{\"cniVersion\": ").cni_error(6);
}

#[test]
fn missing_prev_result_is_7_and_says_chained() {
    let (_d, sock) = dead_socket();
    let e = fleet_cni(&cni_env("ADD", NETNS), &config("1.0.0", &sock, None)).cni_error(7);
    assert!(
        e["details"].as_str().unwrap().contains("primary plugin"),
        "{e}"
    );
    assert_eq!(e["cniVersion"], "1.0.0");
}

#[test]
fn invalid_prev_result_is_7() {
    let (_d, sock) = dead_socket();
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "not-an-ip"}]});
    let e = fleet_cni(&cni_env("ADD", NETNS), &config("1.0.0", &sock, Some(prev))).cni_error(7);
    assert!(e["msg"].as_str().unwrap().contains("ips[0].address"), "{e}");
}

#[test]
fn unsupported_version_is_1_with_the_list() {
    let (_d, sock) = dead_socket();
    let e = fleet_cni(
        &cni_env("ADD", NETNS),
        &config("0.3.1", &sock, Some(json!({}))),
    )
    .cni_error(1);
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("0.4.0, 1.0.0, 1.1.0"),
        "{e}"
    );
}

#[test]
fn nonexistent_netns_is_3() {
    let (_d, sock) = dead_socket();
    let stdin = config("1.0.0", &sock, Some(fixture("1.0.0")));
    let e = fleet_cni(
        &cni_env("ADD", "/var/run/netns/fleet-cni-test-missing"),
        &stdin,
    )
    .cni_error(3);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("fleet-cni-test-missing")
    );
}

#[test]
fn daemon_down_is_11_for_add_and_del() {
    let (_d, sock) = dead_socket();
    let stdin = config("1.0.0", &sock, Some(fixture("1.0.0")));
    let e = fleet_cni(&cni_env("ADD", NETNS), &stdin).cni_error(11);
    assert!(
        e["details"].as_str().unwrap().contains("nobody.sock"),
        "{e}"
    );
    fleet_cni(&cni_env("DEL", ""), &config("1.0.0", &sock, None)).cni_error(11);
}

#[test]
fn missing_env_is_4() {
    let (_d, sock) = dead_socket();
    let stdin = config("1.0.0", &sock, Some(fixture("1.0.0")));
    let env: Vec<_> = cni_env("ADD", NETNS)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_CONTAINERID")
        .collect();
    let e = fleet_cni(&env, &stdin).cni_error(4);
    assert!(e["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    fleet_cni(&cni_env("ADD", ""), &stdin).cni_error(4);
    fleet_cni(&[("CNI_COMMAND", "FROB")], &stdin).cni_error(4);
}

#[test]
fn status_without_daemon_is_50() {
    let (_d, sock) = dead_socket();
    fleet_cni(&[("CNI_COMMAND", "STATUS")], &config("1.1.0", &sock, None)).cni_error(50);
}

// ---- VERSION ----

#[test]
fn version_lists_supported_versions() {
    let out = fleet_cni(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(out.exit, 0);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
    );
    let out = fleet_cni(&[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(out.json()["cniVersion"], "1.1.0");
}

// ---- happy paths against the scripted daemon ----

#[test]
fn add_appends_to_a_real_bridge_result() {
    for version in ["0.4.0", "1.0.0"] {
        let daemon = ScriptedNodeDaemon::start(&[("attach", attach_ok())]);
        let prev = fixture(version);
        let out = fleet_cni(
            &cni_env("ADD", NETNS),
            &config(version, &daemon.socket, Some(prev.clone())),
        );
        assert_eq!(out.exit, 0, "{}", out.stdout);
        let res = out.json();

        let ifaces = res["interfaces"].as_array().unwrap();
        assert_eq!(ifaces[..3], prev["interfaces"].as_array().unwrap()[..]);
        assert_eq!(
            ifaces[3],
            json!({"name": "eth-fleet", "mac": "0a:58:64:60:01:05", "sandbox": NETNS})
        );
        assert_eq!(res["ips"][0], prev["ips"][0]);
        let mut ip = json!({"interface": 3, "address": "100.96.1.5/24", "gateway": "100.96.1.1"});
        if version == "0.4.0" {
            ip["version"] = json!("4");
        }
        assert_eq!(res["ips"][1], ip);
        assert_eq!(res["routes"][0], prev["routes"][0]);
        assert_eq!(
            res["routes"][1],
            json!({"dst": "100.96.0.0/12", "gw": "100.96.1.1"})
        );
        assert_eq!(res["dns"], prev["dns"]);

        let reqs = daemon.requests();
        assert_eq!(reqs.len(), 1);
        let primary_if =
            &prev["interfaces"][prev["ips"][0]["interface"].as_u64().unwrap() as usize]["name"];
        assert_eq!(
            reqs[0],
            json!({"op": "attach", "args": {
                "key": {"container_id": "a1b2c3", "ifname": "eth0"},
                "network": "fleet-test", "netns": NETNS,
                "pod": {"namespace": "shop", "name": "web-0", "uid": "uid-7"},
                // What the primary plugin configured, for fleet-nri's overlap check.
                "primary": [
                    {"kind": "address", "cidr": prev["ips"][0]["address"], "interface": primary_if},
                    {"kind": "route", "cidr": "0.0.0.0/0"}
                ]
            }})
        );
    }
}

#[test]
fn add_1_1_0_stamps_the_version_and_mtu() {
    let daemon = ScriptedNodeDaemon::start(&[("attach", attach_ok())]);
    let mut prev = fixture("1.0.0");
    prev["cniVersion"] = json!("1.1.0");
    let out = fleet_cni(
        &cni_env("ADD", NETNS),
        &config("1.1.0", &daemon.socket, Some(prev)),
    );
    assert_eq!(out.exit, 0, "{}", out.stdout);
    let res = out.json();
    assert_eq!(res["cniVersion"], "1.1.0");
    assert_eq!(res["interfaces"][3]["mtu"], 1420);
}

/// Debian's reference plugins parse prevResult with libcni's own types: feeding fleet-cni's
/// result to `portmap` (which, with no port mappings, parses and re-prints prevResult) shows
/// the result is what they expect. Debian's plugins speak up to CNI 1.0.0.
#[test]
fn reference_plugin_accepts_the_result() {
    let portmap = Path::new("/usr/lib/cni/portmap");
    assert!(
        portmap.exists(),
        "this test needs Debian's containernetworking-plugins (/usr/lib/cni/portmap); apt-get install containernetworking-plugins"
    );
    for version in ["0.4.0", "1.0.0"] {
        let daemon = ScriptedNodeDaemon::start(&[("attach", attach_ok())]);
        let out = fleet_cni(
            &cni_env("ADD", NETNS),
            &config(version, &daemon.socket, Some(fixture(version))),
        );
        assert_eq!(out.exit, 0, "{}", out.stdout);
        let ours = out.json();

        let conf = json!({"cniVersion": version, "name": "fleet-test", "type": "portmap", "prevResult": ours});
        let mut child = Command::new(portmap)
            .env_clear()
            .envs(cni_env("ADD", NETNS))
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let reprinted = child.wait_with_output().unwrap();
        let text = String::from_utf8(reprinted.stdout).unwrap();
        assert!(
            reprinted.status.success(),
            "portmap rejected fleet-cni's {version} result: {text}"
        );
        let theirs: Value = serde_json::from_str(&text).unwrap();
        for key in ["cniVersion", "interfaces", "ips", "routes", "dns"] {
            assert_eq!(
                theirs[key], ours[key],
                "{version} {key} after a round trip through portmap"
            );
        }
    }
}

#[test]
fn add_passes_daemon_errors_through() {
    let daemon = ScriptedNodeDaemon::start(&[(
        "attach",
        json!({"error": {"code": 100, "msg": "node subnet 100.96.1.0/24 is exhausted", "details": "254 of 254"}}),
    )]);
    let e = fleet_cni(
        &cni_env("ADD", NETNS),
        &config("1.0.0", &daemon.socket, Some(fixture("1.0.0"))),
    )
    .cni_error(100);
    assert_eq!(e["details"], "254 of 254");
}

#[test]
fn add_releases_an_unusable_daemon_answer() {
    let mut bad = attach_ok();
    bad["ok"]["prefix_len"] = json!(0);
    let daemon = ScriptedNodeDaemon::start(&[("attach", bad), ("detach", json!({"ok": null}))]);
    fleet_cni(
        &cni_env("ADD", NETNS),
        &config("1.0.0", &daemon.socket, Some(fixture("1.0.0"))),
    )
    .cni_error(6);
    let ops: Vec<Value> = daemon.requests().iter().map(|r| r["op"].clone()).collect();
    assert_eq!(ops, ["attach", "detach"]);
}

#[test]
fn del_without_netns_or_prev_result_detaches() {
    let daemon = ScriptedNodeDaemon::start(&[("detach", json!({"ok": null}))]);
    let env: Vec<_> = cni_env("DEL", NETNS)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let out = fleet_cni(&env, &config("0.4.0", &daemon.socket, None));
    assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
    assert_eq!(
        daemon.requests()[0],
        json!({"op": "detach", "args": {"key": {"container_id": "a1b2c3", "ifname": "eth0"}, "network": "fleet-test", "netns": ""}})
    );
}

#[test]
fn del_of_an_unknown_attachment_succeeds() {
    let daemon = ScriptedNodeDaemon::start(&[(
        "detach",
        json!({"error": {"code": 3, "msg": "no such attachment"}}),
    )]);
    let out = fleet_cni(
        &cni_env("DEL", NETNS),
        &config("1.1.0", &daemon.socket, None),
    );
    assert_eq!(out.exit, 0, "{}", out.stdout);
}

#[test]
fn check_verifies_prev_result_then_asks_the_daemon() {
    let attachment = json!({
        "key": {"container_id": "a1b2c3", "ifname": "eth0"}, "network": "fleet-test", "netns": NETNS,
        "interface": "eth-fleet", "mac": "0a:58:64:60:01:05", "address": "100.96.1.5", "prefix_len": 24,
        "host_veth": "vfa1b2c3", "pod": {}, "origin": "cni", "created_unix": 1
    });
    let daemon = ScriptedNodeDaemon::start(&[
        ("attach", attach_ok()),
        ("list_attachments", json!({"ok": [attachment]})),
        ("check", json!({"ok": null})),
    ]);
    let added = fleet_cni(
        &cni_env("ADD", NETNS),
        &config("1.0.0", &daemon.socket, Some(fixture("1.0.0"))),
    )
    .json();
    let out = fleet_cni(
        &cni_env("CHECK", NETNS),
        &config("1.0.0", &daemon.socket, Some(added)),
    );
    assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
    let ops: Vec<Value> = daemon.requests().iter().map(|r| r["op"].clone()).collect();
    assert_eq!(ops, ["attach", "list_attachments", "check"]);

    // The primary's result alone lacks eth-fleet: CHECK fails before asking the daemon to check.
    let e = fleet_cni(
        &cni_env("CHECK", NETNS),
        &config("1.0.0", &daemon.socket, Some(fixture("1.0.0"))),
    )
    .cni_error(102);
    assert!(e["msg"].as_str().unwrap().contains("eth-fleet"), "{e}");
}

#[test]
fn gc_sends_the_valid_attachments() {
    let daemon = ScriptedNodeDaemon::start(&[("gc", json!({"ok": {"released": []}}))]);
    let mut conf: Value = serde_json::from_str(&config("1.1.0", &daemon.socket, None)).unwrap();
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": "a1", "ifname": "eth0"}, {"containerID": "b2", "ifname": "eth0"}]);
    let out = fleet_cni(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf.to_string(),
    );
    assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
    assert_eq!(
        daemon.requests()[0]["args"],
        json!({"network": "fleet-test", "valid": [{"container_id": "a1", "ifname": "eth0"}, {"container_id": "b2", "ifname": "eth0"}]})
    );
}

#[test]
fn status_reflects_daemon_readiness() {
    let status = |ready: bool| {
        json!({"ok": {"ready": ready, "node_subnet": "100.96.1.0/24", "fleet_cidr": "100.96.0.0/12",
                      "vip_range": "100.112.0.0/16", "allocated": 3, "capacity": 253,
                      "nri_registered": true, "nri_registrations": 1}})
    };
    let daemon = ScriptedNodeDaemon::start(&[("status", status(true))]);
    let out = fleet_cni(
        &[("CNI_COMMAND", "STATUS")],
        &config("1.1.0", &daemon.socket, None),
    );
    assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
    let daemon = ScriptedNodeDaemon::start(&[("status", status(false))]);
    fleet_cni(
        &[("CNI_COMMAND", "STATUS")],
        &config("1.1.0", &daemon.socket, None),
    )
    .cni_error(50);
}

#[test]
fn debug_log_goes_to_the_configured_file_only() {
    let (dir, sock) = dead_socket();
    let log = dir.path().join("fleet-cni.log");
    let mut conf: Value = serde_json::from_str(&config("1.0.0", &sock, None)).unwrap();
    conf["logFile"] = json!(log);
    let out = fleet_cni(&cni_env("DEL", NETNS), &conf.to_string());
    out.cni_error(11);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("DEL container=a1b2c3") && text.contains("code=11"),
        "{text}"
    );
}

#[test]
fn del_tolerates_malformed_cni_args_add_does_not() {
    let daemon =
        ScriptedNodeDaemon::start(&[("attach", attach_ok()), ("detach", json!({"ok": null}))]);
    let with_bad_args = |cmd| -> Vec<(&str, &str)> {
        cni_env(cmd, NETNS)
            .into_iter()
            .map(|(k, v)| {
                if k == "CNI_ARGS" {
                    (k, "no-equals-sign")
                } else {
                    (k, v)
                }
            })
            .collect()
    };
    let out = fleet_cni(
        &with_bad_args("DEL"),
        &config("1.0.0", &daemon.socket, None),
    );
    assert_eq!(out.exit, 0, "{}", out.stdout);
    let stdin = config("1.0.0", &daemon.socket, Some(fixture("1.0.0")));
    fleet_cni(&with_bad_args("ADD"), &stdin).cni_error(4);
    let ops: Vec<Value> = daemon.requests().iter().map(|r| r["op"].clone()).collect();
    assert_eq!(ops, ["detach"], "ADD refused before calling the daemon");
}

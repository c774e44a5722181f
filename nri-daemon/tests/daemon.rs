//! The fleet-nri binary without a runtime (`--no-nri`): node API, IPAM persistence across
//! kill -9, concurrency, bad input. Needs root (netns). Runtime-driven behaviour is in e2e/.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_core::netns;
use fleet_proto::node::{
    AttachRequest, AttachmentKey, CheckRequest, DetachRequest, GcRequest, NodeClient, PodMeta, code,
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
}

/// A netns created by this test; deleted on drop.
struct Ns(String);

impl Ns {
    fn new(name: String) -> Ns {
        netns::ensure_named(&name).expect("create test netns");
        Ns(name)
    }
    fn path(&self) -> String {
        netns::named_path(&self.0).display().to_string()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = netns::delete_named(&self.0);
    }
}

/// One fleet-nri process with its own dirs and CNF netns; killed by PID and cleaned on drop.
struct Daemon {
    dir: tempfile::TempDir,
    cnf: String,
    child: Option<Child>,
}

impl Daemon {
    fn start(tag: &str, subnet: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let cnf = format!("fbd-{tag}-{}", std::process::id());
        let cfg = serde_json::json!({
            "plan": {"node_subnet": subnet},
            "local": {"cnf_netns": cnf, "data_dir": dir.path().join("data")},
            "socket": dir.path().join("node.sock"),
        });
        std::fs::write(dir.path().join("node.json"), cfg.to_string()).unwrap();
        let mut d = Daemon {
            dir,
            cnf,
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleet-nri"))
            .arg("--config")
            .arg(self.dir.path().join("node.json"))
            .arg("--no-nri")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fleet-nri");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.client().status().is_err() {
            assert!(
                Instant::now() < deadline,
                "fleet-nri did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    fn client(&self) -> NodeClient {
        NodeClient::new(self.socket(), Duration::from_secs(10))
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("node.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits until no pod veth is left (released links are deleted in the background).
    fn await_no_pod_veths(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cnf_links().contains(": fl64") {
            assert!(
                Instant::now() < deadline,
                "pod veths left: {}",
                self.cnf_links()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cnf_links(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.cnf, "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = netns::delete_named(&self.cnf);
    }
}

fn pid() -> u32 {
    std::process::id()
}

fn attach_req(id: &str, ns: &Ns) -> AttachRequest {
    AttachRequest {
        key: AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        },
        network: "fleet".into(),
        netns: ns.path(),
        pod: PodMeta {
            namespace: "default".into(),
            name: id.into(),
            ..Default::default()
        },
        primary: vec![],
    }
}

fn detach_req(id: &str, ns: &str) -> DetachRequest {
    DetachRequest {
        key: AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        },
        network: "fleet".into(),
        netns: ns.into(),
    }
}

#[test]
fn allocations_survive_kill_9_and_are_never_duplicated() {
    require_root();
    let mut d = Daemon::start("k9", "100.96.9.0/24");
    let pods: Vec<Ns> = (0..3)
        .map(|i| Ns::new(format!("fbp-k9-{i}-{}", pid())))
        .collect();
    let a = d.client().attach(attach_req("a", &pods[0])).unwrap();
    let b = d.client().attach(attach_req("b", &pods[1])).unwrap();
    assert_ne!(a.address, b.address);
    // ADD again for the same pod: same answer, nothing new.
    assert_eq!(d.client().attach(attach_req("a", &pods[0])).unwrap(), a);

    d.kill9();
    d.spawn();
    let listed = d.client().list_attachments().unwrap();
    let addrs: HashSet<_> = listed.iter().map(|x| x.address).collect();
    assert_eq!(
        addrs,
        HashSet::from([a.address, b.address]),
        "allocations survive kill -9"
    );
    d.client()
        .check(CheckRequest {
            key: AttachmentKey {
                container_id: "a".into(),
                ifname: "eth0".into(),
            },
            network: "fleet".into(),
            netns: pods[0].path(),
        })
        .expect("pod a's link is intact after the restart");
    let c = d.client().attach(attach_req("c", &pods[2])).unwrap();
    assert!(
        c.address != a.address && c.address != b.address,
        "next pod gets a fresh address"
    );

    for (id, ns) in [("a", &pods[0]), ("b", &pods[1]), ("c", &pods[2])] {
        d.client().detach(detach_req(id, &ns.path())).unwrap();
    }
    // DEL is idempotent, also without a netns.
    d.client().detach(detach_req("a", "")).unwrap();
    assert!(d.client().list_attachments().unwrap().is_empty());
    d.await_no_pod_veths();
}

#[test]
fn sixty_four_concurrent_attaches_get_distinct_addresses_and_release_cleanly() {
    require_root();
    let d = Daemon::start("c64", "100.96.10.0/24");
    let pods: Vec<Ns> = (0..64)
        .map(|i| Ns::new(format!("fbp-c64-{i}-{}", pid())))
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let client = d.client();
                s.spawn(move || client.attach(attach_req(&format!("p{i}"), ns)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let addrs: HashSet<_> = results
        .iter()
        .map(|r| r.as_ref().expect("attach").address)
        .collect();
    assert_eq!(addrs.len(), 64);
    assert_eq!(d.client().status().unwrap().allocated, 64);
    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            let client = d.client();
            s.spawn(move || {
                client
                    .detach(detach_req(&format!("p{i}"), &ns.path()))
                    .unwrap()
            });
        }
    });
    assert_eq!(d.client().status().unwrap().allocated, 0);
    d.await_no_pod_veths();
}

#[test]
fn bad_requests_are_clear_errors_that_change_nothing() {
    require_root();
    let d = Daemon::start("bad", "100.96.11.0/30");
    // Unknown netns.
    let x = Ns::new(format!("fbp-bad-x-{}", pid()));
    let missing = AttachRequest {
        netns: "/run/netns/fbp-no-such".into(),
        ..attach_req("x", &x)
    };
    let err = d.client().attach(missing).unwrap_err();
    assert_eq!(err.code, code::CONTAINER_UNKNOWN, "{err}");
    assert_eq!(d.client().status().unwrap().allocated, 0);
    // Exhausted subnet: a /30 holds one pod.
    let (p1, p2) = (
        Ns::new(format!("fbp-bad-1-{}", pid())),
        Ns::new(format!("fbp-bad-2-{}", pid())),
    );
    d.client().attach(attach_req("one", &p1)).unwrap();
    let err = d.client().attach(attach_req("two", &p2)).unwrap_err();
    assert_eq!(err.code, code::POOL_EXHAUSTED, "{err}");
    assert_eq!(d.client().status().unwrap().allocated, 1);
    // Garbage on the socket.
    for garbage in [
        &b"{not json\n"[..],
        b"\x00\x01\x02\n",
        b"{\"op\":\"explode\"}\n",
    ] {
        let reply = raw(&d.socket(), garbage);
        assert!(
            reply.contains(&format!("\"code\":{}", code::DECODE_FAILURE)),
            "{reply}"
        );
    }
    // GC releases everything of the network that the runtime does not list.
    let gc = d
        .client()
        .gc(GcRequest {
            network: "fleet".into(),
            valid: vec![],
        })
        .unwrap();
    assert_eq!(gc.released.len(), 1);
    assert_eq!(d.client().status().unwrap().allocated, 0);
    d.await_no_pod_veths();
}

fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

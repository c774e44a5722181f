//! fleet-nri's `/metrics` (`--metrics-address`): scraped and parsed with a Prometheus text
//! parser; the node API counters and histograms move with requests, the allocation gauges
//! follow the IPAM. Needs root (netns).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_core::netns;
use fleet_proto::node::{AttachRequest, AttachmentKey, DetachRequest, NodeClient, PodMeta};
use prometheus_parse::{Sample, Scrape, Value};

struct Daemon {
    dir: tempfile::TempDir,
    cnf: String,
    child: Child,
    metrics: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = netns::delete_named(&self.cnf);
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn scrape(addr: SocketAddr) -> Scrape {
    let body = fleet_metrics::scrape(addr).expect("scrape /metrics");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

fn find<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
}

fn number(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, name, labels).map(|x| &x.value) {
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

fn histogram_count(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, name, labels).map(|x| &x.value) {
        Some(Value::Histogram(buckets)) => buckets.last().map_or(0.0, |b| b.count),
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

fn start(dir: tempfile::TempDir, cnf: String) -> Daemon {
    let cfg = serde_json::json!({
        "plan": {"node_subnet": "100.96.77.0/24"},
        "local": {"cnf_netns": cnf, "data_dir": dir.path().join("data")},
        "socket": dir.path().join("node.sock"),
    });
    std::fs::write(dir.path().join("node.json"), cfg.to_string()).unwrap();
    let metrics = free_port();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fleet-nri"))
        .arg("--config")
        .arg(dir.path().join("node.json"))
        .arg("--no-nri")
        .arg("--metrics-address")
        .arg(metrics.to_string())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet-nri");
    let d = Daemon {
        dir,
        cnf,
        child,
        metrics,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.client().status().is_err() || fleet_metrics::scrape(d.metrics).is_err() {
        assert!(
            Instant::now() < deadline,
            "fleet-nri did not come up: {}",
            std::fs::read_to_string(d.dir.path().join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

impl Daemon {
    fn client(&self) -> NodeClient {
        NodeClient::new(self.dir.path().join("node.sock"), Duration::from_secs(10))
    }
}

fn key(id: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: id.into(),
        ifname: "eth0".into(),
    }
}

#[test]
fn node_api_requests_and_allocations_show_in_metrics() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root");
    let pid = std::process::id();
    let pod = format!("fbp-metrics-{pid}");
    netns::ensure_named(&pod).unwrap();
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = netns::delete_named(&self.0);
        }
    }
    let _pod = Cleanup(pod.clone());
    let d = start(tempfile::tempdir().unwrap(), format!("fbd-metrics-{pid}"));

    let before = scrape(d.metrics);
    assert_eq!(
        number(
            &before,
            "fleetboard_build_info",
            &[("component", "fleet-nri")]
        ),
        1.0
    );
    assert_eq!(number(&before, "fleetboard_nri_allocations", &[]), 0.0);
    assert_eq!(
        number(&before, "fleetboard_nri_allocation_capacity", &[]),
        253.0
    );
    assert_eq!(number(&before, "fleetboard_nri_plan_ready", &[]), 1.0);
    assert_eq!(number(&before, "fleetboard_nri_overlay_peers", &[]), 0.0);
    // The scrape loop's own status calls are counted too.
    let status_before = number(
        &before,
        "fleetboard_node_api_requests_total",
        &[("op", "status"), ("result", "ok")],
    );

    let netns_path = netns::named_path(&pod).display().to_string();
    d.client()
        .attach(AttachRequest {
            key: key("m1"),
            network: "fleet".into(),
            netns: netns_path.clone(),
            pod: PodMeta {
                namespace: "default".into(),
                name: "m1".into(),
                ..Default::default()
            },
            primary: vec![],
        })
        .unwrap();
    // A check for a pod that does not exist: an error reply.
    assert!(
        d.client()
            .check(fleet_proto::node::CheckRequest {
                key: key("nope"),
                network: "fleet".into(),
                netns: netns_path.clone(),
            })
            .is_err()
    );
    d.client().status().unwrap();

    let after = scrape(d.metrics);
    assert_eq!(number(&after, "fleetboard_nri_allocations", &[]), 1.0);
    let attach = [("op", "attach"), ("result", "ok")];
    assert_eq!(
        number(&after, "fleetboard_node_api_requests_total", &attach),
        1.0
    );
    assert_eq!(
        number(
            &after,
            "fleetboard_node_api_requests_total",
            &[("op", "check"), ("result", "error")]
        ),
        1.0
    );
    assert_eq!(
        number(
            &after,
            "fleetboard_node_api_requests_total",
            &[("op", "status"), ("result", "ok")]
        ),
        status_before + 1.0
    );
    assert_eq!(
        histogram_count(
            &after,
            "fleetboard_node_api_request_duration_seconds",
            &[("op", "attach")]
        ),
        1.0
    );

    d.client()
        .detach(DetachRequest {
            key: key("m1"),
            network: "fleet".into(),
            netns: netns_path,
        })
        .unwrap();
    let done = scrape(d.metrics);
    assert_eq!(number(&done, "fleetboard_nri_allocations", &[]), 0.0);
    assert_eq!(
        number(
            &done,
            "fleetboard_node_api_requests_total",
            &[("op", "detach"), ("result", "ok")]
        ),
        1.0
    );
}

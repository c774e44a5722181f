//! `fleet-hub serve --metrics-address`: the hub's `/metrics`, parsed with a Prometheus text
//! parser. Calls count by name and result with their latency, a watch shows as open while it
//! is, and the members and store revision follow the registry.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_hub::api::{CaHash, Credential};
use fleet_hub_api::client::{ClientOptions, HubClient};
use fleet_hub_api::model::{ClusterId, JoinRequest, PublicKey};
use futures::StreamExt;
use prometheus_parse::{Scrape, Value};

struct Hub {
    child: Child,
    dir: tempfile::TempDir,
    api: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn scrape(addr: SocketAddr) -> Scrape {
    let body = fleet_metrics::scrape(addr).expect("scrape /metrics");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)));
    match sample.map(|x| &x.value) {
        None => 0.0,
        Some(Value::Counter(v) | Value::Gauge(v)) => *v,
        Some(Value::Histogram(b)) => b.last().map_or(0.0, |b| b.count),
        other => panic!("{name}: {other:?}"),
    }
}

async fn until(what: &str, hub: &Hub, mut ok: impl FnMut(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(hub.metrics);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {:?}", s.samples);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start() -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let (api, metrics) = (free_addr(), free_addr());
    let log = std::fs::File::create(dir.path().join("hub.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fleet-hub"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["serve", "--listen", &api.to_string()])
        .args(["--metrics-address", &metrics.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start fleet-hub serve");
    let hub = Hub {
        child,
        dir,
        api,
        metrics,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(hub.dir.path().join("data/admin.credential").exists()
        && std::net::TcpStream::connect(api).is_ok()
        && fleet_metrics::scrape(metrics).is_ok())
    {
        assert!(
            Instant::now() < deadline,
            "fleet-hub did not come up: {}",
            std::fs::read_to_string(hub.dir.path().join("hub.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    hub
}

/// A client of the test hub without a credential, and the same client as its admin.
fn clients(hub: &Hub) -> (HubClient, HubClient) {
    let data = hub.dir.path().join("data");
    let ca = CaHash::of_pem(&std::fs::read_to_string(data.join("ca.pem")).unwrap()).unwrap();
    let client = HubClient::new([hub.api.to_string()], ca, ClientOptions::default()).unwrap();
    let admin_secret = std::fs::read_to_string(data.join("admin.credential")).unwrap();
    let admin = client.with_credential(Credential::parse(&admin_secret).expect("admin credential"));
    (client, admin)
}

/// Cluster `aa` joining with key `[key; 32]`.
fn aa_request(key: u8) -> JoinRequest {
    JoinRequest {
        cluster: ClusterId::new("aa").unwrap(),
        public_key: PublicKey::from_bytes([key; 32]),
        endpoint: None,
    }
}

#[tokio::test]
async fn hub_calls_watches_members_and_revision_show_in_metrics() {
    let hub = start();
    let (client, admin) = clients(&hub);

    let s = scrape(hub.metrics);
    assert_eq!(
        value(&s, "fleetboard_build_info", &[("component", "fleet-hub")]),
        1.0
    );
    assert_eq!(value(&s, "fleetboard_hub_members", &[]), 0.0);
    let revision_before = value(&s, "fleetboard_hub_store_revision", &[]);

    let (join, _) = admin
        .create_token(Duration::from_secs(3600), "metrics test")
        .await
        .unwrap();
    let joined = client.join(&join, aa_request(7)).await.unwrap();
    // Joining aa again is an error reply (already joined).
    assert!(client.join(&join, aa_request(8),).await.is_err());
    let aa = client.with_credential(joined.credential);
    let view = aa.list().await.unwrap();
    let mut watch = Box::pin(aa.watch(view.revision));
    aa.publish(&ClusterId::new("aa").unwrap(), "probe", b"1")
        .await
        .unwrap();
    watch.next().await.expect("an event").expect("no error");

    let s = until("the watch to count as open", &hub, |s| {
        value(s, "fleetboard_hub_watches_open", &[]) == 1.0
    })
    .await;
    assert_eq!(value(&s, "fleetboard_hub_members", &[]), 1.0);
    assert!(value(&s, "fleetboard_hub_store_revision", &[]) > revision_before);
    let ok = |call| [("call", call), ("result", "ok")];
    assert_eq!(
        value(&s, "fleetboard_hub_requests_total", &ok("tokens/create")),
        1.0
    );
    assert_eq!(value(&s, "fleetboard_hub_requests_total", &ok("join")), 1.0);
    assert_eq!(
        value(
            &s,
            "fleetboard_hub_requests_total",
            &[("call", "join"), ("result", "error")]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "fleetboard_hub_requests_total", &ok("watch")),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "fleetboard_hub_request_duration_seconds",
            &[("call", "join")]
        ),
        2.0
    );

    drop(watch);
    until("the closed watch to leave the gauge", &hub, |s| {
        value(s, "fleetboard_hub_watches_open", &[]) == 0.0
    })
    .await;
}

/// A member calling every 6 s (the controller publishes its gateway record every 5 s) keeps
/// one TLS connection: with a 5 s reuse window every such call made a new handshake.
#[tokio::test]
async fn a_member_calling_every_6_s_keeps_its_connection() {
    let hub = start();
    let (client, admin) = clients(&hub);
    let (join, _) = admin
        .create_token(Duration::from_secs(3600), "reuse test")
        .await
        .unwrap();
    let joined = client.join(&join, aa_request(7)).await.unwrap();
    let aa = client.with_credential(joined.credential);
    let owner = ClusterId::new("aa").unwrap();
    aa.publish(&owner, "gateway", b"0").await.unwrap();
    let accepted = |s: &Scrape| {
        value(
            s,
            "fleetboard_hub_connections_total",
            &[("result", "accepted")],
        )
    };
    let before = accepted(&scrape(hub.metrics));
    assert!(before >= 1.0);
    for beat in 1..=2 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        aa.publish(&owner, "gateway", format!("{beat}").as_bytes())
            .await
            .unwrap();
    }
    let s = scrape(hub.metrics);
    assert_eq!(
        accepted(&s),
        before,
        "no new connection for calls 6 s apart"
    );
    assert_eq!(
        value(
            &s,
            "fleetboard_hub_connections_total",
            &[("result", "refused")]
        ),
        0.0
    );
}

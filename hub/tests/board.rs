//! The fleet board in a real headless browser (Debian's `chromium`, driven over DevTools):
//! a real `fleet-hub serve`, real members joined through the API publishing real `node/*`,
//! `gateway`, `export/*` and `import/*` records, the admin's relay record; the page opened
//! through a one-time login link, screenshotted, its DOM asserted, then changes (a cluster
//! joining, a gateway record with more bytes, a cluster removed) seen without a reload.
//!
//! The browser is started with `--ignore-certificate-errors`: the hub's certificate is
//! signed by its own CA, which a headless profile has no way to trust short of an NSS
//! database; the pinning of that CA is the API client's job and tested there.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::browser::Browser;
use common::hub::{HubProcess, quick_options};
use fleet_hub::registry::{ClusterId, JoinRequest, PublicKey};
use fleet_hub_api::client::HubClient;
use fleet_hub_api::model::RelayRecord;
use serde_json::json;

const HOSTILE_NODE: &str = "<img src=x onerror=\"window.pwned=1\">";
const HOSTILE_GATEWAY_NODE: &str = "<script>window.pwned=2</script>";
const HOSTILE_LABEL: &str = "\"><svg onload=\"window.pwned=3\">";
const HOSTILE_SERVICE: &str = "<iframe srcdoc=x>";

fn key(n: u8) -> PublicKey {
    PublicKey::from_bytes([n; 32])
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn join(hub: &HubProcess, id: &str, n: u8) -> HubClient {
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(600), "")
        .await
        .unwrap();
    let client = HubClient::new([hub.endpoint()], hub.ca_hash(), quick_options()).unwrap();
    let joined = client
        .join(
            &join,
            JoinRequest {
                cluster: ClusterId::new(id).unwrap(),
                public_key: key(n),
                endpoint: None,
            },
        )
        .await
        .unwrap();
    client.with_credential(joined.credential)
}

async fn publish(member: &HubClient, owner: &str, name: &str, value: serde_json::Value) {
    member
        .publish(
            &ClusterId::new(owner).unwrap(),
            name,
            &serde_json::to_vec(&value).unwrap(),
        )
        .await
        .unwrap();
}

/// A `gateway` record: `peers` are (public key, rx bytes) pairs.
fn gateway(node: &str, own: u8, updated_at: u64, peers: &[(PublicKey, u64)]) -> serde_json::Value {
    json!({
        "node": node, "holder": "h1", "backend": "userspace",
        "public_key": key(own).to_string(), "listen_port": 51820, "updated_at": updated_at,
        "peers": peers.iter().map(|(k, rx)| json!({
            "public_key": k.to_string(), "endpoint": "198.51.100.7:51820",
            "last_handshake": updated_at - 2, "rx_bytes": rx, "tx_bytes": rx / 2,
        })).collect::<Vec<_>>(),
    })
}

fn node(subnet: &str, ip: &str) -> serde_json::Value {
    json!({"subnet": subnet, "underlay_ip": ip})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_draws_the_fleet_and_follows_it_live_in_a_real_browser() {
    let hub = HubProcess::start(&[]).await;
    let admin = hub.admin();
    let relay_key = key(9);
    admin
        .publish_relay(
            &RelayRecord {
                id: RelayRecord::id_for(&relay_key),
                public_key: relay_key,
                endpoint: "203.0.113.1:51820".parse().unwrap(),
                expires_at: 0,
                instance: String::new(),
            },
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    let aa = join(&hub, "aa", 1).await;
    let bb = join(&hub, "bb", 2).await;
    // Both run a controller (a held lease): their services are live, not withdrawn.
    for m in [&aa, &bb] {
        assert!(
            m.acquire_lease("ctl", Duration::from_secs(3600))
                .await
                .unwrap()
                .granted
        );
    }
    let t0 = now();
    publish(&aa, "aa", "node/a1", node("100.96.0.0/26", "192.0.2.1")).await;
    publish(
        &aa,
        "aa",
        &format!("node/{HOSTILE_NODE}"),
        node("100.96.0.64/26", "192.0.2.2"),
    )
    .await;
    publish(&bb, "bb", "node/b1", node("100.96.16.0/26", "192.0.2.11")).await;
    // aa talks to bb directly and to the relay; bb only through the relay.
    publish(
        &aa,
        "aa",
        "gateway",
        gateway(
            HOSTILE_GATEWAY_NODE,
            1,
            t0,
            &[(key(2), 1000), (relay_key, 0)],
        ),
    )
    .await;
    publish(
        &bb,
        "bb",
        "gateway",
        gateway("b1", 2, t0, &[(relay_key, 500)]),
    )
    .await;
    publish(
        &aa,
        "aa",
        "export/default/web",
        json!({
            "type": "ClusterSetIP", "created_at_ms": 1, "labels": {"team": HOSTILE_LABEL},
            "ports": [{"port": 80}],
        }),
    )
    .await;
    publish(
        &aa,
        "aa",
        &format!("export/default/{HOSTILE_SERVICE}"),
        json!({
            "type": "ClusterSetIP", "created_at_ms": 1,
        }),
    )
    .await;
    publish(
        &bb,
        "bb",
        "import/default/web",
        json!({
            "type": "ClusterSetIP", "ips": ["100.112.0.10"], "ports": [],
            "clusters": [{"cluster": "aa", "live": true, "endpoints": []}],
        }),
    )
    .await;

    // Only the admin mints login links, and the admin credential is never in one.
    let refused = aa.board_login().await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(fleet_hub_api::wire::ErrorCode::PermissionDenied),
        "{refused}"
    );
    let login = admin.board_login().await.unwrap();
    assert!(
        login.path.starts_with("/board/login?token="),
        "{}",
        login.path
    );
    let admin_secret = hub.admin_credential().expose();
    assert!(!login.path.contains(&admin_secret));
    // The operator's way: `fleet-hub board-url` prints the link.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-hub"))
        .arg("--data-dir")
        .arg(hub.data_dir())
        .args(["--hub", &hub.endpoint(), "board-url"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let origin = format!("https://{}", hub.endpoint());
    let token = link
        .strip_prefix(&format!("{origin}/board/login?token="))
        .unwrap_or_else(|| panic!("board-url printed {link}"));
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{link}"
    );
    assert!(!link.contains(&admin_secret));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&admin_secret));

    let mut browser = Browser::launch(&["--ignore-certificate-errors"]);
    browser.navigate(&link);
    browser.wait_for(
        "location.pathname === '/board' && document.readyState === 'complete' && document.querySelectorAll('#clusters tr.cluster').length === 2",
        Duration::from_secs(30),
        "the board with clusters aa and bb",
    );
    let shot = browser.screenshot();
    let png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-board.png");
    std::fs::write(&png, &shot).unwrap();
    eprintln!("screenshot: {} ({} bytes)", png.display(), shot.len());
    assert_eq!(&shot[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        shot.len() > 10_000,
        "a {}-byte screenshot is blank",
        shot.len()
    );

    // Clusters, nodes, the relay, both kinds of edge, services with their exporters.
    let text = |b: &mut Browser, selector: &str| {
        b.eval(&format!("document.querySelector('{selector}').innerText"))
            .as_str()
            .unwrap()
            .to_string()
    };
    let clusters = text(&mut browser, "#clusters");
    assert!(
        clusters.contains("aa") && clusters.contains("bb"),
        "{clusters}"
    );
    assert!(
        clusters.contains("a1 (100.96.0.0/26, 192.0.2.1)"),
        "{clusters}"
    );
    assert!(
        clusters.contains("b1 (100.96.16.0/26, 192.0.2.11)"),
        "{clusters}"
    );
    let relays = text(&mut browser, "#relays");
    assert!(
        relays.contains(&RelayRecord::id_for(&relay_key)),
        "{relays}"
    );
    let edges = browser.eval(
        "[...document.querySelectorAll('#map g.edge')].map(g => g.getAttribute('class') + ' ' + g.dataset.from + '>' + g.dataset.to)",
    );
    let relay_name = format!("relay {}", RelayRecord::id_for(&relay_key));
    assert_eq!(
        edges,
        json!([
            "edge direct aa>bb",
            format!("edge relayed aa>{relay_name}"),
            format!("edge relayed bb>{relay_name}"),
        ]),
    );
    let tunnels = text(&mut browser, "#tunnels");
    assert!(
        tunnels.contains("direct") && tunnels.contains("relay"),
        "{tunnels}"
    );
    assert!(tunnels.contains("ago"), "handshake ages: {tunnels}");
    let services = text(&mut browser, "#services");
    assert!(services.contains("default/web\taa\tbb"), "{services}");

    // Hostile names are shown as text and never run or parsed as markup.
    let body = text(&mut browser, "body");
    for hostile in [
        HOSTILE_NODE,
        HOSTILE_GATEWAY_NODE,
        HOSTILE_LABEL,
        HOSTILE_SERVICE,
    ] {
        assert!(
            body.contains(hostile),
            "{hostile} not shown as text: {body}"
        );
    }
    assert_eq!(browser.eval("typeof window.pwned"), json!("undefined"));
    assert_eq!(
        browser.eval("document.querySelectorAll('#board img, #board script, #board iframe, #board svg svg').length"),
        json!(0)
    );

    // The session cookie: HttpOnly (scripts cannot read it), Secure, SameSite=Strict.
    assert_eq!(browser.eval("document.cookie"), json!(""));
    let cookies = browser.call(
        "Network.getCookies",
        json!({"urls": [format!("{origin}/board")]}),
    );
    let cookie = &cookies["cookies"][0];
    assert_eq!(cookie["name"], "fleet_board", "{cookies}");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");

    // Live: changes appear without a reload (the marker would not survive one).
    browser.eval("window.sameDocument = 'yes'");
    browser.wait_for(
        "window.fleetBoardUpdates >= 1",
        Duration::from_secs(15),
        "the event stream",
    );
    let cc = join(&hub, "cc", 3).await;
    publish(&cc, "cc", "node/c1", node("100.96.32.0/26", "192.0.2.21")).await;
    browser.wait_for(
        "[...document.querySelectorAll('#clusters tr.cluster')].some(r => r.dataset.cluster === 'cc' && r.innerText.includes('c1'))",
        Duration::from_secs(15),
        "cluster cc joining",
    );
    // Throughput: aa's next gateway record, 10 s later by its clock, 20 KiB more received.
    publish(
        &aa,
        "aa",
        "gateway",
        gateway(
            HOSTILE_GATEWAY_NODE,
            1,
            t0 + 10,
            &[(key(2), 1000 + 20 * 1024), (relay_key, 0)],
        ),
    )
    .await;
    browser.wait_for(
        "document.querySelector('#tunnels').innerText.includes('↓ 2.0 KiB/s ↑ 1.0 KiB/s')",
        Duration::from_secs(15),
        "aa→bb throughput from the byte delta",
    );
    let live = browser.screenshot();
    let live_png = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-board-live.png");
    std::fs::write(&live_png, &live).unwrap();
    eprintln!("screenshot after the live updates: {}", live_png.display());
    admin
        .remove_cluster(&ClusterId::new("bb").unwrap())
        .await
        .unwrap();
    browser.wait_for(
        "![...document.querySelectorAll('#clusters tr.cluster')].some(r => r.dataset.cluster === 'bb')",
        Duration::from_secs(15),
        "cluster bb leaving",
    );
    assert_eq!(
        browser.eval("window.sameDocument"),
        json!("yes"),
        "the page reloaded"
    );

    // The link worked once; without the cookie the board is refused.
    browser.navigate(&link);
    browser.wait_for(
        "document.title.includes('Link used or expired')",
        Duration::from_secs(15),
        "a used link refused",
    );
    browser.call("Network.clearBrowserCookies", json!({}));
    browser.navigate(&format!("{origin}/board"));
    browser.wait_for(
        "document.title.includes('Not signed in')",
        Duration::from_secs(15),
        "no session refused",
    );
    assert!(
        !browser
            .eval("document.body.innerText")
            .as_str()
            .unwrap()
            .contains("aa")
    );
    drop(browser);
    drop(hub);
}

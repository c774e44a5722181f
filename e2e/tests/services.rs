//! Service discovery end to end (KEP-1645) in the sandbox fleet: real containerd pods, real
//! fleet-nri VIP tables (nftables in the CNF netns), the real fleet-dns per member, exports made
//! with `fleetctl export` (the node-first source). Each test builds its own fleet. Needs root.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fleet_e2e::fleet::DNS_VIP;
use fleet_e2e::{Pod, SandboxFleet, poll_until, require_root};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The sandbox fleet with controllers and fleet-dns in both members.
fn fleet() -> SandboxFleet {
    let mut fleet = SandboxFleet::standard().unwrap();
    fleet.start_controllers(false).unwrap();
    fleet.start_dns("aa").unwrap();
    fleet.start_dns("bb").unwrap();
    fleet
}

/// A pod labelled `app=<app>` serving its own name over HTTP on port 80.
fn web_pod(fleet: &SandboxFleet, member: &str, node: usize, name: &str, app: &str) -> Pod {
    fleet.run_http_pod(member, node, name, app, name).unwrap()
}

fn fleetctl_ok(fleet: &SandboxFleet, member: &str, args: &[&str]) -> String {
    let out = fleet.fleetctl(member, args).unwrap();
    assert!(
        out.status.success(),
        "fleetctl {args:?} as {member}: {}",
        text(&out)
    );
    text(&out)
}

/// One HTTP GET from `client`; the body, or `None`.
fn fetch(fleet: &SandboxFleet, client: &Pod, url: &str) -> Option<String> {
    fleet
        .exec(client, &["timeout", "4", "wget", "-q", "-O", "-", url])
        .ok()
        .map(|b| b.trim().to_string())
}

/// `dig` run in `client`'s network namespace against the DNS VIP (over eth-fleet).
fn dig(fleet: &SandboxFleet, client: &Pod, args: &[&str]) -> String {
    let out = fleet
        .pod_command(client, "dig")
        .arg(format!("@{DNS_VIP}"))
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    text(&out)
}

fn dig_short(fleet: &SandboxFleet, client: &Pod, name: &str, extra: &[&str]) -> BTreeSet<String> {
    let mut args = vec![name, "+short"];
    args.extend_from_slice(extra);
    dig(fleet, client, &args)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .collect()
}

fn status_of(dig_output: &str) -> Option<String> {
    let i = dig_output.find("status: ")?;
    Some(
        dig_output[i + 8..]
            .split(',')
            .next()
            .unwrap_or_default()
            .to_string(),
    )
}

/// The bodies of `n` fetches.
fn bodies(fleet: &SandboxFleet, client: &Pod, url: &str, n: usize) -> Vec<String> {
    (0..n).filter_map(|_| fetch(fleet, client, url)).collect()
}

const WEB: &str = "http://web.default.svc.clusterset.local/";

#[test]
fn a_service_exported_in_aa_is_fetched_by_name_from_bb_and_follows_its_endpoints() {
    require_root("a_service_exported_in_aa_is_fetched_by_name_from_bb_and_follows_its_endpoints");
    let fleet = fleet();
    let web1 = web_pod(&fleet, "aa", 1, "web-1", "web");
    let web2 = web_pod(&fleet, "aa", 0, "web-2", "web");
    let client = fleet.run_pod("bb", 1, "client").unwrap();

    let t = Instant::now();
    // --wait: returns once aa's controller has published the export (what it waits for goes
    // to stderr while it waits).
    let said = fleetctl_ok(
        &fleet,
        "aa",
        &[
            "export",
            "web",
            "-n",
            "default",
            "--selector",
            "app=web",
            "--port",
            "http:tcp:80",
            "--wait",
            "30s",
        ],
    );
    assert!(said.contains("its controller published it with"), "{said}");
    poll_until("web by name from bb", Duration::from_secs(30), || {
        fetch(&fleet, &client, WEB)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    eprintln!("export to first fetch by name: {:?}", t.elapsed());
    let vip = dig_short(&fleet, &client, "web.default.svc.clusterset.local", &[]);
    assert_eq!(vip.len(), 1, "one ClusterSetIP: {vip:?}");
    let vip = vip.into_iter().next().unwrap();
    assert!(vip.starts_with("100.112."), "a VIP of bb's range: {vip}");
    assert_ne!(vip, DNS_VIP);
    let seen: BTreeSet<String> = bodies(&fleet, &client, WEB, 30).into_iter().collect();
    assert_eq!(
        seen,
        BTreeSet::from(["web-1".to_string(), "web-2".to_string()]),
        "both of aa's endpoints answer"
    );
    // The pods of bb use the name through their resolv.conf (search path too).
    assert_eq!(
        fetch(&fleet, &client, "http://web/")
            .as_deref()
            .map(|b| b.starts_with("web-")),
        Some(true),
        "search path default.svc.clusterset.local"
    );

    // bb exports the same service: its endpoint joins.
    let web3 = web_pod(&fleet, "bb", 0, "web-3", "web");
    fleetctl_ok(
        &fleet,
        "bb",
        &[
            "export",
            "web",
            "-n",
            "default",
            "--selector",
            "app=web",
            "--port",
            "http:tcp:80",
        ],
    );
    poll_until(
        "bb's endpoint behind the VIP",
        Duration::from_secs(30),
        || {
            bodies(&fleet, &client, WEB, 10)
                .iter()
                .any(|b| b == "web-3")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));

    // aa's pods go: only bb's endpoint remains.
    fleet.delete_pod(&web1).unwrap();
    fleet.delete_pod(&web2).unwrap();
    poll_until("only web-3 answers", Duration::from_secs(30), || {
        let b = bodies(&fleet, &client, WEB, 10);
        (b.len() == 10 && b.iter().all(|b| b == "web-3")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));

    let services = fleetctl_ok(&fleet, "bb", &["services"]);
    assert!(services.contains("default/web"), "{services}");

    // Unexport everywhere: NXDOMAIN, and the VIP stops answering.
    fleetctl_ok(&fleet, "aa", &["unexport", "web", "-n", "default"]);
    fleetctl_ok(&fleet, "bb", &["unexport", "web", "-n", "default"]);
    poll_until("NXDOMAIN after unexport", Duration::from_secs(30), || {
        (status_of(&dig(&fleet, &client, &["web.default.svc.clusterset.local"])).as_deref()
            == Some("NXDOMAIN"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    poll_until("the VIP refuses", Duration::from_secs(30), || {
        fetch(&fleet, &client, &format!("http://{vip}/"))
            .is_none()
            .then_some(())
    })
    .unwrap();
    let again = fleet
        .fleetctl("aa", &["unexport", "web", "-n", "default"])
        .unwrap();
    assert!(!again.status.success(), "unexporting twice is an error");
    drop(web3);
}

#[test]
fn headless_exports_resolve_per_pod_and_conflicting_exports_get_the_keps_conditions() {
    require_root(
        "headless_exports_resolve_per_pod_and_conflicting_exports_get_the_keps_conditions",
    );
    let fleet = fleet();
    let db1 = web_pod(&fleet, "aa", 0, "db-1", "db");
    let db2 = web_pod(&fleet, "aa", 1, "db-2", "db");
    let client = fleet.run_pod("bb", 1, "client").unwrap();
    fleetctl_ok(
        &fleet,
        "aa",
        &[
            "export",
            "db",
            "--selector",
            "app=db",
            "--port",
            "http:tcp:80",
            "--headless",
        ],
    );
    let want = BTreeSet::from([db1.fleet_ip.clone(), db2.fleet_ip.clone()]);
    poll_until("the headless name", Duration::from_secs(30), || {
        (dig_short(&fleet, &client, "db.default.svc.clusterset.local", &[]) == want).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    // Over TCP, through the same VIP, the same answer.
    assert_eq!(
        dig_short(
            &fleet,
            &client,
            "db.default.svc.clusterset.local",
            &["+tcp"]
        ),
        want
    );
    assert_eq!(
        dig_short(
            &fleet,
            &client,
            "db-1.aa.db.default.svc.clusterset.local",
            &[]
        ),
        BTreeSet::from([db1.fleet_ip.clone()])
    );
    // SRV for the named port points at the per-pod names.
    let srv = dig_short(
        &fleet,
        &client,
        "_http._tcp.db.default.svc.clusterset.local",
        &["SRV"],
    );
    assert_eq!(srv.len(), 2, "{srv:?}");
    // <clusterid>.<svc>... exists but must not resolve (NOERROR, no answer).
    let out = dig(&fleet, &client, &["aa.db.default.svc.clusterset.local"]);
    assert_eq!(status_of(&out).as_deref(), Some("NOERROR"), "{out}");
    assert!(dig_short(&fleet, &client, "aa.db.default.svc.clusterset.local", &[]).is_empty());
    // Fetch a pod by its per-pod name.
    assert_eq!(
        fetch(
            &fleet,
            &client,
            "http://db-2.aa.db.default.svc.clusterset.local/"
        )
        .as_deref(),
        Some("db-2")
    );

    // Conflicts: aa exports api first with http 80; bb then with http 8080 (a port conflict)
    // and a port of its own. The oldest (aa) wins http; the union has both ports.
    fleetctl_ok(
        &fleet,
        "aa",
        &[
            "export",
            "api",
            "--selector",
            "app=db",
            "--port",
            "http:tcp:80",
        ],
    );
    std::thread::sleep(Duration::from_millis(20)); // a later creation time
    let _api = web_pod(&fleet, "bb", 0, "api-1", "api");
    fleetctl_ok(
        &fleet,
        "bb",
        &[
            "export",
            "api",
            "--selector",
            "app=api",
            "--port",
            "http:tcp:8080",
            "--port",
            "metrics:tcp:9090",
        ],
    );
    let services = poll_until(
        "both api exports aggregated",
        Duration::from_secs(30),
        || {
            let out = fleet.fleetctl("bb", &["services", "--json"]).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let exports = v["exports"].as_array()?;
            let api: Vec<_> = exports.iter().filter(|e| e["name"] == "api").collect();
            let import = v["imports"]
                .as_array()?
                .iter()
                .find(|i| i["name"] == "api" && i["cluster"] == "bb")?
                .clone();
            (api.len() == 2 && import["clusters"].as_array()?.len() == 2).then_some(v)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    for e in services["exports"].as_array().unwrap() {
        if e["name"] != "api" {
            continue;
        }
        let conflict = e["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Conflict")
            .unwrap();
        assert_eq!(conflict["status"], "True", "{e}");
        assert_eq!(conflict["reason"], "PortConflict", "{e}");
    }
    let import = services["imports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "api" && i["cluster"] == "bb")
        .unwrap();
    let ports: Vec<&str> = import["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        ports,
        ["http TCP/80", "metrics TCP/9090"],
        "aa's http wins; the union"
    );
    // The winner's definition routes: http (80) goes to aa's pods only.
    let body = poll_until("api:80 from bb", Duration::from_secs(30), || {
        fetch(&fleet, &client, "http://api.default.svc.clusterset.local/")
    })
    .unwrap();
    assert!(
        body.starts_with("db-"),
        "port 80 only to the cluster that exports 80: {body}"
    );
}

#[test]
fn a_dead_gateway_is_withdrawn_from_the_other_clusters_and_returns() {
    require_root("a_dead_gateway_is_withdrawn_from_the_other_clusters_and_returns");
    let mut fleet = fleet();
    let _web = web_pod(&fleet, "aa", 1, "web-1", "web");
    let client = fleet.run_pod("bb", 1, "client").unwrap();
    fleetctl_ok(
        &fleet,
        "aa",
        &[
            "export",
            "web",
            "--selector",
            "app=web",
            "--port",
            "http:tcp:80",
        ],
    );
    poll_until("web by name from bb", Duration::from_secs(30), || {
        fetch(&fleet, &client, WEB)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));

    let aa_live = |fleet: &SandboxFleet| -> Option<bool> {
        let out = fleet.fleetctl("bb", &["services", "--json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let import = v["imports"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == "web" && i["cluster"] == "bb")?
            .clone();
        import["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["cluster"] == "aa")?["live"]
            .as_bool()
    };
    assert_eq!(aa_live(&fleet), Some(true));
    // aa's gateway dies (its node daemon holds the userspace WireGuard device), no standby.
    let t = Instant::now();
    fleet.member_mut("aa").nodes[0].node.nri.kill9();
    poll_until("aa withdrawn in bb", Duration::from_secs(20), || {
        (aa_live(&fleet) == Some(false)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let withdrawn = t.elapsed();
    eprintln!("gateway killed → withdrawn in bb: {withdrawn:?}");
    assert!(
        fetch(&fleet, &client, WEB).is_none(),
        "the VIP no longer sends to aa"
    );
    // aa's gateway back: aa's endpoint returns.
    fleet.member_mut("aa").nodes[0].node.nri.spawn().unwrap();
    poll_until("aa back in bb", Duration::from_secs(60), || {
        fetch(&fleet, &client, WEB)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_eq!(aa_live(&fleet), Some(true));
}

//! `fleetctl` as the hub operator's tool, against a real hub in the sandbox: join tokens
//! (create, list, revoke — a revoked token no longer joins), the member list, and removing a
//! member. Needs root.

use std::process::Output;
use std::time::Duration;

use fleet_e2e::{MemberOpts, SandboxFleet, poll_until, require_root, workspace_bin};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `fleetctl <args> --hub <replica> --credential-file <hub admin.credential>` in the hub's netns
/// (the CA comes from ca.pem beside the credential).
fn admin(fleet: &SandboxFleet, args: &[&str]) -> Output {
    let r = &fleet.hub.replicas[0];
    r.netns
        .command(workspace_bin("fleetctl").to_str().unwrap())
        .args(args)
        .args(["--hub", &r.endpoint()])
        .arg("--credential-file")
        .arg(r.data_dir().join("admin.credential"))
        .output()
        .unwrap()
}

#[test]
fn fleetctl_manages_tokens_and_members_with_the_admin_credential() {
    require_root("fleetctl_manages_tokens_and_members_with_the_admin_credential");
    let mut fleet = SandboxFleet::builder()
        .member("aa", MemberOpts::nat(1))
        .start()
        .unwrap();

    let out = admin(
        &fleet,
        &["token", "create", "--ttl", "2h", "--description", "for bb"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let join = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        join.split('.').count(),
        3,
        "token id, secret, CA hash: {join}"
    );
    let id = join.split('.').next().unwrap().to_string();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shown only now"),
        "{}",
        text(&out)
    );
    // The expiry in RFC 3339 UTC, not unix seconds.
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let until = stderr
        .split("valid until ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        until.len() == 20 && until.ends_with('Z') && until.as_bytes()[10] == b'T',
        "{stderr}"
    );

    let out = admin(&fleet, &["token", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{tokens}"));
    assert_eq!(t["state"], "valid");
    assert_eq!(t["description"], "for bb");
    assert_eq!(t["expires_at_utc"].as_str(), Some(until), "{t}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(join.split('.').nth(1).unwrap()),
        "never the secret"
    );

    // -o json: the join string and the token as listed, on stdout alone.
    let out = admin(&fleet, &["token", "create", "--ttl", "1h", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let json_id = created["token"]["id"].as_str().unwrap().to_string();
    assert!(
        created["join"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{json_id}.")),
        "{created}"
    );
    assert_eq!(created["token"]["state"], "valid");
    let out = admin(&fleet, &["token", "revoke", &json_id, "-o", "json"]);
    let revoked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    let out = admin(&fleet, &["token", "revoke", "nosuchtoken"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("fleetctl token list"), "{}", text(&out));

    let out = admin(&fleet, &["token", "revoke", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = admin(&fleet, &["token", "list"]);
    assert!(text(&out).contains("revoked"), "{}", text(&out));

    // A bad lifetime and an admin-only call with a member's credential are refused clearly.
    let out = admin(&fleet, &["token", "create", "--ttl", "soon"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--ttl"), "{}", text(&out));
    let out = admin(&fleet, &["token", "create", "--ttl", "400d"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("at most 365d"), "{}", text(&out));

    // `--hub` without a port reaches the hub on 7443; a reader that goes away (`| head`) ends
    // fleetctl quietly with status 0.
    let r = &fleet.hub.replicas[0];
    let fleetctl = |args: &[&str]| {
        let mut c = r.netns.command(workspace_bin("fleetctl").to_str().unwrap());
        c.args(args)
            .args(["--hub", &r.ip, "--credential-file"])
            .arg(r.data_dir().join("admin.credential"));
        c
    };
    let out = fleetctl(&["token", "list"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = fleetctl(&["token", "list", "-o", "json"])
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(out.stderr.is_empty(), "{}", text(&out));

    // A member joins (its own token), is listed, and is removed.
    fleet.start_controllers(false).unwrap();
    let out = admin(&fleet, &["clusters", "--json"]);
    let clusters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(clusters[0]["id"], "aa", "{clusters}");
    assert!(clusters[0]["records"].as_u64().unwrap() >= 1, "{clusters}");
    let member = fleet.fleetctl("aa", &["token", "list"]).unwrap();
    assert!(
        !member.status.success(),
        "a member's credential cannot list tokens"
    );

    let out = admin(&fleet, &["cluster", "remove", "aa"]);
    assert!(out.status.success(), "{}", text(&out));
    poll_until("aa's controller to stop", Duration::from_secs(20), || {
        let m = fleet.member_mut("aa");
        m.running_controllers().is_empty().then_some(())
    })
    .unwrap();
    let out = admin(&fleet, &["cluster", "remove", "aa"]);
    assert!(
        !out.status.success(),
        "removing twice says it is not a member"
    );
    assert!(text(&out).contains("not a member"), "{}", text(&out));
    assert!(text(&out).contains("`fleetctl clusters`"), "{}", text(&out));
    let out = admin(&fleet, &["clusters"]);
    assert!(text(&out).contains("(no members)"), "{}", text(&out));
}

/// `fleetctl <args>` from `member`'s gateway node with its credential (the CA pinned by hash),
/// with extra environment (libfaketime for a skewed clock).
fn member_cmd(fleet: &SandboxFleet, member: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let m = fleet.member(member);
    m.gateway()
        .node
        .netns
        .command(workspace_bin("fleetctl").to_str().unwrap())
        .args(args)
        .args([
            "--hub",
            &fleet.hub.endpoints(),
            "--ca",
            &fleet.hub.ca_hash().unwrap(),
        ])
        .arg("--credential-file")
        .arg(m.credential_file())
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `fleetctl doctor -o json` from aa's gateway node, asking its fleet-nri (its plan, and the
/// CNF netns whose MTUs to check).
fn doctor(fleet: &SandboxFleet, env: &[(&str, &str)]) -> (Option<i32>, serde_json::Value, String) {
    let socket = fleet.member("aa").gateway().node.nri.socket();
    let out = member_cmd(
        fleet,
        "aa",
        &[
            "doctor",
            "-o",
            "json",
            "--node-socket",
            socket.to_str().unwrap(),
        ],
        env,
    );
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor -o json: {e}: {}", text(&out)));
    (out.status.code(), report, text(&out))
}

/// The findings of one check in a doctor report.
fn findings(report: &serde_json::Value, check: &str) -> Vec<serde_json::Value> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("no check {check}: {report}"))["findings"]
        .as_array()
        .unwrap()
        .clone()
}

fn state<'a>(report: &'a serde_json::Value, check: &str) -> &'a str {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .and_then(|c| c["state"].as_str())
        .unwrap_or("?")
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn fleetctl_doctor_names_what_is_broken_in_a_real_fleet() {
    require_root("fleetctl_doctor_names_what_is_broken_in_a_real_fleet");
    let mut fleet = SandboxFleet::builder()
        .member("aa", MemberOpts::nat(1))
        .start()
        .unwrap();

    // Before aa's controller runs, its node has no plan (with the hub's admin credential: aa
    // has not joined yet).
    let m = fleet.member("aa");
    let r = &fleet.hub.replicas[0];
    let out = m
        .gateway()
        .node
        .netns
        .command(workspace_bin("fleetctl").to_str().unwrap())
        .args(["doctor", "-o", "json", "--hub", &r.endpoint()])
        .arg("--node-socket")
        .arg(m.gateway().node.nri.socket())
        .arg("--credential-file")
        .arg(r.data_dir().join("admin.credential"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = findings(&report, "this-node");
    assert!(
        node[0]["problem"].as_str().unwrap().contains("has no plan"),
        "{report}"
    );

    fleet.start_controllers(false).unwrap();
    fleet.wait_nodes_ready(Duration::from_secs(60)).unwrap();

    // Healthy: every check passes, the MTU check ran against the node's real devices.
    let healthy = poll_until("doctor to find no problem", Duration::from_secs(60), || {
        let (code, report, _) = doctor(&fleet, &[]);
        (code == Some(0)).then_some(report)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", doctor(&fleet, &[]).2));
    assert_eq!(healthy["problems"], 0);
    for check in [
        "hub",
        "credential",
        "ca",
        "clock",
        "this-node",
        "node-plans",
        "tunnels",
        "mtu",
    ] {
        assert_eq!(state(&healthy, check), "ok", "{check}: {healthy}");
    }
    let table = member_cmd(&fleet, "aa", &["doctor"], &[]);
    assert!(
        text(&table).contains("no problems found"),
        "{}",
        text(&table)
    );

    // -o json is --json; -o table is the default.
    let a = member_cmd(&fleet, "aa", &["clusters", "-o", "json"], &[]);
    let b = member_cmd(&fleet, "aa", &["clusters", "--json"], &[]);
    let a: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(a, b);
    let t = member_cmd(&fleet, "aa", &["clusters", "-o", "table"], &[]);
    assert!(
        String::from_utf8_lossy(&t.stdout).starts_with("CLUSTER "),
        "{}",
        text(&t)
    );

    // This machine's clock five minutes ahead (libfaketime on fleetctl only).
    let (code, report, out) = doctor(
        &fleet,
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", "+300s"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    let clock = findings(&report, "clock");
    assert_eq!(clock.len(), 1, "{report}");
    let ahead: f64 = clock[0]["problem"]
        .as_str()
        .unwrap()
        .strip_prefix("it is ahead of the hub's by ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!((295.0..=305.0).contains(&ahead), "{report}");

    // The gateway node's underlay MTU lowered below what the fleet path needs.
    let node = &fleet.member("aa").gateway().node.netns;
    let hub_ip = fleet.hub.replicas[0].ip.clone();
    let route = node
        .command("ip")
        .args(["-j", "route", "get", &hub_ip])
        .output()
        .unwrap();
    let route: serde_json::Value = serde_json::from_slice(&route.stdout).unwrap();
    let dev = route[0]["dev"].as_str().unwrap().to_string();
    let set_mtu = |mtu: &str| {
        let s = node
            .command("ip")
            .args(["link", "set", "dev", &dev, "mtu", mtu])
            .status()
            .unwrap();
        assert!(s.success(), "ip link set dev {dev} mtu {mtu}");
    };
    set_mtu("1400");
    let (code, report, out) = doctor(&fleet, &[]);
    set_mtu("1500");
    assert_eq!(code, Some(1), "{out}");
    let mtu = findings(&report, "mtu");
    assert!(
        mtu.iter()
            .any(|f| f["subject"].as_str().unwrap().ends_with("fleet0")
                && f["problem"]
                    .as_str()
                    .unwrap()
                    .contains("exceeds the underlay")),
        "{report}"
    );

    // A hub address nobody answers: the wait is said on stderr, stdout stays JSON-clean.
    let m = fleet.member("aa");
    let out = m
        .gateway()
        .node
        .netns
        .command(workspace_bin("fleetctl").to_str().unwrap())
        .args(["status", "-o", "json", "--hub", "203.0.113.99:7443"])
        .args(["--ca", &fleet.hub.ca_hash().unwrap()])
        .arg("--credential-file")
        .arg(m.credential_file())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("waiting for the hub at 203.0.113.99:7443"),
        "{err}"
    );
    assert!(
        err.contains("next: check that `fleet-hub serve` runs at 203.0.113.99:7443"),
        "{err}"
    );

    // A removed member's credential: refused, and both doctor and a plain command say how to
    // get a new one.
    let removed = admin(&fleet, &["cluster", "remove", "aa"]);
    assert!(removed.status.success(), "{}", text(&removed));
    let (code, report, out) = doctor(&fleet, &[]);
    assert_eq!(code, Some(1), "{out}");
    let credential = findings(&report, "credential");
    assert!(
        credential[0]["fix"]
            .as_str()
            .unwrap()
            .contains("fleetctl token create"),
        "{report}"
    );
    let status = member_cmd(&fleet, "aa", &["status"], &[]);
    assert!(!status.status.success());
    assert!(text(&status).contains("--join"), "{}", text(&status));

    // A hub whose CA expires in two days (a CA made for it, the hub restarted on it).
    let replica = &mut fleet.hub.replicas[0];
    replica.kill9();
    let data = replica.data_dir();
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=fleetboard hub CA"])
        .arg("-keyout")
        .arg(data.join("ca.key"))
        .arg("-out")
        .arg(data.join("ca.pem"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    replica.spawn().unwrap();
    let out = admin(&fleet, &["doctor", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ca = findings(&report, "ca");
    assert!(
        ca[0]["problem"]
            .as_str()
            .unwrap()
            .contains("the hub's CA expires in "),
        "{report}"
    );

    // The hub down: doctor names its address and what to check.
    fleet.hub.replicas[0].kill9();
    let out = admin(&fleet, &["doctor", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hub = findings(&report, "hub");
    let endpoint = fleet.hub.replicas[0].endpoint();
    assert!(
        hub[0]["subject"].as_str().unwrap().contains(&endpoint),
        "{report}"
    );
    assert!(
        hub[0]["fix"].as_str().unwrap().contains("fleet-hub serve"),
        "{report}"
    );
    assert_eq!(state(&report, "tunnels"), "skipped");
}

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
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(join.split('.').nth(1).unwrap()),
        "never the secret"
    );

    let out = admin(&fleet, &["token", "revoke", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let out = admin(&fleet, &["token", "list"]);
    assert!(text(&out).contains("revoked"), "{}", text(&out));

    // A bad lifetime and an admin-only call with a member's credential are refused clearly.
    let out = admin(&fleet, &["token", "create", "--ttl", "soon"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--ttl"), "{}", text(&out));

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
    let out = admin(&fleet, &["clusters"]);
    assert!(text(&out).contains("(no members)"), "{}", text(&out));
}

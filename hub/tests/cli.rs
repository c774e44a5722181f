//! The `fleet-hub` binary's operator commands on a real data dir and a real etcd.

mod common;

use std::process::{Command, Output};

use common::etcd::EtcdServer;

fn fleet_hub(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleet-hub"))
        .args(args)
        .output()
        .expect("run fleet-hub")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// create → list (no secret) → revoke → list shows it revoked; bad input is a clear error.
fn token_lifecycle(store_args: &[&str]) {
    let with = |rest: &[&str]| {
        let mut args: Vec<&str> = store_args.to_vec();
        args.extend_from_slice(rest);
        fleet_hub(&args)
    };
    let created = with(&["token", "create", "--ttl", "2h", "--description", "for aa"]);
    assert!(created.status.success(), "{}", stderr(&created));
    // `<id>.<secret>`, followed by `.<CA hash>` where the hub's CA is known.
    let token = stdout(&created).trim().to_string();
    let mut parts = token.split('.');
    let (id, secret) = (parts.next().unwrap(), parts.next().expect("<id>.<secret>"));
    assert_eq!(secret.len(), 64);
    assert!(
        !stderr(&created).contains(secret),
        "the secret goes to stdout only"
    );

    let listed = with(&["token", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let text = stdout(&listed);
    assert!(
        text.contains(id) && text.contains("valid") && text.contains("for aa"),
        "{text}"
    );
    assert!(!text.contains(secret), "{text}");

    let revoked = with(&["token", "revoke", id]);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let text = stdout(&with(&["token", "list"]));
    assert!(text.contains("revoked"), "{text}");

    let unknown = with(&["token", "revoke", "ffffffffffff"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no join token with id ffffffffffff"),
        "{}",
        stderr(&unknown)
    );

    let bad_ttl = with(&["token", "create", "--ttl", "soon"]);
    assert!(!bad_ttl.status.success());
    assert!(
        stderr(&bad_ttl).contains("invalid duration"),
        "{}",
        stderr(&bad_ttl)
    );

    let clusters = with(&["clusters"]);
    assert!(clusters.status.success(), "{}", stderr(&clusters));
    assert!(
        stdout(&clusters).starts_with("CLUSTER"),
        "{}",
        stdout(&clusters)
    );

    let missing = with(&["cluster", "remove", "nope"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no cluster nope"),
        "{}",
        stderr(&missing)
    );
    let bad = with(&["cluster", "remove", "Not/An/Id"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("invalid cluster id"),
        "{}",
        stderr(&bad)
    );
}

/// The offline commands on the data dir of a hub that served once and stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_on_the_embedded_store() {
    let mut hub = common::hub::HubProcess::start(&[]).await;
    hub.stop();
    let data_dir = hub.data_dir().to_str().unwrap().to_string();
    let ca_hash = hub.ca_hash().to_string();
    tokio::task::spawn_blocking(move || {
        token_lifecycle(&["--data-dir", &data_dir]);

        // The hub's CA is in the data dir: the token comes as a join string a member can use.
        let created = fleet_hub(&["--data-dir", &data_dir, "token", "create"]);
        assert!(created.status.success(), "{}", stderr(&created));
        assert!(
            stdout(&created).trim().ends_with(&format!(".{ca_hash}")),
            "{}",
            stdout(&created)
        );

        // A fleet's layout is fixed: another block size on the same data dir is refused.
        let other = fleet_hub(&["--data-dir", &data_dir, "--block-prefix", "22", "clusters"]);
        assert!(!other.status.success());
        assert!(
            stderr(&other).contains("layout of a fleet cannot change"),
            "{}",
            stderr(&other)
        );
    })
    .await
    .unwrap();
}

/// Every command that opens the store without serving refuses a data dir `serve` never made
/// (missing, or empty) and creates nothing there: a store made there would hand out tokens no
/// running hub knows.
#[test]
fn operator_commands_refuse_a_data_dir_without_a_hub_store() {
    let commands: &[&[&str]] = &[
        &["token", "create"],
        &["token", "list"],
        &["token", "revoke", "ffffffffffff"],
        &["clusters"],
        &["cluster", "remove", "aa"],
    ];
    let parent = tempfile::tempdir().unwrap();
    let missing = parent.path().join("missing").join("x");
    let empty = parent.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for dir in [&missing, &empty] {
        let dir_text = dir.to_str().unwrap();
        for command in commands {
            let mut args = vec!["--data-dir", dir_text];
            args.extend_from_slice(command);
            let refused = fleet_hub(&args);
            let err = stderr(&refused);
            assert!(
                !refused.status.success(),
                "{command:?} in {dir_text}: {err}"
            );
            assert!(
                refused.stdout.is_empty(),
                "{command:?}: {}",
                stdout(&refused)
            );
            assert!(
                err.contains(&format!("no hub store in {dir_text}"))
                    && err.contains(&format!("fleet-hub serve --data-dir {dir_text}")),
                "{command:?}: {err}"
            );
        }
    }
    assert!(!missing.exists() && !missing.parent().unwrap().exists());
    let left: Vec<_> = std::fs::read_dir(&empty).unwrap().collect();
    assert!(left.is_empty(), "created in the empty dir: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_on_etcd() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    tokio::task::spawn_blocking(move || token_lifecycle(&["--etcd", &endpoint]))
        .await
        .unwrap();
}

/// Against a serving hub (whose embedded store it cannot open), `--hub` makes the token
/// commands use the admin API; the printed join string lets a member pin the CA and join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_through_a_serving_hub() {
    use fleet_hub::api::JoinString;
    use fleet_hub::registry::{ClusterId, JoinRequest, PublicKey};
    use fleet_hub_api::client::HubClient;

    let hub = common::hub::HubProcess::start(&[]).await;
    let data_dir = hub.data_dir();
    let endpoint = hub.endpoint();
    let args = |rest: &[&str]| {
        let mut args = vec!["--data-dir", data_dir.to_str().unwrap(), "--hub", &endpoint];
        args.extend_from_slice(rest);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_fleet-hub"))
            .args(a)
            .output()
            .unwrap()
    };
    let created = tokio::task::spawn_blocking({
        let a = args(&["token", "create", "--ttl", "1h", "--description", "via api"]);
        move || run(a)
    })
    .await
    .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    let join = JoinString::parse(&stdout(&created)).expect("a join string on stdout");
    assert_eq!(join.ca_hash, hub.ca_hash());

    let member =
        HubClient::new([hub.endpoint()], join.ca_hash, common::hub::quick_options()).unwrap();
    let joined = member
        .join(
            &join,
            JoinRequest {
                cluster: ClusterId::new("aa").unwrap(),
                public_key: PublicKey::from_bytes([1; 32]),
                endpoint: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(joined.record.id.as_str(), "aa");

    let listed = tokio::task::spawn_blocking({
        let a = args(&["token", "list"]);
        move || run(a)
    })
    .await
    .unwrap();
    assert!(stdout(&listed).contains("via api"), "{}", stdout(&listed));
    assert!(
        !hub.log().contains(&join.token.expose_secret()),
        "never logged"
    );
}

/// `clusters` and `cluster remove` through a serving hub: the member is listed, removed, its
/// credential refused afterwards; removing it again (or a bad id) is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_commands_through_a_serving_hub() {
    use fleet_hub::api::ErrorCode;
    use fleet_hub::registry::{ClusterId, JoinRequest, PublicKey};
    use fleet_hub_api::client::HubClient;

    let hub = common::hub::HubProcess::start(&[]).await;
    let (join, _) = hub
        .admin()
        .create_token(std::time::Duration::from_secs(3600), "")
        .await
        .unwrap();
    let member =
        HubClient::new([hub.endpoint()], join.ca_hash, common::hub::quick_options()).unwrap();
    member
        .join(
            &join,
            JoinRequest {
                cluster: ClusterId::new("aa").unwrap(),
                public_key: PublicKey::from_bytes([1; 32]),
                endpoint: None,
            },
        )
        .await
        .unwrap();
    let data_dir = hub.data_dir().to_str().unwrap().to_string();
    let endpoint = hub.endpoint();
    let run = move |rest: &[&str]| {
        let mut args = vec!["--data-dir", data_dir.as_str(), "--hub", endpoint.as_str()];
        args.extend_from_slice(rest);
        fleet_hub(&args)
    };
    let (listed, removed, again, bad) = tokio::task::spawn_blocking(move || {
        (
            run(&["clusters"]),
            run(&["cluster", "remove", "aa"]),
            run(&["cluster", "remove", "aa"]),
            run(&["cluster", "remove", "x-"]),
        )
    })
    .await
    .unwrap();
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).contains("aa "), "{}", stdout(&listed));
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert!(
        stdout(&removed).contains("cluster aa removed"),
        "{}",
        stdout(&removed)
    );
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("no cluster aa"),
        "{}",
        stderr(&again)
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("invalid cluster id"),
        "{}",
        stderr(&bad)
    );
    let err = member.list().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated), "{err}");
}

/// `serve` accepts as many connections as its open-file limit allows less a reserve (a fixed
/// 16,384 refused members past ~5,000 clusters, each holding ~3); `--max-connections` 0, -5 or a
/// word is a clear error.
#[tokio::test]
async fn serve_sizes_its_connection_budget_from_the_open_file_limit() {
    let hub = common::hub::HubProcess::start(&[]).await;
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let want = format!(
        "max_connections={}",
        fleet_hub::limits::connection_budget(hard)
    );
    let log = hub.log();
    assert!(log.contains(&want), "{want} in:\n{log}");
    for bad in ["0", "-5", "many"] {
        let refused = fleet_hub(&["serve", "--max-connections", bad]);
        assert!(!refused.status.success(), "{bad}");
        let err = stderr(&refused);
        assert!(
            err.contains("invalid value") && err.contains("--max-connections"),
            "{bad}: {err}"
        );
    }
}

/// A log written to a file (not a terminal) is plain text: no colour escape sequences.
#[tokio::test]
async fn serve_logs_plain_text_to_a_file() {
    let hub = common::hub::HubProcess::start(&[]).await;
    let log = hub.log();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "escape sequences in:\n{log:?}");
}

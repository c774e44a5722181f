//! Issue 12 item 9: the hub reaches etcd over TLS (with a client certificate) and with etcd
//! users, refuses plain http:// to an etcd off its loopback unless forced, and keeps admin
//! credentials in the store only as hashes. Against a real etcd (Debian's 3.4) started with
//! TLS and client-certificate auth, and one with `auth enable`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::etcd::EtcdServer;
use common::hub::HubProcess;
use fleet_hub::store::{EtcdOptions, EtcdStore, Store, StoreError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleet test etcd CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "etcd",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(vec![], "hub", ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server.key", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client.key", client_key),
    }
}

fn tls_client(pki: &Pki) -> EtcdOptions {
    let mut options = EtcdOptions::new(Vec::<String>::new());
    options.ca_cert = Some(pki.ca.clone());
    options.client_cert = Some(pki.client_cert.clone());
    options.client_key = Some(pki.client_key.clone());
    options.request_timeout = Duration::from_secs(3);
    options
}

async fn tls_etcd(pki: &Pki) -> EtcdServer {
    let args = [
        format!("--cert-file={}", pki.server_cert.display()),
        format!("--key-file={}", pki.server_key.display()),
        format!("--trusted-ca-file={}", pki.ca.display()),
        "--client-cert-auth".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    EtcdServer::start_secured(&args, "https", tls_client(pki)).await
}

fn fleet_hub(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fleet-hub"))
        .args(args)
        .output()
        .expect("run fleet-hub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_uses_etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let etcd = tls_etcd(&pki).await;
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));

    // The store over TLS with the client certificate: writes, reads, watches.
    let store = EtcdStore::connect(etcd.options()).await.unwrap();
    let rev = store.put("k", b"v".to_vec()).await.unwrap();
    assert_eq!(store.get("k").await.unwrap().unwrap().mod_revision, rev);

    // Without the client certificate etcd refuses us; without the CA we refuse etcd; plain
    // http:// to the TLS port fails: each a clear error, never a silent fallback.
    let mut no_identity = etcd.options();
    no_identity.client_cert = None;
    no_identity.client_key = None;
    let err = EtcdStore::connect(no_identity).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Etcd { .. } | StoreError::Timeout { .. }),
        "{err}"
    );
    let mut no_ca = etcd.options();
    no_ca.ca_cert = None;
    let err = EtcdStore::connect(no_ca).await.unwrap_err();
    assert!(err.to_string().contains("--etcd-cacert"), "{err}");

    // The real binary with etcd's client flags: a hub serving on the TLS etcd.
    let (ca, cert, key) = (
        pki.ca.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let flags = [
        "--etcd",
        endpoint.as_str(),
        "--etcd-cacert",
        ca.as_str(),
        "--etcd-cert",
        cert.as_str(),
        "--etcd-key",
        key.as_str(),
    ];
    let hub = HubProcess::start(&flags).await;
    let (join, _) = hub
        .admin()
        .create_token(Duration::from_secs(60), "over tls")
        .await
        .unwrap();
    assert_eq!(hub.admin().list_tokens().await.unwrap().len(), 1);
    drop(join);

    // What the store holds: the CA (its key: protect etcd like ca.key), never an admin
    // credential in clear — only its hash under meta/admins/.
    let listed = store.list("").await.unwrap();
    let admin = hub.admin_credential().expose();
    for kv in &listed.items {
        let text = String::from_utf8_lossy(&kv.value);
        assert!(
            !text.contains(&admin),
            "{} holds the admin credential",
            kv.key
        );
        assert!(
            !text.contains("\"a."),
            "{} holds an admin credential",
            kv.key
        );
    }
    let hashes: Vec<&str> = listed
        .items
        .iter()
        .filter_map(|kv| kv.key.strip_prefix("meta/admins/"))
        .collect();
    assert_eq!(
        hashes,
        vec![fleet_hub::api::tls::admin_hash(&admin).unwrap().as_str()]
    );
}

fn etcdctl(endpoint: &str, user: Option<&str>, args: &[&str]) {
    let mut command = Command::new("/usr/bin/etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"));
    if let Some(user) = user {
        command.arg(format!("--user={user}"));
    }
    let out = command
        .args(args)
        .output()
        .expect("etcdctl (Debian's etcd-client)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_uses_an_etcd_user_limited_to_its_namespace() {
    let mut etcd = EtcdServer::start().await;
    let url = etcd.endpoint();
    etcdctl(
        &url,
        None,
        &["user", "add", "root", "--new-user-password=rootpw"],
    );
    etcdctl(&url, None, &["role", "add", "fleet-hub"]);
    etcdctl(
        &url,
        None,
        &[
            "role",
            "grant-permission",
            "fleet-hub",
            "--prefix=true",
            "readwrite",
            "/fleetboard/",
        ],
    );
    etcdctl(
        &url,
        None,
        &["user", "add", "hub", "--new-user-password=hubpw"],
    );
    etcdctl(&url, None, &["user", "grant-role", "hub", "fleet-hub"]);
    etcdctl(&url, None, &["auth", "enable"]);

    let with_user = |user: &str, password: &str| {
        let mut options = EtcdOptions::new([url.clone()]);
        options.user = Some(user.into());
        options.password = Some(password.into());
        options.request_timeout = Duration::from_secs(3);
        options
    };
    etcd.set_client(with_user("hub", "hubpw"));

    // Without credentials, or with a wrong password: refused.
    let anonymous = EtcdOptions::new([url.clone()]);
    assert!(EtcdStore::connect(anonymous).await.is_err());
    assert!(EtcdStore::connect(with_user("hub", "wrong")).await.is_err());
    // With them: the hub's namespace works (list, txn, watch); another namespace does not.
    let store = EtcdStore::connect(with_user("hub", "hubpw")).await.unwrap();
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("w/", start).await.unwrap();
    let rev = store.put("w/1", b"x".to_vec()).await.unwrap();
    assert_eq!(
        common::store_suite::next(&mut watch)
            .await
            .unwrap()
            .revision(),
        rev
    );
    let other = with_user("hub", "hubpw").namespace("/other/");
    // (etcd may refuse already at connect, which reads the namespace's revision.)
    if let Ok(store) = EtcdStore::connect(other).await {
        assert!(store.put("k", b"x".to_vec()).await.is_err());
    }

    // The real binary with --etcd-user and --etcd-password-file.
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "hubpw\n").unwrap();
    let password = password.display().to_string();
    let flags = [
        "--etcd",
        url.as_str(),
        "--etcd-user",
        "hub",
        "--etcd-password-file",
        password.as_str(),
    ];
    let hub = HubProcess::start(&flags).await;
    hub.admin()
        .create_token(Duration::from_secs(60), "with auth")
        .await
        .unwrap();
    assert_eq!(hub.admin().list_tokens().await.unwrap().len(), 1);
}

#[test]
fn plain_http_to_a_remote_etcd_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let started = std::time::Instant::now();
    let out = fleet_hub(&[
        "--data-dir",
        &data,
        "--etcd",
        "http://192.0.2.10:2379",
        "clusters",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refusing plain http://"), "{stderr}");
    assert!(stderr.contains("--etcd-allow-insecure"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused before any connection attempt"
    );

    // The settings check itself: loopback is fine, a remote host only when forced, TLS files
    // only with https://, https:// only with a CA.
    let check = |endpoint: &str, edit: &dyn Fn(&mut EtcdOptions)| {
        let mut options = EtcdOptions::new([endpoint]);
        edit(&mut options);
        options.check()
    };
    assert!(check("http://127.0.0.1:2379", &|_| {}).is_ok());
    assert!(check("http://[::1]:2379", &|_| {}).is_ok());
    assert!(check("localhost:2379", &|_| {}).is_ok());
    assert!(check("http://etcd.example:2379", &|_| {}).is_err());
    assert!(check("http://192.0.2.10:2379", &|o| o.allow_insecure = true).is_ok());
    assert!(check("https://192.0.2.10:2379", &|_| {}).is_err());
    assert!(
        check("https://192.0.2.10:2379", &|o| o.ca_cert =
            Some("ca.pem".into()))
        .is_ok()
    );
    assert!(
        check("http://127.0.0.1:2379", &|o| o.ca_cert =
            Some("ca.pem".into()))
        .is_err()
    );
    assert!(
        check("https://192.0.2.10:2379", &|o| {
            o.ca_cert = Some("ca.pem".into());
            o.client_cert = Some("c.pem".into());
        })
        .is_err()
    );
    assert!(check("http://127.0.0.1:2379", &|o| o.user = Some("hub".into())).is_err());
}

/// A store written by an older hub holds the admin credential in clear in `meta/identity`:
/// the first replica of this version adopts it (it keeps working as an admin credential),
/// registers it by hash and removes the clear text from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_text_admin_credential_left_by_an_older_hub_is_moved_to_a_hash() {
    let etcd = EtcdServer::start().await;
    let store = etcd.store("/fleetboard/").await;
    let ca_key = KeyPair::generate().unwrap();
    // As an older hub made it (the hub issues its server certificates under this name).
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "fleetboard hub CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let legacy = format!("a.{}", "ab".repeat(32));
    let old = serde_json::json!({
        "ca_pem": ca.pem(),
        "ca_key_pem": ca_key.serialize_pem(),
        "admin_credential": legacy,
    });
    store
        .put("meta/identity", serde_json::to_vec(&old).unwrap())
        .await
        .unwrap();

    let url = etcd.endpoint();
    let hub = HubProcess::start(&["--etcd", url.as_str()]).await;
    assert_eq!(
        hub.admin_credential().expose(),
        legacy,
        "adopted into the data dir"
    );
    let identity = store.get("meta/identity").await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&identity.value);
    assert!(!text.contains("admin_credential"), "{text}");
    let hash = fleet_hub::api::tls::admin_hash(&legacy).unwrap();
    assert!(
        store
            .get(&format!("meta/admins/{hash}"))
            .await
            .unwrap()
            .is_some()
    );
    hub.admin().list_tokens().await.unwrap();
}

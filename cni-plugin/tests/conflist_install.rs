//! The installer path: `fleet-cni conflist add|remove` on real files, and `install.sh` end to
//! end in a scratch bin dir and conf dir.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_fleet-cni");
const INSTALL_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../install.sh");

fn fleet_cni(args: &[&str]) -> Output {
    Command::new(BIN)
        .env_remove("CNI_COMMAND")
        .args(args)
        .output()
        .unwrap()
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
}

fn bridge_conflist() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "containerd-net",
        "x-vendor": {"keep": "me"},
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "x-extra": [1, 2]}
        ]
    })
}

fn text(v: &Value) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn add_to_file_keeps_other_plugins_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("10-containerd-net.conflist");
    fs::write(&f, text(&bridge_conflist())).unwrap();
    let f_str = f.to_str().unwrap();

    for round in 0..2 {
        let out = fleet_cni(&[
            "conflist",
            "add",
            "--file",
            f_str,
            "--socket",
            "/run/test.sock",
        ]);
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc = read(&f);
        let mut expected = bridge_conflist();
        expected["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "fleet-cni", "socket": "/run/test.sock"}));
        assert_eq!(
            text(&doc),
            text(&expected),
            "round {round}: order and unknown fields kept"
        );
    }

    let out = fleet_cni(&["conflist", "remove", "--file", f_str]);
    assert!(out.status.success());
    assert_eq!(text(&read(&f)), text(&bridge_conflist()));
}

#[test]
fn malformed_file_is_a_clear_error_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("10-broken.conflist");
    fs::write(&f, "{\"plugins\": [").unwrap();
    let out = fleet_cni(&["conflist", "add", "--file", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10-broken.conflist") && err.contains("not valid JSON"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&f).unwrap(), "{\"plugins\": [");

    let out = fleet_cni(&[
        "conflist",
        "add",
        "--conf-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));

    let empty = tempfile::tempdir().unwrap();
    let out = fleet_cni(&[
        "conflist",
        "add",
        "--conf-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("install the primary CNI first"));

    let out = fleet_cni(&["conflist", "frob"]);
    assert_eq!(out.status.code(), Some(2));
}

/// An unknown subcommand or argument is named, with the usage, and nothing is touched.
#[test]
fn unknown_subcommand_or_argument_is_named_with_the_usage() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("10-containerd-net.conflist");
    fs::write(&f, text(&bridge_conflist())).unwrap();
    let f_str = f.to_str().unwrap();
    for (args, want) in [
        (
            vec!["conflist", "frob"],
            "unknown conflist command \"frob\"; expected add or remove",
        ),
        (
            vec!["conflist", "frob", "--file", f_str],
            "unknown conflist command \"frob\"",
        ),
        (
            vec!["conflist", "add", "frob", "--file", f_str],
            "unexpected argument \"frob\"",
        ),
        (
            vec!["conflist", "add", "--frob", "--file", f_str],
            "unknown flag \"--frob\"",
        ),
    ] {
        let out = fleet_cni(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            err.contains("fleet-cni conflist add"),
            "usage missing: {err}"
        );
        assert!(!err.contains("exactly one of"), "{args:?}: {err}");
    }
    assert_eq!(text(&read(&f)), text(&bridge_conflist()));
}

#[test]
fn conf_dir_picks_the_lexically_first_and_converts_a_conf() {
    let dir = tempfile::tempdir().unwrap();
    let conf = json!({"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "x": true});
    fs::write(dir.path().join("10-mynet.conf"), text(&conf)).unwrap();
    fs::write(
        dir.path().join("20-other.conflist"),
        text(&bridge_conflist()),
    )
    .unwrap();

    let out = fleet_cni(&[
        "conflist",
        "add",
        "--conf-dir",
        dir.path().to_str().unwrap(),
        "--socket",
        "/s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("10-mynet.conf").exists(),
        "the .conf must not shadow the new conflist"
    );
    assert_eq!(read(&dir.path().join("10-mynet.conf.fleet-cni-orig")), conf);
    assert_eq!(
        read(&dir.path().join("10-mynet.conflist")),
        json!({"cniVersion": "0.4.0", "name": "mynet", "plugins": [conf, {"type": "fleet-cni", "socket": "/s"}]})
    );
    assert_eq!(
        read(&dir.path().join("20-other.conflist")),
        bridge_conflist(),
        "only the active file is edited"
    );

    // A .conf shadowing a .conflist of the same stem is refused rather than overwritten.
    fs::write(dir.path().join("05-twin.conf"), text(&conf)).unwrap();
    fs::write(dir.path().join("05-twin.conflist"), "precious").unwrap();
    let out = fleet_cni(&[
        "conflist",
        "add",
        "--conf-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("05-twin.conflist exists too"));
    assert_eq!(
        fs::read_to_string(dir.path().join("05-twin.conflist")).unwrap(),
        "precious"
    );
}

#[test]
fn install_sh_installs_idempotently_and_uninstalls() {
    let root = tempfile::tempdir().unwrap();
    let (bin_dir, conf_dir) = (root.path().join("bin"), root.path().join("net.d"));
    fs::create_dir(&conf_dir).unwrap();
    let list = conf_dir.join("10-containerd-net.conflist");
    fs::write(&list, text(&bridge_conflist())).unwrap();
    let install = |extra: &[&str]| {
        let out = Command::new("sh")
            .arg(INSTALL_SH)
            .args([
                "--bin-dir",
                bin_dir.to_str().unwrap(),
                "--conf-dir",
                conf_dir.to_str().unwrap(),
            ])
            .args(["--binary", BIN, "--socket", "/run/fleet-test.sock"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    install(&[]);
    install(&[]);
    assert_eq!(
        fs::read(bin_dir.join("fleet-cni")).unwrap(),
        fs::read(BIN).unwrap()
    );
    let plugins = read(&list)["plugins"].as_array().unwrap().clone();
    assert_eq!(plugins.len(), 3);
    assert_eq!(
        plugins[2],
        json!({"type": "fleet-cni", "socket": "/run/fleet-test.sock"})
    );

    install(&["--uninstall"]);
    install(&["--uninstall"]);
    assert!(!bin_dir.join("fleet-cni").exists());
    assert_eq!(text(&read(&list)), text(&bridge_conflist()));
}

//! The released binary refuses a config with a number out of range before it touches
//! anything: it exits non-zero, names the field, the value and the range, and never serves.

use std::process::Command;

fn run_with_config(json: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.json");
    std::fs::write(&path, json).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-nri"))
        .arg("--config")
        .arg(&path)
        .arg("--no-nri")
        .arg("--socket")
        .arg(dir.path().join("node.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stderr)
}

#[test]
fn out_of_range_numbers_stop_the_daemon_with_the_field_value_and_range() {
    for (json, want) in [
        (
            r#"{"local":{"mtu":0}}"#,
            "local.mtu is 0, outside the allowed range 1280..=8950",
        ),
        (
            r#"{"local":{"mtu":999999}}"#,
            "local.mtu is 999999, outside the allowed range 1280..=8950",
        ),
        (
            r#"{"local":{"overlay_vni":4294967295}}"#,
            "local.overlay_vni is 4294967295, outside the allowed range 1..=16777215",
        ),
        (
            r#"{"local":{"overlay_port":0}}"#,
            "local.overlay_port is 0, outside the allowed range 1..=65535",
        ),
    ] {
        let (ok, stderr) = run_with_config(json);
        assert!(!ok, "{json} was accepted: {stderr}");
        assert!(stderr.contains(want), "{json}: {stderr}");
        assert!(stderr.contains("invalid config"), "{json}: {stderr}");
        assert!(!stderr.contains("fleet-nri serving"), "{json}: {stderr}");
    }
}

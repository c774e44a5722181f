//! `fleet-controller` refuses what it can check locally at start — out-of-range numbers, zero
//! durations, a broken credential — with a clear message and a non-zero exit, before contacting
//! any hub or node (none exists here), and says at once what a standby replica (no credential,
//! no join string) waits for. Needs no root.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fleet-controller");

/// The binary with `args`, no join string in its environment and outside Kubernetes, its
/// stderr piped.
fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .args(args)
        .env("FLEET_JOIN", "")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the binary to its exit (killed and failed after 20 s: it must not wait); (code, stderr).
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = spawn(args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "fleet-controller {args:?} still running after 20 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary until its stderr has a line containing `needle` (failing after 20 s or if
/// it exits first), then kills it by its PID; the stderr read so far.
fn run_until(args: &[&str], needle: &str) -> String {
    use std::io::BufRead;
    let mut child = spawn(args);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(needle) {
                    break true;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                break false;
            }
            Err(_) => {}
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found,
        "fleet-controller {args:?}: no line with {needle:?}:\n{seen}"
    );
    seen
}

/// `run` flags for cluster `aa` with the credential at `credential`, no hub or node behind.
fn run_args<'a>(credential: &'a str, data: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--cluster",
        "aa",
        "--hub",
        "127.0.0.1:1",
        "--ca",
        "0101010101010101010101010101010101010101010101010101010101010101",
        "--credential-file",
        credential,
        "--data-dir",
        data,
        "--nodes",
        "/nonexistent/nodes.json",
        "--gateway-node",
        "n1",
        "--leader-election",
        "hub",
        "--kubernetes",
        "off",
    ];
    args.extend_from_slice(extra);
    args
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn node_api_certs_years_out_of_range_are_refused_by_the_flag_parser() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c9");
    for years in ["0", "101", "65535"] {
        let (code, err) = run_to_exit(&["node-api-certs", "--out", path(&out), "--years", years]);
        assert_eq!(code, Some(2), "--years {years}: {err}");
        assert!(err.contains("--years"), "--years {years}: {err}");
        assert!(!err.contains("panicked"), "--years {years}: {err}");
        assert!(!out.exists(), "--years {years} wrote {}", out.display());
    }
    let (code, err) = run_to_exit(&["node-api-certs", "--out", path(&out), "--years", "0"]);
    assert!(err.contains("1..=100"), "{err}");
    assert_eq!(code, Some(2));
    let (code, err) = run_to_exit(&["node-api-certs", "--out", path(&out), "--years", "100"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.join("controller/tls.crt").exists());
}

#[test]
fn a_broken_credential_fails_at_start_and_a_standby_says_what_it_waits_for() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let absent = dir.path().join("aa.credential");

    // A standby replica: it waits, and says for what before anything else.
    let err = run_until(&run_args(path(&absent), path(&data), &[]), "no join string");
    assert!(
        err.contains("waiting for another replica") && err.contains("--join"),
        "{err}"
    );

    let broken = dir.path().join("broken.credential");
    std::fs::write(&broken, "garbage").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, err) = run_to_exit(&run_args(path(&broken), path(&data), &[]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a member credential"), "{err}");

    let (code, err) = run_to_exit(&run_args(path(&absent), path(&data), &["--join", "x.y"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--join: expected"), "{err}");
    assert!(!absent.exists());
}

#[test]
fn zero_and_malformed_durations_say_which_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let (credential, data) = (dir.path().join("c"), dir.path().join("d"));
    for (flag, value, expected) in [
        ("--lease-ttl", "0s", "must be positive"),
        ("--status-interval", "0s", "must be positive"),
        ("--endpoint-poll-interval", "0ms", "must be positive"),
        ("--lease-ttl", "3h", "use a whole number with ms, s or m"),
        ("--status-interval", "99999m", "too long"),
    ] {
        let (code, err) = run_to_exit(&run_args(path(&credential), path(&data), &[flag, value]));
        assert_eq!(code, Some(1), "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(expected),
            "{flag} {value}: {err}"
        );
    }
}

#[test]
fn a_malformed_hub_address_is_refused_before_anything_dials_it() {
    let dir = tempfile::tempdir().unwrap();
    let (credential, data) = (dir.path().join("c"), dir.path().join("d"));
    for (hub, expected) in [
        ("127.0.0.1:99999", "1 to 65535"),
        ("http://127.0.0.1:7443", "not a URL"),
        ("", "empty"),
    ] {
        let mut args = run_args(path(&credential), path(&data), &[]);
        let at = args.iter().position(|a| *a == "--hub").unwrap();
        args[at + 1] = hub;
        let (code, err) = run_to_exit(&args);
        assert_eq!(code, Some(2), "--hub {hub:?}: {err}");
        assert!(
            err.contains("--hub") && err.contains(expected),
            "--hub {hub:?}: {err}"
        );
    }
}

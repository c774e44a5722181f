//! Every shell script of the repository passes `shellcheck` (installed by
//! scripts/install-deps.sh), and every sandbox test `e2e/kind.sh` names as the proof of one of
//! its steps exists (a renamed test would otherwise leave the script pointing at nothing).
//! `e2e/kind.sh` itself needs a container engine and cannot run here.
//!
//! No root needed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// `*.sh` under the repository, outside `target/` and hidden directories.
fn scripts(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            scripts(&path, out);
        } else if name.ends_with(".sh") {
            out.push(path);
        }
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let mut all = Vec::new();
    scripts(&repo(), &mut all);
    all.sort();
    assert!(
        all.iter().any(|p| p.ends_with("e2e/kind.sh")),
        "e2e/kind.sh is among the scripts: {all:?}"
    );
    let out = Command::new("shellcheck")
        .args(&all)
        .output()
        .expect("shellcheck runs (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_test_kind_sh_names_exists() {
    let kind = std::fs::read_to_string(repo().join("e2e/kind.sh")).unwrap();
    // Test names are written `like_this` in the step comments.
    let names: Vec<&str> = kind
        .lines()
        .filter(|l| l.trim_start().starts_with('#'))
        .flat_map(|l| l.split('`').skip(1).step_by(2))
        .filter(|n| {
            n.contains('_')
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(names.len() >= 8, "kind.sh names its proofs: {names:?}");
    let mut sources = String::new();
    for dir in ["e2e/tests", "controller/tests"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    for name in names {
        assert!(
            sources.contains(&format!("fn {name}(")),
            "e2e/kind.sh names the test {name}, which no e2e/tests or controller/tests file has"
        );
    }
}

//! Helpers shared by core's integration tests: a netns the test owns, and the root check.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use fleet_core::netns;

/// A netns this test created; deleted on drop, even when the test fails.
pub struct Ns(pub String);

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let name = format!("fbt-{tag}-{}", std::process::id());
        netns::ensure_named(&name).expect("create test netns");
        Ns(name)
    }
    pub fn path(&self) -> PathBuf {
        netns::named_path(&self.0)
    }
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .args(args)
            .output()
            .expect("nsenter");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = netns::delete_named(&self.0);
    }
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
}

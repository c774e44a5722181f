//! Locating the workspace's built binaries (fleet-cni, fleet-nri, ...).

use std::path::PathBuf;

/// The workspace's target directory: `CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Path of a built workspace binary: beside the running executable first (so a release
/// `fleet-sandbox` or bench uses release binaries, a test uses its profile's), then
/// `target/debug`, then `target/release`. Panics with what to do when it is not built.
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = target_dir();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from));
    let mut candidates = Vec::new();
    if let Some(dir) = exe_dir {
        candidates.push(dir.join(name));
        // Tests run from <profile>/deps.
        if let Some(profile) = dir.parent().filter(|_| dir.ends_with("deps")) {
            candidates.push(profile.join(name));
        }
    }
    candidates.push(target.join("debug").join(name));
    candidates.push(target.join("release").join(name));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "binary `{name}` not found (looked in {}): build it first with \
         cargo build --workspace --bins",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_how_to_build_it() {
        let err = std::panic::catch_unwind(|| workspace_bin("fleet-no-such-binary")).unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
        assert!(msg.contains("fleet-no-such-binary"), "{msg}");
    }
}

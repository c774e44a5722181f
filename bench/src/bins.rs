//! The binaries under test: always the release builds (debug ones would measure the wrong thing).

use std::path::PathBuf;

/// `<target>/release/<name>`, or an error saying how to build it.
pub fn release_bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = fleet_e2e::bins::target_dir().join("release").join(name);
    if !path.is_file() {
        anyhow::bail!(
            "release binary {} not found: build it with cargo build --release -p fleet-cni -p fleet-nri",
            path.display()
        );
    }
    Ok(path)
}

/// Debian's CNI plugins.
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";

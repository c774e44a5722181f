//! The two images the tests run, built locally without a registry:
//! - [`PAUSE_IMAGE`]: a static `pause` (gcc -static from `e2e/images/pause.c`), the sandbox image;
//! - [`BUSYBOX_IMAGE`]: Debian's static `/bin/busybox` with a symlink per applet in `/bin`.
//!
//! Each is a single-layer docker-archive tarball (manifest.json + config JSON + layer.tar)
//! written once per process into `<target>/fleet-e2e-images/` and imported into a containerd
//! with `ctr -a SOCK -n k8s.io images import`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::util::run_command;

/// Sandbox image reference (set as the instance's `sandbox_image`).
pub const PAUSE_IMAGE: &str = "registry.fleet.test/e2e/pause:1";
/// Workload image reference: busybox with sh, ip, wget, httpd, nc, ping, sleep, ...
pub const BUSYBOX_IMAGE: &str = "registry.fleet.test/e2e/busybox:1";

/// Paths of the built image tarballs.
#[derive(Debug, Clone)]
pub struct ImageArchives {
    pub pause: PathBuf,
    pub busybox: PathBuf,
}

static ARCHIVES: OnceLock<std::result::Result<ImageArchives, String>> = OnceLock::new();

/// Builds both archives on first call in this process, then returns the cached paths.
pub fn archives() -> Result<ImageArchives> {
    ARCHIVES
        .get_or_init(|| {
            build_archives(&crate::bins::target_dir().join("fleet-e2e-images"))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Error::Invalid(format!("building the e2e images: {e}")))
}

/// Imports both images into the containerd at `grpc_socket`, namespace `k8s.io`.
pub fn import_into(grpc_socket: &Path) -> Result<()> {
    let archives = archives()?;
    for tarball in [&archives.pause, &archives.busybox] {
        run_command(
            Command::new("ctr")
                .arg("-a")
                .arg(grpc_socket)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(tarball),
        )?;
    }
    Ok(())
}

/// Imports one image archive (docker-archive or OCI layout tar) into the containerd at
/// `grpc_socket`, namespace `k8s.io`, as `kind load image-archive` does on a kind node.
pub fn import_archive(grpc_socket: &Path, archive: &Path) -> Result<()> {
    run_command(
        Command::new("ctr")
            .arg("-a")
            .arg(grpc_socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive),
    )?;
    Ok(())
}

/// The image reference `scripts/build-images.sh` gives `name` by default (what `deploy/`
/// names): `fleetboard.local/<name>:<workspace version>`.
pub fn deploy_image(name: &str) -> String {
    format!("fleetboard.local/{name}:{}", env!("CARGO_PKG_VERSION"))
}

/// Builds the `deploy/` image archive of `name` (`fleet-nri`, `fleet-controller`, ...) with
/// `scripts/build-images.sh` from the binaries this test run uses (its profile, no cargo
/// run), into `<target>/fleet-e2e-images/deploy-<pid>/`; returns the archive's path.
pub fn build_deploy_image(name: &str) -> Result<PathBuf> {
    let nri = crate::workspace_bin("fleet-nri");
    let profile_dir = nri
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent dir", nri.display())))?;
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .ok_or_else(|| Error::Invalid(format!("no profile dir in {}", nri.display())))?;
    let target = profile_dir
        .parent()
        .ok_or_else(|| Error::Invalid(format!("no target dir above {}", nri.display())))?;
    let out = crate::bins::target_dir()
        .join("fleet-e2e-images")
        .join(format!("deploy-{}", std::process::id()));
    run_command(
        Command::new(crate::bins::workspace_root().join("scripts/build-images.sh"))
            .args(["--no-build", "--profile", profile, "--target-dir"])
            .arg(target)
            .arg("--out")
            .arg(&out)
            .arg(name),
    )?;
    Ok(out.join(format!("{name}.tar")))
}

fn build_archives(dir: &Path) -> Result<ImageArchives> {
    fs::create_dir_all(dir).map_err(|e| Error::io("creating image cache dir", dir, e))?;
    let work = dir.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(|e| Error::io("creating", &work, e))?;

    let pause_src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("images/pause.c");
    let pause_bin = work.join("pause");
    run_command(
        Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&pause_bin)
            .arg(&pause_src),
    )?;
    let pause_layer = {
        let mut layer = LayerBuilder::new();
        layer.file("pause", &read(&pause_bin)?, 0o755)?;
        layer.finish()?
    };
    let pause = dir.join("pause.tar");
    write_archive(&pause, PAUSE_IMAGE, &pause_layer, &["/pause"], &[])?;

    let busybox_layer = busybox_layer(Path::new("/bin/busybox"))?;
    let busybox = dir.join("busybox.tar");
    write_archive(&busybox, BUSYBOX_IMAGE, &busybox_layer, &[], &["sh"])?;

    let _ = fs::remove_dir_all(&work);
    Ok(ImageArchives { pause, busybox })
}

fn busybox_layer(busybox: &Path) -> Result<Vec<u8>> {
    let bin = read(busybox).map_err(|e| {
        Error::Invalid(format!(
            "{e} (install Debian's busybox-static: scripts/install-deps.sh)"
        ))
    })?;
    let list = run_command(Command::new(busybox).arg("--list"))?;
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();

    let mut layer = LayerBuilder::new();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "var",
        "var/www",
    ] {
        layer.dir(d, 0o755)?;
    }
    layer.dir("tmp", 0o1777)?;
    layer.file("bin/busybox", &bin, 0o755)?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        layer.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    layer.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    )?;
    layer.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    layer.finish()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io("reading", path, e))
}

/// Writes an uncompressed layer tar in memory with fixed ownership and mtime (reproducible).
struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl LayerBuilder {
    fn new() -> Self {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    }

    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.append(&mut h, &format!("{path}/"), &[][..])
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.append(&mut h, path, data)
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, path, target)
            .map_err(|e| Error::io("adding symlink to layer", path, e))
    }

    fn append(&mut self, h: &mut tar::Header, path: &str, data: &[u8]) -> Result<()> {
        self.tar
            .append_data(h, path, data)
            .map_err(|e| Error::io("adding to layer", path, e))
    }

    fn finish(self) -> Result<Vec<u8>> {
        self.tar
            .into_inner()
            .map_err(|e| Error::io("finishing layer", "layer.tar", e))
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The image config JSON for a single layer.
fn image_config(layer: &[u8], entrypoint: &[&str], cmd: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"],
            "Entrypoint": if entrypoint.is_empty() { serde_json::Value::Null } else { serde_json::json!(entrypoint) },
            "Cmd": if cmd.is_empty() { serde_json::Value::Null } else { serde_json::json!(cmd) },
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(layer))] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "fleet-e2e" }],
    })
}

/// Writes a docker-archive tarball for `reference` atomically (temp file + rename), so
/// concurrent test processes never import a half-written archive.
fn write_archive(
    out: &Path,
    reference: &str,
    layer: &[u8],
    entrypoint: &[&str],
    cmd: &[&str],
) -> Result<()> {
    let config = serde_json::to_vec(&image_config(layer, entrypoint, cmd))
        .map_err(|e| Error::Invalid(format!("encoding image config for {reference}: {e}")))?;
    let config_name = format!("{}.json", sha256_hex(&config));
    let layer_dir = sha256_hex(layer);
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": [format!("{layer_dir}/layer.tar")],
    }]))
    .map_err(|e| Error::Invalid(format!("encoding manifest for {reference}: {e}")))?;

    let mut archive = LayerBuilder::new();
    archive.dir(&layer_dir, 0o755)?;
    archive.file(&format!("{layer_dir}/layer.tar"), layer, 0o644)?;
    archive.file(&config_name, &config, 0o644)?;
    archive.file("manifest.json", &manifest, 0o644)?;
    let bytes = archive.finish()?;

    let tmp = out.with_extension(format!("tar.{}.tmp", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
    f.write_all(&bytes)
        .map_err(|e| Error::io("writing", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, out).map_err(|e| Error::io("renaming into place", out, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_diff_id_is_the_layer_digest() {
        let layer = b"layer bytes";
        let config = image_config(layer, &["/pause"], &[]);
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256_hex(layer))
        );
        assert_eq!(config["config"]["Entrypoint"][0], "/pause");
        assert!(config["config"]["Cmd"].is_null());
    }

    #[test]
    fn archive_has_manifest_config_and_layer() {
        let dir = std::env::temp_dir().join(format!("fe2e-archive-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut layer = LayerBuilder::new();
        layer.file("hello", b"hi", 0o644).unwrap();
        let layer = layer.finish().unwrap();
        let out = dir.join("img.tar");
        write_archive(&out, "registry.fleet.test/x:1", &layer, &[], &["sh"]).unwrap();

        let mut names = Vec::new();
        let mut manifest = String::new();
        let mut ar = tar::Archive::new(fs::File::open(&out).unwrap());
        for entry in ar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            if name == "manifest.json" {
                std::io::Read::read_to_string(&mut entry, &mut manifest).unwrap();
            }
            names.push(name);
        }
        let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        assert_eq!(m[0]["RepoTags"][0], "registry.fleet.test/x:1");
        assert!(
            names.contains(&m[0]["Config"].as_str().unwrap().to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&m[0]["Layers"][0].as_str().unwrap().to_string()),
            "{names:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! Finding and detaching mounts under a directory (containerd's shm, rootfs overlays and netns
//! bind mounts), read from `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

use crate::error::{Error, Result};

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading", "/proc/self/mountinfo", e))?;
    Ok(parse_mounts_under(&info, dir))
}

fn parse_mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or below `dir`, deepest first, repeating while mounts remain
/// (stacked mounts). Returns the mounts that could not be removed.
pub fn unmount_all_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut failures = Vec::new();
    for _ in 0..5 {
        let mounts = match mounts_under(dir) {
            Ok(m) => m,
            Err(e) => return vec![(dir.to_path_buf(), e.to_string())],
        };
        if mounts.is_empty() {
            return Vec::new();
        }
        failures.clear();
        for m in mounts {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                failures.push((m, e.to_string()));
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
100 22 0:50 / /tmp/fe2e/state/shm rw - tmpfs shm rw
101 22 0:51 / /tmp/fe2e/state/k8s.io/abc/rootfs rw - overlay overlay rw
102 22 0:4 net:[4026532] /tmp/fe2e/state/netns/cni-1 rw - nsfs nsfs rw
103 22 0:52 / /tmp/fe2e-other/x rw - tmpfs t rw
104 22 0:53 / /tmp/fe2e/with\\040space rw - tmpfs t rw
";

    #[test]
    fn finds_only_mounts_below_dir_deepest_first() {
        let got = parse_mounts_under(INFO, Path::new("/tmp/fe2e"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/tmp/fe2e/state/k8s.io/abc/rootfs"),
                PathBuf::from("/tmp/fe2e/state/netns/cni-1"),
                PathBuf::from("/tmp/fe2e/state/shm"),
                PathBuf::from("/tmp/fe2e/with space"),
            ]
        );
    }
}

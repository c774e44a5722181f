//! Node IPAM: hands out the pod addresses of one node subnet, persistently.
//!
//! Every allocated address is one file, `<dir>/<address>`, holding the attachment's JSON
//! record. A record is written completely to a temporary file first and then `link(2)`ed to
//! its final name; `link` fails if the name exists, so an address can be claimed only once,
//! atomically, whatever instant the daemon is killed at. A kill leaves at most a temporary file,
//! removed on the next open. Release is one `unlink`.
//!
//! No fsync: the guarantee needed is "never handed out twice" across daemon crashes, which the
//! page cache already gives; after a power loss every pod is recreated and re-added anyway.
//!
//! Every change of a record (`modify`, `update`) checks under the store's lock that the
//! attachment still holds its address, so a metadata update racing a release can neither bring
//! the address back nor overwrite the record of the pod that got it next.
//!
//! Addresses are handed out round-robin after the last one reserved (kept in `last_reserved`)
//! so a released address is not reused at once.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fleet_proto::node::{Attachment, AttachmentKey};

use crate::config::NodePlan;

const CURSOR_FILE: &str = "last_reserved";
const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("node subnet {subnet} has no free address ({capacity} pod addresses, all in use)")]
    Exhausted { subnet: String, capacity: usize },
    #[error("IPAM store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct NodeIpam {
    dir: PathBuf,
    plan: NodePlan,
    state: Mutex<State>,
    tmp_seq: AtomicU64,
}

struct State {
    by_address: BTreeMap<Ipv4Addr, Attachment>,
    /// Addresses whose record could not be read: never handed out, listed for an operator.
    unreadable: Vec<Ipv4Addr>,
    cursor: Ipv4Addr,
}

impl NodeIpam {
    /// Opens (or creates) the store in `dir` and loads every record.
    pub fn open(dir: &Path, plan: NodePlan) -> Result<Self, IpamError> {
        crate::private_socket::ensure_dir(dir, 0o700).map_err(io_err(dir))?;
        let mut by_address = BTreeMap::new();
        let mut unreadable = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                // A write that a kill interrupted before it was linked: it never claimed anything.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(address) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            match fs::read(entry.path()).map(|b| serde_json::from_slice::<Attachment>(&b)) {
                Ok(Ok(record)) if record.address == address => {
                    by_address.insert(address, record);
                }
                other => {
                    tracing::warn!(%address, ?other, "unreadable IPAM record; address stays reserved");
                    unreadable.push(address);
                }
            }
        }
        let cursor = fs::read_to_string(dir.join(CURSOR_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(plan.gateway());
        Ok(NodeIpam {
            dir: dir.to_owned(),
            plan,
            state: Mutex::new(State {
                by_address,
                unreadable,
                cursor,
            }),
            tmp_seq: AtomicU64::new(0),
        })
    }

    pub fn plan(&self) -> &NodePlan {
        &self.plan
    }

    /// Reserves an address for `template`'s (key, network). If that attachment already holds
    /// one, its record is returned unchanged with `false` (ADD is idempotent); otherwise the
    /// template gets the next free address (and the host veth name that goes with it), is
    /// persisted, and returned with `true`.
    pub fn reserve(&self, template: Attachment) -> Result<(Attachment, bool), IpamError> {
        let mut state = self.state.lock().expect("ipam lock");
        if let Some(found) = state.find(&template.key, &template.network) {
            return Ok((found.clone(), false));
        }
        let (first, last) = self.plan.pod_range();
        let (first, last) = (u32::from(first), u32::from(last));
        let span = last - first + 1;
        let start = u32::from(state.cursor).clamp(first - 1, last) - (first - 1);
        let mut record = template;
        record.prefix_len = self.plan.node_subnet.prefix();
        for step in 0..span {
            let candidate = Ipv4Addr::from(first + (start + step) % span);
            if state.by_address.contains_key(&candidate) || state.unreadable.contains(&candidate) {
                continue;
            }
            record.address = candidate;
            record.host_veth = host_veth_name(candidate);
            record.mac = format_mac(pod_mac(candidate));
            if self.claim(&record)? {
                state.cursor = candidate;
                self.write_cursor(candidate);
                state.by_address.insert(candidate, record.clone());
                return Ok((record, true));
            }
            // Claimed on disk by a record we did not load: keep off it.
            state.unreadable.push(candidate);
        }
        Err(IpamError::Exhausted {
            subnet: self.plan.node_subnet.to_string(),
            capacity: self.plan.pod_capacity(),
        })
    }

    /// Rewrites the record of an attachment that still holds its address (e.g. to add the MAC
    /// or pod metadata). `Ok(false)`, and nothing written, when `record`'s attachment no longer
    /// holds `record.address` — released meanwhile, or the address already handed to another
    /// pod: a stale copy can never bring an address back or overwrite another pod's record.
    /// Atomic: readers see the old or the new record, never a mix.
    pub fn update(&self, record: &Attachment) -> Result<bool, IpamError> {
        let key = record.key.clone();
        let network = record.network.clone();
        let address = record.address;
        let written = self.modify(&key, &network, |current| {
            if current.address == address {
                *current = record.clone();
            }
        })?;
        Ok(written.is_some_and(|r| r == *record))
    }

    /// Applies `change` to the current record of (`key`, `network`) and persists it, under the
    /// store's lock: the check that the attachment still holds its address and the write are
    /// one step, so a release (or a reservation of the freed address) can never interleave.
    /// The address, its veth name and the identity stay as they are whatever `change` does.
    /// `Ok(None)` when the attachment holds no address.
    pub fn modify(
        &self,
        key: &AttachmentKey,
        network: &str,
        change: impl FnOnce(&mut Attachment),
    ) -> Result<Option<Attachment>, IpamError> {
        let mut state = self.state.lock().expect("ipam lock");
        let Some(current) = state.find(key, network).cloned() else {
            return Ok(None);
        };
        let mut record = current.clone();
        change(&mut record);
        record.key = current.key.clone();
        record.network = current.network.clone();
        record.address = current.address;
        record.prefix_len = current.prefix_len;
        record.host_veth = current.host_veth.clone();
        if record == current {
            return Ok(Some(record));
        }
        let tmp = self.write_tmp(&record)?;
        let path = self.dir.join(record.address.to_string());
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        state.by_address.insert(record.address, record.clone());
        Ok(Some(record))
    }

    /// Releases the address of (`key`, `network`); `None` if it held none.
    pub fn release(
        &self,
        key: &AttachmentKey,
        network: &str,
    ) -> Result<Option<Attachment>, IpamError> {
        let mut state = self.state.lock().expect("ipam lock");
        let Some(address) = state.find(key, network).map(|r| r.address) else {
            return Ok(None);
        };
        let path = self.dir.join(address.to_string());
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(IpamError::Io { path, source: e }),
        }
        Ok(state.by_address.remove(&address))
    }

    pub fn find(&self, key: &AttachmentKey, network: &str) -> Option<Attachment> {
        self.state
            .lock()
            .expect("ipam lock")
            .find(key, network)
            .cloned()
    }

    /// Every attachment of a pod sandbox (any network, any CNI ifname).
    pub fn find_by_container(&self, container_id: &str) -> Vec<Attachment> {
        let state = self.state.lock().expect("ipam lock");
        state
            .by_address
            .values()
            .filter(|r| r.key.container_id == container_id)
            .cloned()
            .collect()
    }

    pub fn list(&self) -> Vec<Attachment> {
        self.state
            .lock()
            .expect("ipam lock")
            .by_address
            .values()
            .cloned()
            .collect()
    }

    pub fn allocated(&self) -> usize {
        let state = self.state.lock().expect("ipam lock");
        state.by_address.len() + state.unreadable.len()
    }

    /// Writes the record to a temp file and links it to its address; `Ok(false)` if the
    /// address file already exists.
    fn claim(&self, record: &Attachment) -> Result<bool, IpamError> {
        let tmp = self.write_tmp(record)?;
        let path = self.dir.join(record.address.to_string());
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(IpamError::Io { path, source: e }),
        }
    }

    fn write_tmp(&self, record: &Attachment) -> Result<PathBuf, IpamError> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{}-{}-{seq}",
            record.address,
            std::process::id()
        ));
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let body = serde_json::to_vec(record).expect("attachments serialize");
        f.write_all(&body).map_err(io_err(&tmp))?;
        Ok(tmp)
    }

    fn write_cursor(&self, address: Ipv4Addr) {
        let path = self.dir.join(CURSOR_FILE);
        let tmp = self.dir.join(format!("{TMP_PREFIX}{CURSOR_FILE}"));
        // Only fairness depends on the cursor, so a failed write is logged, not fatal.
        if let Err(e) = fs::write(&tmp, address.to_string()).and_then(|_| fs::rename(&tmp, &path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot persist IPAM cursor");
        }
    }
}

/// Name of the node-side veth end of the pod holding `address`: unique per node because the
/// address is, and within the 15 bytes Linux allows.
pub fn host_veth_name(address: Ipv4Addr) -> String {
    format!("fl{:08x}", u32::from(address))
}

/// MAC of a pod's `eth-fleet`: derived from its fleet address (unique fleet-wide), locally
/// administered, so a re-attached pod keeps its MAC and neighbours' caches stay valid.
pub fn pod_mac(address: Ipv4Addr) -> [u8; 6] {
    let o = address.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// True for names [`host_veth_name`] makes.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 10 && name.starts_with("fl") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl State {
    fn find(&self, key: &AttachmentKey, network: &str) -> Option<&Attachment> {
        self.by_address
            .values()
            .find(|r| &r.key == key && r.network == network)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use fleet_proto::node::Origin;

    use super::*;
    use crate::config::{DEFAULT_FLEET_CIDR, DEFAULT_VIP_RANGE};

    fn plan(subnet: &str) -> NodePlan {
        NodePlan::new(
            DEFAULT_FLEET_CIDR.parse().unwrap(),
            DEFAULT_VIP_RANGE.parse().unwrap(),
            subnet.parse().unwrap(),
        )
        .unwrap()
    }

    fn template(id: &str) -> Attachment {
        Attachment {
            key: AttachmentKey {
                container_id: id.into(),
                ifname: "eth0".into(),
            },
            network: "fleet".into(),
            netns: format!("/run/netns/{id}"),
            interface: "eth-fleet".into(),
            mac: String::new(),
            address: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            host_veth: String::new(),
            pod: Default::default(),
            origin: Origin::Cni,
            created_unix: 0,
        }
    }

    #[test]
    fn reserve_is_idempotent_distinct_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = NodeIpam::open(dir.path(), plan("100.96.1.0/24")).unwrap();
        let (a, new_a) = ipam.reserve(template("a")).unwrap();
        let (again, new_again) = ipam.reserve(template("a")).unwrap();
        assert!(new_a && !new_again);
        assert_eq!(a, again);
        assert_eq!(a.address, Ipv4Addr::new(100, 96, 1, 2));
        assert_eq!(a.prefix_len, 24);
        assert_eq!(a.host_veth, "fl64600102");
        let (b, _) = ipam.reserve(template("b")).unwrap();
        assert_ne!(a.address, b.address);
        drop(ipam);
        let reopened = NodeIpam::open(dir.path(), plan("100.96.1.0/24")).unwrap();
        assert_eq!(reopened.list(), vec![a.clone(), b.clone()]);
        // Round-robin: the next address is after the last reserved one, even after release.
        reopened.release(&b.key, "fleet").unwrap().unwrap();
        let (c, _) = reopened.reserve(template("c")).unwrap();
        assert_eq!(c.address, Ipv4Addr::new(100, 96, 1, 4));
    }

    #[test]
    fn exhaustion_is_an_error_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = NodeIpam::open(dir.path(), plan("100.96.1.0/29")).unwrap();
        let mut seen = HashSet::new();
        for i in 0..5 {
            let (r, _) = ipam.reserve(template(&format!("p{i}"))).unwrap();
            assert!(seen.insert(r.address));
        }
        let err = ipam.reserve(template("p5")).unwrap_err();
        assert!(
            matches!(err, IpamError::Exhausted { capacity: 5, .. }),
            "{err}"
        );
        assert_eq!(ipam.allocated(), 5);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            6,
            "5 records + cursor"
        );
    }

    #[test]
    fn leftovers_of_a_kill_are_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan("100.96.1.0/29");
        let ipam = NodeIpam::open(dir.path(), p.clone()).unwrap();
        let (a, _) = ipam.reserve(template("a")).unwrap();
        drop(ipam);
        // A temp file from an interrupted write, a garbage record and a record for an address
        // nobody in memory knows of.
        fs::write(dir.path().join(".tmp-100.96.1.5-1-0"), b"{half").unwrap();
        fs::write(dir.path().join("100.96.1.3"), b"garbage").unwrap();
        let ipam = NodeIpam::open(dir.path(), p).unwrap();
        assert!(!dir.path().join(".tmp-100.96.1.5-1-0").exists());
        let (b, _) = ipam.reserve(template("b")).unwrap();
        assert_ne!(b.address, a.address);
        assert_ne!(
            b.address,
            Ipv4Addr::new(100, 96, 1, 3),
            "unreadable record stays reserved"
        );
    }

    #[test]
    fn concurrent_reservations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = std::sync::Arc::new(NodeIpam::open(dir.path(), plan("100.96.1.0/24")).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| {
                            ipam.reserve(template(&format!("t{t}-{i}")))
                                .unwrap()
                                .0
                                .address
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 200);
    }

    /// Issue 12 item 6: a metadata update (NRI, without the pod lock) racing a release must
    /// never bring the released address back, nor overwrite the record of the pod that got the
    /// address next. A /30 holds one pod, so the next reservation always reuses the address.
    #[test]
    fn updates_racing_releases_never_resurrect_or_overwrite() {
        use std::sync::{Arc, Barrier};
        let dir = tempfile::tempdir().unwrap();
        let ipam = Arc::new(NodeIpam::open(dir.path(), plan("100.96.1.0/30")).unwrap());
        let (mut resurrected, mut overwritten) = (0, 0);
        for i in 0..500 {
            let (a, _) = ipam.reserve(template(&format!("a{i}"))).unwrap();
            let mut stale = a.clone();
            stale.pod.name = format!("meta-{i}");
            let barrier = Arc::new(Barrier::new(2));
            let deleter = {
                let (ipam, barrier, a) = (ipam.clone(), barrier.clone(), a.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ipam.release(&a.key, "fleet").unwrap();
                    ipam.reserve(template(&format!("b{i}")))
                        .ok()
                        .map(|(b, _)| b)
                })
            };
            let updater = {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let _ = ipam.update(&stale);
                })
            };
            updater.join().unwrap();
            let b = deleter.join().unwrap();
            if ipam.find(&a.key, "fleet").is_some() {
                resurrected += 1;
            }
            let on_disk: Option<Attachment> = fs::read(dir.path().join(a.address.to_string()))
                .ok()
                .map(|bytes| serde_json::from_slice(&bytes).unwrap());
            match &b {
                Some(b)
                    if ipam.find(&b.key, "fleet").as_ref() != Some(b)
                        || on_disk.as_ref() != Some(b) =>
                {
                    overwritten += 1
                }
                None if on_disk.is_some_and(|r| r.key == a.key) => resurrected += 1,
                _ => {}
            }
            for r in ipam.list() {
                ipam.release(&r.key, &r.network).unwrap();
            }
        }
        assert_eq!(
            (resurrected, overwritten),
            (0, 0),
            "(released addresses brought back, other pods' records overwritten) in 500 races"
        );
    }
}

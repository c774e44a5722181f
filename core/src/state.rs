//! What the cluster controller gave this node, persisted in the data dir so a restart (even a
//! `kill -9`) keeps it: the plan (`plan.json`), the peer nodes (`peers.json`) and the VIP
//! table (`services.json`).
//!
//! Each file is replaced atomically (write a temp file, fsync, rename, fsync the dir): a crash
//! leaves either the old or the new content, never a torn one. Unlike an IPAM record, losing
//! the plan would strand every pod, so these writes are fsynced (they are rare).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use fleet_proto::node::{PeerNode, PlanChange, VipService};

use crate::config::NodePlan;

const PLAN_FILE: &str = "plan.json";
const PEERS_FILE: &str = "peers.json";
const SERVICES_FILE: &str = "services.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("node state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node state {path} is not valid JSON ({source}); fix or remove it and resend it")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Why a new plan was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanChangeError {
    #[error(
        "node has {allocated} live pod allocations in {current}; its plan cannot change to \
         subnet {new} while pods hold addresses: drain the node (delete its pods) first"
    )]
    LiveAllocations {
        current: String,
        new: String,
        allocated: usize,
    },
}

/// Decides whether `new` may replace `current`. Any change is refused while pods hold
/// addresses: their addresses, gateway and routes all derive from the plan.
pub fn check_plan_change(
    current: Option<&NodePlan>,
    new: &NodePlan,
    allocated: usize,
) -> Result<PlanChange, PlanChangeError> {
    match current {
        Some(c) if c == new => Ok(PlanChange::Unchanged),
        Some(c) if allocated > 0 => Err(PlanChangeError::LiveAllocations {
            current: format!(
                "{} (fleet {}, VIPs {})",
                c.node_subnet, c.fleet_cidr, c.vip_range
            ),
            new: new.node_subnet.to_string(),
            allocated,
        }),
        _ => Ok(PlanChange::Applied),
    }
}

/// The node's persisted controller state in `dir`.
#[derive(Debug, Clone)]
pub struct NodeStateStore {
    dir: PathBuf,
}

impl NodeStateStore {
    pub fn new(dir: &Path) -> Self {
        NodeStateStore {
            dir: dir.to_owned(),
        }
    }

    pub fn load_plan(&self) -> Result<Option<NodePlan>, StateError> {
        self.load(PLAN_FILE)
    }

    pub fn save_plan(&self, plan: &NodePlan) -> Result<(), StateError> {
        self.save(PLAN_FILE, plan)
    }

    pub fn load_peers(&self) -> Result<Vec<PeerNode>, StateError> {
        Ok(self.load(PEERS_FILE)?.unwrap_or_default())
    }

    pub fn save_peers(&self, peers: &[PeerNode]) -> Result<(), StateError> {
        self.save(PEERS_FILE, &peers)
    }

    /// The VIP table last accepted; `None` if `set_services` never came.
    pub fn load_services(&self) -> Result<Option<Vec<VipService>>, StateError> {
        self.load(SERVICES_FILE)
    }

    pub fn save_services(&self, services: &[VipService]) -> Result<(), StateError> {
        self.save(SERVICES_FILE, &services)
    }

    fn load<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    fn save<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        // The data dir also holds the gateway's key: nobody else may write to it.
        crate::private_socket::ensure_dir(&self.dir, 0o700).map_err(io(&self.dir))?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&serde_json::to_vec_pretty(value).expect("state serializes"))
            .map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn plan_and_peers_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = NodeStateStore::new(&dir.path().join("data"));
        assert_eq!(store.load_plan().unwrap(), None);
        assert!(store.load_peers().unwrap().is_empty());
        store.save_plan(&plan("100.96.3.0/24")).unwrap();
        let peers = vec![PeerNode {
            name: "b".into(),
            underlay_ip: "192.0.2.2".parse().unwrap(),
            node_subnet: "100.96.4.0/24".into(),
            routed_cidrs: vec!["100.97.0.0/16".into()],
        }];
        store.save_peers(&peers).unwrap();
        let again = NodeStateStore::new(&dir.path().join("data"));
        assert_eq!(again.load_plan().unwrap(), Some(plan("100.96.3.0/24")));
        assert_eq!(again.load_peers().unwrap(), peers);
        assert_eq!(again.load_services().unwrap(), None);
        let services = vec![VipService {
            name: "shop/web".into(),
            vip: "100.112.0.10".parse().unwrap(),
            ports: vec![fleet_proto::node::VipPort {
                protocol: fleet_proto::node::VipProtocol::Tcp,
                port: 80,
                backends: vec!["100.96.3.7:8080".parse().unwrap()],
            }],
            affinity_timeout_seconds: Some(60),
        }];
        again.save_services(&services).unwrap();
        assert_eq!(
            NodeStateStore::new(&dir.path().join("data"))
                .load_services()
                .unwrap(),
            Some(services)
        );
        // Replacing leaves no temp file behind.
        again.save_peers(&[]).unwrap();
        assert!(again.load_peers().unwrap().is_empty());
        let names: Vec<_> = fs::read_dir(dir.path().join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    }

    #[test]
    fn a_corrupt_plan_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(PLAN_FILE), b"{not json").unwrap();
        let err = NodeStateStore::new(dir.path()).load_plan().unwrap_err();
        assert!(err.to_string().contains("plan.json"), "{err}");
    }

    #[test]
    fn a_plan_change_is_refused_while_pods_hold_addresses() {
        let a = plan("100.96.3.0/24");
        let b = plan("100.96.4.0/24");
        assert_eq!(check_plan_change(None, &a, 0), Ok(PlanChange::Applied));
        assert_eq!(
            check_plan_change(Some(&a), &a, 5),
            Ok(PlanChange::Unchanged)
        );
        assert_eq!(check_plan_change(Some(&a), &b, 0), Ok(PlanChange::Applied));
        let err = check_plan_change(Some(&a), &b, 2).unwrap_err();
        assert!(err.to_string().contains("2 live pod allocations"), "{err}");
        assert!(err.to_string().contains("drain the node"), "{err}");
        // Also a change of the fleet CIDR or VIP range alone: pods carry routes for them.
        let other_vip = NodePlan::new(
            DEFAULT_FLEET_CIDR.parse().unwrap(),
            "100.113.0.0/16".parse().unwrap(),
            "100.96.3.0/24".parse().unwrap(),
        )
        .unwrap();
        assert!(check_plan_change(Some(&a), &other_vip, 1).is_err());
    }
}

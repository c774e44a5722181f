//! fleet-nri's configuration file (JSON).
//!
//! ```json
//! {
//!   "plan": { "fleet_cidr": "100.96.0.0/12", "vip_range": "100.112.0.0/16",
//!             "node_subnet": "100.96.3.0/24" },
//!   "local": { "cnf_netns": "fleet-cnf", "bridge": "fleet0", "mtu": 1370,
//!              "data_dir": "/var/lib/fleetboard" },
//!   "socket": "/run/fleetboard/node.sock",
//!   "nri_socket": "/var/run/nri/nri.sock",
//!   "network": "fleet",
//!   "reclaim_interval_secs": 5
//! }
//! ```
//! `plan` is what the cluster controller hands out with `set_plan`. It may be left out: the
//! node then waits for the controller (ADD answers code 11 until then). A plan the controller
//! sent (persisted in `data_dir`) overrides the config's. The rest is local to the node.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_core::config::{DEFAULT_FLEET_CIDR, DEFAULT_VIP_RANGE, NodeLocal, NodePlan};
use ipnetwork::Ipv4Network;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    #[serde(default = "default_fleet_cidr")]
    pub fleet_cidr: Ipv4Network,
    #[serde(default = "default_vip_range")]
    pub vip_range: Ipv4Network,
    pub node_subnet: Ipv4Network,
}

fn default_fleet_cidr() -> Ipv4Network {
    DEFAULT_FLEET_CIDR.parse().expect("valid default")
}

fn default_vip_range() -> Ipv4Network {
    DEFAULT_VIP_RANGE.parse().expect("valid default")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    #[serde(default)]
    pub plan: Option<PlanConfig>,
    #[serde(default)]
    pub local: NodeLocal,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_nri_socket")]
    pub nri_socket: PathBuf,
    /// Network name recorded for pods repaired through NRI (CNI ADDs carry their own).
    #[serde(default = "default_network")]
    pub network: String,
    /// NRI plugin index: orders fleet-nri among other NRI plugins.
    #[serde(default = "default_plugin_idx")]
    pub plugin_idx: String,
    /// How often allocations whose pod netns is gone are reclaimed when no CNI DEL or NRI event
    /// said so: the bound on how long a vanished pod holds its address.
    #[serde(default = "default_reclaim_interval_secs")]
    pub reclaim_interval_secs: u64,
}

fn default_reclaim_interval_secs() -> u64 {
    5
}

fn default_socket() -> PathBuf {
    fleet_proto::node::DEFAULT_SOCKET.into()
}

fn default_nri_socket() -> PathBuf {
    "/var/run/nri/nri.sock".into()
}

fn default_network() -> String {
    "fleet".into()
}

fn default_plugin_idx() -> String {
    "10".into()
}

impl DaemonConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: DaemonConfig = serde_json::from_str(text)?;
        cfg.node_plan()?;
        anyhow::ensure!(
            cfg.reclaim_interval_secs > 0,
            "reclaim_interval_secs must be at least 1"
        );
        Ok(cfg)
    }

    /// The config's plan, if it has one (`None`: wait for the controller's `set_plan`).
    pub fn node_plan(&self) -> anyhow::Result<Option<NodePlan>> {
        let Some(p) = &self.plan else {
            return Ok(None);
        };
        Ok(Some(NodePlan::new(
            p.fleet_cidr,
            p.vip_range,
            p.node_subnet,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = DaemonConfig::parse(r#"{"plan":{"node_subnet":"100.96.3.0/24"}}"#).unwrap();
        assert_eq!(
            cfg.plan.as_ref().unwrap().fleet_cidr.to_string(),
            DEFAULT_FLEET_CIDR
        );
        assert_eq!(cfg.local.overlay_port, 4789);
        assert_eq!(cfg.local.bridge, "fleet0");
        assert_eq!(cfg.network, "fleet");
        assert_eq!(cfg.reclaim_interval_secs, 5);
    }

    #[test]
    fn the_plan_may_be_left_to_the_controller() {
        let cfg = DaemonConfig::parse(r#"{"local":{"data_dir":"/tmp/x"}}"#).unwrap();
        assert!(cfg.node_plan().unwrap().is_none());
    }

    #[test]
    fn bad_config_says_what_is_wrong() {
        let err = DaemonConfig::parse(r#"{"plan":{"node_subnet":"10.0.0.0/24"}}"#).unwrap_err();
        assert!(
            format!("{err:#}").contains("not inside the fleet CIDR"),
            "{err:#}"
        );
        let err = DaemonConfig::parse(r#"{"plan":{"node_subnet":"100.96.3.0/24"},"sokcet":"x"}"#)
            .unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }
}

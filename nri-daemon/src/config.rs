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
//!
//! Every number is range-checked at load ([`ConfigError::OutOfRange`] names the field, the
//! value and the range), so the daemon never starts with a value the kernel or the runtime
//! would refuse later, or would quietly replace:
//!
//! | field | range | why |
//! |---|---|---|
//! | `local.mtu` | [`MTU_RANGE`] (1280..=8950 bytes) | see [`MTU_RANGE`] |
//! | `local.overlay_vni` | [`OVERLAY_VNI_RANGE`] (1..=16777215) | 24-bit VNI, RFC 7348 §5 |
//! | `local.overlay_port` | [`OVERLAY_PORT_RANGE`] (1..=65535) | the kernel turns 0 into 8472 |
//! | `reclaim_interval_secs` | [`RECLAIM_INTERVAL_SECS_RANGE`] (1..=3600) | see there |
//! | `plugin_idx` | two digits, `00`..`99` | NRI's plugin index format |

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_core::config::{DEFAULT_FLEET_CIDR, DEFAULT_VIP_RANGE, NodeLocal, NodePlan};
use ipnetwork::Ipv4Network;
use serde::Deserialize;

/// `local.mtu`, in bytes: the MTU of pod `eth-fleet` interfaces, their veth peers, the CNF
/// bridge and the `fleetvx` VXLAN device (`docs/architecture.md`, "MTU").
///
/// - At least 1280, the smallest link MTU IPv6 allows (RFC 8200 §5): below it Linux drops
///   IPv6 from the link, and no node network needs it (one of 1280 + 50 bytes of VXLAN is
///   already smaller than any real underlay).
/// - At most 8950: a 9000-byte jumbo-frame node network, the largest in common use, less the
///   50 bytes VXLAN over IPv4 adds (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14). A
///   larger MTU leaves no room for the overlay header on any underlay; the kernel refuses
///   anything above 65535 outright.
///
/// The default, 1370, fits a 1500-byte network with VXLAN (50) and WireGuard over IPv6 (80).
pub const MTU_RANGE: RangeInclusive<u32> = 1280..=8950;

/// `local.overlay_vni`: a VXLAN network identifier is 24 bits (RFC 7348 §5). 0 is refused,
/// although the RFC allows it: it is what an unset number reads as, and every node of a
/// cluster must share the VNI, so a typo'd 0 would split the overlay silently.
pub const OVERLAY_VNI_RANGE: RangeInclusive<u32> = 1..=16_777_215;

/// `local.overlay_port`, UDP: 0 is refused because the kernel replaces a VXLAN destination
/// port of 0 with its legacy default 8472, which then never matches the config (the device
/// would be re-made on every peer update, and nodes would disagree on the port).
pub const OVERLAY_PORT_RANGE: RangeInclusive<u16> = 1..=65535;

/// `reclaim_interval_secs`, in seconds. 0 would spin; above an hour, a node whose pods die
/// without a CNI DEL or NRI event holds their addresses long enough to run its subnet dry.
pub const RECLAIM_INTERVAL_SECS_RANGE: RangeInclusive<u64> = 1..=3600;

/// Why a config that parsed as JSON is still refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A number outside its range: `field` as it is spelt in the file (`local.mtu`).
    #[error("{field} is {value}, outside the allowed range {min}..={max}: {why}")]
    OutOfRange {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
        why: &'static str,
    },
    /// `plugin_idx` is not two ASCII digits, as NRI requires.
    #[error(
        "plugin_idx is {0:?}, not two digits: NRI orders plugins by a two-digit index \
         (\"00\" to \"99\"); the runtime would refuse the registration"
    )]
    PluginIndex(String),
}

fn check_range<T: Copy + Into<u64> + PartialOrd>(
    field: &'static str,
    value: T,
    range: &RangeInclusive<T>,
    why: &'static str,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        field,
        value: value.into(),
        min: (*range.start()).into(),
        max: (*range.end()).into(),
        why,
    })
}

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
    /// NRI plugin index: orders fleet-nri among other NRI plugins. Two digits, `"00"`..`"99"`.
    #[serde(default = "default_plugin_idx")]
    pub plugin_idx: String,
    /// How often allocations whose pod netns is gone are reclaimed when no CNI DEL or NRI event
    /// said so: the bound on how long a vanished pod holds its address. Seconds, in
    /// [`RECLAIM_INTERVAL_SECS_RANGE`].
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

    /// Parses and checks a config: JSON errors, the plan's ([`fleet_core::config::PlanError`])
    /// and the ranges of every number ([`ConfigError`]).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: DaemonConfig = serde_json::from_str(text)?;
        cfg.node_plan()?;
        cfg.check_numbers()?;
        Ok(cfg)
    }

    /// Refuses numbers the kernel or the runtime would refuse, or quietly replace, later.
    pub fn check_numbers(&self) -> Result<(), ConfigError> {
        let l = &self.local;
        check_range(
            "local.mtu",
            l.mtu,
            &MTU_RANGE,
            "at least the IPv6 minimum (RFC 8200 §5), at most a 9000-byte jumbo frame less \
             50 bytes of VXLAN; on a 1500-byte node network use 1370",
        )?;
        check_range(
            "local.overlay_vni",
            l.overlay_vni,
            &OVERLAY_VNI_RANGE,
            "a VXLAN VNI is 24 bits (RFC 7348 §5) and 0 is refused; every node of the \
             cluster must use the same one",
        )?;
        check_range(
            "local.overlay_port",
            l.overlay_port,
            &OVERLAY_PORT_RANGE,
            "the kernel would replace UDP port 0 with 8472; the default is 4789 (IANA's VXLAN)",
        )?;
        check_range(
            "reclaim_interval_secs",
            self.reclaim_interval_secs,
            &RECLAIM_INTERVAL_SECS_RANGE,
            "how long a vanished pod may hold its address; the default is 5",
        )?;
        let idx = self.plugin_idx.as_bytes();
        if idx.len() != 2 || !idx.iter().all(u8::is_ascii_digit) {
            return Err(ConfigError::PluginIndex(self.plugin_idx.clone()));
        }
        Ok(())
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

    fn refusal(json: &str) -> String {
        format!("{:#}", DaemonConfig::parse(json).unwrap_err())
    }

    #[test]
    fn numbers_out_of_range_are_refused_by_field_value_and_range() {
        for (json, want) in [
            (
                r#"{"local":{"mtu":0}}"#,
                "local.mtu is 0, outside the allowed range 1280..=8950",
            ),
            (
                r#"{"local":{"mtu":1279}}"#,
                "local.mtu is 1279, outside the allowed range 1280..=8950",
            ),
            (
                r#"{"local":{"mtu":8951}}"#,
                "local.mtu is 8951, outside the allowed range 1280..=8950",
            ),
            (
                r#"{"local":{"mtu":999999}}"#,
                "local.mtu is 999999, outside the allowed range 1280..=8950",
            ),
            (
                r#"{"local":{"overlay_vni":4294967295}}"#,
                "local.overlay_vni is 4294967295, outside the allowed range 1..=16777215",
            ),
            (
                r#"{"local":{"overlay_vni":16777216}}"#,
                "local.overlay_vni is 16777216, outside the allowed range 1..=16777215",
            ),
            (
                r#"{"local":{"overlay_vni":0}}"#,
                "local.overlay_vni is 0, outside the allowed range 1..=16777215",
            ),
            (
                r#"{"local":{"overlay_port":0}}"#,
                "local.overlay_port is 0, outside the allowed range 1..=65535",
            ),
            (
                r#"{"reclaim_interval_secs":0}"#,
                "reclaim_interval_secs is 0, outside the allowed range 1..=3600",
            ),
            (
                r#"{"reclaim_interval_secs":18446744073709551615}"#,
                "reclaim_interval_secs is 18446744073709551615, outside the allowed range 1..=3600",
            ),
            (
                r#"{"plugin_idx":"1"}"#,
                "plugin_idx is \"1\", not two digits",
            ),
            (
                r#"{"plugin_idx":"1a"}"#,
                "plugin_idx is \"1a\", not two digits",
            ),
            (
                r#"{"plugin_idx":"100"}"#,
                "plugin_idx is \"100\", not two digits",
            ),
        ] {
            let err = refusal(json);
            assert!(err.contains(want), "{json}: {err}");
        }
        // Too big for the field's type at all: serde names the value and the type's range.
        let err = refusal(r#"{"local":{"mtu":-1}}"#);
        assert!(err.contains("-1") && err.contains("u32"), "{err}");
        let err = refusal(r#"{"local":{"overlay_port":65536}}"#);
        assert!(err.contains("65536") && err.contains("u16"), "{err}");
    }

    #[test]
    fn numbers_at_the_edges_of_their_ranges_load() {
        let cfg = DaemonConfig::parse(
            r#"{"plan":{"node_subnet":"100.96.3.0/24"},
                "local":{"mtu":1280,"overlay_vni":1,"overlay_port":1},
                "reclaim_interval_secs":1,"plugin_idx":"00"}"#,
        )
        .unwrap();
        assert_eq!((cfg.local.mtu, cfg.local.overlay_vni), (1280, 1));
        let cfg = DaemonConfig::parse(
            r#"{"local":{"mtu":8950,"overlay_vni":16777215,"overlay_port":65535},
                "reclaim_interval_secs":3600,"plugin_idx":"99"}"#,
        )
        .unwrap();
        assert_eq!((cfg.local.mtu, cfg.local.overlay_vni), (8950, 16_777_215));
        // The documented example, and the defaults.
        let cfg = DaemonConfig::parse(
            r#"{"plan":{"fleet_cidr":"100.96.0.0/12","vip_range":"100.112.0.0/16",
                        "node_subnet":"100.96.3.0/24"},
                "local":{"cnf_netns":"fleet-cnf","bridge":"fleet0","mtu":1370,
                         "data_dir":"/var/lib/fleetboard"},
                "socket":"/run/fleetboard/node.sock","nri_socket":"/var/run/nri/nri.sock",
                "network":"fleet","reclaim_interval_secs":5}"#,
        )
        .unwrap();
        assert_eq!(cfg.local.mtu, 1370);
        DaemonConfig::parse("{}").unwrap().check_numbers().unwrap();
    }
}

//! CNI network configs for an instance: `bridge` + `host-local` (the pod subnet) with optional
//! chained plugins after them (fleet-cni's entry is `{"type":"fleet-cni","socket":"..."}`).
//!
//! The bridge is created in the netns containerd runs in, which is why instances run in a
//! test netns by default. No `ipMasq`: nothing is NATed anywhere.

use std::fs;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::containerd::Containerd;
use crate::error::{Error, Result};

/// A bridge network. `BridgeNetwork::new("podnet", "fe2e-br0", "10.244.1.0/24")`.
#[derive(Debug, Clone)]
pub struct BridgeNetwork {
    /// Network name (also the conflist file name).
    pub name: String,
    /// Bridge interface name in containerd's netns (at most 15 bytes).
    pub bridge: String,
    /// Pod subnet for host-local, e.g. `10.244.1.0/24`.
    pub subnet: String,
    /// Routes host-local gives pods; by default only `0.0.0.0/0` via the bridge gateway
    /// (the bridge lives in a test netns with no way out).
    pub routes: Vec<String>,
    /// Plugin entries appended after bridge, in order.
    pub chained: Vec<Value>,
    pub cni_version: String,
}

impl BridgeNetwork {
    pub fn new(name: &str, bridge: &str, subnet: &str) -> Self {
        BridgeNetwork {
            name: name.to_string(),
            bridge: bridge.to_string(),
            subnet: subnet.to_string(),
            routes: vec!["0.0.0.0/0".to_string()],
            chained: Vec::new(),
            cni_version: "1.0.0".to_string(),
        }
    }

    /// Appends a chained plugin entry, e.g. `json!({"type": "fleet-cni", "socket": path})`.
    pub fn chain(mut self, plugin: Value) -> Self {
        self.chained.push(plugin);
        self
    }

    pub fn cni_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_string();
        self
    }

    /// The conflist JSON with host-local keeping its state in `ipam_data_dir`.
    pub fn conflist(&self, ipam_data_dir: &std::path::Path) -> Result<Value> {
        if self.bridge.is_empty() || self.bridge.len() > 15 {
            return Err(Error::Invalid(format!(
                "bridge name {:?} must be 1 to 15 bytes (a Linux interface name)",
                self.bridge
            )));
        }
        if !self.subnet.contains('/') {
            return Err(Error::Invalid(format!(
                "pod subnet {:?} must be a CIDR like 10.244.1.0/24",
                self.subnet
            )));
        }
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": self.subnet }]],
                "routes": self.routes.iter().map(|dst| json!({ "dst": dst })).collect::<Vec<_>>(),
                "dataDir": ipam_data_dir,
            },
        })];
        plugins.extend(self.chained.iter().cloned());
        Ok(json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "plugins": plugins,
        }))
    }

    /// Writes `10-<name>.conflist` into the instance's CNI conf dir (atomically: the temp file
    /// has no CNI extension, so containerd never loads half a file). Then wait for it with
    /// [`crate::Cri::wait_network_ready`].
    pub fn write_to(&self, containerd: &Containerd) -> Result<PathBuf> {
        let conflist = self.conflist(&containerd.ipam_dir())?;
        let dir = containerd.cni_conf_dir();
        let path = dir.join(format!("10-{}.conflist", self.name));
        let tmp = dir.join(format!(".{}.tmp", self.name));
        let text = serde_json::to_string_pretty(&conflist)
            .map_err(|e| Error::Invalid(format!("encoding conflist {}: {e}", self.name)))?;
        fs::write(&tmp, text).map_err(|e| Error::io("writing", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io("renaming into place", &path, e))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn conflist_is_bridge_host_local_then_chained() {
        let net = BridgeNetwork::new("podnet", "fe2e-br0", "10.244.1.0/24")
            .chain(json!({"type": "fleet-cni", "socket": "/run/fleet.sock"}));
        let c = net.conflist(Path::new("/tmp/ipam")).unwrap();
        assert_eq!(c["name"], "podnet");
        let plugins = c["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0]["type"], "bridge");
        assert_eq!(plugins[0]["bridge"], "fe2e-br0");
        assert_eq!(plugins[0]["isGateway"], true);
        assert_eq!(plugins[0]["ipMasq"], false);
        assert_eq!(
            plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.1.0/24"
        );
        assert_eq!(plugins[0]["ipam"]["dataDir"], "/tmp/ipam");
        assert_eq!(plugins[1]["type"], "fleet-cni");
    }

    #[test]
    fn rejects_long_bridge_name_and_bad_subnet() {
        let long = BridgeNetwork::new("n", "a-very-long-bridge-name", "10.0.0.0/24");
        assert!(
            long.conflist(Path::new("/x"))
                .unwrap_err()
                .to_string()
                .contains("15 bytes")
        );
        let bad = BridgeNetwork::new("n", "br", "10.0.0.1");
        assert!(
            bad.conflist(Path::new("/x"))
                .unwrap_err()
                .to_string()
                .contains("CIDR")
        );
    }
}

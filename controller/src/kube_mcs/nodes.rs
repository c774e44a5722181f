//! The cluster's nodes from the Kubernetes API, pure: each Node's name and its `InternalIP`
//! (the overlay's underlay address), and what changed since the last read.
//!
//! With `--nodes-from-kubernetes` these are the cluster's nodes, each `fleet-nri` reached at
//! `tcp://<InternalIP>:<port>` with mutual TLS (`crate::nodes::api_node_specs`); see
//! `controller/README.md` ("Nodes from the Kubernetes API").

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;

/// Name → InternalIP (IPv4) of every Node that has one; the others are returned by name.
pub fn api_nodes(nodes: &[Node]) -> (BTreeMap<String, Ipv4Addr>, Vec<String>) {
    let mut found = BTreeMap::new();
    let mut without_ip = Vec::new();
    for n in nodes {
        let Some(name) = n.metadata.name.clone() else {
            continue;
        };
        let ip = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        match ip {
            Some(ip) => {
                found.insert(name, ip);
            }
            None => without_ip.push(name),
        }
    }
    (found, without_ip)
}

/// A change in the cluster's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeChange {
    Added { name: String, underlay_ip: Ipv4Addr },
    Removed { name: String },
    Moved { name: String, underlay_ip: Ipv4Addr },
}

/// What differs between two reads.
pub fn node_changes(
    before: &BTreeMap<String, Ipv4Addr>,
    after: &BTreeMap<String, Ipv4Addr>,
) -> Vec<NodeChange> {
    let mut changes = Vec::new();
    for (name, ip) in after {
        match before.get(name) {
            None => changes.push(NodeChange::Added {
                name: name.clone(),
                underlay_ip: *ip,
            }),
            Some(old) if old != ip => changes.push(NodeChange::Moved {
                name: name.clone(),
                underlay_ip: *ip,
            }),
            Some(_) => {}
        }
    }
    for name in before.keys().filter(|n| !after.contains_key(*n)) {
        changes.push(NodeChange::Removed { name: name.clone() });
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, addresses: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"addresses": addresses},
        }))
        .unwrap()
    }

    #[test]
    fn nodes_by_internal_ip_and_their_changes() {
        let nodes = [
            node(
                "aa-1",
                json!([{"type": "Hostname", "address": "aa-1"},
                       {"type": "InternalIP", "address": "fd00::1"},
                       {"type": "InternalIP", "address": "172.18.0.2"}]),
            ),
            node(
                "aa-2",
                json!([{"type": "ExternalIP", "address": "203.0.113.9"}]),
            ),
            node(
                "aa-3",
                json!([{"type": "InternalIP", "address": "172.18.0.4"}]),
            ),
        ];
        let (found, without) = api_nodes(&nodes);
        assert_eq!(found["aa-1"].to_string(), "172.18.0.2");
        assert_eq!(found.len(), 2);
        assert_eq!(without, ["aa-2"]);

        let mut after = found.clone();
        after.remove("aa-1");
        after.insert("aa-3".into(), "172.18.0.5".parse().unwrap());
        after.insert("aa-4".into(), "172.18.0.6".parse().unwrap());
        assert_eq!(
            node_changes(&found, &after),
            [
                NodeChange::Moved {
                    name: "aa-3".into(),
                    underlay_ip: "172.18.0.5".parse().unwrap()
                },
                NodeChange::Added {
                    name: "aa-4".into(),
                    underlay_ip: "172.18.0.6".parse().unwrap()
                },
                NodeChange::Removed {
                    name: "aa-1".into()
                },
            ]
        );
    }
}

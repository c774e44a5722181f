//! The cluster's nodes: nodes.json, and the node API calls the controller makes on each
//! node's `fleet-nri`, behind [`NodeApi`] so the reconciler is testable with a fake.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use fleet_proto::node::{
    Attachment, ClearGatewayResult, GatewayKey, GatewayStatus, NodeClient, NodeError, PeerNode,
    PlanChange, SetGatewayRequest, SetGatewayResult, SetPlanRequest, SetServicesRequest,
    SetServicesResult, StatusResult,
};

use crate::plan::NodeSpec;

#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    #[error("cannot read the nodes file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error(
        "the nodes file {path} is not a JSON list of {{\"name\",\"socket\",\"underlay_ip\",\"netns\"}}: {reason}"
    )]
    Parse { path: String, reason: String },
    #[error("the nodes file {path} lists node {name:?} twice; node names must be unique")]
    Duplicate { path: String, name: String },
    #[error("the nodes file {path} lists no nodes")]
    Empty { path: String },
    #[error(
        "the nodes file {path} has a node with an invalid name {name:?}: use 1-63 printable \
         characters without '/' or spaces"
    )]
    BadName { path: String, name: String },
    #[error("--gateway-node {gateway:?} is not in the nodes file {path}")]
    NoGateway { path: String, gateway: String },
}

/// Reads and checks nodes.json; `gateway` must be one of its nodes.
pub fn load_nodes(path: &Path, gateway: &str) -> Result<Vec<NodeSpec>, NodesError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| NodesError::Read {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    parse_nodes(&text, &p, gateway)
}

pub fn parse_nodes(text: &str, path: &str, gateway: &str) -> Result<Vec<NodeSpec>, NodesError> {
    let nodes: Vec<NodeSpec> = serde_json::from_str(text).map_err(|e| NodesError::Parse {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if nodes.is_empty() {
        return Err(NodesError::Empty { path: path.into() });
    }
    let mut seen = BTreeSet::new();
    for n in &nodes {
        let bad = n.name.is_empty()
            || n.name.len() > 63
            || n.name
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control());
        if bad {
            return Err(NodesError::BadName {
                path: path.into(),
                name: n.name.clone(),
            });
        }
        if !seen.insert(n.name.as_str()) {
            return Err(NodesError::Duplicate {
                path: path.into(),
                name: n.name.clone(),
            });
        }
    }
    if !seen.contains(gateway) {
        return Err(NodesError::NoGateway {
            path: path.into(),
            gateway: gateway.into(),
        });
    }
    Ok(nodes)
}

/// The node API calls the controller makes.
#[async_trait::async_trait]
pub trait NodeApi: Send + Sync {
    async fn status(&self) -> Result<StatusResult, NodeError>;
    async fn get_plan(&self) -> Result<Option<SetPlanRequest>, NodeError>;
    async fn set_plan(&self, plan: SetPlanRequest) -> Result<PlanChange, NodeError>;
    async fn set_peers(&self, peers: Vec<PeerNode>) -> Result<(), NodeError>;
    async fn list_peers(&self) -> Result<Vec<PeerNode>, NodeError>;
    /// The gateway node only: make or update the cluster's WireGuard device.
    async fn set_gateway(&self, req: SetGatewayRequest) -> Result<SetGatewayResult, NodeError>;
    /// The gateway device as it is; `None` without one.
    async fn gateway_status(&self) -> Result<Option<GatewayStatus>, NodeError>;
    /// The gateway's public key (the node makes the key pair if it has none).
    async fn gateway_key(&self) -> Result<GatewayKey, NodeError>;
    /// Removes the device, its routes and its saved state.
    async fn clear_gateway(&self) -> Result<ClearGatewayResult, NodeError>;
    /// The node's pods with their fleet addresses and labels.
    async fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError>;
    /// The node's whole VIP table.
    async fn set_services(&self, req: SetServicesRequest) -> Result<SetServicesResult, NodeError>;
}

/// [`NodeApi`] over a node's socket (the blocking client, on tokio's blocking pool).
#[derive(Debug, Clone)]
pub struct NodeSocket(pub NodeClient);

impl NodeSocket {
    pub fn new(spec: &NodeSpec) -> Self {
        NodeSocket(NodeClient::new(&spec.socket, Duration::from_secs(10)))
    }

    /// Runs one call of the blocking client on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&NodeClient) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let client = self.0.clone();
        tokio::task::spawn_blocking(move || f(&client))
            .await
            .map_err(|e| {
                NodeError::new(
                    fleet_proto::node::code::IO_FAILURE,
                    "node API call panicked",
                    e.to_string(),
                )
            })?
    }
}

#[async_trait::async_trait]
impl NodeApi for NodeSocket {
    async fn status(&self) -> Result<StatusResult, NodeError> {
        self.blocking(|c| c.status()).await
    }
    async fn get_plan(&self) -> Result<Option<SetPlanRequest>, NodeError> {
        self.blocking(|c| c.get_plan()).await
    }
    async fn set_plan(&self, plan: SetPlanRequest) -> Result<PlanChange, NodeError> {
        self.blocking(move |c| c.set_plan(plan)).await
    }
    async fn set_peers(&self, peers: Vec<PeerNode>) -> Result<(), NodeError> {
        self.blocking(move |c| c.set_peers(peers)).await
    }
    async fn list_peers(&self) -> Result<Vec<PeerNode>, NodeError> {
        self.blocking(|c| c.list_peers()).await
    }

    async fn set_gateway(&self, req: SetGatewayRequest) -> Result<SetGatewayResult, NodeError> {
        self.blocking(move |c| c.set_gateway(req)).await
    }

    async fn gateway_status(&self) -> Result<Option<GatewayStatus>, NodeError> {
        self.blocking(|c| c.gateway_status()).await
    }

    async fn gateway_key(&self) -> Result<GatewayKey, NodeError> {
        self.blocking(|c| c.gateway_key()).await
    }

    async fn clear_gateway(&self) -> Result<ClearGatewayResult, NodeError> {
        self.blocking(|c| c.clear_gateway()).await
    }

    async fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError> {
        self.blocking(|c| c.list_attachments()).await
    }

    async fn set_services(&self, req: SetServicesRequest) -> Result<SetServicesResult, NodeError> {
        self.blocking(move |c| c.set_services(req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_file_is_checked() {
        let ok = r#"[{"name":"aa-1","socket":"/run/a.sock","underlay_ip":"198.51.100.11","netns":"/run/netns/a"},
                     {"name":"aa-2","socket":"/run/b.sock","underlay_ip":"198.51.100.12","netns":"/run/netns/b"}]"#;
        let nodes = parse_nodes(ok, "nodes.json", "aa-1").unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].underlay_ip.to_string(), "198.51.100.12");
        assert!(matches!(
            parse_nodes(ok, "nodes.json", "aa-9"),
            Err(NodesError::NoGateway { .. })
        ));
        let dup = ok.replace("aa-2", "aa-1");
        assert!(matches!(
            parse_nodes(&dup, "nodes.json", "aa-1"),
            Err(NodesError::Duplicate { .. })
        ));
        assert!(matches!(
            parse_nodes("[]", "nodes.json", "aa-1"),
            Err(NodesError::Empty { .. })
        ));
        let bad_ip = ok.replace("198.51.100.12", "not-an-ip");
        let err = parse_nodes(&bad_ip, "nodes.json", "aa-1").unwrap_err();
        assert!(err.to_string().contains("nodes.json"), "{err}");
        let unknown = ok.replace(
            "\"netns\":\"/run/netns/b\"",
            "\"netns\":\"/run/netns/b\",\"x\":1",
        );
        assert!(matches!(
            parse_nodes(&unknown, "nodes.json", "aa-1"),
            Err(NodesError::Parse { .. })
        ));
        let slash = ok.replace("aa-2", "a/b");
        assert!(matches!(
            parse_nodes(&slash, "nodes.json", "aa-1"),
            Err(NodesError::BadName { .. })
        ));
    }
}

//! The cluster's nodes: nodes.json, and the node API calls the controller makes on each
//! node's `fleet-nri`, behind [`NodeApi`] so the reconciler is testable with a fake.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::node_tls::TCP_SCHEME;
use fleet_proto::node::{
    Attachment, ClearGatewayResult, GatewayKey, GatewayStatus, NodeClient, NodeError, NodeReply,
    NodeRequest, PeerNode, PlanChange, SetGatewayRequest, SetGatewayResult, SetPeersRequest,
    SetPlanRequest, SetServicesRequest, SetServicesResult, StatusResult, code,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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
    #[error(
        "node {name:?} has the node API address {address:?}: expected a unix socket path or \
         tcp://<ip>:<port>"
    )]
    BadAddress { name: String, address: String },
    #[error(
        "node {name:?} is reached over TCP ({address}), which needs --node-api-tls (the \
         controller's client certificate for the node API)"
    )]
    NoTls { name: String, address: String },
}

/// How the controller reaches a node's `fleet-nri`: nodes.json's `socket` is a unix socket
/// path, or `tcp://<ip>:<port>` for a daemon serving `--node-api-listen` (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddress {
    Unix(std::path::PathBuf),
    Tcp(SocketAddr),
}

impl NodeAddress {
    pub fn of(spec: &NodeSpec) -> Result<Self, NodesError> {
        let text = spec.socket.to_string_lossy();
        match text.strip_prefix(TCP_SCHEME) {
            None => Ok(NodeAddress::Unix(spec.socket.clone())),
            Some(addr) => addr
                .parse()
                .map(NodeAddress::Tcp)
                .map_err(|_| NodesError::BadAddress {
                    name: spec.name.clone(),
                    address: text.into_owned(),
                }),
        }
    }
}

/// The node API client for `spec`: its unix socket, or TCP with mutual TLS (`tls`: the
/// controller's client configuration, `fleet_core::node_tls::client_config`).
pub fn node_api(
    spec: &NodeSpec,
    tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
) -> Result<Arc<dyn NodeApi>, NodesError> {
    Ok(match NodeAddress::of(spec)? {
        NodeAddress::Unix(_) => Arc::new(NodeSocket::new(spec)),
        NodeAddress::Tcp(addr) => {
            let Some(tls) = tls else {
                return Err(NodesError::NoTls {
                    name: spec.name.clone(),
                    address: addr.to_string(),
                });
            };
            Arc::new(NodeTcp::new(addr, tls.clone(), Duration::from_secs(10)))
        }
    })
}

/// The nodes of the Kubernetes API (name → InternalIP) as node specs, each `fleet-nri`
/// reached at `tcp://<InternalIP>:<port>`.
pub fn api_node_specs(nodes: &BTreeMap<String, Ipv4Addr>, port: u16) -> Vec<NodeSpec> {
    nodes
        .iter()
        .map(|(name, ip)| NodeSpec {
            name: name.clone(),
            socket: format!("{TCP_SCHEME}{ip}:{port}").into(),
            underlay_ip: *ip,
            netns: std::path::PathBuf::new(),
        })
        .collect()
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

/// How long a TCP connect to a node daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// [`NodeApi`] over TCP with mutual TLS: a `fleet-nri` on another node (`--node-api-listen`).
/// The same JSON lines as the unix socket, one request per connection.
#[derive(Clone)]
pub struct NodeTcp {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for NodeTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTcp").field("addr", &self.addr).finish()
    }
}

impl NodeTcp {
    pub fn new(
        addr: SocketAddr,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
        timeout: Duration,
    ) -> Self {
        NodeTcp {
            addr,
            connector: tokio_rustls::TlsConnector::from(tls),
            timeout,
        }
    }

    /// One request, one reply. A daemon that cannot be reached (or refuses our certificate,
    /// or shows one the node-API CA did not sign) is `TRY_AGAIN_LATER`, as on the socket.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: &NodeRequest,
    ) -> Result<T, NodeError> {
        let unreachable = |what: &str, e: &dyn std::fmt::Display| {
            NodeError::new(
                code::TRY_AGAIN_LATER,
                format!("fleet-nri at {} is not reachable ({what})", self.addr),
                e.to_string(),
            )
        };
        let exchange = async {
            // A node that is down (no answer to ARP or SYN) costs at most this much per call.
            let connect = self.timeout.min(CONNECT_TIMEOUT);
            let tcp = tokio::time::timeout(connect, tokio::net::TcpStream::connect(self.addr))
                .await
                .map_err(|_| unreachable("connect", &format!("no answer within {connect:?}")))?
                .map_err(|e| unreachable("connect", &e))?;
            let _ = tcp.set_nodelay(true);
            let mut tls = self
                .connector
                .connect(fleet_core::node_tls::server_name(), tcp)
                .await
                .map_err(|e| unreachable("TLS handshake", &e))?;
            let mut line = serde_json::to_vec(req).expect("node requests always serialize");
            line.push(b'\n');
            tls.write_all(&line)
                .await
                .map_err(|e| unreachable("write", &e))?;
            tls.flush().await.map_err(|e| unreachable("write", &e))?;
            let mut reply = String::new();
            BufReader::new(tls)
                .read_line(&mut reply)
                .await
                .map_err(|e| unreachable("read", &e))?;
            Ok::<_, NodeError>(reply)
        };
        let reply = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                unreachable("timeout", &format!("no answer within {:?}", self.timeout))
            })??;
        if reply.is_empty() {
            return Err(NodeError::new(
                code::TRY_AGAIN_LATER,
                "fleet-nri closed the connection without an answer",
                self.addr.to_string(),
            ));
        }
        match serde_json::from_str::<NodeReply<T>>(&reply) {
            Ok(NodeReply::Ok(v)) => Ok(v),
            Ok(NodeReply::Error(e)) => Err(e),
            Err(e) => Err(NodeError::new(
                code::DECODE_FAILURE,
                "fleet-nri sent a reply this client cannot decode (version skew?)",
                e.to_string(),
            )),
        }
    }
}

#[async_trait::async_trait]
impl NodeApi for NodeTcp {
    async fn status(&self) -> Result<StatusResult, NodeError> {
        self.call(&NodeRequest::Status).await
    }
    async fn get_plan(&self) -> Result<Option<SetPlanRequest>, NodeError> {
        self.call(&NodeRequest::GetPlan).await
    }
    async fn set_plan(&self, plan: SetPlanRequest) -> Result<PlanChange, NodeError> {
        self.call(&NodeRequest::SetPlan(plan)).await
    }
    async fn set_peers(&self, peers: Vec<PeerNode>) -> Result<(), NodeError> {
        self.call(&NodeRequest::SetPeers(SetPeersRequest { peers }))
            .await
    }
    async fn list_peers(&self) -> Result<Vec<PeerNode>, NodeError> {
        self.call(&NodeRequest::ListPeers).await
    }
    async fn set_gateway(&self, req: SetGatewayRequest) -> Result<SetGatewayResult, NodeError> {
        self.call(&NodeRequest::SetGateway(req)).await
    }
    async fn gateway_status(&self) -> Result<Option<GatewayStatus>, NodeError> {
        self.call(&NodeRequest::GatewayStatus).await
    }
    async fn gateway_key(&self) -> Result<GatewayKey, NodeError> {
        self.call(&NodeRequest::GatewayKey).await
    }
    async fn clear_gateway(&self) -> Result<ClearGatewayResult, NodeError> {
        self.call(&NodeRequest::ClearGateway).await
    }
    async fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError> {
        self.call(&NodeRequest::ListAttachments).await
    }
    async fn set_services(&self, req: SetServicesRequest) -> Result<SetServicesResult, NodeError> {
        self.call(&NodeRequest::SetServices(req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_a_socket_path_or_tcp_and_tcp_needs_tls() {
        let spec = |socket: &str| NodeSpec {
            name: "aa-1".into(),
            socket: socket.into(),
            underlay_ip: "198.51.100.11".parse().unwrap(),
            netns: "/run/netns/a".into(),
        };
        assert_eq!(
            NodeAddress::of(&spec("/run/fleetboard/node.sock")).unwrap(),
            NodeAddress::Unix("/run/fleetboard/node.sock".into())
        );
        assert_eq!(
            NodeAddress::of(&spec("tcp://198.51.100.11:9650")).unwrap(),
            NodeAddress::Tcp("198.51.100.11:9650".parse().unwrap())
        );
        assert!(matches!(
            NodeAddress::of(&spec("tcp://aa-1:9650")),
            Err(NodesError::BadAddress { .. })
        ));
        assert!(node_api(&spec("/run/a.sock"), None).is_ok());
        let e = node_api(&spec("tcp://198.51.100.11:9650"), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("--node-api-tls"), "{e}");

        let nodes = BTreeMap::from([
            ("aa-1".to_string(), "172.18.0.2".parse().unwrap()),
            ("aa-2".to_string(), "172.18.0.3".parse().unwrap()),
        ]);
        let specs = api_node_specs(&nodes, 9650);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].name, "aa-2");
        assert_eq!(specs[1].socket.to_str().unwrap(), "tcp://172.18.0.3:9650");
        assert_eq!(specs[1].underlay_ip.to_string(), "172.18.0.3");
    }

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

//! The node API: `fleet-cni`, `fleetctl` and the cluster controller talk to `fleet-nri` over a
//! local unix socket (default [`DEFAULT_SOCKET`]).
//!
//! One connection carries one request: the client writes one JSON object and a newline, the
//! daemon answers with one JSON object and a newline, then closes. A reply is either
//! `{"ok": <result>}` or `{"error": {"code": N, "msg": "...", "details": "..."}}`; the codes are
//! the CNI spec's error codes (see [`code`]) so `fleet-cni` can pass them through unchanged.
//! `docs/node-api.md` documents every request with examples.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wireguard::PublicKey;

/// Where `fleet-nri` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/fleetboard/node.sock";

/// Error codes carried in [`NodeError::code`]. 1–99 are the CNI spec's, 100+ are ours.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The node's fleet subnet has no free address.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// Creating or configuring the pod's link failed; nothing was left behind.
    pub const ATTACH_FAILED: u32 = 101;
    /// CHECK found the pod's interface, address or routes not as allocated.
    pub const CHECK_FAILED: u32 = 102;
    /// `set_plan` would change the plan of a node that still has live allocations.
    pub const PLAN_CONFLICT: u32 = 103;
    /// Programming the intra-cluster overlay (VXLAN link, routes, neighbours) failed; the
    /// requested peers are recorded and re-applied on the next request or restart.
    pub const OVERLAY_FAILED: u32 = 104;
    /// Creating or configuring the gateway (WireGuard device, peers, own-block route, key)
    /// failed; an accepted `set_gateway` is recorded and re-applied on the next request or
    /// restart.
    pub const GATEWAY_FAILED: u32 = 105;
    /// Programming the service VIPs (nftables in the CNF netns) failed; an accepted
    /// `set_services` is recorded and re-applied on the next request or restart.
    pub const SERVICES_FAILED: u32 = 106;
}

/// Identity of one attachment as the runtime sees it: the CNI triple minus the network name,
/// which is carried beside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    /// CNI_CONTAINERID; for containerd this is the pod sandbox id.
    pub container_id: String,
    /// CNI_IFNAME given to the chain (usually `eth0`), not the name of our interface.
    pub ifname: String,
}

/// Pod identity and metadata. CNI supplies namespace/name/uid (from `CNI_ARGS`); NRI adds
/// labels and annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Who created an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `fleet-cni` ADD.
    Cni,
    /// `fleet-nri` repairing a pod that existed before it started (NRI Synchronize).
    NriRepair,
}

/// One pod attachment on this node: what `ListAttachments` returns and what the daemon
/// persists per allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub key: AttachmentKey,
    /// Network name from the CNI config (`name`); NRI repairs use the daemon's network name.
    pub network: String,
    /// Path of the pod's network namespace.
    pub netns: String,
    /// Name of the interface inside the pod (`eth-fleet`).
    pub interface: String,
    /// MAC of the pod-side interface, `aa:bb:..`; empty until the link exists.
    #[serde(default)]
    pub mac: String,
    /// The pod's fleet address.
    pub address: Ipv4Addr,
    /// Prefix length of the node subnet the address belongs to.
    pub prefix_len: u8,
    /// Name of the node-side veth end in the CNF netns.
    pub host_veth: String,
    pub pod: PodMeta,
    pub origin: Origin,
    /// Seconds since the Unix epoch when the address was reserved.
    pub created_unix: u64,
}

/// A route installed inside the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRoute {
    /// Destination CIDR, e.g. `100.96.0.0/12`.
    pub dst: String,
    pub gw: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub key: AttachmentKey,
    pub network: String,
    /// Path of the pod's network namespace (CNI_NETNS).
    pub netns: String,
    #[serde(default)]
    pub pod: PodMeta,
    /// What the pod's primary plugin configured (fleet-cni sends prevResult's IPv4 addresses and
    /// routes): fleet-nri refuses to attach when one overlaps the fleet CIDR or the VIP range.
    /// Empty (NRI repair, an older fleet-cni): fleet-nri reads the pod's netns instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub primary: Vec<PrimaryNetwork>,
}

/// One network the pod's primary plugin configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryNetwork {
    pub kind: PrimaryKind,
    /// As prevResult has it: `100.96.128.7/24` (an address) or `10.96.0.0/12` (a route).
    pub cidr: String,
    /// The interface prevResult names for it; empty when it names none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryKind {
    Address,
    Route,
}

/// What ADD produced, in the terms a CNI result needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachResult {
    pub interface: String,
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub routes: Vec<PodRoute>,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachRequest {
    pub key: AttachmentKey,
    pub network: String,
    /// May be empty: DEL must succeed without a netns.
    #[serde(default)]
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub key: AttachmentKey,
    pub network: String,
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub network: String,
    /// `cni.dev/valid-attachments`: everything of this network not listed here is released.
    pub valid: Vec<AttachmentKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResult {
    pub released: Vec<AttachmentKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResult {
    pub ready: bool,
    pub node_subnet: String,
    pub fleet_cidr: String,
    pub vip_range: String,
    pub allocated: usize,
    pub capacity: usize,
    /// Whether the NRI plugin is currently registered with the runtime.
    pub nri_registered: bool,
    /// How many times the plugin has registered since the daemon started (reconnects + 1).
    pub nri_registrations: u64,
    /// Path of the CNF netns the daemon programs (e.g. `/run/netns/fleet-cnf`): where the
    /// cluster controller puts the gateway's WireGuard interface. Empty from older daemons.
    #[serde(default)]
    pub cnf_netns: String,
}

/// The node's address plan, as the cluster controller hands it out (`set_plan`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPlanRequest {
    /// The fleet's global CIDR, e.g. `100.96.0.0/12`.
    pub fleet_cidr: String,
    /// The cluster's service VIP range, e.g. `100.112.0.0/16`.
    pub vip_range: String,
    /// This node's block of the fleet CIDR, e.g. `100.96.3.0/24`.
    pub node_subnet: String,
}

/// What `set_plan` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanChange {
    /// The node already had exactly this plan.
    Unchanged,
    /// The plan was stored and the datapath follows it.
    Applied,
}

/// Another node of the same cluster, reached over the intra-cluster overlay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerNode {
    /// The peer's node name (unique within the cluster).
    pub name: String,
    /// The peer's address on the cluster's node network (where its overlay UDP socket is).
    pub underlay_ip: Ipv4Addr,
    /// The peer's node subnet (a block of the fleet CIDR).
    pub node_subnet: String,
    /// Further CIDRs routed to this peer, e.g. other clusters' blocks behind the cluster's
    /// gateway node. Empty for an ordinary node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routed_cidrs: Vec<String>,
}

/// The complete set of other nodes of this cluster; it replaces the previous set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPeersRequest {
    pub peers: Vec<PeerNode>,
}

/// Which WireGuard implementation runs the gateway device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireguardBackend {
    /// The kernel's WireGuard (where the kernel has it).
    Kernel,
    /// gotatun inside `fleet-nri` (a TUN device and the UAPI socket `/var/run/wireguard/<name>.sock`).
    Userspace,
}

impl std::str::FromStr for WireguardBackend {
    type Err = String;
    /// `kernel` or `userspace`; the error says which values exist.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            other => Err(format!(
                "unknown WireGuard backend {other:?}: use kernel or userspace"
            )),
        }
    }
}

impl std::fmt::Display for WireguardBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// One WireGuard peer of the gateway (another cluster's gateway, or the hub's relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPeer {
    /// The peer's public key (base64 on the wire, as `wg` shows it).
    pub public_key: PublicKey,
    /// Where to send; `None`: learnt from the peer's handshakes (a NAT'd peer dials in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// CIDRs routed to this peer (and accepted from it), e.g. `100.96.0.0/12` for the relay.
    pub allowed_ips: Vec<String>,
    /// Persistent keepalive in seconds (peers behind NAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u16>,
    /// For a direct peer (dialled at its own `endpoint`, or dialling us): where to send while
    /// the direct path does not work (the hub relay's address). The node watches the peer's
    /// received bytes and falls back after a few seconds of silence; the dialling end probes
    /// its direct endpoint again now and then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<SocketAddr>,
}

/// `set_gateway`: this node is the cluster's gateway. The whole desired state; persisted, so
/// the device and its peers survive restarts of the controller and of `fleet-nri`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetGatewayRequest {
    /// Interface name (1-15 bytes); also names a userspace device's UAPI socket, host-wide.
    pub name: String,
    /// The UDP port in the node's own netns.
    pub listen_port: u16,
    pub mtu: u32,
    /// `None`: kernel WireGuard where the kernel has it, else userspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<WireguardBackend>,
    /// The cluster's block: `unreachable <own_block>` is kept in the CNF netns beside the
    /// device (without it a packet to an unused address of the block would bounce between
    /// the gateway and the relay). `None`: no such route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_block: Option<String>,
    /// The complete peer set; replaces the previous one.
    pub peers: Vec<GatewayPeer>,
    /// The hub relay among `peers`, with its instance. When the instance changes (the relay
    /// process restarted and knows no member's address nor any session), the node resets the
    /// sessions of the relay peer and of every peer sent to the relay's endpoint, so they
    /// register with the new relay and handshake through it at once. `None`: no relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<GatewayRelay>,
}

/// Which peer of a `set_gateway` request is the hub relay, and which start of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRelay {
    pub public_key: PublicKey,
    /// New at every start of the relay process.
    pub instance: String,
}

/// The gateway device as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayDevice {
    pub name: String,
    pub backend: WireguardBackend,
    /// The device's public key; the private key never leaves the node.
    pub public_key: PublicKey,
    pub listen_port: u16,
}

/// What `set_gateway` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetGatewayResult {
    pub device: GatewayDevice,
    /// The device was created (or re-created) by this request.
    pub created: bool,
    /// The device's peers were changed by this request.
    pub peers_changed: bool,
}

/// One peer's tunnel state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPeerStatus {
    pub public_key: PublicKey,
    /// Where the peer was last heard from (or the configured endpoint).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds of the last handshake; `None` if none yet.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// `direct` or `relay`: the path the peer's packets take now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Unix seconds since when that path is used (known for peers with a fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_since: Option<u64>,
}

/// `gateway_status`: the device, its own-block route and its peers' tunnel state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub device: GatewayDevice,
    /// The CNF netns the device lives in.
    pub cnf_netns: String,
    /// The own block with an `unreachable` route beside the device.
    pub own_block: Option<String>,
    pub peers: Vec<GatewayPeerStatus>,
}

/// `gateway_key`: the node's gateway public key (the key is created on first use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayKey {
    pub public_key: PublicKey,
}

/// What `clear_gateway` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearGatewayResult {
    /// A device (or persisted gateway state) existed and is gone now.
    pub removed: bool,
}

/// The transport protocol of a VIP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipProtocol {
    Tcp,
    Udp,
    Sctp,
}

/// One port of a VIP and where its connections go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipPort {
    pub protocol: VipProtocol,
    /// 1-65535.
    pub port: u16,
    /// The ready endpoints, `fleet-ip:target-port`; a new connection picks one at random
    /// (or its client's previous one, under affinity). Empty: connections are refused
    /// (TCP reset / ICMP port unreachable), never forwarded elsewhere.
    pub backends: Vec<std::net::SocketAddrV4>,
}

/// One ClusterSetIP VIP as the node programs it: DNAT in the CNF netns (never the host's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipService {
    /// `<namespace>/<name>` of the service (for status, logs and rule comments).
    pub name: String,
    /// An address of the plan's VIP range.
    pub vip: Ipv4Addr,
    /// Ports not listed are refused.
    pub ports: Vec<VipPort>,
    /// `sessionAffinity: ClientIP`: a client keeps its backend for this many seconds after its
    /// last new connection (1-86400); `None` without affinity.
    #[serde(default)]
    pub affinity_timeout_seconds: Option<u32>,
}

/// `set_services`: the whole VIP table of the node (replaces the previous one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetServicesRequest {
    pub services: Vec<VipService>,
}

/// What `set_services` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetServicesResult {
    /// False when the table was already as requested (nothing was reprogrammed).
    pub changed: bool,
}

/// A request on the node socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum NodeRequest {
    Attach(AttachRequest),
    Detach(DetachRequest),
    Check(CheckRequest),
    Gc(GcRequest),
    Status,
    ListAttachments,
    /// The controller hands the node its plan; persisted in the data dir.
    SetPlan(SetPlanRequest),
    /// The controller hands the node the other nodes of its cluster; persisted.
    SetPeers(SetPeersRequest),
    /// The plan the node has (`null` before it has one).
    GetPlan,
    /// The peers the node currently programs.
    ListPeers,
    /// The controller makes this node the cluster's gateway (device, peers, own block).
    SetGateway(SetGatewayRequest),
    /// The gateway device and its peers' tunnel state (`null` when the node runs none).
    GatewayStatus,
    /// The gateway's public key, creating the key if there is none.
    GatewayKey,
    /// Removes the gateway device, its own-block route and its persisted state (the key stays).
    ClearGateway,
    /// The controller hands the node its whole VIP table; persisted, programmed in one
    /// nftables transaction.
    SetServices(SetServicesRequest),
    /// The VIP table the node has (as last accepted).
    ListServices,
}

/// An error answered by the daemon, or produced by the client when the daemon can't be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct NodeError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl NodeError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        NodeError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// A reply on the node socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeReply<T> {
    Ok(T),
    Error(NodeError),
}

/// Blocking client of the node API; small enough for a CNI plugin that lives a few ms.
#[derive(Debug, Clone)]
pub struct NodeClient {
    socket: PathBuf,
    timeout: Duration,
}

impl NodeClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        NodeClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn attach(&self, req: AttachRequest) -> Result<AttachResult, NodeError> {
        self.call(&NodeRequest::Attach(req))
    }

    pub fn detach(&self, req: DetachRequest) -> Result<(), NodeError> {
        self.call(&NodeRequest::Detach(req))
    }

    pub fn check(&self, req: CheckRequest) -> Result<(), NodeError> {
        self.call(&NodeRequest::Check(req))
    }

    pub fn gc(&self, req: GcRequest) -> Result<GcResult, NodeError> {
        self.call(&NodeRequest::Gc(req))
    }

    pub fn status(&self) -> Result<StatusResult, NodeError> {
        self.call(&NodeRequest::Status)
    }

    pub fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError> {
        self.call(&NodeRequest::ListAttachments)
    }

    pub fn set_plan(&self, req: SetPlanRequest) -> Result<PlanChange, NodeError> {
        self.call(&NodeRequest::SetPlan(req))
    }

    pub fn set_peers(&self, peers: Vec<PeerNode>) -> Result<(), NodeError> {
        self.call(&NodeRequest::SetPeers(SetPeersRequest { peers }))
    }

    pub fn get_plan(&self) -> Result<Option<SetPlanRequest>, NodeError> {
        self.call(&NodeRequest::GetPlan)
    }

    pub fn list_peers(&self) -> Result<Vec<PeerNode>, NodeError> {
        self.call(&NodeRequest::ListPeers)
    }

    pub fn set_gateway(&self, req: SetGatewayRequest) -> Result<SetGatewayResult, NodeError> {
        self.call(&NodeRequest::SetGateway(req))
    }

    pub fn gateway_status(&self) -> Result<Option<GatewayStatus>, NodeError> {
        self.call(&NodeRequest::GatewayStatus)
    }

    pub fn gateway_key(&self) -> Result<GatewayKey, NodeError> {
        self.call(&NodeRequest::GatewayKey)
    }

    pub fn clear_gateway(&self) -> Result<ClearGatewayResult, NodeError> {
        self.call(&NodeRequest::ClearGateway)
    }

    pub fn set_services(&self, req: SetServicesRequest) -> Result<SetServicesResult, NodeError> {
        self.call(&NodeRequest::SetServices(req))
    }

    pub fn list_services(&self) -> Result<Vec<VipService>, NodeError> {
        self.call(&NodeRequest::ListServices)
    }

    /// Sends one request and reads its reply. A daemon that cannot be reached is
    /// `TRY_AGAIN_LATER`: the runtime retries the pod, nothing was allocated.
    pub fn call<T: for<'de> Deserialize<'de>>(&self, req: &NodeRequest) -> Result<T, NodeError> {
        let unreachable = |e: std::io::Error| {
            NodeError::new(
                code::TRY_AGAIN_LATER,
                "fleet-nri is not reachable; is the fleet-nri DaemonSet running on this node?",
                format!("{}: {e}", self.socket.display()),
            )
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        let mut line = serde_json::to_vec(req).expect("node requests always serialize");
        line.push(b'\n');
        stream.write_all(&line).map_err(unreachable)?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply).map_err(|e| {
            NodeError::new(
                code::TRY_AGAIN_LATER,
                "fleet-nri did not answer in time",
                format!("{}: {e}", self.socket.display()),
            )
        })?;
        if reply.is_empty() {
            return Err(NodeError::new(
                code::TRY_AGAIN_LATER,
                "fleet-nri closed the connection without an answer",
                self.socket.display().to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_is_tagged() {
        let req = NodeRequest::Detach(DetachRequest {
            key: AttachmentKey {
                container_id: "abc".into(),
                ifname: "eth0".into(),
            },
            network: "fleet".into(),
            netns: String::new(),
        });
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["op"], "detach");
        assert_eq!(v["args"]["key"]["container_id"], "abc");
        let back: NodeRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);
        let status: NodeRequest = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(status, NodeRequest::Status);
    }

    #[test]
    fn new_requests_and_fields_are_additive() {
        let req: NodeRequest = serde_json::from_str(
            r#"{"op":"set_peers","args":{"peers":[{"name":"b","underlay_ip":"192.0.2.2","node_subnet":"100.96.4.0/24"}]}}"#,
        )
        .unwrap();
        let NodeRequest::SetPeers(p) = req else {
            panic!("{req:?}")
        };
        assert!(p.peers[0].routed_cidrs.is_empty());
        let plan = NodeRequest::SetPlan(SetPlanRequest {
            fleet_cidr: "100.96.0.0/12".into(),
            vip_range: "100.112.0.0/16".into(),
            node_subnet: "100.96.3.0/24".into(),
        });
        assert_eq!(serde_json::to_value(&plan).unwrap()["op"], "set_plan");
    }

    #[test]
    fn gateway_requests_have_their_wire_shape() {
        let req: NodeRequest = serde_json::from_str(
            r#"{"op":"set_gateway","args":{"name":"fleetwg0","listen_port":51820,"mtu":1420,
                "own_block":"100.96.16.0/20",
                "peers":[{"public_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","endpoint":"203.0.113.10:51820",
                          "allowed_ips":["100.96.0.0/12"],"keepalive":25}]}}"#,
        )
        .unwrap();
        let NodeRequest::SetGateway(g) = &req else {
            panic!("{req:?}")
        };
        assert_eq!(g.backend, None);
        assert_eq!(g.peers[0].keepalive, Some(25));
        let back: NodeRequest =
            serde_json::from_value(serde_json::to_value(&req).unwrap()).unwrap();
        assert_eq!(back, req);
        for (op, r) in [
            ("gateway_status", NodeRequest::GatewayStatus),
            ("gateway_key", NodeRequest::GatewayKey),
            ("clear_gateway", NodeRequest::ClearGateway),
        ] {
            assert_eq!(serde_json::to_value(&r).unwrap()["op"], op);
        }
        assert_eq!(
            serde_json::to_value(WireguardBackend::Userspace).unwrap(),
            "userspace"
        );
    }

    #[test]
    fn unreachable_daemon_is_try_again_later() {
        let dir = std::env::temp_dir().join(format!("fleet-proto-test-{}", std::process::id()));
        let client = NodeClient::new(dir.join("missing.sock"), Duration::from_millis(200));
        let err = client.status().unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        assert!(err.details.contains("missing.sock"));
    }
}

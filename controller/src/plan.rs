//! The controller's decisions as pure functions: which subnet each node gets, which nodes each
//! node peers with (and what the gateway node routes), and which WireGuard peers the gateway
//! has. No I/O here: the reconciler feeds in what it read from the hub and the nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use fleet_hub_api::model::ClusterId;
use fleet_proto::node::GatewayPeer;
use fleet_proto::node::PeerNode;
use fleet_proto::wireguard::PublicKey;
use ipnetwork::Ipv4Network;

/// One member cluster as the gateway needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    pub id: ClusterId,
    pub block: Ipv4Network,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
}

/// One hub relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    pub id: String,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// New at every start of the relay process (see `fleet_hub_api::model::RelayRecord`).
    pub instance: String,
}

/// The fleet as last listed and watched: what every decision is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetState {
    pub fleet_cidr: Ipv4Network,
    pub clusters: BTreeMap<ClusterId, ClusterInfo>,
    pub relays: BTreeMap<String, RelayInfo>,
}

impl FleetState {
    /// Every cluster's block but `own`'s, in address order.
    pub fn other_blocks(&self, own: &ClusterId) -> Vec<Ipv4Network> {
        let mut blocks: Vec<Ipv4Network> = self
            .clusters
            .values()
            .filter(|c| &c.id != own)
            .map(|c| c.block)
            .collect();
        blocks.sort_by_key(|b| (u32::from(b.network()), b.prefix()));
        blocks
    }
}

/// A node of this cluster, as nodes.json lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// The node's `fleet-nri` socket.
    pub socket: std::path::PathBuf,
    /// The node's address on the cluster's node network (its overlay endpoint).
    pub underlay_ip: Ipv4Addr,
    /// The node's own netns: the underlay of the gateway's WireGuard UDP socket when this node
    /// is the gateway.
    pub netns: std::path::PathBuf,
}

/// What is known about a node's subnet before planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetHints {
    /// The subnet the node's `fleet-nri` has now (`get_plan`); `None` if it has none or could
    /// not be asked.
    pub current: Option<Ipv4Network>,
    /// The subnet of the node's `node/<name>` record at the hub.
    pub recorded: Option<Ipv4Network>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error(
        "no free /{prefix} left in the cluster block {block} for node {node}: every subnet is \
         taken by another node; remove a node from nodes.json or use a longer --node-prefix"
    )]
    Exhausted {
        node: String,
        block: Ipv4Network,
        prefix: u8,
    },
    #[error(
        "--node-prefix /{prefix} does not fit the cluster block {block}: it must be between the \
         block's prefix and 30"
    )]
    BadPrefix { block: Ipv4Network, prefix: u8 },
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// A usable sticky subnet: inside the block and /30 or larger.
fn usable(block: Ipv4Network, subnet: Ipv4Network) -> bool {
    subnet.prefix() >= block.prefix() && subnet.prefix() <= 30 && block.contains(subnet.network())
}

/// `100.96.16.5/24` -> `100.96.16.0/24`.
fn normalize(net: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(net.network(), net.prefix()).expect("prefix of a valid network is valid")
}

/// Gives every node a subnet of `block`: a node keeps the subnet it has (`current`), else the
/// one its record names (`recorded`), if that is inside the block and nobody holds it; every
/// other node gets the lowest free `/prefix`. Two nodes never get overlapping subnets. Nodes
/// are decided in name order, so the result does not depend on the order of nodes.json.
pub fn allocate_subnets(
    block: Ipv4Network,
    prefix: u8,
    nodes: &BTreeMap<String, SubnetHints>,
) -> Result<BTreeMap<String, Result<Ipv4Network, SubnetError>>, SubnetError> {
    if prefix < block.prefix() || prefix > 30 {
        return Err(SubnetError::BadPrefix { block, prefix });
    }
    let block = normalize(block);
    let mut taken: Vec<Ipv4Network> = Vec::new();
    let mut out: BTreeMap<String, Result<Ipv4Network, SubnetError>> = BTreeMap::new();
    let free = |taken: &[Ipv4Network], s: Ipv4Network| !taken.iter().any(|t| overlaps(*t, s));
    // What a node has wins over what a record says: a node's live pods hold its addresses.
    for pass in [
        (|h: &SubnetHints| h.current) as fn(&SubnetHints) -> Option<Ipv4Network>,
        |h: &SubnetHints| h.recorded,
    ] {
        for (name, hints) in nodes {
            if out.contains_key(name) {
                continue;
            }
            if let Some(s) = pass(hints).map(normalize).filter(|s| usable(block, *s))
                && free(&taken, s)
            {
                taken.push(s);
                out.insert(name.clone(), Ok(s));
            }
        }
    }
    let step = 1u64 << (32 - prefix);
    let count = 1u64 << (prefix - block.prefix());
    let base = u64::from(u32::from(block.network()));
    for name in nodes.keys() {
        if out.contains_key(name) {
            continue;
        }
        let found = (0..count)
            .map(|i| {
                Ipv4Network::new(Ipv4Addr::from((base + i * step) as u32), prefix)
                    .expect("valid prefix")
            })
            .find(|s| free(&taken, *s));
        let result = match found {
            Some(s) => {
                taken.push(s);
                Ok(s)
            }
            None => Err(SubnetError::Exhausted {
                node: name.clone(),
                block,
                prefix,
            }),
        };
        out.insert(name.clone(), result);
    }
    Ok(out)
}

/// The peers each node is handed (`set_peers`): every other node that has a subnet; the
/// gateway node's entry also carries `routed` (the other clusters' blocks).
pub fn node_peers(
    nodes: &[NodeSpec],
    subnets: &BTreeMap<String, Ipv4Network>,
    gateway_node: &str,
    routed: &[Ipv4Network],
) -> BTreeMap<String, Vec<PeerNode>> {
    let entry = |n: &NodeSpec, subnet: Ipv4Network| PeerNode {
        name: n.name.clone(),
        underlay_ip: n.underlay_ip,
        node_subnet: subnet.to_string(),
        routed_cidrs: if n.name == gateway_node {
            routed.iter().map(ToString::to_string).collect()
        } else {
            Vec::new()
        },
    };
    nodes
        .iter()
        .filter(|n| subnets.contains_key(&n.name))
        .map(|me| {
            let mut peers: Vec<PeerNode> = nodes
                .iter()
                .filter(|n| n.name != me.name)
                .filter_map(|n| subnets.get(&n.name).map(|s| entry(n, *s)))
                .collect();
            peers.sort();
            (me.name.clone(), peers)
        })
        .collect()
}

/// How this cluster's gateway is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayMode {
    /// Seconds between keepalives towards peers we dial (0: none).
    pub keepalive: u16,
    /// Whether we declare a public endpoint (then every other cluster may dial us directly).
    pub public: bool,
}

impl GatewayMode {
    fn keepalive(&self) -> Option<u16> {
        (self.keepalive > 0).then_some(self.keepalive)
    }
}

/// Keepalive towards the relay when the gateway has none configured: the relay learns (and
/// keeps open) a member's mapped address only from the member's own packets.
pub const RELAY_KEEPALIVE: u16 = 25;

/// Keepalive on direct tunnels (both ends) while a relay exists: a working direct path then
/// brings received bytes every second, and `fleet-nri` falls back to the relay after a few
/// silent seconds (see `fleet-nri`'s `paths`). About 150 bytes/s each way per direct peer.
pub const DIRECT_KEEPALIVE: u16 = 1;

/// The relay the gateway uses: the first by id.
pub fn chosen_relay(fleet: &FleetState) -> Option<&RelayInfo> {
    fleet.relays.values().next()
}

/// The gateway's WireGuard peers:
/// - the first relay itself: its key, **no allowed IPs**, a keepalive — the relay's own
///   session with us, from which it learns our mapped address;
/// - a direct peer for each other cluster that declares an endpoint (allowed: its block);
/// - when we are public ourselves, every other cluster as a peer that dials us;
/// - every other cluster, when neither side is public: a peer end to end (its key, its
///   block) whose endpoint is the relay — the relay forwards the datagrams without being
///   able to read them.
///
/// Our own cluster and keys seen twice are left out.
pub fn wireguard_peers(fleet: &FleetState, own: &ClusterId, mode: GatewayMode) -> Vec<GatewayPeer> {
    let mut peers = Vec::new();
    let mut keys = BTreeSet::new();
    if let Some(own_info) = fleet.clusters.get(own) {
        keys.insert(own_info.public_key);
    }
    let relay = chosen_relay(fleet).filter(|r| keys.insert(r.public_key));
    if let Some(relay) = relay {
        peers.push(GatewayPeer {
            public_key: relay.public_key,
            endpoint: Some(relay.endpoint),
            allowed_ips: Vec::new(),
            keepalive: Some(mode.keepalive().unwrap_or(RELAY_KEEPALIVE)),
            fallback: None,
        });
    }
    for c in fleet.clusters.values().filter(|c| &c.id != own) {
        // Direct tunnels (we dial it, or it dials us) keep a short keepalive and the relay's
        // address as a fallback while there is a relay (`fleet-nri` watches both ends).
        let direct_keepalive = match relay {
            Some(_) => Some(DIRECT_KEEPALIVE),
            None => mode.keepalive(),
        };
        let (endpoint, fallback, keepalive) = match (c.endpoint, mode.public, relay) {
            (Some(e), _, r) => (Some(e), r.map(|r| r.endpoint), direct_keepalive),
            (None, true, r) => (None, r.map(|r| r.endpoint), direct_keepalive), // it dials us
            (None, false, Some(r)) => (Some(r.endpoint), None, mode.keepalive()),
            (None, false, None) => continue, // unreachable until a relay is up
        };
        if !keys.insert(c.public_key) {
            tracing::warn!(cluster = %c.id, key = %c.public_key, "cluster shares a WireGuard key with another peer; left out");
            continue;
        }
        peers.push(GatewayPeer {
            public_key: c.public_key,
            endpoint,
            allowed_ips: vec![c.block.to_string()],
            keepalive,
            fallback,
        });
    }
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn hints(current: Option<&str>, recorded: Option<&str>) -> SubnetHints {
        SubnetHints {
            current: current.map(net),
            recorded: recorded.map(net),
        }
    }

    fn ok(m: &BTreeMap<String, Result<Ipv4Network, SubnetError>>, n: &str) -> String {
        m[n].as_ref().unwrap().to_string()
    }

    #[test]
    fn fresh_nodes_get_the_lowest_free_subnets_in_name_order() {
        let nodes: BTreeMap<_, _> = [("b", hints(None, None)), ("a", hints(None, None))]
            .into_iter()
            .map(|(n, h)| (n.to_string(), h))
            .collect();
        let m = allocate_subnets(net("100.96.16.0/20"), 24, &nodes).unwrap();
        assert_eq!(ok(&m, "a"), "100.96.16.0/24");
        assert_eq!(ok(&m, "b"), "100.96.17.0/24");
    }

    #[test]
    fn a_node_keeps_its_current_plan_then_its_record() {
        let nodes: BTreeMap<_, _> = [
            ("a", hints(None, None)),
            ("b", hints(Some("100.96.20.0/24"), Some("100.96.21.0/24"))),
            ("c", hints(None, Some("100.96.16.0/24"))),
        ]
        .into_iter()
        .map(|(n, h)| (n.to_string(), h))
        .collect();
        let m = allocate_subnets(net("100.96.16.0/20"), 24, &nodes).unwrap();
        assert_eq!(ok(&m, "b"), "100.96.20.0/24", "current plan wins");
        assert_eq!(ok(&m, "c"), "100.96.16.0/24", "record is sticky");
        assert_eq!(
            ok(&m, "a"),
            "100.96.17.0/24",
            "fresh one skips taken subnets"
        );
    }

    #[test]
    fn sticky_subnets_outside_the_block_or_held_by_another_node_are_not_reused() {
        let nodes: BTreeMap<_, _> = [
            // Plan from another cluster block (e.g. the cluster got a new block): ignored.
            ("a", hints(Some("100.96.0.0/24"), None)),
            // Both claim the same subnet: the node that has it wins over the record.
            ("b", hints(None, Some("100.96.18.0/24"))),
            ("c", hints(Some("100.96.18.0/24"), None)),
            // Overlapping: a /23 record covering c's /24.
            ("d", hints(None, Some("100.96.18.0/23"))),
        ]
        .into_iter()
        .map(|(n, h)| (n.to_string(), h))
        .collect();
        let m = allocate_subnets(net("100.96.16.0/20"), 24, &nodes).unwrap();
        assert_eq!(ok(&m, "c"), "100.96.18.0/24");
        assert_eq!(ok(&m, "a"), "100.96.16.0/24");
        assert_eq!(ok(&m, "b"), "100.96.17.0/24");
        assert_eq!(ok(&m, "d"), "100.96.19.0/24");
        let all: BTreeSet<String> = m.values().map(|r| r.clone().unwrap().to_string()).collect();
        assert_eq!(all.len(), 4, "no subnet twice: {m:?}");
    }

    #[test]
    fn an_exhausted_block_is_an_error_for_the_node_that_does_not_fit() {
        let nodes: BTreeMap<_, _> = ["a", "b", "c", "d", "e"]
            .into_iter()
            .map(|n| (n.to_string(), hints(None, None)))
            .collect();
        let m = allocate_subnets(net("100.96.16.0/22"), 24, &nodes).unwrap();
        for n in ["a", "b", "c", "d"] {
            assert!(m[n].is_ok(), "{n}: {m:?}");
        }
        let err = m["e"].clone().unwrap_err();
        assert!(matches!(err, SubnetError::Exhausted { ref node, .. } if node == "e"));
        assert!(err.to_string().contains("100.96.16.0/22"), "{err}");
        assert!(matches!(
            allocate_subnets(net("100.96.16.0/22"), 20, &nodes),
            Err(SubnetError::BadPrefix { .. })
        ));
    }

    fn spec(name: &str, ip: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            socket: format!("/run/{name}.sock").into(),
            underlay_ip: ip.parse().unwrap(),
            netns: format!("/run/netns/{name}").into(),
        }
    }

    #[test]
    fn every_node_peers_with_the_others_and_the_gateway_entry_routes_other_blocks() {
        let nodes = vec![
            spec("g", "192.0.2.1"),
            spec("w", "192.0.2.2"),
            spec("x", "192.0.2.3"),
        ];
        let subnets: BTreeMap<_, _> = [("g", "100.96.16.0/24"), ("w", "100.96.17.0/24")]
            .into_iter()
            .map(|(n, s)| (n.to_string(), net(s)))
            .collect();
        let routed = [net("100.96.0.0/20"), net("100.96.32.0/20")];
        let peers = node_peers(&nodes, &subnets, "g", &routed);
        // x has no subnet: it gets no peers and is nobody's peer.
        assert_eq!(peers.len(), 2);
        assert_eq!(peers["w"].len(), 1);
        assert_eq!(peers["w"][0].name, "g");
        assert_eq!(
            peers["w"][0].routed_cidrs,
            vec!["100.96.0.0/20", "100.96.32.0/20"]
        );
        assert_eq!(peers["g"].len(), 1);
        assert_eq!(peers["g"][0].name, "w");
        assert!(peers["g"][0].routed_cidrs.is_empty());
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn cluster(id: &str, block: &str, k: u8, endpoint: Option<&str>) -> ClusterInfo {
        ClusterInfo {
            id: ClusterId::new(id).unwrap(),
            block: net(block),
            public_key: key(k),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
        }
    }

    fn fleet(clusters: Vec<ClusterInfo>, relay: bool) -> FleetState {
        let mut relays = BTreeMap::new();
        if relay {
            relays.insert(
                "hub".to_string(),
                RelayInfo {
                    id: "hub".into(),
                    public_key: key(99),
                    endpoint: "203.0.113.1:51820".parse().unwrap(),
                    instance: "1".into(),
                },
            );
        }
        FleetState {
            fleet_cidr: net("100.96.0.0/12"),
            clusters: clusters.into_iter().map(|c| (c.id.clone(), c)).collect(),
            relays,
        }
    }

    const NATED: GatewayMode = GatewayMode {
        keepalive: 25,
        public: false,
    };
    const PUBLIC: GatewayMode = GatewayMode {
        keepalive: 25,
        public: true,
    };

    #[test]
    fn nated_members_peer_end_to_end_through_the_relay() {
        let aa = ClusterId::new("aa").unwrap();
        let f = fleet(
            vec![
                cluster("aa", "100.96.0.0/20", 1, None),
                cluster("bb", "100.96.16.0/20", 2, None),
            ],
            true,
        );
        let peers = wireguard_peers(&f, &aa, NATED);
        assert_eq!(peers.len(), 2);
        // The relay itself: no allowed IPs (it is never a next hop for inner packets).
        assert_eq!(peers[0].public_key, key(99));
        assert!(peers[0].allowed_ips.is_empty());
        assert_eq!(peers[0].keepalive, Some(25));
        // bb end to end: its own key and block, sent to the relay's address.
        assert_eq!(peers[1].public_key, key(2));
        assert_eq!(peers[1].allowed_ips, vec!["100.96.16.0/20".to_string()]);
        assert_eq!(
            peers[1].endpoint,
            Some("203.0.113.1:51820".parse().unwrap())
        );
        assert_eq!(peers[1].keepalive, Some(25));
        assert_eq!(f.other_blocks(&aa), vec![net("100.96.16.0/20")]);
        // No keepalive configured: the relay peer still gets one (registration).
        let quiet = GatewayMode {
            keepalive: 0,
            public: false,
        };
        let peers = wireguard_peers(&f, &aa, quiet);
        assert_eq!(peers[0].keepalive, Some(RELAY_KEEPALIVE));
        assert_eq!(peers[1].keepalive, None);
        // No relay and nobody public: no peers at all.
        assert!(
            wireguard_peers(
                &fleet(f.clusters.values().cloned().collect(), false),
                &aa,
                NATED
            )
            .is_empty()
        );
    }

    #[test]
    fn public_members_get_direct_peers_and_take_dial_ins() {
        let aa = ClusterId::new("aa").unwrap();
        let f = fleet(
            vec![
                cluster("aa", "100.96.0.0/20", 1, None),
                cluster("bb", "100.96.16.0/20", 2, Some("198.51.100.2:51820")),
                cluster("cc", "100.96.32.0/20", 3, None),
            ],
            true,
        );
        // NAT'd aa: relay, a direct tunnel to public bb (it dials bb), NAT'd cc via the relay.
        let peers = wireguard_peers(&f, &aa, NATED);
        assert_eq!(peers.len(), 3);
        let bb = &peers[1];
        assert_eq!(bb.public_key, key(2));
        assert_eq!(bb.endpoint, Some("198.51.100.2:51820".parse().unwrap()));
        assert_eq!(bb.allowed_ips, vec!["100.96.16.0/20".to_string()]);
        // A direct tunnel falls back to the relay; both ends keep a 1 s keepalive for that.
        assert_eq!(bb.fallback, Some("203.0.113.1:51820".parse().unwrap()));
        assert_eq!(bb.keepalive, Some(DIRECT_KEEPALIVE));
        assert_eq!(peers[2].public_key, key(3));
        assert_eq!(peers[2].fallback, None);
        assert_eq!(
            peers[2].endpoint,
            Some("203.0.113.1:51820".parse().unwrap())
        );
        // Public bb: relay, and aa and cc as peers that dial in (no endpoint).
        let peers = wireguard_peers(&f, &ClusterId::new("bb").unwrap(), PUBLIC);
        let keys: Vec<_> = peers.iter().map(|p| p.public_key).collect();
        assert_eq!(keys, vec![key(99), key(1), key(3)]);
        assert!(peers[1..].iter().all(|p| p.endpoint.is_none()));
        assert!(
            peers[1..]
                .iter()
                .all(|p| p.keepalive == Some(DIRECT_KEEPALIVE)
                    && p.fallback == Some("203.0.113.1:51820".parse().unwrap()))
        );
        assert_eq!(peers[2].allowed_ips, vec!["100.96.32.0/20".to_string()]);
    }

    #[test]
    fn a_removed_cluster_leaves_no_peer_and_no_route() {
        let aa = ClusterId::new("aa").unwrap();
        let bb = ClusterId::new("bb").unwrap();
        let mut f = fleet(
            vec![
                cluster("aa", "100.96.0.0/20", 1, None),
                cluster("bb", "100.96.16.0/20", 2, Some("198.51.100.2:51820")),
            ],
            false,
        );
        assert_eq!(wireguard_peers(&f, &aa, NATED).len(), 1);
        f.clusters.remove(&bb);
        assert!(wireguard_peers(&f, &aa, NATED).is_empty());
        assert!(f.other_blocks(&aa).is_empty());
        let nodes = vec![spec("g", "192.0.2.1"), spec("w", "192.0.2.2")];
        let subnets: BTreeMap<_, _> = [("g", net("100.96.0.0/24")), ("w", net("100.96.1.0/24"))]
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        let peers = node_peers(&nodes, &subnets, "g", &f.other_blocks(&aa));
        assert!(peers["w"][0].routed_cidrs.is_empty());
    }
}

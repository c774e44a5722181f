//! The intra-cluster overlay: how a node's CNF netns reaches the other nodes of its cluster.
//!
//! One VXLAN device, `fleetvx`, per node. It is created by a netlink request sent from the
//! node's own netns with `IFLA_NET_NS_FD` naming the CNF netns, so it is born inside the CNF
//! netns (no half-made link is ever visible on the node), while the kernel keeps its UDP
//! socket in the netns the request came from. Encapsulated packets therefore use the node's
//! own underlay address and routing, and the device, its FDB, its neighbours and every fleet
//! route live in the CNF netns: the node's routing tables stay untouched.
//!
//! ```text
//!  CNF netns (node A, 100.96.30.0/24)                       CNF netns (node B, 100.96.31.0/24)
//!  pod ─▶ fleet0 ─▶ route 100.96.31.0/24 via 100.96.31.0 dev fleetvx onlink
//!                   neigh 100.96.31.0 lladdr 0e:fb:64:60:1f:00 (B's VTEP MAC)
//!                   fdb   0e:fb:64:60:1f:00 dst 192.0.2.2        fleetvx ─▶ fleet0 ─▶ pod
//!                              │ UDP 4789, from node A's netns         ▲
//!  node A netns 192.0.2.1 ─────┴──────── underlay ────────────▶ node B netns 192.0.2.2
//! ```
//!
//! Every address is static, derived from what the controller sends (name, underlay IP, node
//! subnet): a peer's VTEP address is its subnet's network address, its VTEP MAC is
//! `0e:fb:` + that address. No learning, no flooding, no ARP on the overlay. The device exists
//! only while the node has peers: a single-node cluster has no overlay socket at all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use fleet_proto::node::PeerNode;
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};

use crate::config::NodePlan;
use crate::datapath::{DatapathError, errno, link_by_name, nl};
use crate::netns;
use crate::routes::{Route, RouteOwner, RoutesError, plan_route_changes, sync_routes};

/// Name of the overlay's VXLAN device in the CNF netns.
pub const OVERLAY_LINK: &str = "fleetvx";

/// A peer node, validated against the local plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub node_subnet: Ipv4Network,
    /// Further CIDRs routed via this peer (other clusters' blocks behind a gateway node).
    pub routed: Vec<Ipv4Network>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("a peer has an empty name; give every peer its node name")]
    EmptyName,
    #[error("peer {0} is listed twice; list every node once")]
    DuplicateName(String),
    #[error("peer {peer}: {value:?} is not an IPv4 CIDR ({reason})")]
    BadCidr {
        peer: String,
        value: String,
        reason: String,
    },
    #[error("peer {peer}: underlay IP {ip} is not a unicast address")]
    BadUnderlay { peer: String, ip: Ipv4Addr },
    #[error("peer {peer}: node subnet {subnet} is not inside the fleet CIDR {fleet}")]
    OutsideFleet {
        peer: String,
        subnet: Ipv4Network,
        fleet: Ipv4Network,
    },
    #[error("peer {peer}: {cidr} overlaps {other}; every routed block must be distinct")]
    Overlap {
        peer: String,
        cidr: Ipv4Network,
        other: String,
    },
}

fn parse_cidr(peer: &str, value: &str) -> Result<Ipv4Network, PeerError> {
    let net: Ipv4Network = value.parse().map_err(|e| PeerError::BadCidr {
        peer: peer.into(),
        value: value.into(),
        reason: format!("{e}"),
    })?;
    Ipv4Network::new(net.network(), net.prefix()).map_err(|e| PeerError::BadCidr {
        peer: peer.into(),
        value: value.into(),
        reason: format!("{e}"),
    })
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Validates the controller's peer list against this node's plan: names unique, subnets in
/// the fleet CIDR, and no routed block overlapping another or this node's own subnet.
pub fn parse_peers(plan: &NodePlan, peers: &[PeerNode]) -> Result<Vec<Peer>, PeerError> {
    let mut names = BTreeSet::new();
    let mut taken: Vec<(Ipv4Network, String)> =
        vec![(plan.node_subnet, "this node's subnet".into())];
    let mut out = Vec::with_capacity(peers.len());
    for p in peers {
        if p.name.is_empty() {
            return Err(PeerError::EmptyName);
        }
        if !names.insert(p.name.as_str()) {
            return Err(PeerError::DuplicateName(p.name.clone()));
        }
        let ip = p.underlay_ip;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
            return Err(PeerError::BadUnderlay {
                peer: p.name.clone(),
                ip,
            });
        }
        let subnet = parse_cidr(&p.name, &p.node_subnet)?;
        if !plan.fleet_cidr.contains(subnet.network()) || subnet.prefix() < plan.fleet_cidr.prefix()
        {
            return Err(PeerError::OutsideFleet {
                peer: p.name.clone(),
                subnet,
                fleet: plan.fleet_cidr,
            });
        }
        let routed = p
            .routed_cidrs
            .iter()
            .map(|c| parse_cidr(&p.name, c))
            .collect::<Result<Vec<_>, _>>()?;
        for cidr in std::iter::once(subnet).chain(routed.iter().copied()) {
            if let Some((_, other)) = taken.iter().find(|(t, _)| overlaps(*t, cidr)) {
                return Err(PeerError::Overlap {
                    peer: p.name.clone(),
                    cidr,
                    other: other.clone(),
                });
            }
            taken.push((cidr, format!("{cidr} of peer {}", p.name)));
        }
        out.push(Peer {
            name: p.name.clone(),
            underlay_ip: ip,
            node_subnet: subnet,
            routed,
        });
    }
    Ok(out)
}

/// A node's VTEP address on the overlay: its subnet's network address (never a pod's).
pub fn vtep_ip(subnet: Ipv4Network) -> Ipv4Addr {
    subnet.network()
}

/// A node's VTEP MAC: `0e:fb:` + its subnet's network address (locally administered, unicast).
pub fn vtep_mac(subnet: Ipv4Network) -> [u8; 6] {
    let o = subnet.network().octets();
    [0x0e, 0xfb, o[0], o[1], o[2], o[3]]
}

/// The overlay's forwarding state in the CNF netns, as sets keyed like the kernel keys them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayTable {
    /// destination → gateway (a peer's VTEP address), all `dev fleetvx onlink`.
    pub routes: BTreeMap<Ipv4Network, Ipv4Addr>,
    /// VTEP address → VTEP MAC (permanent neighbour entries).
    pub neighbours: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// VTEP MAC → underlay IP (permanent FDB entries).
    pub fdb: BTreeMap<[u8; 6], Ipv4Addr>,
}

impl OverlayTable {
    /// What the kernel must hold for `peers`.
    pub fn desired(peers: &[Peer]) -> OverlayTable {
        let mut t = OverlayTable::default();
        for p in peers {
            let (ip, mac) = (vtep_ip(p.node_subnet), vtep_mac(p.node_subnet));
            t.neighbours.insert(ip, mac);
            t.fdb.insert(mac, p.underlay_ip);
            for dst in std::iter::once(p.node_subnet).chain(p.routed.iter().copied()) {
                t.routes.insert(dst, ip);
            }
        }
        t
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }
}

/// The changes that turn `have` into `want`: entries to delete (keys no longer wanted) and
/// entries to write with replace semantics (missing, or with another value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayChanges {
    pub remove: OverlayTable,
    pub write: OverlayTable,
}

impl OverlayChanges {
    /// The changes from `have` to `want`; the routes are diffed by
    /// [`plan_route_changes`], the one route diff every caller shares.
    pub fn between(want: &OverlayTable, have: &OverlayTable) -> OverlayChanges {
        fn split<K: Ord + Copy, V: PartialEq + Copy>(
            want: &BTreeMap<K, V>,
            have: &BTreeMap<K, V>,
        ) -> (BTreeMap<K, V>, BTreeMap<K, V>) {
            let remove = have
                .iter()
                .filter(|(k, _)| !want.contains_key(k))
                .map(|(k, v)| (*k, *v))
                .collect();
            let write = want
                .iter()
                .filter(|(k, v)| have.get(k) != Some(v))
                .map(|(k, v)| (*k, *v))
                .collect();
            (remove, write)
        }
        let (rr, rw) = plan_route_changes(
            &overlay_routes(OVERLAY_DEVICE, &have.routes),
            &overlay_routes(OVERLAY_DEVICE, &want.routes),
        );
        let (rr, rw) = (route_map(&rr), route_map(&rw));
        let (nr, nw) = split(&want.neighbours, &have.neighbours);
        let (fr, fw) = split(&want.fdb, &have.fdb);
        OverlayChanges {
            remove: OverlayTable {
                routes: rr,
                neighbours: nr,
                fdb: fr,
            },
            write: OverlayTable {
                routes: rw,
                neighbours: nw,
                fdb: fw,
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.write.is_empty()
    }
}

/// The overlay of one node: its VXLAN device in the CNF netns, its socket in `underlay`.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// The CNF netns.
    pub cnf: PathBuf,
    /// The netns whose routing carries the encapsulated packets: the node's own.
    pub underlay: PathBuf,
    pub vni: u32,
    pub port: u16,
    pub mtu: u32,
    /// This node's subnet: gives the device its VTEP MAC.
    pub node_subnet: Ipv4Network,
}

impl Overlay {
    /// Brings the CNF netns in line with `peers`: with none, the device (and with it every
    /// route, neighbour and FDB entry) is deleted; otherwise the device is made if missing and
    /// only the differences are written. Returns what changed.
    pub async fn apply(&self, peers: &[Peer]) -> Result<OverlayChanges, DatapathError> {
        if peers.is_empty() {
            self.remove().await?;
            return Ok(OverlayChanges::default());
        }
        let want = OverlayTable::desired(peers);
        let cnf_file = netns::open(&self.cnf)?;
        let this = self.clone();
        netns::with_netlink(
            vec![self.underlay.clone(), self.cnf.clone()],
            move |h| async move {
                let (underlay, cnf) = (&h[0], &h[1]);
                let idx = this
                    .ensure_link(underlay, cnf, cnf_file.as_raw_fd())
                    .await?;
                write_changes(cnf, idx, &this.cnf, &want).await
            },
        )
        .await?
    }

    /// Deletes the overlay device; missing is fine.
    pub async fn remove(&self) -> Result<(), DatapathError> {
        netns::with_netlink(vec![self.cnf.clone()], |h| async move {
            let Some(l) = link_by_name(&h[0], OVERLAY_LINK).await? else {
                return Ok(());
            };
            match h[0].link().del(l.header.index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
                Err(e) => Err(nl(format!("delete {OVERLAY_LINK}"))(e)),
            }
        })
        .await?
    }

    /// Makes sure `fleetvx` exists in the CNF netns with this node's VNI, port, MTU and MAC,
    /// and is up; returns its index. A device with another VNI or port is re-made.
    async fn ensure_link(
        &self,
        underlay: &Handle,
        cnf: &Handle,
        cnf_fd: i32,
    ) -> Result<u32, DatapathError> {
        let mac = vtep_mac(self.node_subnet).to_vec();
        if let Some(l) = link_by_name(cnf, OVERLAY_LINK).await? {
            if vxlan_params(&l) == Some((self.vni, self.port)) {
                let idx = l.header.index;
                cnf.link()
                    .set(
                        LinkUnspec::new_with_index(idx)
                            .address(mac)
                            .mtu(self.mtu)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl(format!("set {OVERLAY_LINK} up")))?;
                return Ok(idx);
            }
            tracing::info!(
                link = OVERLAY_LINK,
                vni = self.vni,
                port = self.port,
                "re-making the overlay device with the configured VNI and port"
            );
            cnf.link()
                .del(l.header.index)
                .execute()
                .await
                .map_err(nl(format!("delete stale {OVERLAY_LINK}")))?;
        }
        // Sent from the node's netns, created in the CNF netns: the socket stays on the node.
        let vx = LinkVxlan::new(OVERLAY_LINK, self.vni)
            .port(self.port)
            .learning(false)
            .mtu(self.mtu)
            .address(mac)
            .setns_by_fd(cnf_fd)
            .build();
        underlay.link().add(vx).execute().await.map_err(nl(format!(
            "create {OVERLAY_LINK} (VXLAN vni {} port {})",
            self.vni, self.port
        )))?;
        let l = link_by_name(cnf, OVERLAY_LINK).await?.ok_or_else(|| {
            DatapathError::Check(format!("{OVERLAY_LINK} did not appear in the CNF netns"))
        })?;
        let idx = l.header.index;
        cnf.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {OVERLAY_LINK} up")))?;
        tracing::info!(
            link = OVERLAY_LINK,
            vni = self.vni,
            port = self.port,
            "overlay device created"
        );
        Ok(idx)
    }
}

fn vxlan_params(l: &LinkMessage) -> Option<(u32, u16)> {
    let infos = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })?;
    let vni = data.iter().find_map(|d| match d {
        InfoVxlan::Id(v) => Some(*v),
        _ => None,
    })?;
    let port = data.iter().find_map(|d| match d {
        InfoVxlan::Port(p) => Some(*p),
        _ => None,
    })?;
    Some((vni, port))
}

fn mac6(b: &[u8]) -> Option<[u8; 6]> {
    b.try_into().ok()
}

/// Reads the overlay's permanent neighbours and FDB entries on device `idx` (its routes are
/// read by [`sync_routes`]).
async fn read_neighbours(h: &Handle, idx: u32) -> Result<OverlayTable, DatapathError> {
    let mut t = OverlayTable::default();
    let neighbours: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list neighbours in the CNF netns"))?;
    for n in neighbours
        .iter()
        .filter(|n| n.header.ifindex == idx && n.header.state == NeighbourState::Permanent)
    {
        let ip = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(m) => mac6(m),
            _ => None,
        });
        if let (Some(ip), Some(mac)) = (ip, mac) {
            t.neighbours.insert(ip, mac);
        }
    }
    let fdb: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list the overlay's FDB"))?;
    for n in fdb.iter().filter(|n| n.header.ifindex == idx) {
        let dst = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(m) => mac6(m),
            _ => None,
        });
        if let (Some(dst), Some(mac)) = (dst, mac) {
            t.fdb.insert(mac, dst);
        }
    }
    Ok(t)
}

/// Stands in for `fleetvx`'s index where tables are diffed without a kernel.
const OVERLAY_DEVICE: u32 = 0;

/// `<dst> via <vtep> dev <idx> onlink` for each entry.
fn overlay_routes(idx: u32, routes: &BTreeMap<Ipv4Network, Ipv4Addr>) -> Vec<Route> {
    routes
        .iter()
        .map(|(dst, gw)| {
            Route::to((*dst).into())
                .via(IpAddr::V4(*gw))
                .dev(idx)
                .onlink()
        })
        .collect()
}

fn route_map(routes: &[Route]) -> BTreeMap<Ipv4Network, Ipv4Addr> {
    routes
        .iter()
        .filter_map(|r| match (r.destination, r.via) {
            (ipnetwork::IpNetwork::V4(dst), Some(IpAddr::V4(gw))) => Some((dst, gw)),
            _ => None,
        })
        .collect()
}

impl From<RoutesError> for DatapathError {
    fn from(e: RoutesError) -> DatapathError {
        match e.into_netlink() {
            Ok((what, source)) => DatapathError::Netlink { what, source },
            Err(RoutesError::Netns(e)) => DatapathError::Netns(e),
            Err(other) => DatapathError::Check(other.to_string()),
        }
    }
}

fn ignore_missing(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e)
            if matches!(errno(&e), Some(x) if x == nix::errno::Errno::ESRCH as i32
                || x == nix::errno::Errno::ENOENT as i32) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Brings device `idx` in line with `want` and returns what changed. Order: new FDB entries
/// and neighbours first, then the routes (stale ones deleted, new ones written), then stale
/// neighbours and FDB entries, so no route ever points at a missing neighbour.
async fn write_changes(
    h: &Handle,
    idx: u32,
    cnf: &std::path::Path,
    want: &OverlayTable,
) -> Result<OverlayChanges, DatapathError> {
    let have = read_neighbours(h, idx).await?;
    let neighbours_only = OverlayTable {
        routes: BTreeMap::new(),
        ..want.clone()
    };
    let mut c = OverlayChanges::between(&neighbours_only, &have);
    for (mac, dst) in &c.write.fdb {
        h.neighbours()
            .add_bridge(idx, mac)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(IpAddr::V4(*dst))
            .replace()
            .execute()
            .await
            .map_err(nl(format!("write FDB entry to {dst}")))?;
    }
    for (ip, mac) in &c.write.neighbours {
        h.neighbours()
            .add(idx, IpAddr::V4(*ip))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("write neighbour {ip}")))?;
    }
    let owner = RouteOwner::protocol(RouteProtocol::Static.into())
        .dev(idx)
        .netns(cnf);
    let report = sync_routes(h, &owner, &overlay_routes(idx, &want.routes)).await?;
    if !report.blocked.is_empty() {
        tracing::warn!(
            routes = ?report.blocked.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "another protocol's routes hold these overlay destinations; remove them to reach the peers"
        );
    }
    c.remove.routes = route_map(&report.deleted);
    c.write.routes = route_map(&[report.added, report.replaced].concat());
    for (ip, mac) in &c.remove.neighbours {
        let mut req = h.neighbours().add(idx, IpAddr::V4(*ip));
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        let msg = req.message_mut().clone();
        ignore_missing(h.neighbours().del(msg).execute().await)
            .map_err(nl(format!("delete neighbour {ip}")))?;
    }
    for (mac, dst) in &c.remove.fdb {
        let mut req = h
            .neighbours()
            .add_bridge(idx, mac)
            .flags(NeighbourFlags::Own)
            .destination(IpAddr::V4(*dst));
        let msg = req.message_mut().clone();
        ignore_missing(h.neighbours().del(msg).execute().await)
            .map_err(nl(format!("delete FDB entry to {dst}")))?;
    }
    if !c.is_empty() {
        tracing::info!(
            routes_removed = c.remove.routes.len(),
            routes_written = c.write.routes.len(),
            "overlay programmed"
        );
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_FLEET_CIDR, DEFAULT_VIP_RANGE};

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn plan() -> NodePlan {
        NodePlan::new(
            net(DEFAULT_FLEET_CIDR),
            net(DEFAULT_VIP_RANGE),
            net("100.96.30.0/24"),
        )
        .unwrap()
    }

    fn peer(name: &str, ip: &str, subnet: &str, routed: &[&str]) -> PeerNode {
        PeerNode {
            name: name.into(),
            underlay_ip: ip.parse().unwrap(),
            node_subnet: subnet.into(),
            routed_cidrs: routed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn vtep_address_and_mac_derive_from_the_subnet() {
        assert_eq!(
            vtep_ip(net("100.96.31.0/24")),
            Ipv4Addr::new(100, 96, 31, 0)
        );
        assert_eq!(
            vtep_mac(net("100.96.31.0/24")),
            [0x0e, 0xfb, 100, 96, 31, 0]
        );
    }

    #[test]
    fn peers_are_validated_against_the_plan() {
        let p = plan();
        let ok = parse_peers(
            &p,
            &[
                peer("b", "192.0.2.2", "100.96.31.0/24", &[]),
                peer("gw", "192.0.2.3", "100.96.32.0/24", &["100.97.0.0/16"]),
            ],
        )
        .unwrap();
        assert_eq!(ok[1].routed, vec![net("100.97.0.0/16")]);
        let err = |peers: &[PeerNode]| parse_peers(&p, peers).unwrap_err();
        assert_eq!(
            err(&[peer("", "192.0.2.2", "100.96.31.0/24", &[])]),
            PeerError::EmptyName
        );
        assert!(matches!(
            err(&[
                peer("b", "192.0.2.2", "100.96.31.0/24", &[]),
                peer("b", "192.0.2.3", "100.96.32.0/24", &[])
            ]),
            PeerError::DuplicateName(_)
        ));
        assert!(matches!(
            err(&[peer("b", "192.0.2.2", "10.0.0.0/24", &[])]),
            PeerError::OutsideFleet { .. }
        ));
        assert!(matches!(
            err(&[peer("b", "192.0.2.2", "100.96.30.0/25", &[])]),
            PeerError::Overlap { .. }
        ));
        assert!(matches!(
            err(&[
                peer("b", "192.0.2.2", "100.96.31.0/24", &[]),
                peer("c", "192.0.2.3", "100.96.32.0/24", &["100.96.31.128/25"])
            ]),
            PeerError::Overlap { .. }
        ));
        assert!(matches!(
            err(&[peer("b", "0.0.0.0", "100.96.31.0/24", &[])]),
            PeerError::BadUnderlay { .. }
        ));
        assert!(matches!(
            err(&[peer("b", "192.0.2.2", "100.96.31.0/33", &[])]),
            PeerError::BadCidr { .. }
        ));
    }

    #[test]
    fn desired_table_routes_subnet_and_extra_cidrs_via_the_vtep() {
        let peers = parse_peers(
            &plan(),
            &[peer(
                "gw",
                "192.0.2.3",
                "100.96.32.0/24",
                &["100.97.0.0/16"],
            )],
        )
        .unwrap();
        let t = OverlayTable::desired(&peers);
        let vtep = Ipv4Addr::new(100, 96, 32, 0);
        assert_eq!(t.routes.get(&net("100.96.32.0/24")), Some(&vtep));
        assert_eq!(t.routes.get(&net("100.97.0.0/16")), Some(&vtep));
        assert_eq!(
            t.neighbours.get(&vtep),
            Some(&vtep_mac(net("100.96.32.0/24")))
        );
        assert_eq!(
            t.fdb.get(&vtep_mac(net("100.96.32.0/24"))),
            Some(&Ipv4Addr::new(192, 0, 2, 3))
        );
    }

    #[test]
    fn diff_removes_gone_peers_rewrites_moved_ones_and_is_empty_when_in_sync() {
        let p = plan();
        let before = OverlayTable::desired(
            &parse_peers(
                &p,
                &[
                    peer("b", "192.0.2.2", "100.96.31.0/24", &[]),
                    peer("c", "192.0.2.3", "100.96.32.0/24", &[]),
                ],
            )
            .unwrap(),
        );
        // c is gone, b moved to another underlay address, d is new.
        let after = OverlayTable::desired(
            &parse_peers(
                &p,
                &[
                    peer("b", "192.0.2.9", "100.96.31.0/24", &[]),
                    peer("d", "192.0.2.4", "100.96.33.0/24", &[]),
                ],
            )
            .unwrap(),
        );
        let c = OverlayChanges::between(&after, &before);
        assert_eq!(
            c.remove.routes.keys().collect::<Vec<_>>(),
            vec![&net("100.96.32.0/24")]
        );
        assert_eq!(c.remove.fdb.len(), 1);
        assert_eq!(c.remove.neighbours.len(), 1);
        // b's route and neighbour are unchanged; only its FDB entry is rewritten.
        assert_eq!(
            c.write.routes.keys().collect::<Vec<_>>(),
            vec![&net("100.96.33.0/24")]
        );
        assert_eq!(
            c.write.fdb.get(&vtep_mac(net("100.96.31.0/24"))),
            Some(&Ipv4Addr::new(192, 0, 2, 9))
        );
        assert_eq!(c.write.fdb.len(), 2);
        assert!(OverlayChanges::between(&after, &after).is_empty());
        // Everything gone: everything removed, nothing written.
        let gone = OverlayChanges::between(&OverlayTable::default(), &before);
        assert_eq!(gone.remove, before);
        assert!(gone.write.is_empty());
    }
}

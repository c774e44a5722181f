//! The node's fleet datapath: the CNF netns with its bridge, and each pod's `eth-fleet`.
//!
//! ```text
//!   pod netns                     CNF netns (/run/netns/<cnf>)            host netns
//!   eth0  ── primary CNI ──────────────────────────────────────────────▶ (untouched)
//!   eth-fleet 100.96.3.7/24 ◀─veth─▶ fl6460_0307 ──┐
//!     route 100.96.0.0/12 via .1                    ├─ fleet0 100.96.3.1/24 (bridge)
//!     route 100.112.0.0/16 via .1   other pods ─────┘   ip_forward=1 (towards other nodes:
//!   default route stays on eth0                          fleetvx, see `overlay`)
//! ```
//!
//! Nothing is created in the host netns. The veth is created from inside the CNF netns with
//! its peer placed straight into the pod netns under its final name, so no half-made link is
//! ever visible in a third namespace.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use fleet_proto::node::{Attachment, PodRoute};
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::config::{NodeLocal, NodePlan, POD_INTERFACE};
use crate::ipam::{is_host_veth_name, pod_mac};
use crate::netlink;
use crate::netns::{self, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Check(String),
    #[error("cannot set {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

impl DatapathError {
    /// True when the failure was a pod netns that does not exist (CNI: container unknown).
    pub fn is_netns_missing(&self) -> bool {
        matches!(self, DatapathError::Netns(NetnsError::NotFound { .. }))
    }
}

pub(crate) fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Netlink { what, source }
}

pub(crate) use crate::netlink::errno;

/// The node datapath: one per node daemon.
#[derive(Debug, Clone)]
pub struct NodeDatapath {
    plan: NodePlan,
    local: NodeLocal,
}

/// What `attach` learned about the link it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub mac: String,
}

impl NodeDatapath {
    pub fn new(plan: NodePlan, local: NodeLocal) -> Self {
        NodeDatapath { plan, local }
    }

    pub fn plan(&self) -> &NodePlan {
        &self.plan
    }

    pub fn cnf_path(&self) -> PathBuf {
        netns::named_path(&self.local.cnf_netns)
    }

    /// Routes every pod gets: the fleet CIDR and the VIP range via the node gateway.
    pub fn pod_routes(&self) -> Vec<PodRoute> {
        let gw = self.plan.gateway();
        vec![
            PodRoute {
                dst: self.plan.fleet_cidr.to_string(),
                gw,
            },
            PodRoute {
                dst: self.plan.vip_range.to_string(),
                gw,
            },
        ]
    }

    pub fn mtu(&self) -> u32 {
        self.local.mtu
    }

    /// Creates (or repairs) the CNF netns: loopback up, the bridge holding the node gateway
    /// address, forwarding on. Idempotent.
    pub async fn ensure_cnf(&self) -> Result<(), DatapathError> {
        let path = netns::ensure_named(&self.local.cnf_netns)?;
        let bridge = self.local.bridge.clone();
        let mtu = self.local.mtu;
        let gw = self.plan.gateway();
        let prefix = self.plan.node_subnet.prefix();
        let cnf = path.clone();
        netns::with_netlink(vec![path], move |h| async move {
            let h = &h[0];
            if let Some(lo) = link_by_name(h, "lo").await? {
                h.link()
                    .set(LinkUnspec::new_with_index(lo.header.index).up().build())
                    .execute()
                    .await
                    .map_err(nl("set lo up in the CNF netns"))?;
            }
            let br = match link_by_name(h, &bridge).await? {
                Some(l) => l,
                None => {
                    h.link()
                        .add(LinkBridge::new(&bridge).mtu(mtu).build())
                        .execute()
                        .await
                        .map_err(nl(format!("create bridge {bridge}")))?;
                    link_by_name(h, &bridge).await?.ok_or_else(|| {
                        DatapathError::Check(format!("bridge {bridge} vanished after creation"))
                    })?
                }
            };
            let idx = br.header.index;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(nl(format!("set {bridge} up")))?;
            // A plan change leaves the old gateway address behind: drop every other one.
            for (stale, stale_prefix, msg) in addresses(h, idx).await? {
                if (stale, stale_prefix) != (gw, prefix) {
                    h.address().del(msg).execute().await.map_err(nl(format!(
                        "remove stale {stale}/{stale_prefix} from {bridge}"
                    )))?;
                }
            }
            if !has_address(h, idx, gw, prefix).await? {
                h.address()
                    .add(idx, IpAddr::V4(gw), prefix)
                    .execute()
                    .await
                    .map_err(nl(format!("add {gw}/{prefix} to {bridge}")))?;
            }
            write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
            Ok::<_, DatapathError>(())
        })
        .await??;
        tracing::info!(cnf = %cnf.display(), bridge = %self.local.bridge, gateway = %gw, "CNF netns ready");
        Ok(())
    }

    /// Gives the pod in `pod_netns` its `eth-fleet` with `att.address`, routes included.
    /// On failure nothing is left behind.
    pub async fn attach(
        &self,
        pod_netns: &Path,
        att: &Attachment,
    ) -> Result<PodLink, DatapathError> {
        let pod_file = netns::open(pod_netns)?;
        let bridge = self.local.bridge.clone();
        let host_veth = att.host_veth.clone();
        let mtu = self.local.mtu;
        let address = att.address;
        let prefix = att.prefix_len;
        let routes = self.route_targets();
        let gw = self.plan.gateway();
        netns::with_netlink(
            vec![self.cnf_path(), pod_netns.to_owned()],
            move |h| async move {
                let (cnf, pod) = (&h[0], &h[1]);
                let made = async {
                    // Leftovers of an attach that was interrupted (daemon killed mid-way).
                    delete_link(cnf, &host_veth).await?;
                    delete_link(pod, POD_INTERFACE).await?;
                    let br = link_by_name(cnf, &bridge).await?.ok_or_else(|| {
                        DatapathError::Check(format!("bridge {bridge} missing in the CNF netns"))
                    })?;
                    let peer = LinkMessageBuilder::<LinkUnspec>::new()
                        .name(POD_INTERFACE.to_string())
                        .mtu(mtu)
                        .address(pod_mac(address).to_vec())
                        .setns_by_fd(pod_file.as_raw_fd())
                        .build();
                    let veth = LinkVeth::new(&host_veth, POD_INTERFACE)
                        .mtu(mtu)
                        .controller(br.header.index)
                        .up()
                        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                        .build();
                    cnf.link()
                        .add(veth)
                        .execute()
                        .await
                        .map_err(nl(format!("create veth {host_veth} <-> {POD_INTERFACE}")))?;
                    let link = link_by_name(pod, POD_INTERFACE).await?.ok_or_else(|| {
                        DatapathError::Check(format!(
                            "{POD_INTERFACE} did not appear in the pod netns"
                        ))
                    })?;
                    let idx = link.header.index;
                    pod.address()
                        .add(idx, IpAddr::V4(address), prefix)
                        .execute()
                        .await
                        .map_err(nl(format!("add {address}/{prefix} to {POD_INTERFACE}")))?;
                    pod.link()
                        .set(LinkUnspec::new_with_index(idx).up().build())
                        .execute()
                        .await
                        .map_err(nl(format!("set {POD_INTERFACE} up")))?;
                    for dst in &routes {
                        let route = RouteMessageBuilder::<Ipv4Addr>::new()
                            .destination_prefix(dst.network(), dst.prefix())
                            .gateway(gw)
                            .output_interface(idx)
                            .build();
                        match pod.route().add(route).execute().await {
                            Ok(()) => {}
                            Err(e) if errno(&e) == Some(libc_eexist()) => {}
                            Err(e) => return Err(nl(format!("add route {dst} via {gw}"))(e)),
                        }
                    }
                    Ok(PodLink { mac: mac_of(&link) })
                }
                .await;
                if made.is_err() {
                    let _ = delete_link(cnf, &host_veth).await;
                    let _ = delete_link(pod, POD_INTERFACE).await;
                }
                made
            },
        )
        .await?
    }

    /// Removes the pod's link (both veth ends). Missing netns or link: nothing to do.
    pub async fn detach(&self, att: &Attachment) -> Result<(), DatapathError> {
        let host_veth = att.host_veth.clone();
        netns::with_netlink(vec![self.cnf_path()], move |h| async move {
            delete_link(&h[0], &host_veth).await
        })
        .await?
    }

    /// Index of the pod's veth end in the CNF netns, if it exists. Deleting by this index
    /// later can never hit a newer link that re-uses the name (the kernel does not re-use
    /// indexes of a netns while it lives).
    pub async fn host_veth_index(&self, att: &Attachment) -> Result<Option<u32>, DatapathError> {
        let host_veth = att.host_veth.clone();
        netns::with_netlink(vec![self.cnf_path()], move |h| async move {
            Ok(link_by_name(&h[0], &host_veth)
                .await?
                .map(|l| l.header.index))
        })
        .await?
    }

    /// Deletes a link of the CNF netns by index; already gone is fine. Deleting a veth waits
    /// for the kernel's RCU grace period (~10–20 ms), which is why callers run it off the
    /// request path.
    pub async fn delete_link_index(&self, index: u32) -> Result<(), DatapathError> {
        netns::with_netlink(vec![self.cnf_path()], move |h| async move {
            match h[0].link().del(index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
                Err(e) => Err(nl(format!("delete link #{index}"))(e)),
            }
        })
        .await?
    }

    /// Verifies the pod's `eth-fleet`: exists, up, holds the address, has the routes; and its
    /// veth peer sits on the bridge.
    pub async fn check(&self, pod_netns: &Path, att: &Attachment) -> Result<(), DatapathError> {
        let bridge = self.local.bridge.clone();
        let host_veth = att.host_veth.clone();
        let (address, prefix) = (att.address, att.prefix_len);
        let routes = self.route_targets();
        let gw = self.plan.gateway();
        netns::with_netlink(
            vec![self.cnf_path(), pod_netns.to_owned()],
            move |h| async move {
                let (cnf, pod) = (&h[0], &h[1]);
                let fail = |m: String| Err(DatapathError::Check(m));
                let Some(link) = link_by_name(pod, POD_INTERFACE).await? else {
                    return fail(format!("{POD_INTERFACE} is missing in the pod netns"));
                };
                if !link.header.flags.contains(LinkFlags::Up) {
                    return fail(format!("{POD_INTERFACE} is down"));
                }
                if !has_address(pod, link.header.index, address, prefix).await? {
                    return fail(format!("{POD_INTERFACE} lacks {address}/{prefix}"));
                }
                let present = route_dsts_via(pod, link.header.index, gw).await?;
                for dst in &routes {
                    if !present.contains(dst) {
                        return fail(format!(
                            "route {dst} via {gw} dev {POD_INTERFACE} is missing"
                        ));
                    }
                }
                let Some(peer) = link_by_name(cnf, &host_veth).await? else {
                    return fail(format!("veth peer {host_veth} is missing in the CNF netns"));
                };
                let Some(br) = link_by_name(cnf, &bridge).await? else {
                    return fail(format!("bridge {bridge} is missing in the CNF netns"));
                };
                let on_bridge = peer
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Controller(i) if *i == br.header.index));
                if !on_bridge {
                    return fail(format!("{host_veth} is not attached to {bridge}"));
                }
                Ok(())
            },
        )
        .await?
    }

    /// Names of the pod veth ends present in the CNF netns (for leak checks and cleanup).
    pub async fn host_veths(&self) -> Result<Vec<String>, DatapathError> {
        netns::with_netlink(vec![self.cnf_path()], |h| async move {
            let links: Vec<LinkMessage> = h[0]
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("list links"))?;
            Ok(links
                .iter()
                .filter_map(link_name)
                .filter(|n| is_host_veth_name(n))
                .collect())
        })
        .await?
    }

    /// Deletes one veth end in the CNF netns by name (leak cleanup).
    pub async fn delete_host_veth(&self, name: &str) -> Result<(), DatapathError> {
        let name = name.to_owned();
        netns::with_netlink(vec![self.cnf_path()], move |h| async move {
            delete_link(&h[0], &name).await
        })
        .await?
    }

    fn route_targets(&self) -> Vec<Ipv4Network> {
        vec![self.plan.fleet_cidr, self.plan.vip_range]
    }
}

fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn mac_of(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

pub(crate) async fn link_by_name(
    h: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, DatapathError> {
    netlink::find_link(h, name)
        .await
        .map_err(nl(format!("look up link {name}")))
}

async fn delete_link(h: &Handle, name: &str) -> Result<(), DatapathError> {
    netlink::delete_link(h, name)
        .await
        .map_err(nl(format!("delete link {name}")))
}

/// The IPv4 addresses on link `idx`, with the messages that delete them.
async fn addresses(
    h: &Handle,
    idx: u32,
) -> Result<Vec<(Ipv4Addr, u8, AddressMessage)>, DatapathError> {
    let msgs = netlink::link_addresses(h, idx)
        .await
        .map_err(nl("list addresses"))?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match netlink::address_of(&m)? {
            IpAddr::V4(a) => Some((a, m.header.prefix_len, m)),
            IpAddr::V6(_) => None,
        })
        .collect())
}

async fn has_address(
    h: &Handle,
    idx: u32,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<bool, DatapathError> {
    Ok(addresses(h, idx)
        .await?
        .iter()
        .any(|(a, p, _)| *a == addr && *p == prefix))
}

async fn route_dsts_via(
    h: &Handle,
    idx: u32,
    gw: Ipv4Addr,
) -> Result<Vec<Ipv4Network>, DatapathError> {
    let mut q = RouteMessageBuilder::<Ipv4Addr>::new().build();
    q.header.address_family = AddressFamily::Inet;
    let routes: Vec<_> = h
        .route()
        .get(q)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list routes"))?;
    Ok(routes
        .iter()
        .filter(|r| {
            r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == idx))
                && r.attributes.iter().any(
                    |a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == gw),
                )
        })
        .filter_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                    Ipv4Network::new(*d, r.header.destination_prefix_length).ok()
                }
                _ => None,
            })
        })
        .collect())
}

/// Writes a sysctl of the calling thread's netns (`/proc/sys/net` follows the opener's netns).
fn write_sysctl(path: &str, value: &str) -> Result<(), DatapathError> {
    std::fs::write(path, value).map_err(|source| DatapathError::Sysctl {
        path: path.into(),
        source,
    })
}

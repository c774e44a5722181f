//! The device's link inside its netns, shared by both backends: MTU, addresses, up, and one
//! route per allowed IP (`<prefix> dev <wg> proto fleet`), kept equal to the peers' set.
//!
//! Routes carry their own protocol number so a sync ([`fleet_core::routes::sync_routes`])
//! touches only the routes it made.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use fleet_core::routes::{self, Route, RouteOwner, RoutesError};
use ipnetwork::IpNetwork;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use crate::{GatewayError, Result};

/// The routing protocol number on the routes the gateway installs (`ip route ... proto 0xfb`),
/// outside the numbers iproute2 and routing daemons use.
pub const ROUTE_PROTOCOL: u8 = 0xfb;

pub(crate) use fleet_core::netlink::errno;

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> GatewayError {
    let op = op.into();
    move |source| GatewayError::Netlink { op, source }
}

pub(crate) async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    fleet_core::netlink::find_link(h, name)
        .await
        .map_err(nl(format!("look up link {name}")))
}

async fn index_of(h: &Handle, name: &str) -> Result<u32> {
    link_by_name(h, name)
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| GatewayError::Netlink {
            op: format!("find link {name}"),
            source: rtnetlink::Error::RequestFailed,
        })
}

/// Sets the MTU, adds the addresses (keeping ones already there) and brings `name` up.
pub(crate) async fn configure(
    h: &Handle,
    name: &str,
    mtu: u32,
    addresses: &[IpNetwork],
) -> Result<()> {
    let idx = index_of(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).mtu(mtu).build())
        .execute()
        .await
        .map_err(nl(format!("set mtu {mtu} on {name}")))?;
    let present = addresses_of(h, idx).await?;
    for addr in addresses {
        if present.contains(addr) {
            continue;
        }
        match h
            .address()
            .add(idx, addr.ip(), addr.prefix())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(nix::errno::Errno::EEXIST as i32) => {}
            Err(e) => return Err(nl(format!("add address {addr} to {name}"))(e)),
        }
    }
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {name} up")))
}

async fn addresses_of(h: &Handle, idx: u32) -> Result<Vec<IpNetwork>> {
    let msgs = fleet_core::netlink::link_addresses(h, idx)
        .await
        .map_err(nl("list addresses"))?;
    Ok(msgs
        .iter()
        .filter_map(|m| {
            IpNetwork::new(fleet_core::netlink::address_of(m)?, m.header.prefix_len).ok()
        })
        .collect())
}

/// The gateway's routes on `name`: its protocol number, out of the device, any table.
fn route_owner(name: &str) -> RouteOwner {
    RouteOwner::protocol(ROUTE_PROTOCOL).dev(name)
}

fn route_error(name: &str, e: RoutesError) -> GatewayError {
    match e.into_netlink() {
        Ok((op, source)) => GatewayError::Netlink { op, source },
        Err(RoutesError::Netns(e)) => GatewayError::Netns(e),
        Err(RoutesError::NoSuchDevice { .. }) => GatewayError::Netlink {
            op: format!("find link {name}"),
            source: rtnetlink::Error::RequestFailed,
        },
        Err(other) => GatewayError::InvalidConfig {
            name: name.into(),
            reason: other.to_string(),
        },
    }
}

/// The prefixes routed to `name` by the gateway (its protocol number), IPv4 and IPv6.
pub async fn gateway_routes(h: &Handle, name: &str) -> Result<Vec<IpNetwork>> {
    if link_by_name(h, name).await?.is_none() {
        return Ok(Vec::new());
    }
    Ok(routes::owned_routes(h, &route_owner(name))
        .await
        .map_err(|e| route_error(name, e))?
        .into_iter()
        .map(|r| r.destination)
        .collect())
}

/// Makes the gateway's routes on `name` exactly `desired` (`<prefix> dev <name> proto 0xfb`),
/// with [`routes::sync_routes`]. A prefix the kernel already routes to the device (its own
/// connected prefix) is left to the kernel.
pub(crate) async fn sync_routes(h: &Handle, name: &str, desired: &[IpNetwork]) -> Result<()> {
    let desired: Vec<Route> = desired.iter().map(|net| Route::to(*net)).collect();
    let report = routes::sync_routes(h, &route_owner(name), &desired)
        .await
        .map_err(|e| route_error(name, e))?;
    // A destination another owner holds (another device's route, the own-block unreachable
    // route) would leave the peer's traffic unrouted while the peer looks configured.
    if !report.blocked.is_empty() {
        let shown: Vec<String> = report.blocked.iter().map(ToString::to_string).collect();
        return Err(GatewayError::InvalidConfig {
            name: name.into(),
            reason: format!(
                "allowed IPs already routed elsewhere in the device's netns, so they cannot \
                 go to {name}: {}; remove them from the peer or free the route",
                shown.join(", ")
            ),
        });
    }
    Ok(())
}

/// `RTM_NEWLINK` moving link `index` into the netns open as `netns_fd`
/// (`ip link set <link> netns <ns>`).
pub fn move_message(index: u32, netns_fd: RawFd) -> LinkMessage {
    LinkUnspec::new_with_index(index)
        .setns_by_fd(netns_fd)
        .build()
}

/// Moves link `name` from the handle's netns into the netns at `target`. Its addresses and
/// routes stay behind (configure it afterwards); an open TUN fd or a kernel WireGuard device's
/// UDP socket keep working. Errors when `name` is not in the handle's netns, or `target`
/// already has a link of that name (`EEXIST`), or is not a netns.
pub async fn move_to_netns(h: &Handle, name: &str, target: &Path) -> Result<()> {
    let netns = fleet_core::netns::open(target)?;
    let idx = index_of(h, name).await?;
    h.link()
        .set(move_message(idx, netns.as_raw_fd()))
        .execute()
        .await
        .map_err(nl(format!(
            "move link {name} into netns {}",
            target.display()
        )))
}

/// Whether `link` is of kind `wireguard`.
pub(crate) fn is_wireguard(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Wireguard))))
    })
}

pub(crate) async fn delete(h: &Handle, name: &str) -> Result<()> {
    fleet_core::netlink::delete_link(h, name)
        .await
        .map_err(nl(format!("delete link {name}")))
}

/// Runs `work` with an rtnetlink handle inside `netns`, on a dedicated thread (never on the
/// caller's tokio worker).
pub(crate) async fn in_netns<T, F, Fut>(netns: PathBuf, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    fleet_core::netns::with_netlink(vec![netns], move |mut handles| {
        let h = handles.remove(0);
        async move { work(h).await }
    })
    .await?
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable;
    use rtnetlink::LinkWireguard;

    use super::*;

    #[test]
    fn move_message_names_the_link_and_the_target_netns_fd() {
        let msg = move_message(7, 42);
        assert_eq!(msg.header.index, 7);
        assert_eq!(msg.attributes, vec![LinkAttribute::NetNsFd(42)]);
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        // IFLA_NET_NS_FD (28), a u32 fd in host order.
        let mut nla = vec![8, 0, 28, 0];
        nla.extend(42u32.to_ne_bytes());
        assert!(bytes.windows(nla.len()).any(|w| w == nla), "{bytes:?}");
    }

    #[test]
    fn only_wireguard_links_count_as_wireguard() {
        assert!(is_wireguard(&LinkWireguard::new("wg0").build()));
        assert!(!is_wireguard(&LinkUnspec::new_with_name("wg0").build()));
    }
}

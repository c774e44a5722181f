//! `unreachable <own block>` in the gateway node's CNF netns, while the gateway runs (moved
//! here from the controller as it was; it moves onto `fleet_core::routes` once that is in).
//!
//! The relay peer's allowed IPs (and so the device's route) are the whole fleet CIDR, our own
//! block included. Without this route a packet to an unassigned address of our block (from
//! the gateway node, or arriving from another cluster) would go to the relay, which sends it
//! back to us, and so on until its TTL runs out. The nodes' subnets are more specific routes,
//! so only unassigned addresses hit it: they fail at once (ICMP unreachable).

use std::net::Ipv4Addr;
use std::path::Path;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::route::{RouteAttribute, RouteProtocol, RouteType};
use rtnetlink::RouteMessageBuilder;

/// Protocol number on the route (`ip route ... proto 0xfa`), so only it is ever touched.
pub const ROUTE_PROTOCOL: u8 = 0xfa;

#[derive(Debug, thiserror::Error)]
pub enum OwnBlockError {
    #[error(transparent)]
    Netns(#[from] fleet_core::netns::NetnsError),
    #[error("cannot {op} the unreachable route for {block} in {netns}: {source}")]
    Netlink {
        op: &'static str,
        block: String,
        netns: String,
        source: rtnetlink::Error,
    },
}

fn message(block: Ipv4Network) -> netlink_packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(block.network(), block.prefix())
        .kind(RouteType::Unreachable)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build()
}

/// Makes the CNF netns' own-block routes exactly `block` (or none): stale ones (another block,
/// or all of them with `None`) go.
pub async fn sync(netns: &Path, block: Option<Ipv4Network>) -> Result<(), OwnBlockError> {
    let label = netns.display().to_string();
    fleet_core::netns::with_netlink(vec![netns.to_owned()], move |h| async move {
        let h = &h[0];
        let fail = |op, b: String, source| OwnBlockError::Netlink {
            op,
            block: b,
            netns: label.clone(),
            source,
        };
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<_> = h
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(|e| fail("list", "routes".into(), e))?;
        let mut present = false;
        for r in routes {
            if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(netlink_packet_route::route::RouteAddress::Inet(
                    ip,
                )) => Some(*ip),
                _ => None,
            });
            let net =
                dst.and_then(|ip| Ipv4Network::new(ip, r.header.destination_prefix_length).ok());
            if net.is_some() && net == block {
                present = true;
                continue;
            }
            let shown = net.map_or_else(|| "a route".to_string(), |n| n.to_string());
            match h.route().del(r).execute().await {
                Ok(()) => {}
                Err(e) if fleet_core::netlink::is_errno(&e, nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(fail("delete", shown, e)),
            }
        }
        if let (Some(b), false) = (block, present) {
            match h.route().add(message(b)).execute().await {
                Ok(()) => {}
                Err(e) if fleet_core::netlink::is_errno(&e, nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(fail("add", b.to_string(), e)),
            }
        }
        Ok(())
    })
    .await?
}

//! `unreachable <own block>` in the gateway node's CNF netns, while the gateway runs: one
//! call of the route-sync primitive `fleet_core::routes` (moved here from the controller).
//!
//! The relay peer's allowed IPs (and so the device's route) are the whole fleet CIDR, our own
//! block included. Without this route a packet to an unassigned address of our block (from
//! the gateway node, or arriving from another cluster) would go to the relay, which sends it
//! back to us, and so on until its TTL runs out. The nodes' subnets are more specific routes,
//! so only unassigned addresses hit it: they fail at once (ICMP unreachable).

use std::path::Path;

use fleet_core::routes::{Route, RouteOwner, RoutesError, sync_routes_in};
use ipnetwork::Ipv4Network;

/// Protocol number on the route (`ip route ... proto 0xfa`), so only it is ever touched.
pub const ROUTE_PROTOCOL: u8 = 0xfa;

/// What failed while syncing the route; names the block's route and the netns.
pub type OwnBlockError = RoutesError;

/// Makes the CNF netns' own-block routes exactly `block` (or none): stale ones (another block,
/// or all of them with `None`) go.
pub async fn sync(netns: &Path, block: Option<Ipv4Network>) -> Result<(), OwnBlockError> {
    let desired = block
        .map(|b| Route::unreachable(b.into()))
        .into_iter()
        .collect();
    sync_routes_in(netns, RouteOwner::protocol(ROUTE_PROTOCOL), desired).await?;
    Ok(())
}

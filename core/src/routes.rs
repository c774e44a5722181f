//! Routes owned by one route protocol, kept equal to a desired set: the single primitive behind
//! every route the fleet programs (the overlay's peer routes, the WireGuard device's allowed
//! IPs, the own block's `unreachable` route).
//!
//! ```text
//!  RouteOwner::protocol(0xfb).dev("wg0")      ≈ ip route show proto 0xfb dev wg0
//!  Route::to(net).dev(7).via(gw).onlink()          ≈ <net> via <gw> dev if7 onlink
//!  Route::unreachable(block)                       ≈ unreachable <block>
//!  sync_routes(&handle, &owner, &desired)          ≈ delete the owner's routes not desired,
//!                                                    add (or replace) the missing ones
//! ```
//!
//! The owner's protocol number marks the routes it made (`ip route ... proto N`); a sync reads
//! only those (optionally only on one output device and in one table) and never deletes or
//! replaces a route of another protocol. [`plan_route_changes`] is the pure diff behind it.
//!
//! A route's kernel identity is (table, destination, metric): two routes with that key cannot
//! both exist, so a desired route whose key is held by one of our routes with other attributes
//! replaces it in place (no gap in forwarding), and one whose key is held by another
//! protocol's route is left out and reported as blocked (`EEXIST`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::netlink::{find_link, is_errno};
use crate::netns::{self, NetnsError};

/// The main routing table (`RT_TABLE_MAIN`), where routes go unless told otherwise.
pub const MAIN_TABLE: u32 = 254;

/// What the kernel does with packets to a route's destination (`ip route add <type> ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// Forward (via a gateway or straight out of a device).
    Unicast,
    /// Drop and answer ICMP unreachable.
    Unreachable,
    /// Drop silently.
    Blackhole,
    /// Drop and answer ICMP administratively prohibited.
    Prohibit,
}

impl RouteKind {
    fn to_netlink(self) -> RouteType {
        match self {
            RouteKind::Unicast => RouteType::Unicast,
            RouteKind::Unreachable => RouteType::Unreachable,
            RouteKind::Blackhole => RouteType::BlackHole,
            RouteKind::Prohibit => RouteType::Prohibit,
        }
    }

    fn from_netlink(t: RouteType) -> Option<RouteKind> {
        match t {
            RouteType::Unicast => Some(RouteKind::Unicast),
            RouteType::Unreachable => Some(RouteKind::Unreachable),
            RouteType::BlackHole => Some(RouteKind::Blackhole),
            RouteType::Prohibit => Some(RouteKind::Prohibit),
            _ => None,
        }
    }
}

/// A device, by interface index or by name (a name is looked up in the handle's netns).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    Index(u32),
    Name(String),
}

impl From<u32> for Device {
    fn from(index: u32) -> Device {
        Device::Index(index)
    }
}

impl From<&str> for Device {
    fn from(name: &str) -> Device {
        Device::Name(name.into())
    }
}

impl From<String> for Device {
    fn from(name: String) -> Device {
        Device::Name(name)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Index(i) => write!(f, "if{i}"),
            Device::Name(n) => f.write_str(n),
        }
    }
}

/// One route, as `ip route` would print it. Built with [`Route::to`] or
/// [`Route::unreachable`] and the chained setters; compared by value (after the kernel's
/// defaults are filled in: metric 0 for IPv4, 1024 for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// Destination prefix; must be a network address (`10.1.0.0/16`, not `10.1.2.3/16`).
    pub destination: IpNetwork,
    pub kind: RouteKind,
    /// Output device; `None` for non-unicast routes, and for unicast routes of an owner that
    /// names a device (the owner's device is used).
    pub device: Option<Device>,
    /// Gateway (`via`); same address family as the destination.
    pub via: Option<IpAddr>,
    /// `onlink`: the gateway is on the device even without a matching address.
    pub onlink: bool,
    /// `metric`; `None` is the kernel's default for the family.
    pub metric: Option<u32>,
    /// Routing table id, [`MAIN_TABLE`] unless set.
    pub table: u32,
}

impl Route {
    /// `<destination>`: a unicast route, to be given a device and/or a gateway.
    pub fn to(destination: IpNetwork) -> Route {
        Route {
            destination,
            kind: RouteKind::Unicast,
            device: None,
            via: None,
            onlink: false,
            metric: None,
            table: MAIN_TABLE,
        }
    }

    /// `unreachable <destination>`.
    pub fn unreachable(destination: IpNetwork) -> Route {
        Route {
            kind: RouteKind::Unreachable,
            ..Route::to(destination)
        }
    }

    /// `dev <index or name>`.
    pub fn dev(mut self, device: impl Into<Device>) -> Route {
        self.device = Some(device.into());
        self
    }

    /// `via <gateway>`.
    pub fn via(mut self, gateway: IpAddr) -> Route {
        self.via = Some(gateway);
        self
    }

    /// `onlink`.
    pub fn onlink(mut self) -> Route {
        self.onlink = true;
        self
    }

    /// `metric <metric>`.
    pub fn metric(mut self, metric: u32) -> Route {
        self.metric = Some(metric);
        self
    }

    /// `table <table>`.
    pub fn table(mut self, table: u32) -> Route {
        self.table = table;
        self
    }

    /// The kernel's identity of a route: at most one route per key can exist.
    fn key(&self) -> (u32, IpNetwork, u32) {
        (self.table, self.destination, self.effective_metric())
    }

    fn effective_metric(&self) -> u32 {
        self.metric.unwrap_or(default_metric(self.destination))
    }

    /// The same route with the kernel's defaults made implicit, so a desired route and the
    /// dumped one compare equal.
    fn normalized(mut self) -> Route {
        if self.metric == Some(default_metric(self.destination)) {
            self.metric = None;
        }
        if self.kind != RouteKind::Unicast {
            // IPv6 hangs reject routes on `lo`; the device means nothing for them.
            self.device = None;
            self.via = None;
            self.onlink = false;
        }
        self
    }
}

/// The metric the kernel gives a route added without one.
fn default_metric(destination: IpNetwork) -> u32 {
    match destination {
        IpNetwork::V4(_) => 0,
        // IP6_RT_PRIO_USER
        IpNetwork::V6(_) => 1024,
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Unicast => {}
            RouteKind::Unreachable => f.write_str("unreachable ")?,
            RouteKind::Blackhole => f.write_str("blackhole ")?,
            RouteKind::Prohibit => f.write_str("prohibit ")?,
        }
        write!(f, "{}", self.destination)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        if let Some(dev) = &self.device {
            write!(f, " dev {dev}")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        if self.table != MAIN_TABLE {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

/// Whose routes a sync may touch: those of one route protocol number, optionally only on one
/// output device and in one table. Everything else in the netns is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteOwner {
    /// `proto <n>` on every route we make (e.g. 0xfb for the gateway, 4 = `static`).
    pub protocol: u8,
    /// Only routes out of this device are ours.
    pub device: Option<Device>,
    /// Only routes in this table are ours; `None`: any table.
    pub table: Option<u32>,
    /// The netns the handle works in, named in errors only.
    pub netns: Option<PathBuf>,
}

impl RouteOwner {
    /// The routes of protocol `protocol`, on any device, in any table.
    pub fn protocol(protocol: u8) -> RouteOwner {
        RouteOwner {
            protocol,
            device: None,
            table: None,
            netns: None,
        }
    }

    /// Restricts the owner to routes out of `device` (an index or a name).
    pub fn dev(mut self, device: impl Into<Device>) -> RouteOwner {
        self.device = Some(device.into());
        self
    }

    /// Restricts the owner to routes in table `table`.
    pub fn table(mut self, table: u32) -> RouteOwner {
        self.table = Some(table);
        self
    }

    /// Names the netns in errors (the handle decides where the routes are).
    pub fn netns(mut self, path: impl Into<PathBuf>) -> RouteOwner {
        self.netns = Some(path.into());
        self
    }

    fn netns_label(&self) -> String {
        match &self.netns {
            Some(p) => format!("netns {}", p.display()),
            None => "the handle's netns".into(),
        }
    }
}

impl fmt::Display for RouteOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "proto {:#x}", self.protocol)?;
        if let Some(d) = &self.device {
            write!(f, " dev {d}")?;
        }
        if let Some(t) = self.table {
            write!(f, " table {t}")?;
        }
        Ok(())
    }
}

/// What a sync changed. `blocked` routes were not added because another protocol's route
/// holds their key (table, destination, metric); they are retried at the next sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSyncReport {
    pub added: Vec<Route>,
    pub replaced: Vec<Route>,
    pub deleted: Vec<Route>,
    pub blocked: Vec<Route>,
}

impl RouteSyncReport {
    /// True when the kernel already held exactly the desired routes.
    pub fn is_unchanged(&self) -> bool {
        self.added.is_empty() && self.replaced.is_empty() && self.deleted.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot list the routes of {owner} in {netns}: {source}")]
    Dump {
        owner: String,
        netns: String,
        source: rtnetlink::Error,
    },
    #[error("cannot look up device {device} in {netns}: {source}")]
    DeviceLookup {
        device: String,
        netns: String,
        source: rtnetlink::Error,
    },
    #[error("device {device} does not exist in {netns}; create it before routing to it")]
    NoSuchDevice { device: String, netns: String },
    #[error("route {route} cannot be made in {netns}: {reason}")]
    Invalid {
        route: Box<Route>,
        netns: String,
        reason: String,
    },
    #[error("cannot {op} route {route} in {netns}: {source}")]
    Write {
        op: &'static str,
        route: Box<Route>,
        netns: String,
        source: rtnetlink::Error,
    },
}

impl RoutesError {
    /// The failed netlink request (what, on which route or device, in which netns) and the
    /// kernel's answer, for callers whose errors carry netlink failures as such a pair;
    /// `Err(self)` for the failures that are not a netlink answer.
    pub fn into_netlink(self) -> Result<(String, rtnetlink::Error), RoutesError> {
        match self {
            RoutesError::Dump {
                owner,
                netns,
                source,
            } => Ok((format!("list the routes of {owner} in {netns}"), source)),
            RoutesError::DeviceLookup {
                device,
                netns,
                source,
            } => Ok((format!("look up device {device} in {netns}"), source)),
            RoutesError::Write {
                op,
                route,
                netns,
                source,
            } => Ok((format!("{op} route {route} in {netns}"), source)),
            other => Err(other),
        }
    }

    fn invalid(route: &Route, owner: &RouteOwner, reason: impl Into<String>) -> RoutesError {
        RoutesError::Invalid {
            route: Box::new(route.clone()),
            netns: owner.netns_label(),
            reason: reason.into(),
        }
    }
}

/// The pure diff: which of the `current` routes (all of one owner) to delete, and which
/// desired routes to add, so the owner's routes become exactly `desired`.
///
/// Both lists are compared by value after the kernel's defaults are made implicit; duplicates
/// in `desired` count once. A current route that differs from a desired one with the same
/// key (table, destination, metric) is not deleted: the add replaces it in place. Both
/// results are sorted.
pub fn plan_route_changes(current: &[Route], desired: &[Route]) -> (Vec<Route>, Vec<Route>) {
    let current: Vec<Route> = current.iter().cloned().map(Route::normalized).collect();
    let desired: BTreeSet<Route> = desired.iter().cloned().map(Route::normalized).collect();
    let have: BTreeSet<&Route> = current.iter().collect();
    let to_add: Vec<Route> = desired
        .iter()
        .filter(|d| !have.contains(d))
        .cloned()
        .collect();
    let add_keys: BTreeSet<_> = to_add.iter().map(Route::key).collect();
    // Per key to be (re)written, the first stale route there is replaced, not deleted.
    let mut replaced_keys = BTreeSet::new();
    let mut sorted = current.clone();
    sorted.sort();
    sorted.dedup();
    let to_delete = sorted
        .into_iter()
        .filter(|c| !desired.contains(c))
        .filter(|c| !(add_keys.contains(&c.key()) && replaced_keys.insert(c.key())))
        .collect();
    (to_delete, to_add)
}

/// One of the owner's routes as the kernel holds it (the dumped message deletes it exactly).
struct Installed {
    route: Route,
    message: RouteMessage,
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    if m.header.flags.contains(RouteFlags::Cloned) {
        return None;
    }
    let kind = RouteKind::from_netlink(m.header.kind)?;
    let mut dst = None;
    let mut via = None;
    let mut oif = None;
    let mut metric = None;
    let mut table = u32::from(m.header.table);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => via = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let dst = match (dst, m.header.address_family) {
        (Some(ip), _) => ip,
        (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let destination = IpNetwork::new(dst, m.header.destination_prefix_length).ok()?;
    Some(
        Route {
            destination,
            kind,
            device: oif.map(Device::Index),
            via,
            onlink: m.header.flags.contains(RouteFlags::Onlink),
            metric,
            table,
        }
        .normalized(),
    )
}

async fn device_index(h: &Handle, device: &Device, owner: &RouteOwner) -> Result<u32, RoutesError> {
    match device {
        Device::Index(i) => Ok(*i),
        Device::Name(name) => find_link(h, name)
            .await
            .map_err(|source| RoutesError::DeviceLookup {
                device: name.clone(),
                netns: owner.netns_label(),
                source,
            })?
            .map(|l| l.header.index)
            .ok_or_else(|| RoutesError::NoSuchDevice {
                device: name.clone(),
                netns: owner.netns_label(),
            }),
    }
}

async fn dump_owned(
    h: &Handle,
    owner: &RouteOwner,
    oif: Option<u32>,
) -> Result<Vec<Installed>, RoutesError> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut q = RouteMessageBuilder::<IpAddr>::new().build();
        q.header.address_family = family;
        let msgs: Vec<RouteMessage> =
            h.route()
                .get(q)
                .execute()
                .try_collect()
                .await
                .map_err(|source| RoutesError::Dump {
                    owner: owner.to_string(),
                    netns: owner.netns_label(),
                    source,
                })?;
        for m in msgs {
            if m.header.protocol != RouteProtocol::from(owner.protocol) {
                continue;
            }
            let Some(route) = route_of(&m) else {
                continue;
            };
            if owner.table.is_some_and(|t| t != route.table) {
                continue;
            }
            let on_dev = m
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if Some(*i) == oif));
            if oif.is_some() && !on_dev {
                continue;
            }
            out.push(Installed { route, message: m });
        }
    }
    Ok(out)
}

/// The owner's routes in the handle's netns, IPv4 and IPv6, as [`Route`]s (devices by
/// index). Errors: the owner's device is missing or the dump fails.
pub async fn owned_routes(h: &Handle, owner: &RouteOwner) -> Result<Vec<Route>, RoutesError> {
    let oif = match &owner.device {
        Some(d) => Some(device_index(h, d, owner).await?),
        None => None,
    };
    Ok(dump_owned(h, owner, oif)
        .await?
        .into_iter()
        .map(|i| i.route)
        .collect())
}

/// Resolves device names, gives unicast routes the owner's device, and refuses routes the
/// owner could never see again (another device or table, a host-bit prefix) or two routes
/// for one key.
async fn resolve_desired(
    h: &Handle,
    owner: &RouteOwner,
    oif: Option<u32>,
    desired: &[Route],
) -> Result<Vec<Route>, RoutesError> {
    let mut out = Vec::with_capacity(desired.len());
    let mut keys: BTreeMap<(u32, IpNetwork, u32), Route> = BTreeMap::new();
    for r in desired {
        let mut route = r.clone();
        if route.destination.network() != route.destination.ip() {
            return Err(RoutesError::invalid(
                r,
                owner,
                format!(
                    "the destination has host bits set; use {}/{}",
                    route.destination.network(),
                    route.destination.prefix()
                ),
            ));
        }
        if let Some(via) = route.via
            && via.is_ipv4() != route.destination.is_ipv4()
        {
            return Err(RoutesError::invalid(
                r,
                owner,
                "the gateway's address family differs from the destination's",
            ));
        }
        if let Some(d) = &route.device {
            route.device = Some(Device::Index(device_index(h, d, owner).await?));
        }
        if let Some(owned) = oif {
            if route.kind != RouteKind::Unicast {
                return Err(RoutesError::invalid(
                    r,
                    owner,
                    format!(
                        "a {:?} route has no device, but {owner} owns only routes on one",
                        route.kind
                    ),
                ));
            }
            match route.device {
                None => route.device = Some(Device::Index(owned)),
                Some(Device::Index(i)) if i == owned => {}
                Some(_) => {
                    return Err(RoutesError::invalid(
                        r,
                        owner,
                        format!("it leaves by another device than {owner}'s"),
                    ));
                }
            }
        }
        if owner.table.is_some_and(|t| t != route.table) {
            return Err(RoutesError::invalid(
                r,
                owner,
                format!("it is in another table than {owner}'s"),
            ));
        }
        let route = route.normalized();
        if let Some(other) = keys.insert(route.key(), route.clone())
            && other != route
        {
            return Err(RoutesError::invalid(
                r,
                owner,
                format!("{other} is desired for the same destination, metric and table"),
            ));
        }
        out.push(route);
    }
    Ok(out)
}

fn message(route: &Route, protocol: u8) -> Result<RouteMessage, String> {
    let dst = route.destination;
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix())
        .map_err(|e| e.to_string())?;
    if let Some(via) = route.via {
        b = b.gateway(via).map_err(|e| e.to_string())?;
    }
    if let Some(Device::Index(i)) = route.device {
        b = b.output_interface(i);
    }
    if let Some(m) = route.metric {
        b = b.priority(m);
    }
    if route.onlink {
        b = b.onlink();
    }
    Ok(b.kind(route.kind.to_netlink())
        .protocol(RouteProtocol::from(protocol))
        .table_id(route.table)
        .build())
}

/// Makes the owner's routes in the handle's netns exactly `desired`: dumps the owner's
/// routes (IPv4 and IPv6), deletes those not desired, replaces ours that differ from a
/// desired route of the same key, and adds the missing ones. Routes of other protocols (or,
/// for an owner restricted to a device or table, elsewhere) are never touched.
///
/// A desired unicast route without a device gets the owner's device. A route that vanished
/// before its delete (`ESRCH`) is fine; an add that meets `EEXIST` re-reads the owner's
/// routes: ours there → replaced if different, another protocol's → reported as `blocked`.
///
/// Errors: the owner's or a route's device does not exist, a desired route is invalid for
/// this owner (host bits, another device or table, two routes for one key), or the kernel
/// refuses a dump, delete, add or replace ([`RoutesError::Write`] names the route).
pub async fn sync_routes(
    h: &Handle,
    owner: &RouteOwner,
    desired: &[Route],
) -> Result<RouteSyncReport, RoutesError> {
    let oif = match &owner.device {
        Some(d) => Some(device_index(h, d, owner).await?),
        None => None,
    };
    let desired = resolve_desired(h, owner, oif, desired).await?;
    let installed = dump_owned(h, owner, oif).await?;
    let current: Vec<Route> = installed.iter().map(|i| i.route.clone()).collect();
    let (to_delete, to_add) = plan_route_changes(&current, &desired);
    let write_err = |op, route: &Route, source| RoutesError::Write {
        op,
        route: Box::new(route.clone()),
        netns: owner.netns_label(),
        source,
    };
    let mut report = RouteSyncReport::default();
    for route in &to_delete {
        let Some(i) = installed.iter().find(|i| &i.route == route) else {
            continue;
        };
        match h.route().del(i.message.clone()).execute().await {
            Ok(()) => report.deleted.push(route.clone()),
            Err(e)
                if is_errno(&e, nix::errno::Errno::ESRCH)
                    || is_errno(&e, nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(write_err("delete", route, e)),
        }
    }
    let kept: BTreeSet<_> = current
        .iter()
        .filter(|c| !to_delete.contains(c))
        .map(Route::key)
        .collect();
    for route in &to_add {
        let msg = message(route, owner.protocol)
            .map_err(|reason| RoutesError::invalid(route, owner, reason))?;
        if kept.contains(&route.key()) {
            h.route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| write_err("replace", route, e))?;
            report.replaced.push(route.clone());
            continue;
        }
        match h.route().add(msg.clone()).execute().await {
            Ok(()) => report.added.push(route.clone()),
            Err(e) if is_errno(&e, nix::errno::Errno::EEXIST) => {
                // Someone got there first: if it is one of ours, make it right; if not, the
                // key belongs to another protocol and stays its.
                let now = dump_owned(h, owner, oif).await?;
                match now.iter().find(|i| i.route.key() == route.key()) {
                    Some(i) if &i.route == route => {}
                    Some(_) => {
                        h.route()
                            .add(msg)
                            .replace()
                            .execute()
                            .await
                            .map_err(|e| write_err("replace", route, e))?;
                        report.replaced.push(route.clone());
                    }
                    None => report.blocked.push(route.clone()),
                }
            }
            Err(e) => return Err(write_err("add", route, e)),
        }
    }
    if !report.is_unchanged() {
        tracing::debug!(
            owner = %owner,
            netns = %owner.netns_label(),
            added = report.added.len(),
            replaced = report.replaced.len(),
            deleted = report.deleted.len(),
            "routes synced"
        );
    }
    Ok(report)
}

/// [`sync_routes`] inside the netns at `netns`, on a dedicated thread (see
/// [`netns::with_netlink`]); errors name that netns. Errors as [`sync_routes`], plus
/// [`RoutesError::Netns`] when the netns cannot be entered.
pub async fn sync_routes_in(
    netns: &Path,
    owner: RouteOwner,
    desired: Vec<Route>,
) -> Result<RouteSyncReport, RoutesError> {
    let owner = match owner.netns {
        Some(_) => owner,
        None => owner.netns(netns),
    };
    netns::with_netlink(vec![netns.to_owned()], move |h| async move {
        sync_routes(&h[0], &owner, &desired).await
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn in_sync_means_nothing_to_do() {
        let routes = vec![
            Route::to(net("10.1.0.0/16")).dev(3),
            Route::unreachable(net("10.2.0.0/16")),
        ];
        assert_eq!(plan_route_changes(&routes, &routes), (vec![], vec![]));
    }

    #[test]
    fn stale_routes_go_and_missing_ones_come() {
        let current = vec![
            Route::to(net("10.1.0.0/16")).dev(3),
            Route::to(net("10.2.0.0/16")).dev(3),
        ];
        let desired = vec![
            Route::to(net("10.2.0.0/16")).dev(3),
            Route::to(net("10.3.0.0/16")).dev(3),
        ];
        let (del, add) = plan_route_changes(&current, &desired);
        assert_eq!(del, vec![Route::to(net("10.1.0.0/16")).dev(3)]);
        assert_eq!(add, vec![Route::to(net("10.3.0.0/16")).dev(3)]);
        // Nothing desired: everything of the owner goes.
        let (del, add) = plan_route_changes(&current, &[]);
        assert_eq!(del.len(), 2);
        assert!(add.is_empty());
    }

    #[test]
    fn a_changed_route_is_replaced_in_place_not_deleted() {
        let current = vec![
            Route::to(net("10.1.0.0/16"))
                .dev(3)
                .via(ip("10.0.0.1"))
                .onlink(),
        ];
        let desired = vec![
            Route::to(net("10.1.0.0/16"))
                .dev(3)
                .via(ip("10.0.0.2"))
                .onlink(),
        ];
        let (del, add) = plan_route_changes(&current, &desired);
        assert!(del.is_empty(), "same key: replaced, no gap: {del:?}");
        assert_eq!(add, desired);
        // A unicast route turning unreachable is the same key too.
        let (del, add) = plan_route_changes(&current, &[Route::unreachable(net("10.1.0.0/16"))]);
        assert!(del.is_empty());
        assert_eq!(add.len(), 1);
    }

    #[test]
    fn another_metric_or_table_is_another_route() {
        let current = vec![Route::to(net("10.1.0.0/16")).dev(3).metric(10)];
        let desired = vec![Route::to(net("10.1.0.0/16")).dev(3).metric(20)];
        let (del, add) = plan_route_changes(&current, &desired);
        assert_eq!(del, current);
        assert_eq!(add, desired);
        let desired = vec![Route::to(net("10.1.0.0/16")).dev(3).metric(10).table(100)];
        let (del, add) = plan_route_changes(&current, &desired);
        assert_eq!((del.len(), add.len()), (1, 1));
    }

    #[test]
    fn kernel_default_metrics_compare_equal_to_none() {
        // The kernel reports IPv6 routes with metric 1024 and IPv4 ones without a metric.
        let current = vec![
            Route::to(net("fd00::/64")).dev(3).metric(1024),
            Route::to(net("10.1.0.0/16")).dev(3),
        ];
        let desired = vec![
            Route::to(net("fd00::/64")).dev(3),
            Route::to(net("10.1.0.0/16")).dev(3).metric(0),
        ];
        assert_eq!(plan_route_changes(&current, &desired), (vec![], vec![]));
    }

    #[test]
    fn reject_routes_ignore_the_device_ipv6_reports() {
        // IPv6 hangs unreachable routes on lo; the desired route names no device.
        let current = vec![Route::unreachable(net("fd00::/48")).dev(1)];
        let desired = vec![Route::unreachable(net("fd00::/48"))];
        assert_eq!(plan_route_changes(&current, &desired), (vec![], vec![]));
    }

    #[test]
    fn duplicates_count_once() {
        let r = Route::to(net("10.1.0.0/16")).dev(3);
        let (del, add) = plan_route_changes(&[r.clone(), r.clone()], &[r.clone(), r.clone()]);
        assert!(del.is_empty() && add.is_empty());
        let (del, add) = plan_route_changes(&[], &[r.clone(), r.clone()]);
        assert!(del.is_empty());
        assert_eq!(add, vec![r]);
    }

    #[test]
    fn two_stale_routes_at_one_key_keep_one_for_the_replace() {
        let a = Route::to(net("fd00::/64")).dev(3);
        let b = Route::to(net("fd00::/64")).dev(4);
        let want = Route::to(net("fd00::/64")).dev(5);
        let (del, add) = plan_route_changes(&[a.clone(), b.clone()], std::slice::from_ref(&want));
        assert_eq!(del, vec![b]);
        assert_eq!(add, vec![want]);
    }

    #[test]
    fn routes_print_like_ip_route() {
        assert_eq!(
            Route::to(net("100.96.31.0/24"))
                .via(ip("100.96.31.0"))
                .dev("fleetvx")
                .onlink()
                .to_string(),
            "100.96.31.0/24 via 100.96.31.0 dev fleetvx onlink"
        );
        assert_eq!(
            Route::unreachable(net("100.96.0.0/16")).to_string(),
            "unreachable 100.96.0.0/16"
        );
        assert_eq!(
            Route::to(net("10.0.0.0/8"))
                .dev(7)
                .metric(5)
                .table(100)
                .to_string(),
            "10.0.0.0/8 dev if7 metric 5 table 100"
        );
        assert_eq!(
            RouteOwner::protocol(0xfb).dev("wg0").to_string(),
            "proto 0xfb dev wg0"
        );
    }

    #[test]
    fn a_dumped_message_reads_back_as_the_route_it_was_built_from() {
        let r = Route::to(net("100.96.31.0/24"))
            .via(ip("100.96.31.0"))
            .dev(9)
            .onlink()
            .metric(7)
            .table(1000);
        let back = route_of(&message(&r, 0xfb).unwrap()).unwrap();
        assert_eq!(back, r);
        let u = Route::unreachable(net("fd00::/48"));
        assert_eq!(route_of(&message(&u, 0xfa).unwrap()).unwrap(), u);
    }
}

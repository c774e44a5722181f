//! The node's plan: validated, checked against live allocations and against the networks the
//! node and its pods already use, its CNF netns and IPAM built, persisted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use fleet_core::config::{NodePlan, UsedNetwork};
use fleet_core::datapath::NodeDatapath;
use fleet_core::ipam::NodeIpam;
use fleet_core::state::check_plan_change;
use fleet_proto::node::{NodeError, PlanChange, PrimaryKind, PrimaryNetwork, SetPlanRequest};
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::RouteMessageBuilder;

use super::{Failure, Node, Planned};

fn parse_cidr(what: &'static str, v: &str) -> Result<ipnetwork::Ipv4Network, Failure> {
    v.parse()
        .map_err(|e: ipnetwork::IpNetworkError| Failure::NotACidr {
            what,
            value: v.to_owned(),
            reason: e.to_string(),
        })
}

impl Node {
    /// Builds the CNF netns and IPAM for `plan` and makes it current.
    pub(super) async fn install_plan(&self, plan: NodePlan) -> Result<Arc<Planned>, Failure> {
        // set_plan refuses such a plan; one restored at start (persisted, or the config's) is
        // kept, pods may hold addresses from it, but never silently.
        match networks_in(&self.underlay_netns, None, "the node's").await {
            Ok(host) => {
                if let Err(e) = plan.check_disjoint(&host) {
                    tracing::error!(error = %e, "the node's plan overlaps the node's own networks");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the node's networks"),
        }
        let datapath = NodeDatapath::new(plan.clone(), self.local.clone());
        datapath.ensure_cnf().await.map_err(Failure::Cnf)?;
        let ipam_dir = self.local.data_dir.join("ipam");
        let ipam = NodeIpam::open(&ipam_dir, plan.clone()).map_err(Failure::IpamOpen)?;
        let planned = Arc::new(Planned { ipam, datapath });
        *self.planned.write().expect("plan lock") = Some(planned.clone());
        tracing::info!(node_subnet = %plan.node_subnet, fleet_cidr = %plan.fleet_cidr, vip_range = %plan.vip_range, "node plan in effect");
        Ok(planned)
    }

    /// `set_plan`: the controller hands the node its plan. Idempotent; any change is refused
    /// while pods hold addresses (drain the node first).
    pub async fn set_plan(&self, req: SetPlanRequest) -> Result<PlanChange, Failure> {
        let plan = NodePlan::new(
            parse_cidr("fleet_cidr", &req.fleet_cidr)?,
            parse_cidr("vip_range", &req.vip_range)?,
            parse_cidr("node_subnet", &req.node_subnet)?,
        )
        .map_err(|e| Failure::InvalidPlan(e.to_string()))?;
        let _control = self.control.lock().await;
        let _gate = self.plan_gate.write().await;
        let current = self.planned_now();
        let allocated = current.as_ref().map_or(0, |p| p.ipam.allocated());
        let change = check_plan_change(
            current.as_ref().map(|p| p.datapath.plan()),
            &plan,
            allocated,
        )
        .map_err(|e| Failure::PlanConflict(e.to_string()))?;
        if change == PlanChange::Unchanged {
            return Ok(change);
        }
        // The daemon runs in the node's netns: a plan overlapping the node's own addresses or
        // routes would send pods' traffic for those networks over eth-fleet.
        let host = networks_in(&self.underlay_netns, None, "the node's")
            .await
            .map_err(|e| Failure::InvalidPlan(format!("cannot read the node's networks: {e}")))?;
        plan.check_disjoint(&host)
            .map_err(|e| Failure::InvalidPlan(e.to_string()))?;
        let planned = self.install_plan(plan.clone()).await?;
        self.store.save_plan(&plan).map_err(|e| Failure::Persist {
            what: "plan",
            reason: e.to_string(),
        })?;
        // The overlay's own VTEP MAC and the peers' validity follow the node subnet.
        let peers = self.peers();
        if !peers.is_empty()
            && let Err(e) = self.program_peers(&planned, &peers).await
        {
            tracing::error!(error = %NodeError::from(e), "overlay not in line with the new plan; resend set_peers");
        }
        // The VIP table's hairpin and refusal rules follow the node subnet and VIP range.
        self.services_follow_plan(&planned).await;
        Ok(change)
    }

    pub fn plan(&self) -> Option<SetPlanRequest> {
        self.planned_now().map(|p| {
            let plan = p.datapath.plan();
            SetPlanRequest {
                fleet_cidr: plan.fleet_cidr.to_string(),
                vip_range: plan.vip_range.to_string(),
                node_subnet: plan.node_subnet.to_string(),
            }
        })
    }
}

/// The networks the pod's primary plugin reported (fleet-cni's `primary`).
pub(super) fn primary_of(reported: &[PrimaryNetwork]) -> Result<Vec<UsedNetwork>, Failure> {
    let mut out = Vec::new();
    for n in reported {
        let net: Ipv4Network = n.cidr.parse().map_err(|e| {
            Failure::PrimaryUnreadable(format!("primary network {:?}: {e}", n.cidr))
        })?;
        let on = if n.interface.is_empty() {
            String::new()
        } else {
            format!(" on {}", n.interface)
        };
        match n.kind {
            PrimaryKind::Address => out.push(UsedNetwork::address(
                net.ip(),
                net.prefix(),
                format!("prevResult address {}{on}", n.cidr),
            )),
            PrimaryKind::Route => out.extend(UsedNetwork::route(
                net,
                format!("prevResult route to {}", n.cidr),
            )),
        }
    }
    Ok(out)
}

/// Every IPv4 network in use in `netns`: each address's subnet and each main-table route's
/// destination, except those on `skip_link` (the pod's own eth-fleet). `whose` labels them
/// ("the node's", "the pod's").
pub(super) async fn networks_in(
    netns: &Path,
    skip_link: Option<&'static str>,
    whose: &'static str,
) -> Result<Vec<UsedNetwork>, String> {
    let found =
        fleet_core::netns::with_netlink(vec![netns.to_owned()], move |handles| async move {
            let h = &handles[0];
            let links: HashMap<u32, String> = h
                .link()
                .get()
                .execute()
                .try_collect::<Vec<_>>()
                .await?
                .into_iter()
                .filter_map(|l| {
                    let name = l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some((l.header.index, name))
                })
                .collect();
            let name = |i: u32| links.get(&i).cloned().unwrap_or_else(|| format!("#{i}"));
            let mut out = Vec::new();
            for a in h.address().get().execute().try_collect::<Vec<_>>().await? {
                let dev = name(a.header.index);
                if Some(dev.as_str()) == skip_link {
                    continue;
                }
                let Some(IpAddr::V4(ip)) = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                }) else {
                    continue;
                };
                if ip.is_loopback() {
                    continue;
                }
                let len = a.header.prefix_len;
                out.push(UsedNetwork::address(
                    ip,
                    len,
                    format!("{whose} address {ip}/{len} on {dev}"),
                ));
            }
            let mut q = RouteMessageBuilder::<std::net::Ipv4Addr>::new().build();
            q.header.address_family = AddressFamily::Inet;
            let routes: Vec<RouteMessage> = h.route().get(q).execute().try_collect().await?;
            for r in routes {
                let mut table = u32::from(r.header.table);
                let (mut dst, mut oif) = (None, None);
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                let dev = oif.map(name).unwrap_or_default();
                if table != MAIN_TABLE || (skip_link.is_some() && Some(dev.as_str()) == skip_link) {
                    continue;
                }
                let Some(dst) = dst else { continue };
                let Ok(net) = Ipv4Network::new(dst, r.header.destination_prefix_length) else {
                    continue;
                };
                out.extend(UsedNetwork::route(
                    net,
                    format!("{whose} route to {net} dev {dev}"),
                ));
            }
            Ok::<_, rtnetlink::Error>(out)
        })
        .await
        .map_err(|e| e.to_string())?;
    found.map_err(|e| format!("{}: {e}", netns.display()))
}

/// `RT_TABLE_MAIN`: where a pod's or a node's ordinary routes live.
const MAIN_TABLE: u32 = 254;

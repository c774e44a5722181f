//! The checks over the fleet the hub lists: node plans and tunnels.

use std::collections::{BTreeMap, BTreeSet};

use fleet_hub_api::model::FleetView;
use fleet_hub_api::records::{
    EXPORT_RECORD_PREFIX, ExportRecord, GATEWAY_RECORD, GatewayRecord, NODE_RECORD_PREFIX,
    NodeRecord,
};
use ipnetwork::Ipv4Network;

use super::{
    CheckOutcome, GATEWAY_RECORD_STALE_SECS, HANDSHAKE_STALE_SECS, SETTLING_SECS, finding,
    gateways, human,
};

/// Every node the fleet mentions has a plan: the controller publishes `node/<name>` (the node's
/// subnet) for each node it planned, so a gateway node or an exporting node without one, a
/// subnet outside the cluster's block, two nodes with one subnet, or a settled member with no
/// node at all mean a node that cannot route fleet traffic.
pub fn check_node_plans(view: &FleetView, now: u64) -> CheckOutcome {
    let mut findings = Vec::new();
    let mut counted = 0;
    for c in &view.clusters {
        let id = c.id.to_string();
        let mut nodes: BTreeMap<String, NodeRecord> = BTreeMap::new();
        for r in view.records.iter().filter(|r| r.owner == c.id) {
            if let Some(name) = r.name.strip_prefix(NODE_RECORD_PREFIX)
                && let Ok(n) = serde_json::from_slice::<NodeRecord>(&r.value)
            {
                nodes.insert(name.to_string(), n);
            }
        }
        counted += nodes.len();
        let fix = |node: &str| {
            format!(
                "check that {node} is in cluster {id}'s controller --nodes file and that its \
                 fleet-nri answers on the node API socket; the active controller's log names \
                 the node (\"cannot read its state\", \"set_plan ... refused\", \"gets no subnet\")"
            )
        };
        if nodes.is_empty() && now.saturating_sub(c.joined_at) > SETTLING_SECS {
            findings.push(finding(
                format!("cluster {id}"),
                "no node has a plan (the cluster publishes no node/<name> record)",
                format!(
                    "check that cluster {id}'s fleet-controller runs and is active (`fleetctl \
                     status`), that its --nodes file lists the nodes, and its log"
                ),
            ));
        }
        let mut mentioned: BTreeSet<(String, &'static str)> = BTreeSet::new();
        for r in view.records.iter().filter(|r| r.owner == c.id) {
            if r.name == GATEWAY_RECORD
                && let Ok(g) = serde_json::from_slice::<GatewayRecord>(&r.value)
            {
                mentioned.insert((g.node, "runs the cluster's gateway"));
            } else if r.name.starts_with(EXPORT_RECORD_PREFIX)
                && let Ok(e) = serde_json::from_slice::<ExportRecord>(&r.value)
            {
                for node in e.endpoints.into_iter().filter_map(|e| e.node_name) {
                    mentioned.insert((node, "holds exported endpoints"));
                }
            }
        }
        for (node, role) in mentioned {
            if !nodes.contains_key(&node) {
                findings.push(finding(
                    format!("cluster {id} node {node}"),
                    format!("it {role} but has no plan (no node/{node} record)"),
                    fix(&node),
                ));
            }
        }
        let mut by_subnet: BTreeMap<Ipv4Network, Vec<&str>> = BTreeMap::new();
        for (name, n) in &nodes {
            by_subnet.entry(n.subnet).or_default().push(name);
            if !c.block.contains(n.subnet.network()) || n.subnet.prefix() < c.block.prefix() {
                findings.push(finding(
                    format!("cluster {id} node {name}"),
                    format!(
                        "its plan's subnet {} is outside the cluster's block {}",
                        n.subnet, c.block
                    ),
                    "restart the cluster's active controller: it re-plans nodes inside the block \
                     the hub gave the cluster",
                ));
            }
        }
        for (subnet, names) in by_subnet.into_iter().filter(|(_, n)| n.len() > 1) {
            findings.push(finding(
                format!("cluster {id}"),
                format!("nodes {} share the subnet {subnet}", names.join(", ")),
                "two controllers may be active at once: check `fleetctl status` and the \
                 controllers' leadership logs",
            ));
        }
    }
    CheckOutcome::new(
        "node-plans",
        format!(
            "{counted} nodes in {} clusters have plans",
            view.clusters.len()
        ),
        findings,
    )
}

/// Every tunnel peer in a gateway record has handshaken within [`HANDSHAKE_STALE_SECS`], and
/// the records are current.
pub fn check_tunnels(view: &FleetView, now: u64) -> CheckOutcome {
    let mut findings = Vec::new();
    let mut names: BTreeMap<String, (String, Option<u64>)> = BTreeMap::new();
    for c in &view.clusters {
        names.insert(
            c.public_key.to_string(),
            (format!("cluster {}", c.id), Some(c.joined_at)),
        );
    }
    for r in &view.relays {
        names.insert(r.public_key.to_string(), (format!("relay {}", r.id), None));
    }
    let records: BTreeMap<String, GatewayRecord> = gateways(view).into_iter().collect();
    let mut peers = 0;
    for c in &view.clusters {
        let id = c.id.to_string();
        let settled = now.saturating_sub(c.joined_at) > SETTLING_SECS;
        let Some(g) = records.get(&id) else {
            if settled {
                findings.push(finding(
                    format!("cluster {id}"),
                    "it has no gateway record: its tunnel is not up",
                    format!(
                        "check that cluster {id}'s fleet-controller runs and is active and that \
                         its gateway node's fleet-nri runs; the controller's log says why"
                    ),
                ));
            }
            continue;
        };
        let age = now.saturating_sub(g.updated_at);
        let stale = age > GATEWAY_RECORD_STALE_SECS;
        if stale {
            findings.push(finding(
                format!("cluster {id}"),
                format!(
                    "its gateway record is {} old: its controller no longer publishes, so its \
                     tunnel figures are not current",
                    human(age as i64)
                ),
                format!(
                    "check that cluster {id}'s fleet-controller runs, is active and reaches the \
                     hub (its log, its hub metrics)"
                ),
            ));
        }
        for p in &g.peers {
            peers += 1;
            // A stale record's handshakes are old by construction: the one finding above says
            // why, instead of one "no handshake" per tunnel.
            if stale {
                continue;
            }
            let (who, peer_joined) = names
                .get(&p.public_key)
                .cloned()
                .unwrap_or_else(|| (format!("peer {}", p.public_key), None));
            let subject = format!("tunnel {id} → {who}");
            let fix = format!(
                "check that node {} (cluster {id}'s gateway) reaches {} over UDP (firewall, NAT) \
                 and that {who} runs; `fleetctl status` shows both ends",
                g.node,
                p.endpoint.map_or("the peer".to_string(), |e| e.to_string())
            );
            match p.last_handshake {
                Some(h) if now.saturating_sub(h) > HANDSHAKE_STALE_SECS => findings.push(finding(
                    subject,
                    format!(
                        "no handshake for {} (WireGuard drops a session {HANDSHAKE_STALE_SECS} s \
                             after its last handshake)",
                        human(now.saturating_sub(h) as i64)
                    ),
                    fix,
                )),
                Some(_) => {}
                None => {
                    let peer_settled =
                        peer_joined.is_none_or(|j| now.saturating_sub(j) > SETTLING_SECS);
                    if settled && peer_settled {
                        findings.push(finding(subject, "it has never completed a handshake", fix));
                    }
                }
            }
        }
    }
    CheckOutcome::new(
        "tunnels",
        format!("{peers} tunnel peers have current handshakes"),
        findings,
    )
}

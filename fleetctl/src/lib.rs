//! `fleetctl status`: the fleet as the hub lists it — clusters and their blocks, each
//! cluster's tunnel (from its `gateway` record) and nodes (from its `node/*` records) — as a
//! table or JSON. Pure rendering of a [`FleetView`]; the binary does the listing.

pub mod admin;
pub mod cli;
pub mod doctor;
pub mod errors;
pub mod gather;
pub mod services;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;

use fleet_hub_api::model::FleetView;
use fleet_hub_api::records::{GATEWAY_RECORD, GatewayRecord, NODE_RECORD_PREFIX, NodeRecord};
use ipnetwork::Ipv4Network;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Status {
    pub revision: u64,
    pub fleet_cidr: Ipv4Network,
    pub relays: Vec<RelayStatus>,
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Debug, Serialize)]
pub struct RelayStatus {
    pub id: String,
    pub public_key: String,
    pub endpoint: SocketAddr,
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub id: String,
    pub block: Ipv4Network,
    pub endpoint: Option<SocketAddr>,
    /// The hub's gateway state: pending, up, down.
    pub gateway: String,
    /// A controller of the cluster holds its lease (the hub's `controller_live`); when not,
    /// the cluster's services are withdrawn from every other cluster.
    pub controller_live: bool,
    pub public_key: String,
    /// The cluster's last `gateway` record, if any.
    pub tunnel: Option<GatewayRecord>,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub subnet: Ipv4Network,
    pub underlay_ip: std::net::Ipv4Addr,
}

/// Builds the status; records that do not parse are skipped (a newer controller's format).
pub fn status(view: &FleetView) -> Status {
    let mut clusters: Vec<ClusterStatus> = view
        .clusters
        .iter()
        .map(|c| ClusterStatus {
            id: c.id.to_string(),
            block: c.block,
            endpoint: c.endpoint,
            gateway: format!("{:?}", c.gateway).to_lowercase(),
            controller_live: c.controller_live,
            public_key: c.public_key.to_string(),
            tunnel: None,
            nodes: Vec::new(),
        })
        .collect();
    clusters.sort_by(|a, b| a.id.cmp(&b.id));
    for r in &view.records {
        let Some(c) = clusters.iter_mut().find(|c| c.id == r.owner.as_str()) else {
            continue;
        };
        if r.name == GATEWAY_RECORD {
            c.tunnel = serde_json::from_slice(&r.value).ok();
        } else if let Some(node) = r.name.strip_prefix(NODE_RECORD_PREFIX)
            && let Ok(n) = serde_json::from_slice::<NodeRecord>(&r.value)
        {
            c.nodes.push(NodeStatus {
                name: node.to_string(),
                subnet: n.subnet,
                underlay_ip: n.underlay_ip,
            });
        }
    }
    for c in &mut clusters {
        c.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Status {
        revision: view.revision,
        fleet_cidr: view.fleet_cidr,
        relays: view
            .relays
            .iter()
            .map(|r| RelayStatus {
                id: r.id.clone(),
                public_key: r.public_key.to_string(),
                endpoint: r.endpoint,
            })
            .collect(),
        clusters,
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(then: u64, now: u64) -> String {
    format!("{}s ago", now.saturating_sub(then))
}

/// The gateway column: the hub's state, except that `up` beside a record older than
/// [`doctor::GATEWAY_RECORD_STALE_SECS`] is not known to be up any more.
fn gateway_cell(c: &ClusterStatus, now: u64) -> String {
    match &c.tunnel {
        Some(t)
            if c.gateway == "up"
                && now.saturating_sub(t.updated_at) > doctor::GATEWAY_RECORD_STALE_SECS =>
        {
            format!("stale ({}s)", now.saturating_sub(t.updated_at))
        }
        _ => c.gateway.clone(),
    }
}

/// `direct since 40s ago`, `relay since 3s ago`; `-` from members that predate `path`.
fn path_cell(p: &fleet_hub_api::records::GatewayPeerRecord, now: u64) -> String {
    match (&p.path, p.path_since) {
        (Some(path), Some(since)) => format!("{path} since {}", ago(since, now)),
        (Some(path), None) => path.clone(),
        (None, _) => "-".to_string(),
    }
}

/// The status as tables; `now` is unix seconds (ages are relative to it).
pub fn render_table(s: &Status, now: u64, out: &mut impl Write) -> std::io::Result<()> {
    // Who a tunnel peer is, by public key.
    let mut names: BTreeMap<&str, String> = BTreeMap::new();
    for c in &s.clusters {
        names.insert(&c.public_key, format!("cluster {}", c.id));
    }
    for r in &s.relays {
        names.insert(&r.public_key, format!("relay {}", r.id));
    }
    writeln!(out, "fleet {} (revision {})", s.fleet_cidr, s.revision)?;
    for r in &s.relays {
        writeln!(out, "relay {} at {} key {}", r.id, r.endpoint, r.public_key)?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<16} {:<18} {:<22} {:<12} {:<10} PUBLIC KEY",
        "CLUSTER", "BLOCK", "ENDPOINT", "GATEWAY", "CONTROLLER"
    )?;
    for c in &s.clusters {
        let endpoint = c.endpoint.map_or("-".to_string(), |e| e.to_string());
        writeln!(
            out,
            "{:<16} {:<18} {:<22} {:<12} {:<10} {}",
            c.id,
            c.block.to_string(),
            endpoint,
            gateway_cell(c, now),
            if c.controller_live {
                "live"
            } else {
                "no lease"
            },
            c.public_key
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<16} {:<12} {:<10} {:<10} {:<24} {:<22} {:<15} {:<22} {:>10} {:>10}",
        "TUNNELS OF",
        "NODE",
        "BACKEND",
        "UPDATED",
        "PEER",
        "ENDPOINT",
        "HANDSHAKE",
        "PATH",
        "RX",
        "TX"
    )?;
    for c in &s.clusters {
        let Some(t) = &c.tunnel else {
            writeln!(out, "{:<16} (no gateway record)", c.id)?;
            continue;
        };
        if t.peers.is_empty() {
            writeln!(
                out,
                "{:<16} {:<12} {:<10} (no peers; updated {})",
                c.id,
                t.node,
                t.backend,
                ago(t.updated_at, now)
            )?;
        }
        for p in &t.peers {
            let who = names
                .get(p.public_key.as_str())
                .cloned()
                .unwrap_or_else(|| p.public_key.clone());
            writeln!(
                out,
                "{:<16} {:<12} {:<10} {:<10} {:<24} {:<22} {:<15} {:<22} {:>10} {:>10}",
                c.id,
                t.node,
                t.backend,
                ago(t.updated_at, now),
                who,
                p.endpoint.map_or("-".to_string(), |e| e.to_string()),
                p.last_handshake
                    .map_or("never".to_string(), |h| ago(h, now)),
                path_cell(p, now),
                bytes(p.rx_bytes),
                bytes(p.tx_bytes)
            )?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<16} {:<16} {:<18} UNDERLAY",
        "NODES OF", "NODE", "SUBNET"
    )?;
    for c in &s.clusters {
        for n in &c.nodes {
            writeln!(
                out,
                "{:<16} {:<16} {:<18} {}",
                c.id,
                n.name,
                n.subnet.to_string(),
                n.underlay_ip
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_hub_api::model::RelayRecord;
    use fleet_hub_api::model::{ClusterId, ClusterRecord, GatewayState, MemberRecord, PublicKey};
    use fleet_hub_api::records::GatewayPeerRecord;

    fn view() -> FleetView {
        let aa = ClusterId::new("aa").unwrap();
        let bb = ClusterId::new("bb").unwrap();
        let relay_key = PublicKey::from_bytes([9; 32]);
        let gateway = GatewayRecord {
            node: "aa-1".into(),
            holder: "h".into(),
            backend: "userspace".into(),
            public_key: PublicKey::from_bytes([1; 32]).to_string(),
            listen_port: 51820,
            updated_at: 100,
            peers: vec![GatewayPeerRecord {
                public_key: relay_key.to_string(),
                endpoint: Some("203.0.113.1:51820".parse().unwrap()),
                last_handshake: Some(95),
                rx_bytes: 2048,
                tx_bytes: 10,
                path: None,
                path_since: None,
            }],
        };
        let rec = |owner: &ClusterId, name: &str, value: Vec<u8>| MemberRecord {
            owner: owner.clone(),
            name: name.into(),
            value,
            revision: 1,
        };
        FleetView {
            clusters: vec![
                ClusterRecord {
                    id: bb.clone(),
                    block: "100.96.16.0/20".parse().unwrap(),
                    public_key: PublicKey::from_bytes([2; 32]),
                    endpoint: None,
                    gateway: GatewayState::Pending,
                    controller_live: true,
                    joined_at: 0,
                    token_id: "t".into(),
                },
                ClusterRecord {
                    id: aa.clone(),
                    block: "100.96.0.0/20".parse().unwrap(),
                    public_key: PublicKey::from_bytes([1; 32]),
                    endpoint: None,
                    gateway: GatewayState::Up,
                    controller_live: true,
                    joined_at: 0,
                    token_id: "t".into(),
                },
            ],
            records: vec![
                rec(&aa, "gateway", serde_json::to_vec(&gateway).unwrap()),
                rec(
                    &aa,
                    "node/aa-2",
                    br#"{"subnet":"100.96.1.0/24","underlay_ip":"198.51.100.12"}"#.to_vec(),
                ),
                rec(
                    &aa,
                    "node/aa-1",
                    br#"{"subnet":"100.96.0.0/24","underlay_ip":"198.51.100.11"}"#.to_vec(),
                ),
                rec(&bb, "node/garbage", b"not json".to_vec()),
                rec(&bb, "export/x", b"{}".to_vec()),
            ],
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            relays: vec![RelayRecord {
                id: "relay1".into(),
                public_key: relay_key,
                endpoint: "203.0.113.1:51820".parse().unwrap(),
                expires_at: 0,
                instance: String::new(),
            }],
            revision: 42,
        }
    }

    #[test]
    fn status_joins_clusters_tunnels_and_nodes() {
        let s = status(&view());
        assert_eq!(s.clusters[0].id, "aa");
        assert_eq!(s.clusters[0].gateway, "up");
        let nodes: Vec<_> = s.clusters[0]
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(nodes, vec!["aa-1", "aa-2"]);
        assert!(s.clusters[1].nodes.is_empty(), "garbage skipped");
        assert!(s.clusters[1].tunnel.is_none());
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["clusters"][0]["tunnel"]["peers"][0]["rx_bytes"], 2048);
        assert_eq!(json["relays"][0]["id"], "relay1");

        let mut out = Vec::new();
        render_table(&s, 100, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("relay relay1"), "{text}");
        assert!(text.contains("5s ago"), "handshake age: {text}");
        assert!(text.contains("0s ago"), "record age: {text}");
        assert!(text.contains("2.0 KiB"), "{text}");
        assert!(text.contains("100.96.1.0/24"), "{text}");
        assert!(text.contains("(no gateway record)"), "{text}");
        assert!(text.contains(" live "), "{text}");
        assert_eq!(json["clusters"][0]["controller_live"], true);
    }

    #[test]
    fn status_marks_a_stale_gateway_a_lost_lease_and_each_tunnels_path() {
        let mut v = view();
        v.clusters[1].controller_live = false;
        let mut g: GatewayRecord = serde_json::from_slice(&v.records[0].value).unwrap();
        g.peers[0].path = Some("relay".into());
        g.peers[0].path_since = Some(60);
        v.records[0].value = serde_json::to_vec(&g).unwrap();
        let s = status(&v);
        assert!(!s.clusters[0].controller_live);
        let mut out = Vec::new();
        // 351 s after the record was written: not shown as `up`.
        render_table(&s, 451, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let aa = text.lines().find(|l| l.starts_with("aa ")).unwrap();
        assert!(aa.contains("stale (351s)"), "{text}");
        assert!(!aa.contains(" up "), "{text}");
        assert!(aa.contains("no lease"), "{text}");
        assert!(text.contains("relay since 391s ago"), "{text}");
        // A current record shows the hub's state.
        let mut out = Vec::new();
        render_table(&s, 120, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let aa = text.lines().find(|l| l.starts_with("aa ")).unwrap();
        assert!(aa.contains(" up "), "{text}");
    }
}

//! The board's picture of the fleet, as HTML with an inline SVG: pure (a [`Fleet`], the time
//! and the previous byte counters in, markup out), so it is unit-tested without a browser.
//! Every text that comes from the store (cluster ids, node names, service names, labels,
//! endpoints) goes through [`esc`]; nothing from a record is ever placed unescaped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::{ClusterId, GatewayState};
use fleet_hub_api::records::{
    EXPORT_RECORD_PREFIX, ExportRecord, GATEWAY_RECORD, GatewayRecord, IMPORT_RECORD_PREFIX,
    ImportRecord, NODE_RECORD_PREFIX, NodeRecord, parse_service_record_name,
};

/// Escapes text for HTML element content and quoted attribute values (also inside SVG).
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Byte counters of one tunnel end as last seen, to turn the next ones into a rate.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    updated_at: u64,
    rx: u64,
    tx: u64,
    /// Bytes per second received and sent, from the sample before this one.
    rate: Option<(f64, f64)>,
}

/// Remembers each tunnel end's last byte counters (keyed by cluster and peer key), so each
/// render shows throughput = byte delta / time between two `gateway` records.
#[derive(Debug, Default)]
pub struct Throughput {
    samples: BTreeMap<(ClusterId, String), Sample>,
}

impl Throughput {
    fn observe(
        &mut self,
        cluster: &ClusterId,
        peer: &str,
        updated_at: u64,
        rx: u64,
        tx: u64,
    ) -> Option<(f64, f64)> {
        let key = (cluster.clone(), peer.to_string());
        let next = match self.samples.get(&key) {
            Some(prev) if updated_at > prev.updated_at && rx >= prev.rx && tx >= prev.tx => {
                let dt = (updated_at - prev.updated_at) as f64;
                Sample {
                    updated_at,
                    rx,
                    tx,
                    rate: Some(((rx - prev.rx) as f64 / dt, (tx - prev.tx) as f64 / dt)),
                }
            }
            // Same record again: keep the rate it gave.
            Some(prev) if updated_at == prev.updated_at => *prev,
            // First sight, or counters reset (a restarted gateway).
            _ => Sample {
                updated_at,
                rx,
                tx,
                rate: None,
            },
        };
        self.samples.insert(key, next);
        next.rate
    }
}

/// What one side of a tunnel reports.
struct Tunnel {
    from: ClusterId,
    /// The other end: a cluster id, or `relay <id>`.
    to: String,
    via_relay: bool,
    endpoint: Option<String>,
    handshake_age: Option<u64>,
    rx: u64,
    tx: u64,
    rate: Option<(f64, f64)>,
    /// Age of the `gateway` record this comes from.
    record_age: u64,
}

fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An idle tunnel is `↓ 0 B/s ↑ 0 B/s`; before a second record of the tunnel there is no
/// rate to show, and the board says so rather than a bare dash.
fn rate(r: Option<(f64, f64)>) -> String {
    match r {
        Some((rx, tx)) => format!("↓ {}/s ↑ {}/s", bytes(rx), bytes(tx)),
        None => "no second sample yet".to_string(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(value: &[u8]) -> Option<T> {
    serde_json::from_slice(value).ok()
}

/// The board at unix time `now`: summary, SVG map, then tables of clusters and nodes,
/// tunnels, services and relays. `throughput` carries the counters between renders.
pub fn render(fleet: &Fleet, now: u64, throughput: &mut Throughput) -> String {
    let relay_by_key: BTreeMap<String, &str> = fleet
        .relays
        .values()
        .map(|r| (r.public_key.to_string(), r.id.as_str()))
        .collect();
    let cluster_by_key: BTreeMap<String, &ClusterId> = fleet
        .clusters
        .values()
        .map(|c| (c.public_key.to_string(), &c.id))
        .collect();

    let mut tunnels = Vec::new();
    let mut nodes: BTreeMap<&ClusterId, Vec<(String, Option<NodeRecord>)>> = BTreeMap::new();
    let mut gateways: BTreeMap<&ClusterId, GatewayRecord> = BTreeMap::new();
    // service (namespace, name) → exporting clusters / importing clusters.
    let mut services: BTreeMap<(String, String), (BTreeSet<String>, BTreeSet<String>)> =
        BTreeMap::new();
    let mut labels: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
    // (service, exporting cluster) that some importer holds withdrawn (`live: false`).
    let mut withdrawn: BTreeSet<((String, String), String)> = BTreeSet::new();
    for id in fleet.clusters.keys() {
        for record in fleet.records_of(id) {
            let name = record.name.as_str();
            if let Some(node) = name.strip_prefix(NODE_RECORD_PREFIX) {
                nodes
                    .entry(id)
                    .or_default()
                    .push((node.to_string(), decode(&record.value)));
            } else if name == GATEWAY_RECORD {
                if let Some(g) = decode::<GatewayRecord>(&record.value) {
                    gateways.insert(id, g);
                }
            } else if let Some((ns, svc)) = parse_service_record_name(EXPORT_RECORD_PREFIX, name) {
                let key = (ns.to_string(), svc.to_string());
                services
                    .entry(key.clone())
                    .or_default()
                    .0
                    .insert(id.to_string());
                if let Some(export) = decode::<ExportRecord>(&record.value) {
                    labels.entry(key).or_default().extend(export.labels);
                }
            } else if let Some((ns, svc)) = parse_service_record_name(IMPORT_RECORD_PREFIX, name) {
                let key = (ns.to_string(), svc.to_string());
                services
                    .entry(key.clone())
                    .or_default()
                    .1
                    .insert(id.to_string());
                if let Some(import) = decode::<ImportRecord>(&record.value) {
                    for c in import.clusters.iter().filter(|c| !c.live) {
                        withdrawn.insert((key.clone(), c.cluster.clone()));
                    }
                    labels.entry(key).or_default().extend(import.labels);
                }
            }
        }
    }
    for (id, g) in &gateways {
        for peer in &g.peers {
            let (to, via_relay) = match (
                relay_by_key.get(&peer.public_key),
                cluster_by_key.get(&peer.public_key),
            ) {
                (Some(relay), _) => (format!("relay {relay}"), true),
                (None, Some(cluster)) => (cluster.to_string(), false),
                (None, None) => (format!("unknown key {}", peer.public_key), false),
            };
            let rate = throughput.observe(
                id,
                &peer.public_key,
                g.updated_at,
                peer.rx_bytes,
                peer.tx_bytes,
            );
            tunnels.push(Tunnel {
                from: (*id).clone(),
                to,
                via_relay,
                endpoint: peer.endpoint.map(|e| e.to_string()),
                handshake_age: peer.last_handshake.map(|h| now.saturating_sub(h)),
                rx: peer.rx_bytes,
                tx: peer.tx_bytes,
                rate,
                record_age: now.saturating_sub(g.updated_at),
            });
        }
    }

    let mut html = String::new();
    let _ = write!(
        html,
        "<p class=\"summary\" data-revision=\"{}\">{} clusters · {} relays · {} tunnel ends · {} services · revision {}</p>",
        fleet.revision,
        fleet.clusters.len(),
        fleet.relays.len(),
        tunnels.len(),
        services.len(),
        fleet.revision
    );
    svg(&mut html, fleet, &tunnels, &nodes);

    html.push_str("<h2>Clusters</h2><table id=\"clusters\"><tr><th>cluster</th><th>block</th><th>controller</th><th>gateway</th><th>public endpoint</th><th>nodes</th></tr>");
    for c in fleet.clusters.values() {
        let state = match c.gateway {
            GatewayState::Pending => "pending",
            GatewayState::Up => "up",
            GatewayState::Down => "down",
        };
        let node_list = nodes
            .get(&c.id)
            .map(|list| {
                list.iter()
                    .map(|(name, record)| match record {
                        Some(r) => format!("{} ({}, {})", esc(name), r.subnet, r.underlay_ip),
                        None => esc(name),
                    })
                    .collect::<Vec<_>>()
                    .join("<br>")
            })
            .unwrap_or_else(|| "—".into());
        let gateway = match gateways.get(&c.id) {
            Some(g) => format!(
                "{state} on {} ({}, record {} old)",
                esc(&g.node),
                esc(&g.backend),
                age(now.saturating_sub(g.updated_at))
            ),
            None => state.to_string(),
        };
        let controller = if c.controller_live {
            "<td>live</td>"
        } else {
            "<td class=\"not-live\">no lease: its services are withdrawn</td>"
        };
        let _ = write!(
            html,
            "<tr class=\"cluster\" data-cluster=\"{id}\"><td>{id}</td><td>{}</td>{controller}<td>{gateway}</td><td>{}</td><td>{node_list}</td></tr>",
            c.block,
            c.endpoint.map_or("—".to_string(), |e| e.to_string()),
            id = esc(c.id.as_str()),
        );
    }
    html.push_str("</table>");

    html.push_str("<h2>Tunnels</h2><table id=\"tunnels\"><tr><th>from</th><th>to</th><th>path</th><th>endpoint</th><th>handshake</th><th>received / sent</th><th>throughput</th><th>as of</th></tr>");
    for t in &tunnels {
        let _ = write!(
            html,
            "<tr class=\"tunnel\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{} ago</td></tr>",
            esc(t.from.as_str()),
            esc(&t.to),
            if t.via_relay { "relay" } else { "direct" },
            esc(t.endpoint.as_deref().unwrap_or("—")),
            t.handshake_age
                .map_or("never".to_string(), |a| format!("{} ago", age(a))),
            bytes(t.rx as f64),
            bytes(t.tx as f64),
            rate(t.rate),
            age(t.record_age),
        );
    }
    html.push_str("</table>");

    html.push_str("<h2>Services</h2><table id=\"services\"><tr><th>service</th><th>exported from</th><th>imported by</th><th>labels</th></tr>");
    for (key, (exporters, importers)) in &services {
        let (ns, name) = key;
        let list = |set: &BTreeSet<String>| {
            if set.is_empty() {
                "—".to_string()
            } else {
                set.iter().map(|s| esc(s)).collect::<Vec<_>>().join(", ")
            }
        };
        // An exporter is withdrawn when its controller holds no lease, its gateway is down, or
        // an importer holds it withdrawn (the liveness rule's verdict, flapping included).
        let exporter_list = if exporters.is_empty() {
            "—".to_string()
        } else {
            exporters
                .iter()
                .map(|e| {
                    let down = ClusterId::new(e)
                        .ok()
                        .and_then(|id| fleet.clusters.get(&id))
                        .is_none_or(|c| !c.controller_live || c.gateway == GatewayState::Down);
                    if down || withdrawn.contains(&(key.clone(), e.clone())) {
                        format!("<span class=\"not-live\">{} (withdrawn)</span>", esc(e))
                    } else {
                        esc(e)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let label_text = labels
            .get(&(ns.clone(), name.clone()))
            .map(|l| {
                l.iter()
                    .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let _ = write!(
            html,
            "<tr class=\"service\"><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(ns),
            esc(name),
            exporter_list,
            list(importers),
            label_text
        );
    }
    html.push_str("</table>");

    html.push_str("<h2>Relays</h2><table id=\"relays\"><tr><th>relay</th><th>endpoint</th><th>public key</th></tr>");
    for r in fleet.relays.values() {
        let _ = write!(
            html,
            "<tr class=\"relay\"><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.id),
            r.endpoint,
            esc(&r.public_key.to_string())
        );
    }
    html.push_str("</table>");
    html
}

/// The map: the relay in the middle, clusters on a circle around it; a line per relayed
/// tunnel end (cluster ↔ relay) and per direct pair (cluster ↔ cluster, dashed), labelled
/// with the handshake age and throughput.
fn svg(
    html: &mut String,
    fleet: &Fleet,
    tunnels: &[Tunnel],
    nodes: &BTreeMap<&ClusterId, Vec<(String, Option<NodeRecord>)>>,
) {
    const W: f64 = 900.0;
    const H: f64 = 520.0;
    let (cx, cy) = (W / 2.0, H / 2.0);
    let radius = 200.0;
    let n = fleet.clusters.len().max(1) as f64;
    let position: BTreeMap<&ClusterId, (f64, f64)> = fleet
        .clusters
        .keys()
        .enumerate()
        .map(|(i, id)| {
            let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            (id, (cx + radius * a.cos(), cy + radius * a.sin()))
        })
        .collect();
    let _ = write!(
        html,
        "<svg id=\"map\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"fleet map\">"
    );
    let mut drawn_direct = BTreeSet::new();
    let mut labels = String::new();
    for t in tunnels {
        let Some(&(x1, y1)) = position.get(&t.from) else {
            continue;
        };
        let (x2, y2, class) = if t.via_relay {
            (cx, cy, "edge relayed")
        } else if let Some(&(x, y)) = fleet
            .clusters
            .keys()
            .find(|c| c.as_str() == t.to)
            .and_then(|c| position.get(c))
        {
            let pair = if t.from.as_str() < t.to.as_str() {
                (t.from.to_string(), t.to.clone())
            } else {
                (t.to.clone(), t.from.to_string())
            };
            if !drawn_direct.insert(pair) {
                continue;
            }
            (x, y, "edge direct")
        } else {
            continue;
        };
        let label = format!(
            "{} · {}",
            t.handshake_age
                .map_or("no handshake".to_string(), |a| format!("hs {} ago", age(a))),
            rate(t.rate)
        );
        // Direct pairs bend aside (a quadratic curve), so they never hide behind the relay's
        // spokes; the label sits on the curve's midpoint.
        let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt().max(1.0);
        let bend = if t.via_relay { 0.0 } else { 200.0 };
        // Bend away from the middle, where the relay sits.
        let (mut nx, mut ny) = (-dy / len, dx / len);
        if (mx - cx) * nx + (my - cy) * ny < 0.0 {
            (nx, ny) = (-nx, -ny);
        }
        let (qx, qy) = (mx + nx * bend, my + ny * bend);
        // The label: beside the spoke's middle, or just outside the curve's apex (the apex is
        // half-way to the control point), on the side the curve bends to.
        let (lx, ly, anchor) = if t.via_relay {
            (mx + 6.0, my - 4.0, "start")
        } else {
            let out = bend / 2.0 + 10.0;
            let anchor = if nx < 0.0 { "end" } else { "start" };
            (mx + nx * out, my + ny * out, anchor)
        };
        let _ = write!(
            html,
            "<g class=\"{class}\" data-from=\"{from}\" data-to=\"{to}\"><path d=\"M {x1:.0} {y1:.0} Q {qx:.0} {qy:.0} {x2:.0} {y2:.0}\"/></g>",
            from = esc(t.from.as_str()),
            to = esc(&t.to),
        );
        // Labels go on top of everything, after the relay and the clusters.
        let _ = write!(
            labels,
            "<text class=\"edge-label\" x=\"{lx:.0}\" y=\"{ly:.0}\" text-anchor=\"{anchor}\">{}</text>",
            esc(&label),
        );
    }
    if !fleet.relays.is_empty() {
        let ids = fleet
            .relays
            .keys()
            .map(|id| esc(id))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            html,
            "<g class=\"relay\"><rect x=\"{:.0}\" y=\"{:.0}\" width=\"140\" height=\"40\" rx=\"6\"/><text x=\"{cx:.0}\" y=\"{:.0}\" text-anchor=\"middle\">relay {ids}</text></g>",
            cx - 70.0,
            cy - 20.0,
            cy + 5.0,
        );
    }
    for (id, &(x, y)) in &position {
        let count = nodes.get(id).map_or(0, Vec::len);
        let block = fleet
            .clusters
            .get(*id)
            .map(|c| c.block.to_string())
            .unwrap_or_default();
        let _ = write!(
            html,
            "<g class=\"node-cluster\" data-cluster=\"{id}\"><circle cx=\"{x:.0}\" cy=\"{y:.0}\" r=\"34\"/><text x=\"{x:.0}\" y=\"{:.0}\" text-anchor=\"middle\" class=\"name\">{id}</text><text x=\"{x:.0}\" y=\"{:.0}\" text-anchor=\"middle\">{block} · {count} nodes</text></g>",
            y + 4.0,
            y + 52.0,
            id = esc(id.as_str()),
        );
    }
    html.push_str(&labels);
    html.push_str("</svg>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_hub_api::model::{ClusterRecord, FleetView, MemberRecord, PublicKey};

    fn cluster(id: &str, key: u8) -> ClusterRecord {
        ClusterRecord {
            id: ClusterId::new(id).unwrap(),
            block: format!("100.96.{key}.0/24").parse().unwrap(),
            public_key: PublicKey::from_bytes([key; 32]),
            endpoint: None,
            gateway: GatewayState::Up,
            controller_live: true,
            joined_at: 0,
            token_id: "t".into(),
        }
    }

    fn record(owner: &str, name: &str, value: serde_json::Value) -> MemberRecord {
        MemberRecord {
            owner: ClusterId::new(owner).unwrap(),
            name: name.into(),
            value: serde_json::to_vec(&value).unwrap(),
            revision: 1,
        }
    }

    fn gateway(updated_at: u64, peer: u8, rx: u64) -> serde_json::Value {
        serde_json::json!({
            "node": "<b>gw</b>", "holder": "h", "backend": "userspace",
            "public_key": PublicKey::from_bytes([1; 32]).to_string(), "listen_port": 51820,
            "updated_at": updated_at,
            "peers": [{"public_key": PublicKey::from_bytes([peer; 32]).to_string(),
                       "endpoint": null, "last_handshake": updated_at - 3,
                       "rx_bytes": rx, "tx_bytes": rx / 2}]
        })
    }

    fn fleet(records: Vec<MemberRecord>) -> Fleet {
        Fleet::from(FleetView {
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            clusters: vec![cluster("aa", 1), cluster("bb", 2)],
            records,
            relays: vec![],
            revision: 7,
        })
    }

    #[test]
    fn record_text_is_escaped_everywhere() {
        let hostile = "<img src=x onerror=alert(1)>\"'&";
        let f = fleet(vec![
            record(
                "aa",
                &format!("node/{hostile}"),
                serde_json::json!({"subnet": "100.96.1.0/26", "underlay_ip": "192.0.2.1"}),
            ),
            record("aa", "gateway", gateway(100, 2, 0)),
            record(
                "aa",
                &format!("export/default/{hostile}"),
                serde_json::json!({
                "type": "ClusterSetIP", "created_at_ms": 1, "labels": {hostile: hostile}}),
            ),
        ]);
        let html = render(&f, 110, &mut Throughput::default());
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>gw"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;"),
            "{html}"
        );
    }

    #[test]
    fn throughput_is_the_byte_delta_over_the_records_interval() {
        let mut t = Throughput::default();
        let first = render(
            &fleet(vec![record("aa", "gateway", gateway(100, 2, 1000))]),
            101,
            &mut t,
        );
        assert!(first.contains("direct") && first.contains("—"), "{first}");
        let second = render(
            &fleet(vec![record(
                "aa",
                "gateway",
                gateway(110, 2, 1000 + 10 * 2048),
            )]),
            111,
            &mut t,
        );
        // 20480 bytes in 10 s received, half of that sent.
        assert!(second.contains("↓ 2.0 KiB/s ↑ 1.0 KiB/s"), "{second}");
        assert!(second.contains("hs 4 s ago"), "{second}");
        // The same record again keeps its rate.
        let third = render(
            &fleet(vec![record(
                "aa",
                "gateway",
                gateway(110, 2, 1000 + 10 * 2048),
            )]),
            115,
            &mut t,
        );
        assert!(third.contains("↓ 2.0 KiB/s"), "{third}");
    }

    #[test]
    fn an_idle_tunnel_shows_0_bytes_per_second_and_a_first_sample_says_so() {
        let mut t = Throughput::default();
        let first = render(
            &fleet(vec![record("aa", "gateway", gateway(100, 2, 1000))]),
            101,
            &mut t,
        );
        assert!(first.contains("no second sample yet"), "{first}");
        // The next record (a re-handshake) with the same counters: idle, not unknown.
        let idle = render(
            &fleet(vec![record("aa", "gateway", gateway(220, 2, 1000))]),
            221,
            &mut t,
        );
        assert!(idle.contains("↓ 0 B/s ↑ 0 B/s"), "{idle}");
        assert!(!idle.contains("no second sample yet"), "{idle}");
    }

    #[test]
    fn clusters_without_a_lease_and_withdrawn_exporters_are_marked() {
        let export = serde_json::json!({"type": "ClusterSetIP", "created_at_ms": 1});
        let import = serde_json::json!({
            "type": "ClusterSetIP", "ports": [],
            "clusters": [{"cluster": "bb", "live": false, "endpoints": []}]});
        let mut view = FleetView {
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            clusters: vec![cluster("aa", 1), cluster("bb", 2), cluster("cc", 3)],
            records: vec![
                record("aa", "export/default/web", export.clone()),
                record("bb", "export/default/web", export.clone()),
                record("cc", "export/default/db", export),
                record("aa", "import/default/web", import),
            ],
            relays: vec![],
            revision: 7,
        };
        view.clusters[2].controller_live = false;
        let html = render(&Fleet::from(view), 10, &mut Throughput::default());
        let row = |marker: &str| {
            let at = html
                .find(marker)
                .unwrap_or_else(|| panic!("{marker}: {html}"));
            html[at..at + html[at..].find("</tr>").unwrap()].to_string()
        };
        // bb: an importer holds it withdrawn; cc: its controller holds no lease.
        let web = row("<td>default/web</td>");
        assert!(web.contains("bb (withdrawn)"), "{web}");
        assert!(!web.contains("aa (withdrawn)"), "{web}");
        assert!(
            row("<td>default/db</td>").contains("cc (withdrawn)"),
            "{html}"
        );
        let cc = row("data-cluster=\"cc\"><td>");
        assert!(cc.contains("no lease: its services are withdrawn"), "{cc}");
        let aa = row("data-cluster=\"aa\"><td>");
        assert!(aa.contains("<td>live</td>"), "{aa}");
    }
}

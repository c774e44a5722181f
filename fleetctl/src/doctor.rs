//! `fleetctl doctor`: the known problems of a fleet, each found by a pure check over facts
//! gathered once (the hub's answer, its clock and CA from one probe, the local clock, the
//! MTUs of a node when run on one), each finding with what to do about it. The binary gathers
//! the facts ([`Facts`]); [`diagnose`] and the `check_*` functions only read them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use fleet_hub_api::model::FleetView;
use fleet_hub_api::records::{
    EXPORT_RECORD_PREFIX, ExportRecord, GATEWAY_RECORD, GatewayRecord, NODE_RECORD_PREFIX,
    NodeRecord,
};
use fleet_hub_api::wire::ErrorCode;
use fleet_proto::node::StatusResult;
use ipnetwork::Ipv4Network;
use serde::Serialize;

/// WireGuard drops a session 180 s after its last handshake (`REJECT_AFTER_TIME`); a live
/// tunnel re-handshakes every 120 s (`REKEY_AFTER_TIME`), and the gateways keep theirs alive.
pub const HANDSHAKE_STALE_SECS: u64 = 180;
/// A gateway record changes at least with every re-handshake (120 s): older than this, its
/// controller has stopped publishing and the tunnel figures are not current.
pub const GATEWAY_RECORD_STALE_SECS: u64 = 300;
/// Tolerated distance between two clocks: ages in `fleetctl status`, token and lease expiry
/// and the staleness checks here are in seconds, and NTP keeps healthy hosts far closer.
pub const CLOCK_SKEW_LIMIT_SECS: u64 = 30;
/// A CA this close to its notAfter is a problem now: every member's join string pins it, so
/// replacing it means new join strings for every cluster.
pub const CA_EXPIRY_WARNING_SECS: i64 = 30 * 86_400;
/// A member that joined less than this long ago may still be bringing its tunnel and nodes up.
pub const SETTLING_SECS: u64 = 180;

/// Everything doctor looks at, gathered by the binary.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The local clock, unix seconds.
    pub now: u64,
    /// The hub addresses asked, comma-separated.
    pub endpoints: String,
    /// The credential file used, and whose it is.
    pub credential_file: String,
    pub credential: CredentialKind,
    pub hub: HubFacts,
    /// The node's MTUs, or why they were not read.
    pub mtu: Result<MtuFacts, String>,
    /// This node's fleet-nri, when doctor runs on a node; or why it was not asked.
    pub node: Result<LocalNode, String>,
}

/// This node's `fleet-nri`, asked over its node API socket.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub socket: String,
    /// Its status (plan, CNF netns), or why it did not answer.
    pub status: Result<StatusResult, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    Admin,
    Member(String),
}

#[derive(Debug, Clone)]
pub enum HubFacts {
    /// No address completed a TLS handshake and answered: the last error.
    Down { error: String },
    Reached {
        endpoint: String,
        clock: Option<ClockSample>,
        /// The pinned CA's notAfter (unix seconds), if it was found in the chain and parsed.
        ca_not_after: Option<i64>,
        /// The fleet, or why the hub refused to list it.
        answer: Result<FleetView, Refusal>,
    },
}

/// One reading of the hub's clock (the reply's `Date` header, whole seconds) against ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSample {
    /// The hub's `Date`, unix seconds (truncated by HTTP to the second).
    pub hub_time: u64,
    /// Our clock when the request left, unix milliseconds.
    pub sent_at_ms: u64,
    /// Request sent to reply headers received.
    pub round_trip_ms: u64,
}

impl ClockSample {
    /// How far our clock is ahead of the hub's (negative: behind), in milliseconds, and the
    /// uncertainty of that figure. The hub stamped its `Date` somewhere within the round trip,
    /// so our clock at that moment was `sent + rtt/2 ± rtt/2`; the `Date` itself lies up to 1 s
    /// below the hub's true time (it is truncated), so the hub's time was `date + 0.5 s ± 0.5 s`.
    pub fn offset_ms(&self) -> (i64, u64) {
        let ours = self.sent_at_ms as i64 + (self.round_trip_ms / 2) as i64;
        let hubs = self.hub_time as i64 * 1000 + 500;
        (ours - hubs, self.round_trip_ms / 2 + 500)
    }
}

/// Why the hub did not list the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The hub's error code, when it answered with one.
    pub code: Option<ErrorCode>,
    pub message: String,
}

/// What a node's links are, read in its CNF netns and its own netns (`ip -j`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtuFacts {
    /// The CNF netns looked at.
    pub cnf_netns: String,
    /// The device the node reaches the hub through, and its MTU.
    pub underlay_device: String,
    pub underlay_mtu: u32,
    /// The underlay is IPv6 (outer headers 20 bytes larger).
    pub underlay_ipv6: bool,
    /// `fleet0`: the pods' MTU (`local.mtu`).
    pub bridge_mtu: Option<u32>,
    /// `fleetvx`: the overlay between the cluster's nodes.
    pub overlay_mtu: Option<u32>,
    /// The WireGuard device, on the gateway node.
    pub wireguard: Option<(String, u32)>,
}

/// One problem and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What it is about: `hub 203.0.113.10:7443`, `cluster aa node aa-1`, ...
    pub subject: String,
    pub problem: String,
    pub fix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckState {
    Ok,
    Problem,
    /// Not run: the facts it needs are missing (`detail` says why).
    Skipped,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CheckOutcome {
    /// Stable name: `hub`, `credential`, `ca`, `clock`, `node-plans`, `tunnels`, `mtu`.
    pub check: &'static str,
    pub state: CheckState,
    /// One line: what was found fine, or why it was skipped.
    pub detail: String,
    pub findings: Vec<Finding>,
}

impl CheckOutcome {
    fn new(check: &'static str, detail: impl Into<String>, findings: Vec<Finding>) -> Self {
        let state = if findings.is_empty() {
            CheckState::Ok
        } else {
            CheckState::Problem
        };
        CheckOutcome {
            check,
            state,
            detail: detail.into(),
            findings,
        }
    }

    fn skipped(check: &'static str, why: impl Into<String>) -> Self {
        CheckOutcome {
            check,
            state: CheckState::Skipped,
            detail: why.into(),
            findings: Vec::new(),
        }
    }
}

/// Every check's outcome; `problems` counts the findings (doctor exits 1 when it is not 0).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub problems: usize,
    pub checks: Vec<CheckOutcome>,
}

fn finding(
    subject: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        subject: subject.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Runs every check over the facts.
pub fn diagnose(facts: &Facts) -> Report {
    let mut checks = vec![check_hub(facts), check_credential(facts)];
    match &facts.hub {
        HubFacts::Down { .. } => {
            for name in ["ca", "clock"] {
                checks.push(CheckOutcome::skipped(name, "the hub did not answer"));
            }
            checks.push(check_local_node(
                facts.node.as_ref(),
                None,
                &facts.credential,
            ));
            for name in ["node-plans", "tunnels"] {
                checks.push(CheckOutcome::skipped(name, "the hub did not answer"));
            }
        }
        HubFacts::Reached {
            clock,
            ca_not_after,
            answer,
            ..
        } => {
            checks.push(check_ca(*ca_not_after, facts.now));
            let view = answer.as_ref().ok();
            checks.push(check_clock(clock.as_ref(), view));
            // Ages are judged by the hub's clock when we have it: ours may be the one that is off.
            let now = clock.map_or(facts.now, |c| c.hub_time);
            checks.push(check_local_node(
                facts.node.as_ref(),
                view,
                &facts.credential,
            ));
            match view {
                Some(view) => {
                    checks.push(check_node_plans(view, now));
                    checks.push(check_tunnels(view, now));
                }
                None => {
                    for name in ["node-plans", "tunnels"] {
                        checks.push(CheckOutcome::skipped(
                            name,
                            "the hub did not list the fleet",
                        ));
                    }
                }
            }
        }
    }
    checks.push(check_mtu(facts.mtu.as_ref()));
    Report {
        problems: checks.iter().map(|c| c.findings.len()).sum(),
        checks,
    }
}

/// The hub answers: a connection and a TLS handshake with the pinned CA succeed.
pub fn check_hub(facts: &Facts) -> CheckOutcome {
    let error = match &facts.hub {
        HubFacts::Reached { endpoint, .. } => {
            return CheckOutcome::new("hub", format!("{endpoint} answers"), Vec::new());
        }
        HubFacts::Down { error } => error,
    };
    let subject = format!("hub {}", facts.endpoints);
    let f = if error.contains("pinned") {
        finding(
            subject,
            format!("the server there is not the hub whose CA is pinned: {error}"),
            "pass the right --ca (the hub logs it as ca_sha256; a join string ends with it) or \
             the credential file from that hub's data dir (with its ca.pem beside it); check \
             --hub names that hub",
        )
    } else if error.contains("xpired") || error.contains("NotValidYet") {
        finding(
            subject,
            format!("the hub's certificate is outside its validity: {error}"),
            "compare this machine's clock with the hub's (`date -u` on both); if the clocks \
             agree, the hub's CA has expired: create a new CA (a new hub data dir) and new join \
             strings for every member",
        )
    } else {
        finding(
            subject,
            format!("no hub answers: {error}"),
            format!(
                "check that `fleet-hub serve` runs there (its log says \"hub API serving\"), that \
                 --hub {} is its --listen address and port (7443 by default), and that this \
                 machine reaches it (routes, firewall: TCP)",
                facts.endpoints
            ),
        )
    };
    CheckOutcome::new("hub", "", vec![f])
}

/// The hub accepts the credential.
pub fn check_credential(facts: &Facts) -> CheckOutcome {
    let HubFacts::Reached { answer, .. } = &facts.hub else {
        return CheckOutcome::skipped("credential", "the hub did not answer");
    };
    let whose = match &facts.credential {
        CredentialKind::Admin => "the hub's admin credential".to_string(),
        CredentialKind::Member(c) => format!("cluster {c}'s credential"),
    };
    let Err(refusal) = answer else {
        return CheckOutcome::new(
            "credential",
            format!("the hub accepts {whose} ({})", facts.credential_file),
            Vec::new(),
        );
    };
    let refused = matches!(
        refusal.code,
        Some(ErrorCode::Unauthenticated | ErrorCode::NotJoined | ErrorCode::PermissionDenied)
    );
    let fix = match (&facts.credential, refused) {
        (_, false) => format!(
            "the hub answered but could not list the fleet: see its log; if it says \
             unavailable, its store (etcd) is unreachable ({})",
            refusal.message
        ),
        (CredentialKind::Admin, true) => "use admin.credential from the hub's data dir (each \
             hub data dir has its own; replicas on one etcd accept each other's)"
            .to_string(),
        (CredentialKind::Member(c), true) => format!(
            "cluster {c} is no longer a member or its credential was replaced: on the hub, \
             `fleetctl token create` (admin credential) gives a join string; run the cluster's \
             fleet-controller with --join <it> and a fresh --credential-file"
        ),
    };
    let problem = if refused {
        format!(
            "the hub refuses {whose} in {}: {}",
            facts.credential_file, refusal.message
        )
    } else {
        format!("the hub did not list the fleet: {}", refusal.message)
    };
    CheckOutcome::new(
        "credential",
        "",
        vec![finding(
            format!("credential {}", facts.credential_file),
            problem,
            fix,
        )],
    )
}

/// The pinned CA is valid for more than [`CA_EXPIRY_WARNING_SECS`].
pub fn check_ca(not_after: Option<i64>, now: u64) -> CheckOutcome {
    let Some(not_after) = not_after else {
        return CheckOutcome::skipped("ca", "the pinned CA was not in the hub's chain");
    };
    let left = not_after - now as i64;
    let fix = "the CA is the fleet's identity (every join string pins it): plan a new hub CA \
               (a new hub data dir) and re-join every member with new join strings before it \
               expires; until then members keep working only while their clocks are before it";
    if left <= 0 {
        return CheckOutcome::new(
            "ca",
            "",
            vec![finding(
                "hub CA",
                format!(
                    "the hub's CA expired {} ago (notAfter unix {not_after})",
                    human(-left)
                ),
                fix,
            )],
        );
    }
    if left < CA_EXPIRY_WARNING_SECS {
        return CheckOutcome::new(
            "ca",
            "",
            vec![finding(
                "hub CA",
                format!(
                    "the hub's CA expires in {} (notAfter unix {not_after})",
                    human(left)
                ),
                fix,
            )],
        );
    }
    CheckOutcome::new(
        "ca",
        format!("the hub's CA is valid for {}", human(left)),
        Vec::new(),
    )
}

/// This machine's clock against the hub's, and each member's `gateway` record stamp against
/// the hub's clock (a stamp in the future means that member's clock runs ahead).
pub fn check_clock(sample: Option<&ClockSample>, view: Option<&FleetView>) -> CheckOutcome {
    let Some(sample) = sample else {
        return CheckOutcome::skipped("clock", "the hub's reply carried no Date header");
    };
    let mut findings = Vec::new();
    let (offset, uncertainty) = sample.offset_ms();
    let limit = CLOCK_SKEW_LIMIT_SECS * 1000;
    if offset.unsigned_abs().saturating_sub(uncertainty) > limit {
        findings.push(finding(
            "this machine's clock",
            format!(
                "it is {} the hub's by {:.1} s (± {:.1} s)",
                if offset > 0 { "ahead of" } else { "behind" },
                offset.unsigned_abs() as f64 / 1000.0,
                uncertainty as f64 / 1000.0
            ),
            "synchronise both clocks with NTP (chrony, systemd-timesyncd) and check the hub's \
             host too: `date -u` on both should agree within a second",
        ));
    }
    if let Some(view) = view {
        let hub_now = sample.hub_time;
        for (cluster, g) in gateways(view) {
            if g.updated_at > hub_now + CLOCK_SKEW_LIMIT_SECS {
                findings.push(finding(
                    format!("cluster {cluster}"),
                    format!(
                        "its gateway record (node {}) is stamped {} s after the hub's clock: that \
                         node's clock runs ahead",
                        g.node,
                        g.updated_at - hub_now
                    ),
                    format!("synchronise the clock of node {} with NTP", g.node),
                ));
            }
        }
    }
    CheckOutcome::new(
        "clock",
        format!(
            "this machine's clock is {:.1} s {} the hub's (± {:.1} s)",
            offset.unsigned_abs() as f64 / 1000.0,
            if offset > 0 { "ahead of" } else { "behind" },
            uncertainty as f64 / 1000.0
        ),
        findings,
    )
}

/// Every cluster's parsed `gateway` record.
fn gateways(view: &FleetView) -> Vec<(String, GatewayRecord)> {
    view.records
        .iter()
        .filter(|r| r.name == GATEWAY_RECORD)
        .filter_map(|r| Some((r.owner.to_string(), serde_json::from_slice(&r.value).ok()?)))
        .collect()
}

/// This node's `fleet-nri` answers and has a plan from the controller, inside the fleet's CIDR
/// and — with a member's credential — inside that cluster's block.
pub fn check_local_node(
    node: Result<&LocalNode, &String>,
    view: Option<&FleetView>,
    credential: &CredentialKind,
) -> CheckOutcome {
    let node = match node {
        Ok(n) => n,
        Err(why) => return CheckOutcome::skipped("this-node", why.clone()),
    };
    let subject = format!("this node ({})", node.socket);
    let status = match &node.status {
        Ok(s) => s,
        Err(e) => {
            return CheckOutcome::new(
                "this-node",
                "",
                vec![finding(
                    subject,
                    format!("its fleet-nri does not answer: {e}"),
                    format!(
                        "start fleet-nri on this node (its config's \"socket\" is {}); its log \
                         says why it stopped",
                        node.socket
                    ),
                )],
            );
        }
    };
    let fix_plan = match credential {
        CredentialKind::Member(c) => format!(
            "check that cluster {c}'s active controller lists this node in its --nodes file with \
             this socket, and its log (\"cannot read its state\", \"set_plan ... refused\")"
        ),
        CredentialKind::Admin => "check that the cluster's active controller lists this node \
             in its --nodes file with this socket, and its log"
            .to_string(),
    };
    if !status.ready || status.node_subnet.is_empty() {
        return CheckOutcome::new(
            "this-node",
            "",
            vec![finding(
                subject,
                "it has no plan: the cluster's controller has not handed it a subnet, so pods \
                 here get no fleet address (CNI ADD answers \"try again later\")",
                fix_plan,
            )],
        );
    }
    let mut findings = Vec::new();
    let subnet: Option<Ipv4Network> = status.node_subnet.parse().ok();
    if let (Some(view), Some(subnet)) = (view, subnet) {
        if status.fleet_cidr != view.fleet_cidr.to_string() {
            findings.push(finding(
                subject.clone(),
                format!(
                    "its plan's fleet CIDR {} is not the hub's {}",
                    status.fleet_cidr, view.fleet_cidr
                ),
                fix_plan.clone(),
            ));
        }
        if let CredentialKind::Member(c) = credential
            && let Some(own) = view.clusters.iter().find(|k| k.id.as_str() == c.as_str())
            && !own.block.contains(subnet.network())
        {
            findings.push(finding(
                subject.clone(),
                format!(
                    "its subnet {subnet} is outside cluster {c}'s block {}",
                    own.block
                ),
                fix_plan,
            ));
        }
    }
    CheckOutcome::new(
        "this-node",
        format!("fleet-nri has its plan: subnet {}", status.node_subnet),
        findings,
    )
}

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
        if age > GATEWAY_RECORD_STALE_SECS {
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

/// Outer headers one fleet hop adds, in bytes.
///
/// VXLAN (between the nodes of a cluster) over IPv4: outer IPv4 20 + UDP 8 + VXLAN 8 + the
/// inner Ethernet header 14 = **50**; over IPv6 the outer header is 40, so **70**.
/// WireGuard (between clusters) over IPv4: IPv4 20 + UDP 8 + WireGuard data header 16 +
/// Poly1305 tag 16 = **60**; over IPv6 **80**.
/// So on a node whose underlay device has MTU `U`, the fleet path needs
/// - pods (`fleet0`, `local.mtu`) and the overlay device (`fleetvx`): `mtu + 50 ≤ U`
///   (1370 + 50 = 1420 ≤ 1500 by default);
/// - the WireGuard device: `mtu + 60 ≤ U` (1420 + 60 = 1480 ≤ 1500);
/// - a pod's packet enters the tunnel whole: pod MTU ≤ WireGuard MTU (1370 ≤ 1420).
pub fn overheads(ipv6: bool) -> (u32, u32) {
    if ipv6 { (70, 80) } else { (50, 60) }
}

/// The MTUs on a node fit its underlay (arithmetic in [`overheads`]).
pub fn check_mtu(mtu: Result<&MtuFacts, &String>) -> CheckOutcome {
    let m = match mtu {
        Ok(m) => m,
        Err(why) => return CheckOutcome::skipped("mtu", why.clone()),
    };
    let (vxlan, wireguard) = overheads(m.underlay_ipv6);
    let u = m.underlay_mtu;
    let mut findings = Vec::new();
    let lower = |device: &str, max: u32, need: u32| {
        format!(
            "lower {device}'s MTU to at most {max}{} or raise {}'s to at least {need}",
            if device == "fleet0" {
                " (fleet-nri's local.mtu; pods get it at their next start)"
            } else {
                ""
            },
            m.underlay_device,
        )
    };
    for (device, have) in [("fleet0", m.bridge_mtu), ("fleetvx", m.overlay_mtu)] {
        if let Some(have) = have
            && have + vxlan > u
        {
            findings.push(finding(
                format!("{} {device}", m.cnf_netns),
                format!(
                    "MTU {have} + VXLAN {vxlan} = {} exceeds the underlay {}'s MTU {u}: larger \
                     packets between nodes are dropped",
                    have + vxlan,
                    m.underlay_device
                ),
                lower(device, u.saturating_sub(vxlan), have + vxlan),
            ));
        }
    }
    if let Some((device, have)) = &m.wireguard {
        if have + wireguard > u {
            findings.push(finding(
                format!("{} {device}", m.cnf_netns),
                format!(
                    "MTU {have} + WireGuard {wireguard} = {} exceeds the underlay {}'s MTU {u}: \
                     larger packets between clusters are dropped",
                    have + wireguard,
                    m.underlay_device
                ),
                lower(device, u.saturating_sub(wireguard), have + wireguard),
            ));
        }
        if let Some(pod) = m.bridge_mtu
            && pod > *have
        {
            findings.push(finding(
                format!("{} fleet0", m.cnf_netns),
                format!("pods' MTU {pod} exceeds the WireGuard device {device}'s {have}"),
                format!("lower fleet-nri's local.mtu to at most {have}"),
            ));
        }
    }
    CheckOutcome::new(
        "mtu",
        format!("fleet devices fit {}'s MTU {u}", m.underlay_device),
        findings,
    )
}

/// `90 s`, `12 min`, `5 h`, `3 days`.
fn human(secs: i64) -> String {
    let s = secs.unsigned_abs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7_199 => format!("{} min", s / 60),
        7_200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

/// The report for people: one line per check, each finding with its fix under it.
pub fn render_report(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    for c in &r.checks {
        let state = match c.state {
            CheckState::Ok => "ok",
            CheckState::Problem => "PROBLEM",
            CheckState::Skipped => "skipped",
        };
        if c.findings.is_empty() {
            writeln!(out, "{:<8} {:<11} {}", state, c.check, c.detail)?;
            continue;
        }
        for f in &c.findings {
            writeln!(
                out,
                "{:<8} {:<11} {}: {}",
                state, c.check, f.subject, f.problem
            )?;
            writeln!(out, "{:<20} fix: {}", "", f.fix)?;
        }
    }
    if r.problems == 0 {
        writeln!(out, "\nno problems found")
    } else {
        writeln!(
            out,
            "\n{} problem{} found",
            r.problems,
            if r.problems == 1 { "" } else { "s" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_hub_api::model::{
        ClusterId, ClusterRecord, GatewayState, MemberRecord, PublicKey, RelayRecord,
    };
    use fleet_hub_api::records::GatewayPeerRecord;

    const NOW: u64 = 1_800_000_000;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn cluster(id: &str, n: u8, joined_at: u64) -> ClusterRecord {
        ClusterRecord {
            id: ClusterId::new(id).unwrap(),
            block: format!("100.96.{}.0/20", 16 * (n - 1)).parse().unwrap(),
            public_key: key(n),
            endpoint: None,
            gateway: GatewayState::Up,
            joined_at,
            token_id: "t".into(),
        }
    }

    fn record(owner: &str, name: &str, value: impl Serialize) -> MemberRecord {
        MemberRecord {
            owner: ClusterId::new(owner).unwrap(),
            name: name.into(),
            value: serde_json::to_vec(&value).unwrap(),
            revision: 1,
        }
    }

    fn gateway(node: &str, updated_at: u64, handshake: Option<u64>) -> GatewayRecord {
        GatewayRecord {
            node: node.into(),
            holder: "h".into(),
            backend: "userspace".into(),
            public_key: key(1).to_string(),
            listen_port: 51820,
            updated_at,
            peers: vec![GatewayPeerRecord {
                public_key: key(9).to_string(),
                endpoint: Some("203.0.113.1:51820".parse().unwrap()),
                last_handshake: handshake,
                rx_bytes: 1,
                tx_bytes: 1,
            }],
        }
    }

    fn node(subnet: &str) -> NodeRecord {
        NodeRecord {
            subnet: subnet.parse().unwrap(),
            underlay_ip: "198.51.100.11".parse().unwrap(),
        }
    }

    /// A healthy one-cluster fleet behind a relay, joined an hour ago.
    fn healthy() -> FleetView {
        FleetView {
            clusters: vec![cluster("aa", 1, NOW - 3600)],
            records: vec![
                record("aa", "gateway", gateway("aa-1", NOW - 5, Some(NOW - 60))),
                record("aa", "node/aa-1", node("100.96.0.0/24")),
                record("aa", "node/aa-2", node("100.96.1.0/24")),
            ],
            fleet_cidr: "100.96.0.0/12".parse().unwrap(),
            relays: vec![RelayRecord {
                id: "relay1".into(),
                public_key: key(9),
                endpoint: "203.0.113.1:51820".parse().unwrap(),
                expires_at: 0,
            }],
            revision: 7,
        }
    }

    fn facts(hub: HubFacts) -> Facts {
        Facts {
            now: NOW,
            endpoints: "203.0.113.10:7443".into(),
            credential_file: "/var/lib/fleetboard/hub/admin.credential".into(),
            credential: CredentialKind::Admin,
            hub,
            mtu: Err("not on a node".into()),
            node: Err("not on a node".into()),
        }
    }

    fn reached(answer: Result<FleetView, Refusal>) -> HubFacts {
        HubFacts::Reached {
            endpoint: "203.0.113.10:7443".into(),
            clock: Some(ClockSample {
                hub_time: NOW,
                sent_at_ms: NOW * 1000 + 480,
                round_trip_ms: 40,
            }),
            ca_not_after: Some((NOW + 365 * 86_400) as i64),
            answer,
        }
    }

    fn subjects(c: &CheckOutcome) -> Vec<String> {
        c.findings.iter().map(|f| f.subject.clone()).collect()
    }

    #[test]
    fn a_healthy_fleet_has_no_problems() {
        let r = diagnose(&facts(reached(Ok(healthy()))));
        assert_eq!(r.problems, 0, "{r:#?}");
        let states: Vec<_> = r.checks.iter().map(|c| (c.check, c.state)).collect();
        assert!(states.contains(&("mtu", CheckState::Skipped)), "{states:?}");
        assert_eq!(
            states.iter().filter(|(_, s)| *s == CheckState::Ok).count(),
            6,
            "{states:?}"
        );
        let mut out = Vec::new();
        render_report(&r, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("no problems found"), "{text}");
    }

    #[test]
    fn a_hub_that_is_down_names_the_address_and_skips_what_needs_it() {
        let f = facts(HubFacts::Down {
            error: "203.0.113.10:7443: Connection refused (os error 111)".into(),
        });
        let r = diagnose(&f);
        assert_eq!(r.problems, 1);
        let hub = &r.checks[0];
        assert_eq!((hub.check, hub.state), ("hub", CheckState::Problem));
        assert!(hub.findings[0].subject.contains("203.0.113.10:7443"));
        assert!(hub.findings[0].fix.contains("fleet-hub serve"), "{hub:?}");
        assert!(
            r.checks
                .iter()
                .filter(
                    |c| ["ca", "clock", "node-plans", "tunnels", "credential"].contains(&c.check)
                )
                .all(|c| c.state == CheckState::Skipped)
        );
        let pinned = check_hub(&facts(HubFacts::Down {
            error: "h: TLS: the hub's CA does not match the pinned hash sha256:ab".into(),
        }));
        assert!(pinned.findings[0].fix.contains("--ca"), "{pinned:?}");
    }

    #[test]
    fn a_refused_credential_says_how_to_get_a_new_one() {
        let mut f = facts(reached(Err(Refusal {
            code: Some(ErrorCode::Unauthenticated),
            message: "hub refused list: bad credential".into(),
        })));
        f.credential = CredentialKind::Member("aa".into());
        let c = check_credential(&f);
        assert_eq!(c.state, CheckState::Problem);
        assert!(
            c.findings[0].problem.contains("cluster aa's credential"),
            "{c:?}"
        );
        assert!(c.findings[0].fix.contains("fleetctl token create"), "{c:?}");
        assert!(c.findings[0].fix.contains("--join"), "{c:?}");
        let r = diagnose(&f);
        assert!(
            r.checks
                .iter()
                .any(|c| c.check == "tunnels" && c.state == CheckState::Skipped)
        );
        let ok = check_credential(&facts(reached(Ok(healthy()))));
        assert_eq!(ok.state, CheckState::Ok);
    }

    #[test]
    fn a_ca_expiring_within_30_days_or_expired_is_a_problem() {
        let day = 86_400;
        assert_eq!(
            check_ca(Some((NOW + 400 * day) as i64), NOW).state,
            CheckState::Ok
        );
        let soon = check_ca(Some((NOW + 3 * day) as i64), NOW);
        assert_eq!(soon.state, CheckState::Problem);
        assert!(
            soon.findings[0].problem.contains("expires in 3 days"),
            "{soon:?}"
        );
        let gone = check_ca(Some((NOW - 2 * 3600) as i64), NOW);
        assert!(
            gone.findings[0].problem.contains("expired 2 h ago"),
            "{gone:?}"
        );
        assert_eq!(check_ca(None, NOW).state, CheckState::Skipped);
    }

    #[test]
    fn clock_offset_accounts_for_the_round_trip_and_the_truncated_date() {
        // Sent at .480, 40 ms round trip: our clock read .500 when the hub stamped NOW(.500).
        let s = ClockSample {
            hub_time: NOW,
            sent_at_ms: NOW * 1000 + 480,
            round_trip_ms: 40,
        };
        assert_eq!(s.offset_ms(), (0, 520));
        assert_eq!(check_clock(Some(&s), None).state, CheckState::Ok);
        // 31 s ahead, but within the uncertainty of a 2 s round trip: not flagged.
        let slow = ClockSample {
            hub_time: NOW,
            sent_at_ms: NOW * 1000 + 31_000 - 500,
            round_trip_ms: 2_000,
        };
        assert_eq!(check_clock(Some(&slow), None).state, CheckState::Ok);
        let behind = ClockSample {
            hub_time: NOW,
            sent_at_ms: NOW * 1000 - 300_000,
            round_trip_ms: 10,
        };
        let c = check_clock(Some(&behind), None);
        assert_eq!(c.state, CheckState::Problem);
        assert!(
            c.findings[0]
                .problem
                .contains("behind the hub's by 300.5 s"),
            "{c:?}"
        );
        assert!(c.findings[0].fix.contains("NTP"));
        assert_eq!(check_clock(None, None).state, CheckState::Skipped);
    }

    #[test]
    fn a_member_stamping_records_in_the_future_has_a_clock_ahead() {
        let s = ClockSample {
            hub_time: NOW,
            sent_at_ms: NOW * 1000 + 500,
            round_trip_ms: 0,
        };
        let mut view = healthy();
        assert_eq!(check_clock(Some(&s), Some(&view)).state, CheckState::Ok);
        view.records[0] = record("aa", "gateway", gateway("aa-1", NOW + 120, Some(NOW)));
        let c = check_clock(Some(&s), Some(&view));
        assert_eq!(subjects(&c), vec!["cluster aa"]);
        assert!(c.findings[0].problem.contains("120 s after"), "{c:?}");
    }

    #[test]
    fn a_gateway_or_exporting_node_without_a_plan_is_named() {
        assert_eq!(check_node_plans(&healthy(), NOW).state, CheckState::Ok);
        let mut view = healthy();
        view.records.retain(|r| r.name != "node/aa-1");
        view.records.push(record(
            "aa",
            "export/default/web",
            serde_json::json!({"type": "ClusterSetIP", "created_at_ms": 1, "endpoints": [
                {"ip": "100.96.5.7", "ready": true, "serving": true, "terminating": false,
                 "node_name": "aa-3"}]}),
        ));
        let c = check_node_plans(&view, NOW);
        assert_eq!(
            subjects(&c),
            vec!["cluster aa node aa-1", "cluster aa node aa-3"],
            "{c:#?}"
        );
        assert!(c.findings[0].problem.contains("runs the cluster's gateway"));
        assert!(c.findings[1].problem.contains("holds exported endpoints"));
        assert!(c.findings[0].fix.contains("--nodes"));
    }

    #[test]
    fn broken_plans_are_found_and_a_new_member_is_left_to_settle() {
        let mut view = healthy();
        view.records
            .push(record("aa", "node/aa-9", node("100.97.0.0/24")));
        view.records
            .push(record("aa", "node/aa-8", node("100.96.1.0/24")));
        let c = check_node_plans(&view, NOW);
        let problems: Vec<_> = c.findings.iter().map(|f| f.problem.as_str()).collect();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("outside the cluster's block")),
            "{c:#?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("aa-2, aa-8 share")),
            "{c:#?}"
        );

        let mut view = healthy();
        view.records.clear();
        assert_eq!(subjects(&check_node_plans(&view, NOW)), vec!["cluster aa"]);
        view.clusters[0].joined_at = NOW - 10;
        assert_eq!(check_node_plans(&view, NOW).state, CheckState::Ok);
    }

    #[test]
    fn a_tunnel_without_a_handshake_for_minutes_is_named_with_its_peer() {
        assert_eq!(check_tunnels(&healthy(), NOW).state, CheckState::Ok);
        let mut view = healthy();
        view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 5, Some(NOW - 600)));
        let c = check_tunnels(&view, NOW);
        assert_eq!(subjects(&c), vec!["tunnel aa → relay relay1"]);
        assert!(
            c.findings[0].problem.contains("no handshake for 10 min"),
            "{c:?}"
        );
        assert!(c.findings[0].fix.contains("203.0.113.1:51820"), "{c:?}");

        view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 5, None));
        let c = check_tunnels(&view, NOW);
        assert!(c.findings[0].problem.contains("never"), "{c:?}");
        view.clusters[0].joined_at = NOW - 20;
        assert_eq!(
            check_tunnels(&view, NOW).state,
            CheckState::Ok,
            "still settling"
        );
    }

    #[test]
    fn a_stale_or_missing_gateway_record_is_a_problem() {
        let mut view = healthy();
        view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 900, Some(NOW - 60)));
        let c = check_tunnels(&view, NOW);
        assert!(c.findings[0].problem.contains("15 min old"), "{c:?}");
        view.records.remove(0);
        let c = check_tunnels(&view, NOW);
        assert!(c.findings[0].problem.contains("no gateway record"), "{c:?}");
    }

    fn mtus(underlay: u32, bridge: u32, wg: u32) -> MtuFacts {
        MtuFacts {
            cnf_netns: "fleet-cnf".into(),
            underlay_device: "eth0".into(),
            underlay_mtu: underlay,
            underlay_ipv6: false,
            bridge_mtu: Some(bridge),
            overlay_mtu: Some(bridge),
            wireguard: Some(("fleetwg0".into(), wg)),
        }
    }

    #[test]
    fn mtus_that_fit_the_underlay_pass_and_the_defaults_fit_1500() {
        assert_eq!(check_mtu(Ok(&mtus(1500, 1370, 1420))).state, CheckState::Ok);
        // 1370 + 50 = 1420 and 1420 + 60 = 1480: a 1480 underlay is the smallest that fits.
        assert_eq!(check_mtu(Ok(&mtus(1480, 1370, 1420))).state, CheckState::Ok);
        assert_eq!(
            check_mtu(Err(&"not on a node".to_string())).state,
            CheckState::Skipped
        );
    }

    #[test]
    fn mtus_above_what_the_underlay_carries_are_named_with_the_arithmetic() {
        let c = check_mtu(Ok(&mtus(1400, 1370, 1420)));
        let subjects = subjects(&c);
        assert_eq!(
            subjects,
            vec![
                "fleet-cnf fleet0",
                "fleet-cnf fleetvx",
                "fleet-cnf fleetwg0"
            ],
            "{c:#?}"
        );
        assert!(
            c.findings[0]
                .problem
                .contains("1370 + VXLAN 50 = 1420 exceeds"),
            "{c:?}"
        );
        assert!(c.findings[0].fix.contains("at most 1350"), "{c:?}");
        assert!(c.findings[0].fix.contains("at least 1420"), "{c:?}");
        assert!(
            c.findings[2].problem.contains("1420 + WireGuard 60 = 1480"),
            "{c:?}"
        );
        let mut v6 = mtus(1500, 1370, 1440);
        v6.underlay_ipv6 = true;
        assert_eq!(subjects_of(check_mtu(Ok(&v6))), vec!["fleet-cnf fleetwg0"]);
        let c = check_mtu(Ok(&mtus(1500, 1420, 1400)));
        assert!(
            c.findings
                .iter()
                .any(|f| f.problem.contains("pods' MTU 1420 exceeds"))
        );
    }

    fn local(ready: bool, subnet: &str) -> LocalNode {
        LocalNode {
            socket: "/run/fleetboard/node.sock".into(),
            status: Ok(StatusResult {
                ready,
                node_subnet: subnet.into(),
                fleet_cidr: "100.96.0.0/12".into(),
                vip_range: "100.112.0.0/16".into(),
                allocated: 0,
                capacity: 253,
                nri_registered: true,
                nri_registrations: 1,
                cnf_netns: "/run/netns/fleet-cnf".into(),
            }),
        }
    }

    #[test]
    fn this_node_without_a_plan_or_with_a_foreign_one_is_a_problem() {
        let aa = CredentialKind::Member("aa".into());
        let view = healthy();
        let ok = check_local_node(Ok(&local(true, "100.96.0.0/24")), Some(&view), &aa);
        assert_eq!(ok.state, CheckState::Ok, "{ok:?}");
        let none = check_local_node(Ok(&local(false, "")), Some(&view), &aa);
        assert_eq!(none.state, CheckState::Problem);
        assert!(none.findings[0].problem.contains("has no plan"), "{none:?}");
        assert!(
            none.findings[0]
                .fix
                .contains("cluster aa's active controller"),
            "{none:?}"
        );
        let foreign = check_local_node(Ok(&local(true, "100.96.32.0/24")), Some(&view), &aa);
        assert!(
            foreign.findings[0]
                .problem
                .contains("outside cluster aa's block 100.96.0.0/20"),
            "{foreign:?}"
        );
        let down = LocalNode {
            socket: "/run/fleetboard/node.sock".into(),
            status: Err("connection refused".into()),
        };
        let c = check_local_node(Ok(&down), None, &aa);
        assert!(c.findings[0].problem.contains("does not answer"), "{c:?}");
        assert_eq!(
            check_local_node(Err(&"not on a node".to_string()), None, &aa).state,
            CheckState::Skipped
        );
    }

    fn subjects_of(c: CheckOutcome) -> Vec<String> {
        subjects(&c)
    }

    #[test]
    fn the_report_is_stable_json_and_a_table_with_fixes() {
        let mut view = healthy();
        view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 5, Some(NOW - 600)));
        let r = diagnose(&facts(reached(Ok(view))));
        assert_eq!(r.problems, 1);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["problems"], 1);
        let tunnels = json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "tunnels")
            .unwrap();
        assert_eq!(tunnels["state"], "problem");
        assert!(tunnels["findings"][0]["fix"].is_string());
        let mut out = Vec::new();
        render_report(&r, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("PROBLEM  tunnels     tunnel aa → relay relay1"),
            "{text}"
        );
        assert!(text.contains("fix: check that node aa-1"), "{text}");
        assert!(text.contains("1 problem found"), "{text}");
    }
}

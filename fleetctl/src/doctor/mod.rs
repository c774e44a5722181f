//! `fleetctl doctor`: the known problems of a fleet, each found by a pure check over facts
//! gathered once (the hub's answer, its clock and CA from one probe, the local clock, the
//! MTUs of a node when run on one), each finding with what to do about it. The binary gathers
//! the facts ([`Facts`]); [`diagnose`] and the `check_*` functions only read them.

use std::io::Write;

use fleet_hub_api::model::FleetView;
use fleet_hub_api::records::{GATEWAY_RECORD, GatewayRecord};
use fleet_hub_api::wire::ErrorCode;
use fleet_proto::node::StatusResult;
use serde::Serialize;

mod fleet;
mod hub;
mod node;
mod services;

pub use fleet::{check_node_plans, check_tunnels};
pub use hub::{check_ca, check_clock, check_credential, check_hub};
pub use node::{check_local_node, check_mtu, overheads};
pub use services::{EMPTY_EXPORT_SECS, check_controllers, check_services};

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
    /// Hub addresses that did not answer while another did (a dead replica), with why.
    pub unreachable: Vec<(String, String)>,
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
    /// Stable name: `hub`, `credential`, `ca`, `clock`, `controllers`, `node-plans`,
    /// `tunnels`, `services`, `mtu`.
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
            for name in ["controllers", "node-plans", "tunnels", "services"] {
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
                    checks.push(check_controllers(view));
                    checks.push(check_node_plans(view, now));
                    checks.push(check_tunnels(view, now));
                    checks.push(check_services(view, now));
                }
                None => {
                    for name in ["controllers", "node-plans", "tunnels", "services"] {
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

/// Every cluster's parsed `gateway` record.
fn gateways(view: &FleetView) -> Vec<(String, GatewayRecord)> {
    view.records
        .iter()
        .filter(|r| r.name == GATEWAY_RECORD)
        .filter_map(|r| Some((r.owner.to_string(), serde_json::from_slice(&r.value).ok()?)))
        .collect()
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
mod tests;

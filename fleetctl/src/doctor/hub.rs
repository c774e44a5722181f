//! The checks of the hub itself: it answers, it accepts the credential, its CA, its clock.

use fleet_hub_api::model::FleetView;
use fleet_hub_api::wire::ErrorCode;

use super::{
    CA_EXPIRY_WARNING_SECS, CLOCK_SKEW_LIMIT_SECS, CheckOutcome, ClockSample, CredentialKind,
    Facts, HubFacts, finding, gateways, human,
};

/// The hub answers: a connection and a TLS handshake with the pinned CA succeed.
pub fn check_hub(facts: &Facts) -> CheckOutcome {
    let error = match &facts.hub {
        HubFacts::Reached { endpoint, .. } => {
            // Members fail over to the others: a replica down is no outage yet, but one less.
            let dead = facts
                .unreachable
                .iter()
                .map(|(address, why)| {
                    finding(
                        format!("hub {address}"),
                        format!("this hub address does not answer ({endpoint} does): {why}"),
                        format!(
                            "check that `fleet-hub serve` runs at {address} and that this \
                             machine reaches it (routes, firewall: TCP); if that replica is \
                             gone for good, drop it from --hub and from the members' hub lists"
                        ),
                    )
                })
                .collect();
            return CheckOutcome::new("hub", format!("{endpoint} answers"), dead);
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
        (CredentialKind::Member(c), true) if refusal.code == Some(ErrorCode::NotJoined) => {
            format!(
                "the hub says cluster {c} is not a member: on the hub, `fleetctl token create` \
                 (admin credential) gives a join string; run the cluster's fleet-controller \
                 with --join <it> and a fresh --credential-file"
            )
        }
        // Well-formed but refused: the hub cannot tell a removed cluster from a replaced
        // credential, and a re-join while the cluster is still a member is refused too, so
        // the operator looks first.
        (CredentialKind::Member(c), true) => format!(
            "this is not the credential the hub holds for cluster {c}: with the hub's admin \
             credential, `fleetctl clusters` shows whether {c} is still a member. If it is, \
             its credential was replaced: use the current one (the file its controller \
             joined with), or `fleetctl cluster remove {c}` before re-joining it. If it is \
             not, re-join: `fleetctl token create` gives a join string; run the cluster's \
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

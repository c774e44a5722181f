//! What fleetctl says when a hub call fails: what failed, where, and what to do next — the
//! address and what to check when the hub is unreachable, how to get a new credential when the
//! hub refuses one, where to look for an id the hub does not know.

use fleet_hub_api::client::HubError;
use fleet_hub_api::wire::ErrorCode;

/// Who the caller is to the hub, for the advice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Member(String),
}

/// How a command reached the hub.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The `--hub` addresses, comma-separated.
    pub endpoints: String,
    /// The `--credential-file`.
    pub credential_file: String,
    pub caller: Caller,
}

/// `doing` failed with `e`: one message with the next step.
pub fn explain(doing: &str, e: &HubError, cx: &CallContext) -> String {
    let next = match e {
        HubError::Unreachable { errors, .. } if errors.contains("pinned") => format!(
            "the server at {} is not the hub the CA pin names (wrong hub, or the credential of \
             another hub): pass --ca <the hub's ca_sha256, as it logs it> or the credential \
             file from that hub's data dir, with its ca.pem beside it",
            cx.endpoints
        ),
        HubError::Unreachable { .. } | HubError::Transport { .. } => format!(
            "check that `fleet-hub serve` runs at {} (its log says \"hub API serving\"), that \
             --hub is its --listen address and port (7443 by default), and that this machine \
             reaches it (routes, firewall: TCP); `fleetctl doctor` checks more",
            cx.endpoints
        ),
        HubError::Timeout { .. } => format!(
            "the hub at {} accepted the connection but did not answer in time: it may be \
             overloaded or cut from its store (etcd); see its log, or try another replica in \
             --hub",
            cx.endpoints
        ),
        HubError::Api { code, .. } => match (code, &cx.caller) {
            (ErrorCode::Unauthenticated | ErrorCode::NotJoined, Caller::Admin) => format!(
                "the hub refuses the admin credential in {}: use admin.credential from that \
                 hub's data dir",
                cx.credential_file
            ),
            (ErrorCode::Unauthenticated | ErrorCode::NotJoined, Caller::Member(c)) => format!(
                "the hub refuses cluster {c}'s credential in {} (the cluster was removed, or it \
                 re-joined with a new credential): `fleetctl clusters` (the hub's admin \
                 credential) shows whether {c} is still a member; if it is, use its current \
                 credential or `fleetctl cluster remove {c}` first; then get a join string with \
                 `fleetctl token create` and run the cluster's fleet-controller with --join <it>",
                cx.credential_file
            ),
            (ErrorCode::PermissionDenied, Caller::Member(_)) => "this call needs the hub's \
                 admin credential: pass --credential-file <hub data dir>/admin.credential"
                .to_string(),
            (ErrorCode::PermissionDenied, Caller::Admin) => "this call acts for one cluster: \
                 pass that cluster's credential file (the one its controller joined with)"
                .to_string(),
            (ErrorCode::NotFound, _) => "the hub does not know it: `fleetctl clusters` lists \
                 the members, `fleetctl token list` the join tokens"
                .to_string(),
            (ErrorCode::Unavailable | ErrorCode::Internal, _) => format!(
                "the hub at {} cannot serve now (its store may be unreachable): see its log",
                cx.endpoints
            ),
            _ => "`fleetctl doctor` checks the hub, the credential and the clocks".to_string(),
        },
        _ => "`fleetctl doctor` checks the hub, the credential and the clocks".to_string(),
    };
    format!("{doing}: {e}\n  next: {next}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(caller: Caller) -> CallContext {
        CallContext {
            endpoints: "203.0.113.10:7443".into(),
            credential_file: "/etc/fleetboard/aa.credential".into(),
            caller,
        }
    }

    #[test]
    fn an_unreachable_hub_names_the_address_and_what_to_check() {
        let e = HubError::Unreachable {
            endpoints: "203.0.113.10:7443".into(),
            errors: "203.0.113.10:7443: Connection refused (os error 111)".into(),
        };
        let m = explain("listing the fleet", &e, &cx(Caller::Admin));
        assert!(
            m.starts_with("listing the fleet: no hub reachable at 203.0.113.10:7443"),
            "{m}"
        );
        assert!(
            m.contains("`fleet-hub serve` runs at 203.0.113.10:7443"),
            "{m}"
        );
        assert!(m.contains("--listen"), "{m}");
        assert!(m.contains("firewall"), "{m}");
    }

    #[test]
    fn a_wrong_ca_pin_says_which_flag_fixes_it() {
        let e = HubError::Unreachable {
            endpoints: "h:7443".into(),
            errors: "h:7443: TLS: the hub's CA does not match the pinned hash".into(),
        };
        let m = explain("listing the fleet", &e, &cx(Caller::Admin));
        assert!(m.contains("--ca"), "{m}");
        assert!(!m.contains("firewall"), "{m}");
    }

    #[test]
    fn a_refused_credential_says_how_to_get_a_new_one() {
        let e = HubError::Api {
            call: "list",
            code: ErrorCode::Unauthenticated,
            message: "wrong credential".into(),
        };
        let m = explain("listing the fleet", &e, &cx(Caller::Member("aa".into())));
        assert!(m.contains("cluster aa's credential"), "{m}");
        assert!(m.contains("fleetctl token"), "{m}");
        assert!(m.contains("--join"), "{m}");
        let m = explain("listing the fleet", &e, &cx(Caller::Admin));
        assert!(
            m.contains("admin.credential from that hub's data dir"),
            "{m}"
        );
    }

    #[test]
    fn an_admin_call_with_a_member_credential_names_the_admin_credential() {
        let e = HubError::Api {
            call: "tokens",
            code: ErrorCode::PermissionDenied,
            message: "needs the admin credential".into(),
        };
        let m = explain("listing join tokens", &e, &cx(Caller::Member("aa".into())));
        assert!(m.contains("admin.credential"), "{m}");
    }

    #[test]
    fn an_unknown_id_points_at_the_lists() {
        let e = HubError::Api {
            call: "revoke token",
            code: ErrorCode::NotFound,
            message: "no token zz".into(),
        };
        let m = explain("revoking join token zz", &e, &cx(Caller::Admin));
        assert!(
            m.contains("fleetctl clusters") && m.contains("fleetctl token list"),
            "{m}"
        );
    }
}

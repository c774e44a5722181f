//! `ServiceExport.status.conditions`, pure: the aggregation's conditions for this cluster's
//! exports as mcs-api `metav1.Condition`s (`Valid`, `Conflict`, `Ready`), keeping each
//! condition's `lastTransitionTime` while its status stays, and a patch only when something
//! changed.

use fleet_services::aggregate::{Condition, ConditionStatus, ConditionType, ExportStatus};
use serde_json::{Value, json};

/// mcs-api's reason for a ServiceExport whose Service does not exist.
pub const REASON_NO_SERVICE: &str = "NoService";

/// The conditions of a ServiceExport whose Service does not exist.
pub fn no_service_status() -> ExportStatus {
    ExportStatus {
        conditions: vec![Condition {
            type_: ConditionType::Valid,
            status: ConditionStatus::False,
            reason: REASON_NO_SERVICE.into(),
            message: "the Service of this name does not exist in the namespace".into(),
        }],
    }
}

fn type_name(t: ConditionType) -> &'static str {
    match t {
        ConditionType::Valid => "Valid",
        ConditionType::Conflict => "Conflict",
        ConditionType::Ready => "Ready",
    }
}

fn status_name(s: ConditionStatus) -> &'static str {
    match s {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
}

/// The reason written for `c` (metav1.Condition requires a non-empty one; commas are allowed,
/// so several conflict reasons stay joined).
fn reason(c: &Condition) -> &str {
    if c.reason.is_empty() {
        type_name(c.type_)
    } else {
        &c.reason
    }
}

/// The `status.conditions` to write, or `None` when `current` (the object's conditions)
/// already says the same (type, status, reason, message). `now` is RFC 3339; a condition
/// whose status is unchanged keeps its `lastTransitionTime`.
pub fn conditions_patch(current: &[Value], wanted: &ExportStatus, now: &str) -> Option<Vec<Value>> {
    let find = |w: &Condition| {
        current
            .iter()
            .find(|c| c["type"] == type_name(w.type_) && c["status"] == status_name(w.status))
    };
    let same = current.len() == wanted.conditions.len()
        && wanted.conditions.iter().all(|w| {
            find(w).is_some_and(|c| c["reason"] == reason(w) && c["message"] == w.message.as_str())
        });
    if same {
        return None;
    }
    Some(
        wanted
            .conditions
            .iter()
            .map(|w| {
                let since = find(w)
                    .and_then(|c| c["lastTransitionTime"].as_str())
                    .unwrap_or(now);
                json!({
                    "type": type_name(w.type_),
                    "status": status_name(w.status),
                    "reason": reason(w),
                    "message": w.message,
                    "lastTransitionTime": since,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(conflict: ConditionStatus, reason: &str) -> ExportStatus {
        let c = |type_, status, reason: &str| Condition {
            type_,
            status,
            reason: reason.into(),
            message: format!("{reason} message"),
        };
        ExportStatus {
            conditions: vec![
                c(ConditionType::Valid, ConditionStatus::True, "Valid"),
                c(ConditionType::Conflict, conflict, reason),
                c(ConditionType::Ready, ConditionStatus::True, "Ready"),
            ],
        }
    }

    #[test]
    fn conditions_are_patched_only_when_they_change_and_keep_their_transition_time() {
        let t0 = "2026-01-01T00:00:00Z";
        let first = conditions_patch(&[], &status(ConditionStatus::False, "NoConflicts"), t0)
            .expect("nothing written yet");
        assert_eq!(first.len(), 3);
        assert_eq!(first[1]["type"], "Conflict");
        assert_eq!(first[1]["status"], "False");
        assert_eq!(first[1]["lastTransitionTime"], t0);
        let t1 = "2026-01-01T00:01:00Z";
        assert_eq!(
            conditions_patch(&first, &status(ConditionStatus::False, "NoConflicts"), t1),
            None,
            "unchanged: no write"
        );
        let reasons = "PortConflict,TypeConflict";
        let second = conditions_patch(&first, &status(ConditionStatus::True, reasons), t1).unwrap();
        assert_eq!(second[0]["lastTransitionTime"], t0, "Valid stayed True");
        assert_eq!(second[1]["lastTransitionTime"], t1, "Conflict turned True");
        assert_eq!(
            second[1]["reason"], reasons,
            "metav1.Condition allows commas"
        );
        let missing = conditions_patch(&second, &no_service_status(), t1).unwrap();
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0]["reason"], REASON_NO_SERVICE);
        assert_eq!(missing[0]["status"], "False");
    }
}

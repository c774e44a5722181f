//! The CNI error every failure ends as: `{"cniVersion","code","msg","details"}` on stdout.

use fleet_proto::node::NodeError;
use serde_json::{Value, json};

/// Error codes used by fleet-cni: the CNI spec's (1–99) and the node API's own (100+), which
/// pass through from `fleet-nri` unchanged.
pub mod code {
    pub use fleet_proto::node::code::*;
    /// STATUS: the plugin cannot service ADD requests (CNI spec 1.1.0).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin is available with limited connectivity (CNI spec 1.1.0; unused).
    pub const LIMITED_CONNECTIVITY: u32 = 51;

    /// Whether `c` is a code a CNI runtime can receive from fleet-cni.
    pub fn is_valid(c: u32) -> bool {
        matches!(c, 1..=7 | 11 | 50 | 51) || c >= 100
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} ({details})")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object, stamped with the version the caller speaks.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// Daemon errors keep their code: the daemon already speaks CNI codes.
impl From<NodeError> for CniError {
    fn from(e: NodeError) -> Self {
        CniError {
            code: e.code,
            msg: e.msg,
            details: e.details,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_shape_in_order() {
        let e = CniError::new(7, "bad", "why");
        let text = serde_json::to_string(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            text,
            r#"{"cniVersion":"1.0.0","code":7,"msg":"bad","details":"why"}"#
        );
    }

    #[test]
    fn node_errors_keep_their_code() {
        let e: CniError = NodeError::new(100, "pool exhausted", "10.0.0.0/24").into();
        assert_eq!(e.code, 100);
        assert_eq!(e.details, "10.0.0.0/24");
    }

    #[test]
    fn valid_codes() {
        for c in [1, 4, 7, 11, 50, 51, 100, 102] {
            assert!(code::is_valid(c), "{c}");
        }
        for c in [0, 8, 10, 12, 49, 99] {
            assert!(!code::is_valid(c), "{c}");
        }
    }
}

//! The network configuration fleet-cni receives on stdin, and the CNI versions it speaks.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::error::{CniError, code};

/// The CNI spec versions fleet-cni speaks. 0.4.0 is the oldest with CHECK; older ones have a
/// different result shape and no runtime we target still uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

impl CniVersion {
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn parse(s: &str) -> Option<CniVersion> {
        match s {
            "0.4.0" => Some(CniVersion::V0_4_0),
            "1.0.0" => Some(CniVersion::V1_0_0),
            "1.1.0" => Some(CniVersion::V1_1_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }
}

/// The answer to VERSION. The requested version is echoed when fleet-cni speaks it, otherwise
/// the latest is named, so the reply is always a version this plugin can honour.
pub fn version_reply(stdin: &[u8]) -> Value {
    let requested = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .and_then(CniVersion::parse)
        })
        .unwrap_or(CniVersion::LATEST);
    json!({ "cniVersion": requested.as_str(), "supportedVersions": SUPPORTED_VERSIONS })
}

/// The version to stamp on an error reply: the config's when fleet-cni speaks it.
pub fn error_version(stdin: &[u8]) -> &'static str {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .and_then(CniVersion::parse)
        })
        .unwrap_or(CniVersion::LATEST)
        .as_str()
}

/// A parsed plugin configuration. `prevResult` and `cni.dev/valid-attachments` stay raw: only
/// the verbs that use them validate them (DEL must not fail on a prevResult it ignores).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// Network name; with a conflist, the list's name.
    pub name: String,
    pub plugin_type: String,
    pub prev_result: Option<Value>,
    pub runtime_config: Option<Value>,
    pub valid_attachments: Option<Value>,
    /// Ours: the node daemon's socket.
    pub socket: PathBuf,
    /// Ours: how long to wait for the node daemon per request.
    pub timeout: Duration,
    /// Ours: append one line per invocation to this file (never stdout).
    pub log_file: Option<PathBuf>,
}

pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
const MAX_TIMEOUT_MS: u64 = 120_000;

/// Parses stdin. Malformed JSON is code 6, a config that parses but makes no sense is code 7,
/// and a version fleet-cni does not speak is code 1.
pub fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "the network configuration on stdin is not valid JSON",
            format!("{e}; check the CNI config file in the runtime's CNI conf dir"),
        )
    })?;
    let Value::Object(map) = value else {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "the network configuration on stdin is not a JSON object",
            format!("got {}; check the CNI config file", kind(&value)),
        ));
    };

    let cni_version = match map.get("cniVersion") {
        Some(Value::String(s)) => {
            CniVersion::parse(s).ok_or_else(|| unsupported(&format!("{s:?}")))?
        }
        None => return Err(unsupported("no cniVersion")),
        Some(other) => return Err(unsupported(&other.to_string())),
    };

    let name = str_field(&map, "name")?.ok_or_else(|| {
        invalid(
            "the network configuration has no \"name\"",
            "set \"name\" on the conflist",
        )
    })?;
    // Same rule as libcni's network name validation.
    let name_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !name_ok {
        return Err(invalid(
            format!("network name {name:?} is invalid"),
            "a network name starts with a letter or digit and holds only letters, digits, '_', '.', '-'",
        ));
    }
    let plugin_type = str_field(&map, "type")?.unwrap_or_default();

    let socket = match str_field(&map, "socket")? {
        Some(s) => PathBuf::from(s),
        None => PathBuf::from(fleet_proto::node::DEFAULT_SOCKET),
    };
    let timeout_ms = match map.get("timeoutMs") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_MS,
        Some(v) => match v.as_u64() {
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => ms,
            _ => {
                return Err(invalid(
                    format!(
                        "\"timeoutMs\" is {v}, not a whole number of milliseconds in 1..={MAX_TIMEOUT_MS}"
                    ),
                    format!(
                        "fix the fleet-cni entry of the conflist or drop the field (default {DEFAULT_TIMEOUT_MS})"
                    ),
                ));
            }
        },
    };
    let log_file = str_field(&map, "logFile")?.map(PathBuf::from);

    let object_or_absent = |key: &str| -> Result<Option<Value>, CniError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
            Some(v) => Err(invalid(
                format!("{key:?} is {}, not an object", kind(v)),
                "the runtime builds this field; check the runtime and the conflist",
            )),
        }
    };
    let runtime_config = object_or_absent("runtimeConfig")?;
    let prev_result = match map.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.clone()),
    };
    let valid_attachments = map.get("cni.dev/valid-attachments").cloned();

    Ok(NetConf {
        cni_version,
        name: name.to_string(),
        plugin_type: plugin_type.to_string(),
        prev_result,
        runtime_config,
        valid_attachments,
        socket,
        timeout: Duration::from_millis(timeout_ms),
        log_file,
    })
}

/// The `logFile` of a config, read leniently so even a rejected config can be logged.
pub fn log_file_of(stdin: &[u8]) -> Option<PathBuf> {
    serde_json::from_slice::<Value>(stdin)
        .ok()?
        .get("logFile")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(invalid(
            format!("{key:?} is {}, not a string", kind(v)),
            "fix the field in the CNI config file",
        )),
    }
}

fn unsupported(got: &str) -> CniError {
    CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!("fleet-cni does not support CNI version {got}"),
        format!(
            "supported versions: {}; set \"cniVersion\" of the conflist to one of them",
            SUPPORTED_VERSIONS.join(", ")
        ),
    )
}

pub(crate) fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg, details)
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ours_and_defaults() {
        let c = parse_config(
            br#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"fleet-cni","extra":1}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "k8s-pod-network");
        assert_eq!(c.socket, PathBuf::from(fleet_proto::node::DEFAULT_SOCKET));
        assert_eq!(c.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert_eq!(c.prev_result, None);

        let c = parse_config(
            br#"{"cniVersion":"1.1.0","name":"n","type":"fleet-cni","socket":"/tmp/s.sock","timeoutMs":250,
                "logFile":"/tmp/l","runtimeConfig":{"x":1},"prevResult":{"ips":[]}}"#,
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.log_file, Some(PathBuf::from("/tmp/l")));
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn error_codes_by_kind_of_mistake() {
        assert_eq!(parse_config(b"{not json").unwrap_err().code, 6);
        assert_eq!(parse_config(b"[1]").unwrap_err().code, 6);
        let e = parse_config(br#"{"cniVersion":"0.3.1","name":"n"}"#).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.details.contains("0.4.0, 1.0.0, 1.1.0"));
        assert_eq!(parse_config(br#"{"name":"n"}"#).unwrap_err().code, 1);
        assert_eq!(
            parse_config(br#"{"cniVersion":"1.0.0"}"#).unwrap_err().code,
            7
        );
        assert_eq!(
            parse_config(br#"{"cniVersion":"1.0.0","name":"-x"}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            parse_config(br#"{"cniVersion":"1.0.0","name":"n","socket":5}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            parse_config(br#"{"cniVersion":"1.0.0","name":"n","timeoutMs":0}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            parse_config(br#"{"cniVersion":"1.0.0","name":"n","timeoutMs":"5"}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            parse_config(br#"{"cniVersion":"1.0.0","name":"n","runtimeConfig":[]}"#)
                .unwrap_err()
                .code,
            7
        );
    }

    #[test]
    fn version_reply_echoes_what_we_speak() {
        let v = version_reply(br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(version_reply(b"")["cniVersion"], "1.1.0");
        assert_eq!(
            version_reply(br#"{"cniVersion":"0.3.1"}"#)["cniVersion"],
            "1.1.0"
        );
        assert_eq!(error_version(br#"{"cniVersion":"1.0.0"}"#), "1.0.0");
        assert_eq!(error_version(b"garbage"), "1.1.0");
    }
}

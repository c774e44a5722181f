//! The CNI_* environment: which verb, which container, which netns, which pod.

use std::ffi::OsString;

use crate::error::{CniError, code};

/// The CNI verbs fleet-cni answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not a CNI verb fleet-cni knows"),
                    "expected one of ADD, DEL, CHECK, GC, STATUS, VERSION; check the runtime's CNI version",
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// Pod identity from `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_UID=..`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodArgs {
    /// Unknown keys are ignored (runtimes add their own, e.g. `K8S_POD_INFRA_CONTAINER_ID`).
    pub fn parse(s: &str) -> Result<PodArgs, CniError> {
        let mut args = PodArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS has an entry without '=': {pair:?}"),
                    format!("CNI_ARGS={s:?}; expected KEY=VALUE pairs separated by ';'"),
                ));
            };
            match k {
                "K8S_POD_NAMESPACE" => args.namespace = v.to_string(),
                "K8S_POD_NAME" => args.name = v.to_string(),
                "K8S_POD_UID" => args.uid = v.to_string(),
                _ => {}
            }
        }
        Ok(args)
    }
}

/// The CNI environment. Every field but `command` is optional here; each verb asks for what it
/// needs with the `require_*` methods, so a missing variable fails only the verbs that use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// CNI_ARGS as given; parsed by [`CniEnv::pod`] only where it is used (ADD), so a runtime
    /// sending odd args can still DEL.
    pub args: Option<String>,
    /// CNI_PATH: fleet-cni never executes another plugin, so it is kept for logs only.
    pub path: Option<String>,
}

impl CniEnv {
    /// Reads the environment through `lookup` (the process env in `main`, a table in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<CniEnv, CniError> {
        let get = |name: &str| -> Result<Option<String>, CniError> {
            match lookup(name) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) if s.is_empty() => Ok(None),
                    Ok(s) => Ok(Some(s)),
                    Err(raw) => Err(CniError::new(
                        code::INVALID_ENV,
                        format!("{name} is not valid UTF-8"),
                        format!("{name}={raw:?}; the runtime must pass UTF-8 values"),
                    )),
                },
            }
        };
        let command = match get("CNI_COMMAND")? {
            Some(c) => Command::parse(&c)?,
            None => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "CNI_COMMAND is not set",
                    "fleet-cni is run by the container runtime as a CNI plugin; for the installer helper run `fleet-cni --help`",
                ));
            }
        };
        Ok(CniEnv {
            command,
            container_id: get("CNI_CONTAINERID")?,
            netns: get("CNI_NETNS")?,
            ifname: get("CNI_IFNAME")?,
            args: get("CNI_ARGS")?,
            path: get("CNI_PATH")?,
        })
    }

    pub fn pod(&self) -> Result<PodArgs, CniError> {
        self.args
            .as_deref()
            .map_or(Ok(PodArgs::default()), PodArgs::parse)
    }

    pub fn require_container_id(&self) -> Result<&str, CniError> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| missing("CNI_CONTAINERID", self.command))?;
        // Same rule as libcni's ValidateContainerID.
        let ok = id.starts_with(|c: char| c.is_ascii_alphanumeric())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID {id:?} has invalid characters"),
                "a container id starts with a letter or digit and holds only letters, digits, '_', '.', '-'",
            ));
        }
        Ok(id)
    }

    pub fn require_ifname(&self) -> Result<&str, CniError> {
        let name = self
            .ifname
            .as_deref()
            .ok_or_else(|| missing("CNI_IFNAME", self.command))?;
        // Same rule as libcni's ValidateInterfaceName (IFNAMSIZ is 16 with the NUL).
        let ok = name.len() <= 15
            && name != "."
            && name != ".."
            && !name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace());
        if !ok {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {name:?} is not a valid interface name"),
                "an interface name is at most 15 bytes, not '.' or '..', without '/', ':' or spaces",
            ));
        }
        Ok(name)
    }

    pub fn require_netns(&self) -> Result<&str, CniError> {
        self.netns
            .as_deref()
            .ok_or_else(|| missing("CNI_NETNS", self.command))
    }
}

fn missing(var: &str, cmd: Command) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("{var} is not set"),
        format!(
            "CNI {} needs {var}; the container runtime must set it",
            cmd.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).map(OsString::from))
    }

    #[test]
    fn parses_a_kubernetes_add() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1",
            ),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.require_container_id().unwrap(), "abc123");
        assert_eq!(e.require_ifname().unwrap(), "eth0");
        assert_eq!(e.require_netns().unwrap(), "/var/run/netns/x");
        assert_eq!(
            e.pod().unwrap(),
            PodArgs {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: "u-1".into()
            }
        );
    }

    #[test]
    fn missing_or_bad_env_is_code_4() {
        assert_eq!(env(&[]).unwrap_err().code, 4);
        assert_eq!(env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code, 4);
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "novalue")]).unwrap();
        assert_eq!(
            e.pod().unwrap_err().code,
            4,
            "malformed CNI_ARGS fails only where it is used"
        );
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "-bad")]).unwrap();
        assert_eq!(e.require_container_id().unwrap_err().code, 4);
        assert_eq!(e.require_ifname().unwrap_err().code, 4);
        assert!(e.require_netns().unwrap_err().msg.contains("CNI_NETNS"));
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_IFNAME", "a-very-long-ifname0"),
        ])
        .unwrap();
        assert_eq!(e.require_ifname().unwrap_err().code, 4);
        let e = env(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", "")]).unwrap();
        assert_eq!(e.netns, None, "an empty CNI_NETNS counts as unset");
    }
}

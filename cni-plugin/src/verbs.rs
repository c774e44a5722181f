//! What each CNI verb does. Every verb validates locally first, then makes one or two calls to
//! the node daemon; the daemon does all netlink and IPAM work.

use std::path::Path;

use fleet_proto::node::{
    AttachRequest, AttachResult, Attachment, AttachmentKey, CheckRequest, DetachRequest, GcRequest,
    GcResult, NodeClient, NodeError, PodMeta, StatusResult,
};
use serde_json::Value;

use crate::cni_result::{validate_attach_result, validate_prev_result};
use crate::config::{CniVersion, NetConf, invalid, kind, parse_config, version_reply};
use crate::env::{CniEnv, Command};
use crate::error::{CniError, code};

/// The node API as fleet-cni uses it; [`NodeClient`] in production.
pub trait NodeApi {
    fn attach(&self, req: AttachRequest) -> Result<AttachResult, NodeError>;
    fn detach(&self, req: DetachRequest) -> Result<(), NodeError>;
    fn check(&self, req: CheckRequest) -> Result<(), NodeError>;
    fn gc(&self, req: GcRequest) -> Result<GcResult, NodeError>;
    fn status(&self) -> Result<StatusResult, NodeError>;
    fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError>;
}

impl NodeApi for NodeClient {
    fn attach(&self, req: AttachRequest) -> Result<AttachResult, NodeError> {
        NodeClient::attach(self, req)
    }
    fn detach(&self, req: DetachRequest) -> Result<(), NodeError> {
        NodeClient::detach(self, req)
    }
    fn check(&self, req: CheckRequest) -> Result<(), NodeError> {
        NodeClient::check(self, req)
    }
    fn gc(&self, req: GcRequest) -> Result<GcResult, NodeError> {
        NodeClient::gc(self, req)
    }
    fn status(&self) -> Result<StatusResult, NodeError> {
        NodeClient::status(self)
    }
    fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError> {
        NodeClient::list_attachments(self)
    }
}

/// What a verb hands back to `main`.
#[derive(Debug, Default)]
pub struct Output {
    /// Printed on stdout (ADD's result, VERSION's answer); nothing for the other verbs.
    pub stdout: Option<Value>,
    /// ADD only: how to undo the attachment if the result cannot be delivered.
    pub rollback: Option<DetachRequest>,
}

/// Runs one CNI invocation. `connect` builds the node API client from the parsed config.
pub fn run<N: NodeApi>(
    env: &CniEnv,
    stdin: &[u8],
    connect: impl FnOnce(&NetConf) -> N,
) -> Result<Output, CniError> {
    if env.command == Command::Version {
        return Ok(Output {
            stdout: Some(version_reply(stdin)),
            rollback: None,
        });
    }
    let conf = parse_config(stdin)?;
    let node = connect(&conf);
    match env.command {
        Command::Add => add(env, &conf, &node),
        Command::Del => del(env, &conf, &node).map(|()| Output::default()),
        Command::Check => check(env, &conf, &node).map(|()| Output::default()),
        Command::Gc => gc(&conf, &node).map(|()| Output::default()),
        Command::Status => status(&conf, &node).map(|()| Output::default()),
        Command::Version => unreachable!("answered above"),
    }
}

fn key(env: &CniEnv) -> Result<AttachmentKey, CniError> {
    Ok(AttachmentKey {
        container_id: env.require_container_id()?.to_string(),
        ifname: env.require_ifname()?.to_string(),
    })
}

fn require_netns_exists(netns: &str) -> Result<(), CniError> {
    if !Path::new(netns).exists() {
        return Err(CniError::new(
            code::CONTAINER_UNKNOWN,
            format!("network namespace {netns} does not exist"),
            "the sandbox is gone or CNI_NETNS is wrong; the runtime should recreate the pod sandbox",
        ));
    }
    Ok(())
}

fn add(env: &CniEnv, conf: &NetConf, node: &impl NodeApi) -> Result<Output, CniError> {
    let key = key(env)?;
    let netns = env.require_netns()?;
    let prev = validate_prev_result(conf.prev_result.as_ref(), conf.cni_version)?;
    require_netns_exists(netns)?;

    let args = env.pod()?;
    let pod = PodMeta {
        namespace: args.namespace,
        name: args.name,
        uid: args.uid,
        ..PodMeta::default()
    };
    let ours = node.attach(AttachRequest {
        key: key.clone(),
        network: conf.name.clone(),
        netns: netns.to_string(),
        pod,
        primary: prev.primary_networks(),
    })?;
    let rollback = DetachRequest {
        key,
        network: conf.name.clone(),
        netns: netns.to_string(),
    };
    if let Err(why) = validate_attach_result(&ours) {
        let undo = match node.detach(rollback) {
            Ok(()) => "the attachment was released".to_string(),
            Err(e) => format!("releasing it also failed ({e}); the runtime's DEL will retry"),
        };
        return Err(CniError::new(
            code::DECODE_FAILURE,
            format!("fleet-nri answered ADD with an unusable result: {why}"),
            format!(
                "{undo}; fleet-cni and fleet-nri are probably different versions, upgrade them together"
            ),
        ));
    }
    Ok(Output {
        stdout: Some(prev.with_attachment(&ours, netns)),
        rollback: Some(rollback),
    })
}

/// DEL is idempotent: an attachment the daemon does not know is already gone.
///
/// When the daemon is unreachable DEL fails with 11 (try again later) instead of pretending:
/// the runtime then retries until the daemon confirms the address is released, so a daemon
/// restart never leaks addresses. The pod's veth dies with its netns either way, and
/// `install.sh --uninstall` removes fleet-cni from the conflist, so a removed daemon does not
/// wedge pod deletion for good. (fleet-nri also releases on NRI RemovePodSandbox and GC.)
fn del(env: &CniEnv, conf: &NetConf, node: &impl NodeApi) -> Result<(), CniError> {
    let key = key(env)?;
    let req = DetachRequest {
        key,
        network: conf.name.clone(),
        netns: env.netns.clone().unwrap_or_default(),
    };
    match node.detach(req) {
        Ok(()) => Ok(()),
        Err(e) if e.code == code::CONTAINER_UNKNOWN => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn check(env: &CniEnv, conf: &NetConf, node: &impl NodeApi) -> Result<(), CniError> {
    let key = key(env)?;
    let netns = env.require_netns()?;
    let prev = validate_prev_result(conf.prev_result.as_ref(), conf.cni_version)?;
    require_netns_exists(netns)?;

    // The daemon's record says which interface and address are ours; prevResult must carry them.
    let ours = node
        .list_attachments()?
        .into_iter()
        .find(|a| a.key == key && a.network == conf.name)
        .ok_or_else(|| {
            CniError::new(
                code::CHECK_FAILED,
                format!(
                    "fleet-nri has no attachment for container {} ifname {} on network {}",
                    key.container_id, key.ifname, conf.name
                ),
                "the pod lost its fleet address (daemon state reset?); delete the pod so it is recreated",
            )
        })?;
    let address = format!("{}/{}", ours.address, ours.prefix_len);
    prev.holds(&ours.interface, netns, &address).map_err(|why| {
        CniError::new(
            code::CHECK_FAILED,
            format!("prevResult does not carry fleet's attachment: {why}"),
            format!(
                "fleet-nri holds {} {address} for this pod; the cached result is stale, delete the pod so it is recreated",
                ours.interface
            ),
        )
    })?;
    node.check(CheckRequest {
        key,
        network: conf.name.clone(),
        netns: netns.to_string(),
    })?;
    Ok(())
}

fn require_1_1(conf: &NetConf, verb: &str) -> Result<(), CniError> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{verb} needs CNI 1.1.0, the config says {}",
                conf.cni_version.as_str()
            ),
            "set the conflist's cniVersion to 1.1.0 or do not send this verb",
        ));
    }
    Ok(())
}

fn gc(conf: &NetConf, node: &impl NodeApi) -> Result<(), CniError> {
    require_1_1(conf, "GC")?;
    const FIELD: &str = "cni.dev/valid-attachments";
    // Without the list every attachment would look stale: refuse rather than release them all.
    let list = match &conf.valid_attachments {
        Some(Value::Array(list)) => list,
        None => {
            return Err(invalid(
                format!("GC without {FIELD:?}"),
                "the runtime must list the attachments still in use; nothing was released",
            ));
        }
        Some(v) => {
            return Err(invalid(
                format!("{FIELD:?} is {}, not an array", kind(v)),
                "nothing was released",
            ));
        }
    };
    let mut valid = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let field = |k: &str| {
            item.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        match (field("containerID"), field("ifname")) {
            (Some(c), Some(i)) => valid.push(AttachmentKey {
                container_id: c.into(),
                ifname: i.into(),
            }),
            _ => {
                return Err(invalid(
                    format!("{FIELD}[{i}] lacks \"containerID\" or \"ifname\""),
                    format!("got {item}; nothing was released"),
                ));
            }
        }
    }
    node.gc(GcRequest {
        network: conf.name.clone(),
        valid,
    })?;
    Ok(())
}

/// Not ready means "cannot serve ADD". A full pool is not reported: DEL must keep working, and
/// marking the node's network unready would stop far more than new fleet attachments.
fn status(conf: &NetConf, node: &impl NodeApi) -> Result<(), CniError> {
    require_1_1(conf, "STATUS")?;
    let s = node.status().map_err(|e| {
        CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            format!("fleet-nri is not available: {}", e.msg),
            format!("{}; check the fleet-nri pod on this node", e.details),
        )
    })?;
    if !s.ready {
        return Err(CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            "fleet-nri is running but not ready to attach pods",
            format!(
                "node subnet {:?}, fleet CIDR {:?}; it waits for its node subnet from fleet-controller",
                s.node_subnet, s.fleet_cidr
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::ffi::OsString;
    use std::net::Ipv4Addr;

    use fleet_proto::node::{Origin, PodRoute};
    use serde_json::json;

    /// A test double of the node daemon: answers from fields, records every call.
    #[derive(Default)]
    struct FakeNode {
        attach: Option<Result<AttachResult, NodeError>>,
        detach: Option<NodeError>,
        attachments: Vec<Attachment>,
        status: Option<Result<StatusResult, NodeError>>,
        calls: RefCell<Vec<String>>,
        gc_valid: RefCell<Vec<AttachmentKey>>,
    }

    impl NodeApi for &FakeNode {
        fn attach(&self, req: AttachRequest) -> Result<AttachResult, NodeError> {
            self.calls
                .borrow_mut()
                .push(format!("attach {} {:?}", req.network, req.pod));
            self.attach.clone().expect("attach not scripted")
        }
        fn detach(&self, req: DetachRequest) -> Result<(), NodeError> {
            self.calls
                .borrow_mut()
                .push(format!("detach {} {}", req.key.container_id, req.netns));
            self.detach.clone().map_or(Ok(()), Err)
        }
        fn check(&self, _: CheckRequest) -> Result<(), NodeError> {
            self.calls.borrow_mut().push("check".into());
            Ok(())
        }
        fn gc(&self, req: GcRequest) -> Result<GcResult, NodeError> {
            self.calls.borrow_mut().push("gc".into());
            *self.gc_valid.borrow_mut() = req.valid;
            Ok(GcResult { released: vec![] })
        }
        fn status(&self) -> Result<StatusResult, NodeError> {
            self.status.clone().expect("status not scripted")
        }
        fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError> {
            self.calls.borrow_mut().push("list".into());
            Ok(self.attachments.clone())
        }
    }

    fn ours() -> AttachResult {
        AttachResult {
            interface: "eth-fleet".into(),
            mac: "0a:58:64:60:01:05".into(),
            address: Ipv4Addr::new(100, 96, 1, 5),
            prefix_len: 24,
            gateway: Ipv4Addr::new(100, 96, 1, 1),
            routes: vec![PodRoute {
                dst: "100.96.0.0/12".into(),
                gw: Ipv4Addr::new(100, 96, 1, 1),
            }],
            mtu: 1420,
        }
    }

    fn env(cmd: &str, netns: &str) -> CniEnv {
        let vars = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
        ];
        CniEnv::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(*v))
        })
        .unwrap()
    }

    fn conf(version: &str, prev: Option<Value>) -> Vec<u8> {
        let mut c = json!({"cniVersion": version, "name": "net1", "type": "fleet-cni"});
        if let Some(p) = prev {
            c["prevResult"] = p;
        }
        serde_json::to_vec(&c).unwrap()
    }

    const NETNS: &str = "/proc/self/ns/net"; // exists everywhere

    #[test]
    fn add_merges_and_offers_a_rollback() {
        let node = FakeNode {
            attach: Some(Ok(ours())),
            ..Default::default()
        };
        let stdin = conf("1.0.0", Some(json!({"cniVersion": "1.0.0", "ips": []})));
        let out = run(&env("ADD", NETNS), &stdin, |_| &node).unwrap();
        let res = out.stdout.unwrap();
        assert_eq!(res["ips"][0]["address"], "100.96.1.5/24");
        assert_eq!(res["interfaces"][0]["sandbox"], NETNS);
        assert_eq!(out.rollback.unwrap().key.container_id, "c1");
        assert!(node.calls.borrow()[0].contains("namespace: \"ns\""));
    }

    #[test]
    fn add_refuses_before_calling_the_daemon() {
        let node = FakeNode::default();
        let e = run(&env("ADD", NETNS), &conf("1.0.0", None), |_| &node).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.details.contains("primary plugin"));
        let stdin = conf("1.0.0", Some(json!({})));
        let e = run(&env("ADD", "/nonexistent/netns"), &stdin, |_| &node).unwrap_err();
        assert_eq!(e.code, 3);
        assert!(node.calls.borrow().is_empty());
    }

    #[test]
    fn add_passes_daemon_errors_through_and_releases_bad_results() {
        let stdin = conf("1.1.0", Some(json!({})));
        let node = FakeNode {
            attach: Some(Err(NodeError::new(100, "pool exhausted", "x"))),
            ..Default::default()
        };
        assert_eq!(
            run(&env("ADD", NETNS), &stdin, |_| &node).unwrap_err().code,
            100
        );

        let mut bad = ours();
        bad.prefix_len = 40;
        let node = FakeNode {
            attach: Some(Ok(bad)),
            ..Default::default()
        };
        let e = run(&env("ADD", NETNS), &stdin, |_| &node).unwrap_err();
        assert_eq!(e.code, 6);
        assert!(
            node.calls
                .borrow()
                .iter()
                .any(|c| c.starts_with("detach c1"))
        );
    }

    #[test]
    fn del_is_idempotent_and_needs_no_netns_or_prev_result() {
        let node = FakeNode {
            detach: Some(NodeError::new(3, "unknown", "")),
            ..Default::default()
        };
        let vars = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        let env = CniEnv::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(*v))
        })
        .unwrap();
        let stdin = conf("0.4.0", Some(json!("garbage DEL ignores")));
        run(&env, &stdin, |_| &node).unwrap();
        assert_eq!(node.calls.borrow()[0], "detach c1 ");

        let node = FakeNode {
            detach: Some(NodeError::new(11, "down", "")),
            ..Default::default()
        };
        assert_eq!(run(&env, &stdin, |_| &node).unwrap_err().code, 11);
    }

    #[test]
    fn check_needs_our_attachment_in_prev_result() {
        let attachment = Attachment {
            key: AttachmentKey {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            network: "net1".into(),
            netns: NETNS.into(),
            interface: "eth-fleet".into(),
            mac: "0a:58:64:60:01:05".into(),
            address: Ipv4Addr::new(100, 96, 1, 5),
            prefix_len: 24,
            host_veth: "vf1".into(),
            pod: PodMeta::default(),
            origin: Origin::Cni,
            created_unix: 0,
        };
        let node = FakeNode {
            attachments: vec![attachment],
            ..Default::default()
        };
        let added = crate::cni_result::validate_prev_result(Some(&json!({})), CniVersion::V1_0_0)
            .unwrap()
            .with_attachment(&ours(), NETNS);
        run(&env("CHECK", NETNS), &conf("1.0.0", Some(added)), |_| &node).unwrap();
        assert_eq!(*node.calls.borrow(), ["list", "check"]);

        let e = run(
            &env("CHECK", NETNS),
            &conf("1.0.0", Some(json!({}))),
            |_| &node,
        )
        .unwrap_err();
        assert_eq!(e.code, code::CHECK_FAILED);
        let empty = FakeNode::default();
        let e = run(
            &env("CHECK", NETNS),
            &conf("1.0.0", Some(json!({}))),
            |_| &empty,
        )
        .unwrap_err();
        assert_eq!(e.code, code::CHECK_FAILED);
    }

    #[test]
    fn gc_and_status_are_1_1_only() {
        let node = FakeNode {
            status: Some(Err(NodeError::new(11, "down", "/sock"))),
            ..Default::default()
        };
        let e = run(&env("STATUS", ""), &conf("1.0.0", None), |_| &node).unwrap_err();
        assert_eq!(e.code, 1);
        let e = run(&env("STATUS", ""), &conf("1.1.0", None), |_| &node).unwrap_err();
        assert_eq!(e.code, 50);
        assert!(e.details.contains("/sock"));
        assert_eq!(
            run(&env("GC", ""), &conf("1.0.0", None), |_| &node)
                .unwrap_err()
                .code,
            1
        );
        assert_eq!(
            run(&env("GC", ""), &conf("1.1.0", None), |_| &node)
                .unwrap_err()
                .code,
            7
        );

        let mut c: Value = serde_json::from_slice(&conf("1.1.0", None)).unwrap();
        c["cni.dev/valid-attachments"] = json!([{"containerID": "c9", "ifname": "eth0"}]);
        run(&env("GC", ""), &serde_json::to_vec(&c).unwrap(), |_| &node).unwrap();
        assert_eq!(node.gc_valid.borrow()[0].container_id, "c9");
        c["cni.dev/valid-attachments"] = json!([{"containerID": "c9"}]);
        assert_eq!(
            run(&env("GC", ""), &serde_json::to_vec(&c).unwrap(), |_| &node)
                .unwrap_err()
                .code,
            7
        );
    }

    #[test]
    fn status_not_ready_is_50() {
        let s = StatusResult {
            ready: false,
            node_subnet: String::new(),
            fleet_cidr: "100.96.0.0/12".into(),
            vip_range: String::new(),
            allocated: 0,
            capacity: 0,
            nri_registered: true,
            nri_registrations: 1,
            cnf_netns: String::new(),
        };
        let node = FakeNode {
            status: Some(Ok(s.clone())),
            ..Default::default()
        };
        assert_eq!(
            run(&env("STATUS", ""), &conf("1.1.0", None), |_| &node)
                .unwrap_err()
                .code,
            50
        );
        let node = FakeNode {
            status: Some(Ok(StatusResult { ready: true, ..s })),
            ..Default::default()
        };
        run(&env("STATUS", ""), &conf("1.1.0", None), |_| &node).unwrap();
    }
}

//! NRI protobuf messages to and from the handler's types. The only place that reads NRI
//! message fields.

use fleet_proto::nri::api;

use super::handler::{ContainerAdjust, ContainerInfo, PodSandboxInfo};

/// The namespace type NRI uses for a pod's network namespace.
const NETWORK_NAMESPACE: &str = "network";

/// A pod as the handler sees it. The netns is the `network` entry of the pod's Linux
/// namespaces; host-network pods have none (or one with an empty path).
pub fn pod_info(pod: &api::PodSandbox) -> PodSandboxInfo {
    let netns = pod
        .linux
        .as_ref()
        .and_then(|linux| {
            linux
                .namespaces
                .iter()
                .find(|ns| ns.type_ == NETWORK_NAMESPACE)
        })
        .map(|ns| ns.path.clone())
        .filter(|path| !path.is_empty());
    PodSandboxInfo {
        id: pod.id.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        uid: pod.uid.clone(),
        labels: pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        annotations: pod
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        netns,
    }
}

/// A container as the handler sees it.
pub fn container_info(container: &api::Container) -> ContainerInfo {
    ContainerInfo {
        id: container.id.clone(),
        pod_sandbox_id: container.pod_sandbox_id.clone(),
        name: container.name.clone(),
    }
}

/// The handler's adjustment as an NRI `ContainerAdjustment`.
pub fn adjustment(adjust: ContainerAdjust) -> api::ContainerAdjustment {
    api::ContainerAdjustment {
        annotations: adjust.annotations.into_iter().collect(),
        env: adjust
            .env
            .into_iter()
            .map(|(key, value)| api::KeyValue {
                key,
                value,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;
    use std::collections::BTreeMap;

    fn namespace(type_: &str, path: &str) -> api::LinuxNamespace {
        api::LinuxNamespace {
            type_: type_.into(),
            path: path.into(),
            ..Default::default()
        }
    }

    fn pod_with_namespaces(namespaces: Vec<api::LinuxNamespace>) -> api::PodSandbox {
        api::PodSandbox {
            id: "sandbox-1".into(),
            name: "web".into(),
            uid: "uid-1".into(),
            namespace: "default".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            annotations: [("a".to_string(), "b".to_string())].into(),
            linux: protobuf::MessageField::some(api::LinuxPodSandbox {
                namespaces,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pod_netns_is_the_network_namespace_path() {
        let pod = pod_with_namespaces(vec![
            namespace("ipc", "/proc/1/ns/ipc"),
            namespace("network", "/var/run/netns/cni-1234"),
            namespace("uts", ""),
        ]);
        assert_eq!(
            pod_info(&pod),
            PodSandboxInfo {
                id: "sandbox-1".into(),
                name: "web".into(),
                namespace: "default".into(),
                uid: "uid-1".into(),
                labels: BTreeMap::from([("app".into(), "web".into())]),
                annotations: BTreeMap::from([("a".into(), "b".into())]),
                netns: Some("/var/run/netns/cni-1234".into()),
            }
        );
    }

    #[test]
    fn host_network_pod_has_no_netns() {
        assert_eq!(
            pod_info(&pod_with_namespaces(vec![namespace("ipc", "")])).netns,
            None
        );
        assert_eq!(
            pod_info(&pod_with_namespaces(vec![namespace("network", "")])).netns,
            None
        );
        assert_eq!(pod_info(&api::PodSandbox::default()).netns, None);
    }

    /// The bytes a v0.6.1 runtime sends, hand-encoded, decode into the same pod: guards the
    /// field numbers of our .proto subset (pod 1..8, linux.namespaces 5, type 1, path 2).
    #[test]
    fn decodes_wire_bytes_with_nri_field_numbers() {
        fn field(num: u32, bytes: &[u8]) -> Vec<u8> {
            let mut v = vec![((num << 3) | 2) as u8, bytes.len() as u8];
            v.extend_from_slice(bytes);
            v
        }
        let ns = [field(1, b"network"), field(2, b"/run/netns/x")].concat();
        let linux = [field(3, b"/kubepods"), field(5, &ns)].concat();
        let label = [field(1, b"k"), field(2, b"v")].concat();
        let wire = [
            field(1, b"id1"),
            field(2, b"name1"),
            field(3, b"uid1"),
            field(4, b"ns1"),
            field(5, &label),
            field(7, b"runc"),
            field(8, &linux),
            // pid = 9 (varint) and an unknown field 10 (ips, newer NRI) are skipped.
            vec![9 << 3, 42],
            field(10, b"10.0.0.1"),
        ]
        .concat();
        let pod = api::PodSandbox::parse_from_bytes(&wire).unwrap();
        let info = pod_info(&pod);
        assert_eq!(info.id, "id1");
        assert_eq!(info.name, "name1");
        assert_eq!(info.uid, "uid1");
        assert_eq!(info.namespace, "ns1");
        assert_eq!(info.labels, BTreeMap::from([("k".into(), "v".into())]));
        assert_eq!(info.netns.as_deref(), Some("/run/netns/x"));
    }

    #[test]
    fn container_fields_are_copied() {
        let c = api::Container {
            id: "c1".into(),
            pod_sandbox_id: "sandbox-1".into(),
            name: "app".into(),
            ..Default::default()
        };
        assert_eq!(
            container_info(&c),
            ContainerInfo {
                id: "c1".into(),
                pod_sandbox_id: "sandbox-1".into(),
                name: "app".into(),
            }
        );
    }

    #[test]
    fn adjustment_keeps_env_order_and_annotations() {
        let adj = adjustment(ContainerAdjust {
            env: vec![("B".into(), "2".into()), ("A".into(), "1".into())],
            annotations: BTreeMap::from([("fleet/ip".into(), "10.1.0.5".into())]),
        });
        let env: Vec<_> = adj
            .env
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert_eq!(env, vec![("B", "2"), ("A", "1")]);
        assert_eq!(
            adj.annotations.get("fleet/ip").map(String::as_str),
            Some("10.1.0.5")
        );
    }
}

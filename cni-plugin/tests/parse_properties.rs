//! Properties of config and prevResult parsing: arbitrary or mutated input never panics and
//! always ends as Ok or a CNI error with a valid code; merging passes everything not ours through.

use std::cell::Cell;

use fleet_cni::cni_result::validate_prev_result;
use fleet_cni::config::{CniVersion, parse_config};
use fleet_cni::env::CniEnv;
use fleet_cni::error::code;
use fleet_cni::verbs::{NodeApi, run};
use fleet_proto::node::{
    AttachRequest, AttachResult, Attachment, CheckRequest, DetachRequest, GcRequest, GcResult,
    NodeError, PodRoute, StatusResult,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "prevResult",
    "runtimeConfig",
    "socket",
    "timeoutMs",
    "logFile",
    "cni.dev/valid-attachments",
    "interfaces",
    "ips",
    "routes",
    "dns",
    "address",
    "gateway",
    "interface",
    "dst",
    "gw",
    "sandbox",
    "mac",
    "version",
    "containerID",
    "ifname",
];

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "0.4.0",
            "1.0.0",
            "1.1.0",
            "0.3.1",
            "10.0.0.1/24",
            "10.0.0.1",
            "fd00::1/64",
            "10.0.0.1/99",
            "eth0",
            "4",
            "",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(KEYS).prop_map(String::from),
        "[a-z]{1,6}"
    ]
}

fn valid_config(version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "net1",
        "type": "fleet-cni",
        "socket": "/nonexistent/fleet.sock",
        "timeoutMs": 100,
        "prevResult": {
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": "/proc/self/ns/net"}],
            "ips": [{"interface": 0, "address": "10.0.0.2/24", "gateway": "10.0.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}]
        }
    })
}

/// Replaces the value at a random path (picked by `choices`) inside `v` with `new`.
fn mutate(v: &mut Value, choices: &[usize], new: Value) {
    let Some((&c, rest)) = choices.split_first() else {
        *v = new;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let n = m.len();
            let (_, child) = m.iter_mut().nth(c % n).unwrap();
            mutate(child, rest, new)
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            mutate(&mut a[c % n], rest, new)
        }
        _ => *v = new,
    }
}

/// A node API that always attaches successfully; the properties are about parsing.
struct AlwaysAttaches {
    detaches: Cell<usize>,
}

impl NodeApi for &AlwaysAttaches {
    fn attach(&self, _: AttachRequest) -> Result<AttachResult, NodeError> {
        Ok(ours())
    }
    fn detach(&self, _: DetachRequest) -> Result<(), NodeError> {
        self.detaches.set(self.detaches.get() + 1);
        Ok(())
    }
    fn check(&self, _: CheckRequest) -> Result<(), NodeError> {
        Ok(())
    }
    fn gc(&self, _: GcRequest) -> Result<GcResult, NodeError> {
        Ok(GcResult { released: vec![] })
    }
    fn status(&self) -> Result<StatusResult, NodeError> {
        Err(NodeError::new(code::TRY_AGAIN_LATER, "down", ""))
    }
    fn list_attachments(&self) -> Result<Vec<Attachment>, NodeError> {
        Ok(vec![])
    }
}

fn ours() -> AttachResult {
    AttachResult {
        interface: "eth-fleet".into(),
        mac: "0a:58:64:60:01:05".into(),
        address: "100.96.1.5".parse().unwrap(),
        prefix_len: 24,
        gateway: "100.96.1.1".parse().unwrap(),
        routes: vec![
            PodRoute {
                dst: "100.96.0.0/12".into(),
                gw: "100.96.1.1".parse().unwrap(),
            },
            PodRoute {
                dst: "100.112.0.0/16".into(),
                gw: "100.96.1.1".parse().unwrap(),
            },
        ],
        mtu: 1420,
    }
}

fn env(cmd: &str) -> CniEnv {
    let vars = [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/proc/self/ns/net"),
    ];
    CniEnv::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).into())).unwrap()
}

fn arb_version() -> impl Strategy<Value = CniVersion> {
    prop::sample::select(vec![
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ])
}

fn extras() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(("x-[a-z]{1,5}", arb_json()), 0..3)
}

fn with_extras(mut base: Map<String, Value>, extras: Vec<(String, Value)>) -> Value {
    for (k, v) in extras {
        base.insert(k, v);
    }
    Value::Object(base)
}

/// A valid prevResult of `version`, with unknown fields at every level.
fn arb_prev_result(version: CniVersion) -> impl Strategy<Value = Value> {
    let iface = (
        "[a-z]{1,8}",
        prop::option::of("/var/run/netns/[a-z]{1,4}"),
        extras(),
    )
        .prop_map(|(name, sb, x)| {
            let mut m = Map::new();
            m.insert("name".into(), json!(name));
            if let Some(sb) = sb {
                m.insert("sandbox".into(), json!(sb));
            }
            with_extras(m, x)
        });
    let route = (
        any::<[u8; 4]>(),
        0u8..=32,
        prop::option::of(any::<[u8; 4]>()),
        extras(),
    )
        .prop_map(|(d, l, gw, x)| {
            let mut m = Map::new();
            m.insert(
                "dst".into(),
                json!(format!("{}.{}.{}.{}/{l}", d[0], d[1], d[2], d[3])),
            );
            if let Some(g) = gw {
                m.insert(
                    "gw".into(),
                    json!(format!("{}.{}.{}.{}", g[0], g[1], g[2], g[3])),
                );
            }
            with_extras(m, x)
        });
    let ips = prop::collection::vec((any::<[u8; 4]>(), 1u8..=32, any::<usize>(), extras()), 0..3);
    (
        prop::collection::vec(iface, 0..4),
        ips,
        prop::collection::vec(route, 0..3),
        extras(),
        any::<bool>(),
    )
        .prop_map(move |(ifaces, ips, routes, top, with_version)| {
            let n = ifaces.len();
            let ips: Vec<Value> = ips
                .into_iter()
                .map(|(a, l, idx, x)| {
                    let mut m = Map::new();
                    if version == CniVersion::V0_4_0 {
                        m.insert("version".into(), json!("4"));
                    }
                    if n > 0 {
                        m.insert("interface".into(), json!(idx % n));
                    }
                    m.insert(
                        "address".into(),
                        json!(format!("{}.{}.{}.{}/{l}", a[0], a[1], a[2], a[3])),
                    );
                    with_extras(m, x)
                })
                .collect();
            let mut m = Map::new();
            if with_version {
                m.insert("cniVersion".into(), json!(version.as_str()));
            }
            m.insert("interfaces".into(), Value::Array(ifaces));
            m.insert("ips".into(), Value::Array(ips));
            m.insert("routes".into(), Value::Array(routes));
            with_extras(m, top)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = parse_config(&bytes) {
            prop_assert!(code::is_valid(e.code));
        }
    }

    #[test]
    fn arbitrary_json_config_is_ok_or_a_cni_error(v in arb_json()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        if let Err(e) = parse_config(&bytes) {
            prop_assert!(code::is_valid(e.code), "{e:?}");
            prop_assert!(!e.msg.is_empty() && !e.details.is_empty());
        }
        for version in [CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0] {
            if let Err(e) = validate_prev_result(Some(&v), version) {
                prop_assert_eq!(e.code, code::INVALID_CONFIG);
            }
        }
    }

    #[test]
    fn mutated_configs_through_every_verb(
        version in prop::sample::select(vec!["0.4.0", "1.0.0", "1.1.0"]),
        path in prop::collection::vec(any::<usize>(), 0..5),
        new in arb_json(),
        cmd in prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]),
    ) {
        let mut conf = valid_config(version);
        mutate(&mut conf, &path, new);
        let node = AlwaysAttaches { detaches: Cell::new(0) };
        match run(&env(cmd), &serde_json::to_vec(&conf).unwrap(), |_| &node) {
            Ok(out) => {
                if let Some(v) = out.stdout {
                    prop_assert!(v.get("cniVersion").is_some());
                }
            }
            Err(e) => prop_assert!(code::is_valid(e.code), "{e:?}"),
        }
    }

    #[test]
    fn merge_passes_through_everything_not_ours(
        (version, prev) in arb_version().prop_flat_map(|v| (Just(v), arb_prev_result(v))),
    ) {
        let parsed = validate_prev_result(Some(&prev), version);
        prop_assert!(parsed.is_ok(), "{:?}", parsed);
        let out = parsed.unwrap().with_attachment(&ours(), "/var/run/netns/pod");
        prop_assert_eq!(&out["cniVersion"], version.as_str());

        // Take away exactly what fleet-cni appended; what is left must be the input, in order.
        let mut left = out.clone();
        let m = left.as_object_mut().unwrap();
        let iface_index = {
            let a = m["interfaces"].as_array_mut().unwrap();
            let ours_if = a.pop().unwrap();
            prop_assert_eq!(&ours_if["name"], "eth-fleet");
            a.len()
        };
        let ip = m["ips"].as_array_mut().unwrap().pop().unwrap();
        prop_assert_eq!(&ip["interface"], iface_index);
        prop_assert_eq!(&ip["address"], "100.96.1.5/24");
        let routes = m["routes"].as_array_mut().unwrap();
        for _ in 0..ours().routes.len() {
            routes.pop();
        }
        let mut expected = prev.clone();
        let e = expected.as_object_mut().unwrap();
        e.shift_remove("cniVersion");
        let mut stamped = Map::new();
        stamped.insert("cniVersion".into(), json!(version.as_str()));
        stamped.extend(e.clone());
        // Compare text: Map equality ignores key order, the output must not.
        prop_assert_eq!(serde_json::to_string(&left).unwrap(), serde_json::to_string(&stamped).unwrap());
    }
}

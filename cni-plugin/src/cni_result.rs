//! CNI results: validating the primary plugin's `prevResult` and appending fleet's interface,
//! address and routes to it. The result is edited as JSON, never re-encoded through types, so
//! every field fleet-cni does not know (and the order of all of them) passes through unchanged.

use std::net::IpAddr;

use fleet_proto::node::{AttachResult, PrimaryKind, PrimaryNetwork};
use serde_json::{Map, Value, json};

use crate::config::{CniVersion, kind};
use crate::error::{CniError, code};

/// A prevResult that has the shape of a CNI result of one version.
#[derive(Debug, Clone, PartialEq)]
pub struct PrevResult {
    map: Map<String, Value>,
    version: CniVersion,
}

const CHAINED_HINT: &str = "fleet-cni is a chained plugin: it must follow a primary plugin (e.g. bridge) in a \
     .conflist, which hands it a prevResult; check the active file in the CNI conf dir";

/// Validates a prevResult against the result shape of `version`. Missing is an error: ADD and
/// CHECK only make sense after a primary plugin.
pub fn validate_prev_result(
    prev: Option<&Value>,
    version: CniVersion,
) -> Result<PrevResult, CniError> {
    let prev = prev.ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "the configuration has no prevResult",
            CHAINED_HINT,
        )
    })?;
    let bad = |what: String| {
        CniError::new(
            code::INVALID_CONFIG,
            format!(
                "prevResult is not a CNI {} result: {what}",
                version.as_str()
            ),
            CHAINED_HINT,
        )
    };
    let Value::Object(map) = prev else {
        return Err(bad(format!("it is {}, not an object", kind(prev))));
    };
    match map.get("cniVersion") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == version.as_str() => {}
        // libcni hands each plugin its predecessor's result in the list's version; a mismatch
        // means the runtime or the primary plugin is broken, and merging would mix shapes.
        Some(v) => {
            return Err(bad(format!(
                "its cniVersion is {v}, the config's is {:?}",
                version.as_str()
            )));
        }
    }

    let interfaces = array(map, "interfaces").map_err(&bad)?;
    for (i, iface) in interfaces.iter().enumerate() {
        let o = iface
            .as_object()
            .ok_or_else(|| bad(format!("interfaces[{i}] is not an object")))?;
        match o.get("name") {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err(bad(format!("interfaces[{i}] has no \"name\""))),
        }
        for key in ["mac", "sandbox"] {
            if let Some(v) = o.get(key).filter(|v| !v.is_string() && !v.is_null()) {
                return Err(bad(format!(
                    "interfaces[{i}].{key} is {}, not a string",
                    kind(v)
                )));
            }
        }
    }
    for (i, ip) in array(map, "ips").map_err(&bad)?.iter().enumerate() {
        let o = ip
            .as_object()
            .ok_or_else(|| bad(format!("ips[{i}] is not an object")))?;
        match o.get("address").and_then(Value::as_str) {
            Some(s) if parse_cidr(s).is_some() => {}
            _ => return Err(bad(format!("ips[{i}].address is not an address/prefix"))),
        }
        if !optional_ip_ok(o, "gateway") {
            return Err(bad(format!("ips[{i}].gateway is not an IP address")));
        }
        if let Some(idx) = o.get("interface").filter(|v| !v.is_null()) {
            match idx.as_u64() {
                Some(n) if (n as usize) < interfaces.len() => {}
                _ => {
                    return Err(bad(format!(
                        "ips[{i}].interface is not an index into interfaces"
                    )));
                }
            }
        }
        let bad_ip_version = o.get("version").filter(|v| {
            version == CniVersion::V0_4_0 && !v.is_null() && !matches!(v.as_str(), Some("4" | "6"))
        });
        if let Some(v) = bad_ip_version {
            return Err(bad(format!("ips[{i}].version is {v}, not \"4\" or \"6\"")));
        }
    }
    for (i, route) in array(map, "routes").map_err(&bad)?.iter().enumerate() {
        let o = route
            .as_object()
            .ok_or_else(|| bad(format!("routes[{i}] is not an object")))?;
        match o.get("dst").and_then(Value::as_str) {
            Some(s) if parse_cidr(s).is_some() => {}
            _ => return Err(bad(format!("routes[{i}].dst is not an address/prefix"))),
        }
        if !optional_ip_ok(o, "gw") {
            return Err(bad(format!("routes[{i}].gw is not an IP address")));
        }
    }
    if let Some(d) = map.get("dns").filter(|v| !v.is_null() && !v.is_object()) {
        return Err(bad(format!("dns is {}, not an object", kind(d))));
    }
    Ok(PrevResult {
        map: map.clone(),
        version,
    })
}

/// An absent or null field, or a string holding an IP address.
fn optional_ip_ok(o: &Map<String, Value>, key: &str) -> bool {
    match o.get(key) {
        None | Some(Value::Null) => true,
        Some(v) => v.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
    }
}

/// An optional array field; null counts as absent (Go's encoder writes null for nil slices).
fn array<'a>(map: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(v) => Err(format!("{key} is {}, not an array", kind(v))),
    }
}

/// `a.b.c.d/len` or an IPv6 CIDR; `None` when malformed or the prefix is too long.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

/// Checks what the daemon answered before it is written into a result: a reply that cannot be
/// turned into a valid CNI result must not reach the runtime.
pub fn validate_attach_result(r: &AttachResult) -> Result<(), String> {
    if r.interface.is_empty() || r.interface.len() > 15 {
        return Err(format!(
            "interface name {:?} is not a Linux interface name",
            r.interface
        ));
    }
    let mac_ok = r.mac.len() == 17
        && r.mac.split(':').count() == 6
        && r.mac
            .split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
    if !mac_ok {
        return Err(format!("mac {:?} is not a MAC address", r.mac));
    }
    if r.prefix_len == 0 || r.prefix_len > 32 {
        return Err(format!("prefix length {} is not in 1..=32", r.prefix_len));
    }
    for route in &r.routes {
        if !matches!(parse_cidr(&route.dst), Some((IpAddr::V4(_), _))) {
            return Err(format!(
                "route destination {:?} is not an IPv4 CIDR",
                route.dst
            ));
        }
    }
    Ok(())
}

impl PrevResult {
    /// The result ADD prints: prevResult with fleet's interface, address and routes appended,
    /// stamped with the config's version. Nothing else changes.
    pub fn with_attachment(&self, ours: &AttachResult, netns: &str) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(self.version.as_str()));
        for (k, v) in &self.map {
            if k != "cniVersion" {
                out.insert(k.clone(), v.clone());
            }
        }

        let mut iface = Map::new();
        iface.insert("name".into(), json!(ours.interface));
        iface.insert("mac".into(), json!(ours.mac));
        if self.version >= CniVersion::V1_1_0 && ours.mtu > 0 {
            iface.insert("mtu".into(), json!(ours.mtu));
        }
        iface.insert("sandbox".into(), json!(netns));
        let index = push(&mut out, "interfaces", Value::Object(iface));

        // Field order as Debian's bridge plugin writes it.
        let mut ip = Map::new();
        if self.version == CniVersion::V0_4_0 {
            ip.insert("version".into(), json!("4"));
        }
        ip.insert("interface".into(), json!(index));
        ip.insert(
            "address".into(),
            json!(format!("{}/{}", ours.address, ours.prefix_len)),
        );
        ip.insert("gateway".into(), json!(ours.gateway.to_string()));
        push(&mut out, "ips", Value::Object(ip));

        for r in &ours.routes {
            push(
                &mut out,
                "routes",
                json!({ "dst": r.dst, "gw": r.gw.to_string() }),
            );
        }
        Value::Object(out)
    }

    /// The IPv4 addresses and routes the primary plugin configured, for fleet-nri to refuse a
    /// pod whose primary network overlaps the fleet's ranges. Validated shapes only (see
    /// [`validate_prev_result`]); IPv6 is skipped (the fleet is IPv4).
    pub fn primary_networks(&self) -> Vec<PrimaryNetwork> {
        let interfaces = array(&self.map, "interfaces").unwrap_or(&[]);
        let name_of = |ip: &Value| {
            ip.get("interface")
                .and_then(Value::as_u64)
                .and_then(|i| interfaces.get(i as usize))
                .and_then(|i| i.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let ipv4 = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .filter(|s| matches!(parse_cidr(s), Some((IpAddr::V4(_), _))))
                .map(str::to_string)
        };
        let mut out = Vec::new();
        for ip in array(&self.map, "ips").unwrap_or(&[]) {
            if let Some(cidr) = ipv4(ip.get("address")) {
                out.push(PrimaryNetwork {
                    kind: PrimaryKind::Address,
                    cidr,
                    interface: name_of(ip),
                });
            }
        }
        for route in array(&self.map, "routes").unwrap_or(&[]) {
            if let Some(cidr) = ipv4(route.get("dst")) {
                out.push(PrimaryNetwork {
                    kind: PrimaryKind::Route,
                    cidr,
                    interface: String::new(),
                });
            }
        }
        out
    }

    /// Whether prevResult holds interface `name` in `netns` with `address` (CIDR) on it: how CHECK
    /// knows the chain still carries what fleet-cni added.
    pub fn holds(&self, name: &str, netns: &str, address: &str) -> Result<(), String> {
        let interfaces = array(&self.map, "interfaces").unwrap_or(&[]);
        let index = interfaces
            .iter()
            .position(|i| {
                i.get("name").and_then(Value::as_str) == Some(name)
                    && i.get("sandbox")
                        .and_then(Value::as_str)
                        .is_none_or(|s| s == netns)
            })
            .ok_or_else(|| format!("no interface {name:?} in sandbox {netns:?}"))?;
        let has_ip = array(&self.map, "ips").unwrap_or(&[]).iter().any(|ip| {
            ip.get("address").and_then(Value::as_str) == Some(address)
                && ip.get("interface").and_then(Value::as_u64) == Some(index as u64)
        });
        if !has_ip {
            return Err(format!("no address {address} on interface {name:?}"));
        }
        Ok(())
    }
}

/// Appends to an array field (creating it when absent or null) and returns the new index.
fn push(out: &mut Map<String, Value>, key: &str, item: Value) -> usize {
    let slot = out
        .entry(key.to_string())
        .or_insert_with(|| Value::Array(Vec::new()));
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    let arr = slot.as_array_mut().expect("made an array above");
    arr.push(item);
    arr.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_proto::node::PodRoute;

    pub(crate) fn attach_result() -> AttachResult {
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

    #[test]
    fn primary_networks_are_the_ipv4_addresses_and_routes() {
        let p = validate_prev_result(
            Some(&json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "cni0"}, {"name": "eth0", "sandbox": "/x"}],
                "ips": [
                    {"interface": 1, "address": "100.96.128.7/24", "gateway": "100.96.128.1"},
                    {"interface": 1, "address": "fd00::7/64"}
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12", "gw": "100.96.128.1"}]
            })),
            CniVersion::V1_0_0,
        )
        .unwrap();
        let got: Vec<_> = p
            .primary_networks()
            .into_iter()
            .map(|n| (n.kind, n.cidr, n.interface))
            .collect();
        assert_eq!(
            got,
            [
                (
                    PrimaryKind::Address,
                    "100.96.128.7/24".into(),
                    "eth0".into()
                ),
                (PrimaryKind::Route, "0.0.0.0/0".into(), String::new()),
                (PrimaryKind::Route, "10.96.0.0/12".into(), String::new()),
            ]
        );
    }

    fn prev(version: &str) -> Value {
        let mut ip =
            json!({"interface": 2, "address": "10.244.7.2/24", "gateway": "10.244.7.1", "x-ip": 1});
        if version == "0.4.0" {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version,
            "x-top": {"keep": [1, 2]},
            "interfaces": [
                {"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"},
                {"name": "veth1", "mac": "bb:bb:bb:bb:bb:bb", "x-if": true},
                {"name": "eth0", "mac": "cc:cc:cc:cc:cc:cc", "sandbox": "/var/run/netns/p"}
            ],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0", "x-route": "r"}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "z-last": null
        })
    }

    fn merged(version: CniVersion) -> Value {
        let p = prev(version.as_str());
        validate_prev_result(Some(&p), version)
            .unwrap()
            .with_attachment(&attach_result(), "/var/run/netns/p")
    }

    #[test]
    fn merge_appends_and_keeps_everything_for_each_version() {
        for version in [CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0] {
            let out = merged(version);
            let original = prev(version.as_str());
            let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
            let orig_keys: Vec<&String> = original.as_object().unwrap().keys().collect();
            assert_eq!(keys, orig_keys, "key order kept for {version:?}");
            assert_eq!(out["x-top"], original["x-top"]);
            assert_eq!(out["dns"], original["dns"]);
            assert_eq!(out["z-last"], Value::Null);
            assert_eq!(out["interfaces"][1]["x-if"], true);
            assert_eq!(out["ips"][0], original["ips"][0]);
            assert_eq!(out["routes"][0], original["routes"][0]);

            assert_eq!(out["interfaces"][3]["name"], "eth-fleet");
            assert_eq!(out["interfaces"][3]["sandbox"], "/var/run/netns/p");
            assert_eq!(out["interfaces"][3]["mac"], "0a:58:64:60:01:05");
            assert_eq!(out["ips"][1]["address"], "100.96.1.5/24");
            assert_eq!(out["ips"][1]["gateway"], "100.96.1.1");
            assert_eq!(out["ips"][1]["interface"], 3);
            assert_eq!(
                out["routes"][1],
                json!({"dst": "100.96.0.0/12", "gw": "100.96.1.1"})
            );
            assert_eq!(out["routes"][2]["dst"], "100.112.0.0/16");
            assert_eq!(out["cniVersion"], version.as_str());
        }
        assert_eq!(merged(CniVersion::V0_4_0)["ips"][1]["version"], "4");
        assert_eq!(merged(CniVersion::V1_0_0)["ips"][1].get("version"), None);
        assert_eq!(merged(CniVersion::V1_1_0)["interfaces"][3]["mtu"], 1420);
        assert_eq!(merged(CniVersion::V1_0_0)["interfaces"][3].get("mtu"), None);
    }

    #[test]
    fn merge_into_an_empty_result_creates_the_lists() {
        let p = json!({"cniVersion": "1.0.0"});
        let out = validate_prev_result(Some(&p), CniVersion::V1_0_0)
            .unwrap()
            .with_attachment(&attach_result(), "/n");
        assert_eq!(out["interfaces"].as_array().unwrap().len(), 1);
        assert_eq!(out["ips"][0]["interface"], 0);
        assert_eq!(out["routes"].as_array().unwrap().len(), 2);
        let p = json!({"interfaces": null, "ips": null});
        let out = validate_prev_result(Some(&p), CniVersion::V1_1_0)
            .unwrap()
            .with_attachment(&attach_result(), "/n");
        assert_eq!(out["ips"][0]["interface"], 0);
        assert_eq!(out["cniVersion"], "1.1.0");
    }

    #[test]
    fn invalid_prev_results_are_code_7_and_say_chained() {
        let cases = [
            None,
            Some(json!([])),
            Some(json!({"cniVersion": "0.4.0"})),
            Some(json!({"interfaces": {}})),
            Some(json!({"interfaces": [{"mac": "x"}]})),
            Some(json!({"ips": [{"address": "10.0.0.1"}]})),
            Some(json!({"ips": [{"address": "10.0.0.1/33"}]})),
            Some(json!({"ips": [{"address": "10.0.0.1/24", "interface": 0}]})),
            Some(json!({"ips": [{"address": "10.0.0.1/24", "gateway": "nope"}]})),
            Some(json!({"routes": [{"gw": "10.0.0.1"}]})),
            Some(json!({"dns": []})),
        ];
        for case in cases {
            let err = validate_prev_result(case.as_ref(), CniVersion::V1_0_0).unwrap_err();
            assert_eq!(err.code, 7, "{case:?}");
            assert!(err.details.contains("conflist"), "{case:?}");
        }
    }

    #[test]
    fn holds_finds_our_interface_and_address() {
        let out = merged(CniVersion::V1_0_0);
        let p = validate_prev_result(Some(&out), CniVersion::V1_0_0).unwrap();
        p.holds("eth-fleet", "/var/run/netns/p", "100.96.1.5/24")
            .unwrap();
        assert!(
            p.holds("eth-fleet", "/var/run/netns/other", "100.96.1.5/24")
                .is_err()
        );
        assert!(
            p.holds("eth-fleet", "/var/run/netns/p", "100.96.1.6/24")
                .is_err()
        );
        assert!(
            p.holds("eth-fleet", "/var/run/netns/p", "10.244.7.2/24")
                .is_err()
        );
    }

    #[test]
    fn daemon_results_are_checked() {
        validate_attach_result(&attach_result()).unwrap();
        let mut r = attach_result();
        r.prefix_len = 33;
        assert!(validate_attach_result(&r).is_err());
        let mut r = attach_result();
        r.mac = String::new();
        assert!(validate_attach_result(&r).is_err());
        let mut r = attach_result();
        r.routes[0].dst = "100.96.0.0".into();
        assert!(validate_attach_result(&r).is_err());
    }
}

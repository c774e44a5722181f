//! The checks, each both ways, over hand-built facts.

use super::*;
use fleet_hub_api::model::{
    ClusterId, ClusterRecord, GatewayState, MemberRecord, PublicKey, RelayRecord,
};
use fleet_hub_api::records::{
    EndpointRecord, ExportPortRecord, ExportRecord, ExportedServiceType, GatewayPeerRecord,
    ImportClusterRecord, ImportRecord, NodeRecord, Protocol,
};

const NOW: u64 = 1_800_000_000;

fn key(n: u8) -> PublicKey {
    PublicKey::from_bytes([n; 32])
}

fn cluster(id: &str, n: u8, joined_at: u64) -> ClusterRecord {
    ClusterRecord {
        id: ClusterId::new(id).unwrap(),
        block: format!("100.96.{}.0/20", 16 * (n - 1)).parse().unwrap(),
        public_key: key(n),
        endpoint: None,
        gateway: GatewayState::Up,
        controller_live: true,
        joined_at,
        token_id: "t".into(),
    }
}

fn record(owner: &str, name: &str, value: impl Serialize) -> MemberRecord {
    MemberRecord {
        owner: ClusterId::new(owner).unwrap(),
        name: name.into(),
        value: serde_json::to_vec(&value).unwrap(),
        revision: 1,
    }
}

fn gateway(node: &str, updated_at: u64, handshake: Option<u64>) -> GatewayRecord {
    GatewayRecord {
        node: node.into(),
        holder: "h".into(),
        backend: "userspace".into(),
        public_key: key(1).to_string(),
        listen_port: 51820,
        updated_at,
        peers: vec![GatewayPeerRecord {
            public_key: key(9).to_string(),
            endpoint: Some("203.0.113.1:51820".parse().unwrap()),
            last_handshake: handshake,
            rx_bytes: 1,
            tx_bytes: 1,
            path: None,
            path_since: None,
        }],
    }
}

fn node(subnet: &str) -> NodeRecord {
    NodeRecord {
        subnet: subnet.parse().unwrap(),
        underlay_ip: "198.51.100.11".parse().unwrap(),
    }
}

/// A healthy one-cluster fleet behind a relay, joined an hour ago.
fn healthy() -> FleetView {
    FleetView {
        clusters: vec![cluster("aa", 1, NOW - 3600)],
        records: vec![
            record("aa", "gateway", gateway("aa-1", NOW - 5, Some(NOW - 60))),
            record("aa", "node/aa-1", node("100.96.0.0/24")),
            record("aa", "node/aa-2", node("100.96.1.0/24")),
        ],
        fleet_cidr: "100.96.0.0/12".parse().unwrap(),
        relays: vec![RelayRecord {
            id: "relay1".into(),
            public_key: key(9),
            endpoint: "203.0.113.1:51820".parse().unwrap(),
            expires_at: 0,
            instance: String::new(),
        }],
        revision: 7,
    }
}

fn facts(hub: HubFacts) -> Facts {
    Facts {
        now: NOW,
        endpoints: "203.0.113.10:7443".into(),
        unreachable: Vec::new(),
        credential_file: "/var/lib/fleetboard/hub/admin.credential".into(),
        credential: CredentialKind::Admin,
        hub,
        mtu: Err("not on a node".into()),
        node: Err("not on a node".into()),
    }
}

fn reached(answer: Result<FleetView, Refusal>) -> HubFacts {
    HubFacts::Reached {
        endpoint: "203.0.113.10:7443".into(),
        clock: Some(ClockSample {
            hub_time: NOW,
            sent_at_ms: NOW * 1000 + 480,
            round_trip_ms: 40,
        }),
        ca_not_after: Some((NOW + 365 * 86_400) as i64),
        answer,
    }
}

fn subjects(c: &CheckOutcome) -> Vec<String> {
    c.findings.iter().map(|f| f.subject.clone()).collect()
}

#[test]
fn a_healthy_fleet_has_no_problems() {
    let r = diagnose(&facts(reached(Ok(healthy()))));
    assert_eq!(r.problems, 0, "{r:#?}");
    let states: Vec<_> = r.checks.iter().map(|c| (c.check, c.state)).collect();
    assert!(states.contains(&("mtu", CheckState::Skipped)), "{states:?}");
    assert_eq!(
        states.iter().filter(|(_, s)| *s == CheckState::Ok).count(),
        8,
        "{states:?}"
    );
    let mut out = Vec::new();
    render_report(&r, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("no problems found"), "{text}");
}

#[test]
fn a_hub_that_is_down_names_the_address_and_skips_what_needs_it() {
    let f = facts(HubFacts::Down {
        error: "203.0.113.10:7443: Connection refused (os error 111)".into(),
    });
    let r = diagnose(&f);
    assert_eq!(r.problems, 1);
    let hub = &r.checks[0];
    assert_eq!((hub.check, hub.state), ("hub", CheckState::Problem));
    assert!(hub.findings[0].subject.contains("203.0.113.10:7443"));
    assert!(hub.findings[0].fix.contains("fleet-hub serve"), "{hub:?}");
    assert!(
        r.checks
            .iter()
            .filter(|c| [
                "ca",
                "clock",
                "controllers",
                "node-plans",
                "tunnels",
                "services",
                "credential"
            ]
            .contains(&c.check))
            .all(|c| c.state == CheckState::Skipped)
    );
    let pinned = check_hub(&facts(HubFacts::Down {
        error: "h: TLS: the hub's CA does not match the pinned hash sha256:ab".into(),
    }));
    assert!(pinned.findings[0].fix.contains("--ca"), "{pinned:?}");
}

#[test]
fn a_refused_credential_says_how_to_get_a_new_one() {
    let mut f = facts(reached(Err(Refusal {
        code: Some(ErrorCode::Unauthenticated),
        message: "hub refused list: bad credential".into(),
    })));
    f.credential = CredentialKind::Member("aa".into());
    let c = check_credential(&f);
    assert_eq!(c.state, CheckState::Problem);
    assert!(
        c.findings[0].problem.contains("cluster aa's credential"),
        "{c:?}"
    );
    // Refused while the cluster may still be a member: look first, re-join only if it is not.
    let fix = &c.findings[0].fix;
    assert!(
        fix.contains("`fleetctl clusters` shows whether aa"),
        "{c:?}"
    );
    assert!(
        fix.contains("`fleetctl cluster remove aa` before re-joining"),
        "{c:?}"
    );
    assert!(
        fix.find("fleetctl clusters") < fix.find("--join"),
        "look before re-joining: {c:?}"
    );
    let mut gone = f.clone();
    gone.hub = reached(Err(Refusal {
        code: Some(ErrorCode::NotJoined),
        message: "cluster aa is not joined".into(),
    }));
    let c = check_credential(&gone);
    assert!(c.findings[0].fix.contains("fleetctl token create"), "{c:?}");
    assert!(c.findings[0].fix.contains("--join"), "{c:?}");
    assert!(!c.findings[0].fix.contains("cluster remove"), "{c:?}");
    let r = diagnose(&f);
    assert!(
        r.checks
            .iter()
            .any(|c| c.check == "tunnels" && c.state == CheckState::Skipped)
    );
    let ok = check_credential(&facts(reached(Ok(healthy()))));
    assert_eq!(ok.state, CheckState::Ok);
}

#[test]
fn a_ca_expiring_within_30_days_or_expired_is_a_problem() {
    let day = 86_400;
    assert_eq!(
        check_ca(Some((NOW + 400 * day) as i64), NOW).state,
        CheckState::Ok
    );
    let soon = check_ca(Some((NOW + 3 * day) as i64), NOW);
    assert_eq!(soon.state, CheckState::Problem);
    assert!(
        soon.findings[0].problem.contains("expires in 3 days"),
        "{soon:?}"
    );
    let gone = check_ca(Some((NOW - 2 * 3600) as i64), NOW);
    assert!(
        gone.findings[0].problem.contains("expired 2 h ago"),
        "{gone:?}"
    );
    assert_eq!(check_ca(None, NOW).state, CheckState::Skipped);
}

#[test]
fn clock_offset_accounts_for_the_round_trip_and_the_truncated_date() {
    // Sent at .480, 40 ms round trip: our clock read .500 when the hub stamped NOW(.500).
    let s = ClockSample {
        hub_time: NOW,
        sent_at_ms: NOW * 1000 + 480,
        round_trip_ms: 40,
    };
    assert_eq!(s.offset_ms(), (0, 520));
    assert_eq!(check_clock(Some(&s), None).state, CheckState::Ok);
    // 31 s ahead, but within the uncertainty of a 2 s round trip: not flagged.
    let slow = ClockSample {
        hub_time: NOW,
        sent_at_ms: NOW * 1000 + 31_000 - 500,
        round_trip_ms: 2_000,
    };
    assert_eq!(check_clock(Some(&slow), None).state, CheckState::Ok);
    let behind = ClockSample {
        hub_time: NOW,
        sent_at_ms: NOW * 1000 - 300_000,
        round_trip_ms: 10,
    };
    let c = check_clock(Some(&behind), None);
    assert_eq!(c.state, CheckState::Problem);
    assert!(
        c.findings[0]
            .problem
            .contains("behind the hub's by 300.5 s"),
        "{c:?}"
    );
    assert!(c.findings[0].fix.contains("NTP"));
    assert_eq!(check_clock(None, None).state, CheckState::Skipped);
}

#[test]
fn a_member_stamping_records_in_the_future_has_a_clock_ahead() {
    let s = ClockSample {
        hub_time: NOW,
        sent_at_ms: NOW * 1000 + 500,
        round_trip_ms: 0,
    };
    let mut view = healthy();
    assert_eq!(check_clock(Some(&s), Some(&view)).state, CheckState::Ok);
    view.records[0] = record("aa", "gateway", gateway("aa-1", NOW + 120, Some(NOW)));
    let c = check_clock(Some(&s), Some(&view));
    assert_eq!(subjects(&c), vec!["cluster aa"]);
    assert!(c.findings[0].problem.contains("120 s after"), "{c:?}");
}

#[test]
fn a_gateway_or_exporting_node_without_a_plan_is_named() {
    assert_eq!(check_node_plans(&healthy(), NOW).state, CheckState::Ok);
    let mut view = healthy();
    view.records.retain(|r| r.name != "node/aa-1");
    view.records.push(record(
        "aa",
        "export/default/web",
        serde_json::json!({"type": "ClusterSetIP", "created_at_ms": 1, "endpoints": [
            {"ip": "100.96.5.7", "ready": true, "serving": true, "terminating": false,
             "node_name": "aa-3"}]}),
    ));
    let c = check_node_plans(&view, NOW);
    assert_eq!(
        subjects(&c),
        vec!["cluster aa node aa-1", "cluster aa node aa-3"],
        "{c:#?}"
    );
    assert!(c.findings[0].problem.contains("runs the cluster's gateway"));
    assert!(c.findings[1].problem.contains("holds exported endpoints"));
    assert!(c.findings[0].fix.contains("--nodes"));
}

#[test]
fn broken_plans_are_found_and_a_new_member_is_left_to_settle() {
    let mut view = healthy();
    view.records
        .push(record("aa", "node/aa-9", node("100.97.0.0/24")));
    view.records
        .push(record("aa", "node/aa-8", node("100.96.1.0/24")));
    let c = check_node_plans(&view, NOW);
    let problems: Vec<_> = c.findings.iter().map(|f| f.problem.as_str()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("outside the cluster's block")),
        "{c:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("aa-2, aa-8 share")),
        "{c:#?}"
    );

    let mut view = healthy();
    view.records.clear();
    assert_eq!(subjects(&check_node_plans(&view, NOW)), vec!["cluster aa"]);
    view.clusters[0].joined_at = NOW - 10;
    assert_eq!(check_node_plans(&view, NOW).state, CheckState::Ok);
}

#[test]
fn a_tunnel_without_a_handshake_for_minutes_is_named_with_its_peer() {
    assert_eq!(check_tunnels(&healthy(), NOW).state, CheckState::Ok);
    let mut view = healthy();
    view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 5, Some(NOW - 600)));
    let c = check_tunnels(&view, NOW);
    assert_eq!(subjects(&c), vec!["tunnel aa → relay relay1"]);
    assert!(
        c.findings[0].problem.contains("no handshake for 10 min"),
        "{c:?}"
    );
    assert!(c.findings[0].fix.contains("203.0.113.1:51820"), "{c:?}");

    view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 5, None));
    let c = check_tunnels(&view, NOW);
    assert!(c.findings[0].problem.contains("never"), "{c:?}");
    view.clusters[0].joined_at = NOW - 20;
    assert_eq!(
        check_tunnels(&view, NOW).state,
        CheckState::Ok,
        "still settling"
    );
}

#[test]
fn a_stale_or_missing_gateway_record_is_a_problem() {
    let mut view = healthy();
    view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 900, Some(NOW - 60)));
    let c = check_tunnels(&view, NOW);
    assert!(c.findings[0].problem.contains("15 min old"), "{c:?}");
    view.records.remove(0);
    let c = check_tunnels(&view, NOW);
    assert!(c.findings[0].problem.contains("no gateway record"), "{c:?}");
}

#[test]
fn a_stale_gateway_record_is_said_once_not_as_a_handshake_per_tunnel() {
    let mut view = healthy();
    // 351 s old, its last handshake 400 s old: only the record's staleness is a finding.
    view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 351, Some(NOW - 400)));
    let c = check_tunnels(&view, NOW);
    assert_eq!(c.findings.len(), 1, "{c:#?}");
    assert!(c.findings[0].problem.contains("old"), "{c:?}");
    assert!(!c.findings[0].problem.contains("handshake"), "{c:?}");
}

#[test]
fn a_cluster_whose_controller_holds_no_lease_is_named() {
    assert_eq!(check_controllers(&healthy()).state, CheckState::Ok);
    let mut view = healthy();
    view.clusters[0].controller_live = false;
    let c = check_controllers(&view);
    assert_eq!(subjects(&c), vec!["cluster aa"]);
    assert!(
        c.findings[0]
            .problem
            .contains("no controller holds cluster aa's lease: its services are withdrawn"),
        "{c:?}"
    );
    assert!(
        c.findings[0]
            .fix
            .contains("start/restart fleet-controller for aa"),
        "{c:?}"
    );
    assert!(diagnose(&facts(reached(Ok(view)))).problems >= 1);
}

fn export(service_type: ExportedServiceType, created_s: u64, endpoints: usize) -> ExportRecord {
    ExportRecord {
        service_type,
        ports: vec![ExportPortRecord {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: None,
            app_protocol: None,
        }],
        session_affinity: Default::default(),
        internal_traffic_policy: Default::default(),
        traffic_distribution: None,
        labels: Default::default(),
        annotations: Default::default(),
        created_at_ms: created_s * 1000,
        endpoints: (0..endpoints)
            .map(|i| EndpointRecord {
                ip: format!("100.96.0.{}", i + 10).parse().unwrap(),
                hostname: None,
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some("aa-1".into()),
            })
            .collect(),
    }
}

#[test]
fn services_checks_name_withdrawn_exporters_empty_exports_and_conflicts() {
    let mut view = healthy();
    view.clusters.push(cluster("bb", 2, NOW - 3600));
    view.records.push(record(
        "aa",
        "export/default/web",
        export(ExportedServiceType::ClusterSetIP, NOW - 600, 2),
    ));
    assert_eq!(
        check_services(&view, NOW).state,
        CheckState::Ok,
        "{view:#?}"
    );

    // bb exports the same service as headless (a type conflict) with no endpoints, 2 min ago.
    view.records.push(record(
        "bb",
        "export/default/web",
        export(ExportedServiceType::Headless, NOW - 120, 0),
    ));
    // aa imports it, bb withdrawn.
    view.records.push(record(
        "aa",
        "import/default/web",
        ImportRecord {
            service_type: ExportedServiceType::ClusterSetIP,
            ips: vec!["100.127.0.10".parse().unwrap()],
            ports: vec![],
            session_affinity: Default::default(),
            internal_traffic_policy: Default::default(),
            traffic_distribution: None,
            labels: Default::default(),
            annotations: Default::default(),
            clusters: vec![ImportClusterRecord {
                cluster: "bb".into(),
                live: false,
                endpoints: vec![],
            }],
        },
    ));
    let c = check_services(&view, NOW);
    let problems: Vec<&str> = c.findings.iter().map(|f| f.problem.as_str()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("exporting cluster bb is withdrawn")),
        "{c:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("0 endpoints, 2 min after it was exported")),
        "{c:#?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("export conflict")),
        "{c:#?}"
    );
    // An export younger than a minute may still be finding its pods.
    view.records[4] = record(
        "bb",
        "export/default/web",
        export(ExportedServiceType::ClusterSetIP, NOW - 30, 0),
    );
    let c = check_services(&view, NOW);
    assert!(
        !c.findings.iter().any(|f| f.problem.contains("0 endpoints")),
        "{c:#?}"
    );
}

fn mtus(underlay: u32, bridge: u32, wg: u32) -> MtuFacts {
    MtuFacts {
        cnf_netns: "fleet-cnf".into(),
        underlay_device: "eth0".into(),
        underlay_mtu: underlay,
        underlay_ipv6: false,
        bridge_mtu: Some(bridge),
        overlay_mtu: Some(bridge),
        wireguard: Some(("fleetwg0".into(), wg)),
    }
}

#[test]
fn mtus_that_fit_the_underlay_pass_and_the_defaults_fit_1500() {
    assert_eq!(check_mtu(Ok(&mtus(1500, 1370, 1420))).state, CheckState::Ok);
    // 1370 + 50 = 1420 and 1420 + 60 = 1480: a 1480 underlay is the smallest that fits.
    assert_eq!(check_mtu(Ok(&mtus(1480, 1370, 1420))).state, CheckState::Ok);
    assert_eq!(
        check_mtu(Err(&"not on a node".to_string())).state,
        CheckState::Skipped
    );
}

#[test]
fn mtus_above_what_the_underlay_carries_are_named_with_the_arithmetic() {
    let c = check_mtu(Ok(&mtus(1400, 1370, 1420)));
    let subjects = subjects(&c);
    assert_eq!(
        subjects,
        vec![
            "fleet-cnf fleet0",
            "fleet-cnf fleetvx",
            "fleet-cnf fleetwg0"
        ],
        "{c:#?}"
    );
    assert!(
        c.findings[0]
            .problem
            .contains("1370 + VXLAN 50 = 1420 exceeds"),
        "{c:?}"
    );
    assert!(c.findings[0].fix.contains("at most 1350"), "{c:?}");
    assert!(c.findings[0].fix.contains("at least 1420"), "{c:?}");
    assert!(
        c.findings[2].problem.contains("1420 + WireGuard 60 = 1480"),
        "{c:?}"
    );
    let mut v6 = mtus(1500, 1370, 1440);
    v6.underlay_ipv6 = true;
    assert_eq!(subjects_of(check_mtu(Ok(&v6))), vec!["fleet-cnf fleetwg0"]);
    let c = check_mtu(Ok(&mtus(1500, 1420, 1400)));
    assert!(
        c.findings
            .iter()
            .any(|f| f.problem.contains("pods' MTU 1420 exceeds"))
    );
}

fn local(ready: bool, subnet: &str) -> LocalNode {
    LocalNode {
        socket: "/run/fleetboard/node.sock".into(),
        status: Ok(StatusResult {
            ready,
            node_subnet: subnet.into(),
            fleet_cidr: "100.96.0.0/12".into(),
            vip_range: "100.112.0.0/16".into(),
            allocated: 0,
            capacity: 253,
            nri_registered: true,
            nri_registrations: 1,
            cnf_netns: "/run/netns/fleet-cnf".into(),
        }),
    }
}

#[test]
fn this_node_without_a_plan_or_with_a_foreign_one_is_a_problem() {
    let aa = CredentialKind::Member("aa".into());
    let view = healthy();
    let ok = check_local_node(Ok(&local(true, "100.96.0.0/24")), Some(&view), &aa);
    assert_eq!(ok.state, CheckState::Ok, "{ok:?}");
    let none = check_local_node(Ok(&local(false, "")), Some(&view), &aa);
    assert_eq!(none.state, CheckState::Problem);
    assert!(none.findings[0].problem.contains("has no plan"), "{none:?}");
    assert!(
        none.findings[0]
            .fix
            .contains("cluster aa's active controller"),
        "{none:?}"
    );
    let foreign = check_local_node(Ok(&local(true, "100.96.32.0/24")), Some(&view), &aa);
    assert!(
        foreign.findings[0]
            .problem
            .contains("outside cluster aa's block 100.96.0.0/20"),
        "{foreign:?}"
    );
    let down = LocalNode {
        socket: "/run/fleetboard/node.sock".into(),
        status: Err("connection refused".into()),
    };
    let c = check_local_node(Ok(&down), None, &aa);
    assert!(c.findings[0].problem.contains("does not answer"), "{c:?}");
    assert_eq!(
        check_local_node(Err(&"not on a node".to_string()), None, &aa).state,
        CheckState::Skipped
    );
}

fn subjects_of(c: CheckOutcome) -> Vec<String> {
    subjects(&c)
}

#[test]
fn the_report_is_stable_json_and_a_table_with_fixes() {
    let mut view = healthy();
    view.records[0] = record("aa", "gateway", gateway("aa-1", NOW - 5, Some(NOW - 600)));
    let r = diagnose(&facts(reached(Ok(view))));
    assert_eq!(r.problems, 1);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["problems"], 1);
    let tunnels = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "tunnels")
        .unwrap();
    assert_eq!(tunnels["state"], "problem");
    assert!(tunnels["findings"][0]["fix"].is_string());
    let mut out = Vec::new();
    render_report(&r, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("PROBLEM  tunnels     tunnel aa → relay relay1"),
        "{text}"
    );
    assert!(text.contains("fix: check that node aa-1"), "{text}");
    assert!(text.contains("1 problem found"), "{text}");
}

#[test]
fn a_dead_replica_is_a_problem_even_when_another_answers() {
    let mut f = facts(reached(Ok(healthy())));
    f.endpoints = "192.0.2.1:7443,203.0.113.10:7443".into();
    f.unreachable = vec![("192.0.2.1:7443".into(), "connect timed out".into())];
    let r = diagnose(&f);
    assert_eq!(r.problems, 1, "{r:#?}");
    let hub = r.checks.iter().find(|c| c.check == "hub").unwrap();
    assert_eq!(hub.state, CheckState::Problem);
    assert_eq!(subjects(hub), ["hub 192.0.2.1:7443"]);
    assert!(
        hub.findings[0].problem.contains("connect timed out")
            && hub.findings[0].problem.contains("203.0.113.10:7443 does"),
        "{hub:?}"
    );
    // The answering replica is still read: the other checks run.
    let credential = r.checks.iter().find(|c| c.check == "credential").unwrap();
    assert_eq!(credential.state, CheckState::Ok);
}

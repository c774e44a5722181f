//! The route-sync primitive against the real kernel: routes of two owners and foreign routes
//! in a netns this test creates, checked with `ip route` dumps. Needs root.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use common::{Ns, require_root};
use fleet_core::routes::{Route, RouteOwner, RoutesError, sync_routes_in};
use ipnetwork::IpNetwork;

/// `ip` inside the test's netns; panics (with ip's message) when it fails.
fn ip(ns: &Ns, args: &[&str]) -> String {
    let mut cmd = vec!["ip"];
    cmd.extend_from_slice(args);
    let (ok, out) = ns.run(&cmd);
    assert!(ok, "ip {args:?} failed in {}", ns.0);
    out
}

/// `ip [-6] route show table all <filter>` as a set of trimmed lines.
fn routes(ns: &Ns, v6: bool, filter: &[&str]) -> BTreeSet<String> {
    let mut args = vec![
        if v6 { "-6" } else { "-4" },
        "route",
        "show",
        "table",
        "all",
    ];
    args.extend_from_slice(filter);
    ip(ns, &args)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn set(lines: &[&str]) -> BTreeSet<String> {
    lines.iter().map(|s| s.to_string()).collect()
}

const A: u8 = 0xf0;
const B: u8 = 0xf1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_touches_only_the_owners_routes_and_is_idempotent() {
    require_root();
    let ns = Ns::new("routes");
    ip(
        &ns,
        &["link", "add", "va", "type", "veth", "peer", "name", "vb"],
    );
    ip(&ns, &["link", "set", "va", "up"]);
    ip(&ns, &["link", "set", "vb", "up"]);
    ip(&ns, &["addr", "add", "10.9.0.1/24", "dev", "va"]);
    ip(
        &ns,
        &["-6", "addr", "add", "fd00:9::1/64", "dev", "va", "nodad"],
    );
    // Foreign routes: the kernel's connected one, and one a human added (proto boot).
    ip(&ns, &["route", "add", "10.50.0.0/16", "dev", "va"]);
    let foreign = || -> BTreeSet<String> {
        routes(&ns, false, &[])
            .into_iter()
            .filter(|l| !l.contains("proto 240") && !l.contains("proto 241"))
            .collect()
    };
    let foreign_before = foreign();
    assert!(foreign_before.iter().any(|l| l.starts_with("10.9.0.0/24")));
    assert!(foreign_before.contains("10.50.0.0/16 dev va scope link"));

    let a = RouteOwner::protocol(A).dev("va");
    let b = RouteOwner::protocol(B);
    let first = sync_routes_in(
        &ns.path(),
        a.clone(),
        vec![
            Route::to(net("10.1.0.0/16")),
            Route::to(net("10.2.0.0/16")).via(addr("10.9.0.2")),
            Route::to(net("fd00:1::/64")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(first.added.len(), 3, "{first:?}");
    let b_report = sync_routes_in(
        &ns.path(),
        b.clone(),
        vec![
            Route::unreachable(net("10.60.0.0/16")),
            Route::unreachable(net("fd00:60::/48")),
        ],
    )
    .await
    .unwrap();
    assert_eq!(b_report.added.len(), 2, "{b_report:?}");
    let b_before = (
        routes(&ns, false, &["proto", "241"]),
        routes(&ns, true, &["proto", "241"]),
    );
    assert_eq!(b_before.0, set(&["unreachable 10.60.0.0/16"]));
    assert!(
        b_before
            .1
            .iter()
            .any(|l| l.starts_with("unreachable fd00:60::/48")),
        "{:?}",
        b_before.1
    );

    // A moves to a new set: one route goes, one changes its gateway, one is new, one stays.
    let desired = vec![
        Route::to(net("10.2.0.0/16")).via(addr("10.9.0.3")),
        Route::to(net("10.3.0.0/16")).metric(50),
        Route::to(net("fd00:1::/64")),
    ];
    let report = sync_routes_in(&ns.path(), a.clone(), desired.clone())
        .await
        .unwrap();
    let shown = |rs: &[Route]| rs.iter().map(|r| r.destination).collect::<Vec<_>>();
    assert_eq!(shown(&report.deleted), vec![net("10.1.0.0/16")]);
    assert_eq!(shown(&report.replaced), vec![net("10.2.0.0/16")]);
    assert_eq!(shown(&report.added), vec![net("10.3.0.0/16")]);
    assert!(report.blocked.is_empty());

    // The kernel's own dump: A's routes are exactly the desired set.
    assert_eq!(
        routes(&ns, false, &["proto", "240"]),
        set(&[
            "10.2.0.0/16 via 10.9.0.3 dev va",
            "10.3.0.0/16 dev va metric 50",
        ])
    );
    let a_v6 = routes(&ns, true, &["proto", "240"]);
    assert_eq!(a_v6.len(), 1, "{a_v6:?}");
    assert!(
        a_v6.iter()
            .all(|l| l.starts_with("fd00:1::/64 dev va metric 1024"))
    );
    // B's and the foreign routes are untouched.
    assert_eq!(
        (
            routes(&ns, false, &["proto", "241"]),
            routes(&ns, true, &["proto", "241"])
        ),
        b_before
    );
    assert_eq!(foreign(), foreign_before);

    // Re-sync: nothing to do.
    let again = sync_routes_in(&ns.path(), a.clone(), desired.clone())
        .await
        .unwrap();
    assert!(again.is_unchanged(), "{again:?}");

    // Unreachable routes answer at once: EHOSTUNREACH, where a missing route gives
    // ENETUNREACH ("Network is unreachable").
    let get = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["ip", "route", "get", "10.60.1.1"])
        .output()
        .unwrap();
    assert!(!get.status.success());
    assert!(
        String::from_utf8_lossy(&get.stderr).contains("No route to host"),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );

    // A destination the foreign route holds is reported, never taken over.
    let mut with_foreign = desired.clone();
    with_foreign.push(Route::to(net("10.50.0.0/16")));
    let blocked = sync_routes_in(&ns.path(), a.clone(), with_foreign)
        .await
        .unwrap();
    assert!(blocked.is_unchanged(), "{blocked:?}");
    assert_eq!(shown(&blocked.blocked), vec![net("10.50.0.0/16")]);
    assert_eq!(foreign(), foreign_before);

    // B emptied: its routes go, A's stay.
    let b_gone = sync_routes_in(&ns.path(), b, vec![]).await.unwrap();
    assert_eq!(b_gone.deleted.len(), 2, "{b_gone:?}");
    assert!(routes(&ns, false, &["proto", "241"]).is_empty());
    assert!(routes(&ns, true, &["proto", "241"]).is_empty());
    assert_eq!(routes(&ns, false, &["proto", "240"]).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_device_route_and_netns() {
    require_root();
    let ns = Ns::new("routes-err");
    let missing = sync_routes_in(&ns.path(), RouteOwner::protocol(A).dev("nope0"), vec![])
        .await
        .unwrap_err();
    assert!(matches!(missing, RoutesError::NoSuchDevice { .. }));
    let text = missing.to_string();
    assert!(text.contains("nope0") && text.contains(&ns.0), "{text}");

    let host_bits = sync_routes_in(
        &ns.path(),
        RouteOwner::protocol(A),
        vec![Route::unreachable(net("10.1.2.3/16"))],
    )
    .await
    .unwrap_err();
    assert!(host_bits.to_string().contains("10.1.0.0/16"), "{host_bits}");

    // The kernel refusing a write: a gateway that is not on any link.
    ip(&ns, &["link", "set", "lo", "up"]);
    let refused = sync_routes_in(
        &ns.path(),
        RouteOwner::protocol(A),
        vec![Route::to(net("10.7.0.0/16")).via(addr("192.0.2.1"))],
    )
    .await
    .unwrap_err();
    let text = refused.to_string();
    assert!(
        matches!(refused, RoutesError::Write { op: "add", .. })
            && text.contains("10.7.0.0/16 via 192.0.2.1")
            && text.contains(&ns.0),
        "{text}"
    );
}

//! Every reply of the hub's API carries an HTTP `Date` from the hub's own clock — what
//! `fleetctl doctor` compares a member's clock with (`HubClient::probe`). Real `fleet-hub
//! serve` processes on 127.0.0.1, one of them under libfaketime ten minutes ahead.

mod common;

use std::time::{Duration, SystemTime};

use common::hub::HubProcess;
use fleet_hub::api::{CaHash, Credential, ErrorCode};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// How far the hub's `Date` is from our clock when the request left, in seconds (signed).
fn offset_secs(probe: &fleet_hub_api::client::Probe) -> f64 {
    let date = probe.hub_time.expect("the reply carries a Date header");
    match date.duration_since(probe.sent_at) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_carry_the_hubs_clock_and_its_ca_even_when_refusing() {
    let hub = HubProcess::start(&[]).await;
    let probe = hub.admin().probe().await.unwrap();
    assert!(probe.answer.is_ok(), "{:?}", probe.answer);
    // The Date is truncated to the second and stamped within the round trip.
    let offset = offset_secs(&probe);
    let bound = 1.0 + probe.round_trip.as_secs_f64();
    assert!(
        (-1.0..=bound).contains(&offset),
        "hub Date {offset:.3} s from our clock (round trip {:?})",
        probe.round_trip
    );
    assert!(
        probe
            .chain
            .iter()
            .any(|der| CaHash::of_der(der) == hub.ca_hash()),
        "the chain carries the pinned CA"
    );

    // A refused credential still tells the hub's clock.
    let wrong = hub
        .admin()
        .with_credential(Credential::parse(&format!("a.{}", "0".repeat(64))).unwrap());
    let refused = wrong.probe().await.unwrap();
    assert_eq!(
        refused.answer.as_ref().unwrap_err().code(),
        Some(ErrorCode::Unauthenticated)
    );
    assert!(refused.hub_time.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_clock_runs_ahead_says_so_in_its_date() {
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} missing: scripts/install-deps.sh installs faketime"
    );
    let ahead = HubProcess::start_with_env(
        &[],
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", "+600s"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .await;
    let probe = ahead.admin().probe().await.unwrap();
    let offset = offset_secs(&probe);
    assert!(
        (598.0..=602.0 + probe.round_trip.as_secs_f64()).contains(&offset),
        "hub Date {offset:.3} s ahead"
    );
    assert!(probe.hub_time.unwrap() > SystemTime::now() + Duration::from_secs(500));
}

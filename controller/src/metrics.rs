//! The controller's Prometheus metrics (`fleet-controller run --metrics-address`). The loop
//! records what it does (leadership, passes and their duration, publishes, mirror changes);
//! service-discovery counts are computed at scrape time from the last mirrored fleet, so they
//! are exactly what the hub holds for this cluster. `controller/README.md` lists the series.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::ClusterId;
use fleet_hub_api::records::{EXPORT_RECORD_PREFIX, IMPORT_RECORD_PREFIX, ImportRecord};
use fleet_metrics::latency_histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabels {
    /// `nodes` (plans, peers, the gateway) or `services` (exports, imports, VIP tables).
    pub pass: &'static str,
    /// `ok`, or `problems` (something did not converge; retried).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassName {
    pass: &'static str,
}

#[derive(Default)]
struct Shared {
    cluster: Mutex<Option<ClusterId>>,
    /// The fleet as last mirrored while active.
    fleet: Mutex<Option<Arc<Fleet>>>,
    last_fleet_change: Mutex<Option<Instant>>,
    last_publish: Mutex<Option<Instant>>,
    hub_reachable: AtomicBool,
}

/// The controller's metrics; clones share them.
#[derive(Clone)]
pub struct ControllerMetrics {
    active: Gauge,
    passes: Family<PassLabels, Counter>,
    durations: Family<PassName, Histogram, fn() -> Histogram>,
    shared: Arc<Shared>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        ControllerMetrics {
            active: Gauge::default(),
            passes: Family::default(),
            durations: Family::new_with_constructor(latency_histogram),
            shared: Arc::default(),
        }
    }
}

impl ControllerMetrics {
    pub fn set_active(&self, active: bool) {
        self.active.set(i64::from(active));
    }

    /// One reconcile pass of `pass`, started at `started`.
    pub fn pass(&self, pass: &'static str, ok: bool, started: Instant) {
        self.durations
            .get_or_create(&PassName { pass })
            .observe(started.elapsed().as_secs_f64());
        let result = if ok { "ok" } else { "problems" };
        self.passes
            .get_or_create(&PassLabels { pass, result })
            .inc();
    }

    /// The mirror delivered `fleet` (a change, or a relist).
    pub fn fleet(&self, cluster: &ClusterId, fleet: Arc<Fleet>, hub_reachable: bool) {
        *self.shared.cluster.lock().expect("metrics") = Some(cluster.clone());
        *self.shared.fleet.lock().expect("metrics") = Some(fleet);
        *self.shared.last_fleet_change.lock().expect("metrics") = Some(Instant::now());
        self.shared
            .hub_reachable
            .store(hub_reachable, Ordering::Relaxed);
    }

    pub fn hub_reachable(&self, reachable: bool) {
        self.shared
            .hub_reachable
            .store(reachable, Ordering::Relaxed);
    }

    /// The gateway record (the heartbeat) was published.
    pub fn published(&self) {
        *self.shared.last_publish.lock().expect("metrics") = Some(Instant::now());
        self.hub_reachable(true);
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fleetboard_controller_active",
            "1 while this replica holds the cluster lease and acts",
            self.active.clone(),
        );
        registry.register(
            "fleetboard_controller_reconcile_passes",
            "Reconcile passes, by pass (nodes, services) and result (ok, problems)",
            self.passes.clone(),
        );
        registry.register(
            "fleetboard_controller_reconcile_duration_seconds",
            "Time one reconcile pass took, by pass",
            self.durations.clone(),
        );
        registry.register_collector(Box::new(self.clone()));
    }
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControllerMetrics")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// What this cluster holds at the hub, from the mirrored fleet.
#[derive(Default)]
struct ServiceCounts {
    exports: i64,
    imports: i64,
    live: i64,
    withdrawn: i64,
}

fn service_counts(fleet: &Fleet, cluster: &ClusterId) -> ServiceCounts {
    let Some(records) = fleet.records.get(cluster) else {
        return ServiceCounts::default();
    };
    let with_prefix = |prefix: &'static str| {
        records
            .range(prefix.to_string()..)
            .take_while(move |(name, _)| name.starts_with(prefix))
    };
    let mut counts = ServiceCounts {
        exports: with_prefix(EXPORT_RECORD_PREFIX).count() as i64,
        ..Default::default()
    };
    let (mut live, mut seen) = (BTreeSet::new(), BTreeSet::new());
    for (_, record) in with_prefix(IMPORT_RECORD_PREFIX) {
        counts.imports += 1;
        let Ok(import) = serde_json::from_slice::<ImportRecord>(&record.value) else {
            continue;
        };
        for c in import.clusters {
            if c.live {
                live.insert(c.cluster.clone());
            }
            seen.insert(c.cluster);
        }
    }
    counts.live = live.len() as i64;
    counts.withdrawn = seen.difference(&live).count() as i64;
    counts
}

fn seconds_since(at: &Mutex<Option<Instant>>) -> Option<f64> {
    at.lock()
        .expect("metrics")
        .map(|t| t.elapsed().as_secs_f64())
}

impl Collector for ControllerMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.shared;
        let fleet = shared.fleet.lock().expect("metrics").clone();
        let cluster = shared.cluster.lock().expect("metrics").clone();
        let counts = match (&fleet, &cluster) {
            (Some(f), Some(c)) => service_counts(f, c),
            _ => ServiceCounts::default(),
        };
        for (name, help, value) in [
            (
                "fleetboard_controller_exports",
                "Exports this cluster has published at the hub (export/* records)",
                counts.exports,
            ),
            (
                "fleetboard_controller_imports",
                "Service imports this cluster has published (import/* records)",
                counts.imports,
            ),
        ] {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        let mut clusters = encoder.encode_descriptor(
            "fleetboard_controller_import_clusters",
            "Exporting clusters in this cluster's imports: live (routed to) or withdrawn",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [("live", counts.live), ("withdrawn", counts.withdrawn)] {
            ConstGauge::new(value).encode(clusters.encode_family(&StateLabel { state })?)?;
        }
        ConstGauge::new(i64::from(shared.hub_reachable.load(Ordering::Relaxed))).encode(
            encoder.encode_descriptor(
                "fleetboard_controller_hub_reachable",
                "1 while the hub answers (the lease, the mirror, publishes)",
                None,
                MetricType::Gauge,
            )?,
        )?;
        for (name, help, at) in [
            (
                "fleetboard_controller_fleet_change_age_seconds",
                "Seconds since the fleet mirror last delivered a change (absent before the first)",
                &shared.last_fleet_change,
            ),
            (
                "fleetboard_controller_publish_age_seconds",
                "Seconds since the gateway record was last published (absent before the first); grows while the hub is unreachable",
                &shared.last_publish,
            ),
        ] {
            if let Some(age) = seconds_since(at) {
                ConstGauge::new(age).encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Gauge,
                )?)?;
            }
        }
        Ok(())
    }
}

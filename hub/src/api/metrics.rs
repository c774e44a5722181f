//! The hub API's Prometheus metrics (`fleet-hub serve --metrics-address`): calls by name and
//! result with their latency, open watches, and — read from the store right before each
//! scrape — the members and the store revision. `hub/README.md` lists the series.

use std::sync::Arc;
use std::time::Instant;

use fleet_metrics::{LatencyFamily, Refresh, latency_family};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;

use crate::registry::Registry;

/// The calls the API serves; any other path is counted as `unknown` (bounded cardinality).
const CALLS: [&str; 17] = [
    "join",
    "rejoin",
    "update",
    "publish",
    "unpublish",
    "list",
    "lease",
    "lease/release",
    "leave",
    "clusters/remove",
    "relays/publish",
    "relays/remove",
    "board/login",
    "tokens/create",
    "tokens/list",
    "tokens/revoke",
    "watch",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallName {
    pub call: &'static str,
}

/// The hub API's metrics; clones share them.
#[derive(Clone)]
pub struct HubMetrics {
    requests: Family<CallLabels, Counter>,
    duration: LatencyFamily<CallName>,
    watches_open: Gauge,
    members: Gauge,
    revision: Gauge,
    connections: Family<ConnectionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `accepted` (a TLS session follows) or `refused` (over `max_connections`).
    pub result: &'static str,
}

impl Default for HubMetrics {
    fn default() -> Self {
        HubMetrics {
            requests: Family::default(),
            duration: latency_family(),
            watches_open: Gauge::default(),
            members: Gauge::default(),
            revision: Gauge::default(),
            connections: Family::default(),
        }
    }
}

/// The `call` label of a request path (`/v1/<call>`).
pub fn call_name(path: &str) -> &'static str {
    let call = path.strip_prefix("/v1/").unwrap_or("");
    CALLS
        .iter()
        .find(|c| **c == call)
        .copied()
        .unwrap_or("unknown")
}

impl HubMetrics {
    /// One call answered (for a watch: its opening), `ok` or not, started at `started`.
    pub fn call(&self, call: &'static str, ok: bool, started: Instant) {
        self.duration
            .get_or_create(&CallName { call })
            .observe(started.elapsed().as_secs_f64());
        let result = if ok { "ok" } else { "error" };
        self.requests
            .get_or_create(&CallLabels { call, result })
            .inc();
    }

    /// One TCP connection accepted (`true`) or refused for being over the budget.
    pub fn connection(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.connections
            .get_or_create(&ConnectionLabels { result })
            .inc();
    }

    /// Counts a watch stream as open until the guard is dropped.
    pub fn watch_open(&self) -> WatchGuard {
        self.watches_open.inc();
        WatchGuard(self.watches_open.clone())
    }

    pub fn register(&self, registry: &mut MetricsRegistry) {
        registry.register(
            "fleetboard_hub_requests",
            "Hub API calls answered, by call and result (a watch counts when it opens)",
            self.requests.clone(),
        );
        registry.register(
            "fleetboard_hub_request_duration_seconds",
            "Time to answer a hub API call (a watch: to open it), by call",
            self.duration.clone(),
        );
        registry.register(
            "fleetboard_hub_watches_open",
            "Watch streams open on this replica",
            self.watches_open.clone(),
        );
        registry.register(
            "fleetboard_hub_connections",
            "API connections accepted or refused (over --max-connections); members keep theirs \
             while they call at least every 25 s",
            self.connections.clone(),
        );
        registry.register(
            "fleetboard_hub_members",
            "Member clusters in the registry (read at scrape)",
            self.members.clone(),
        );
        registry.register(
            "fleetboard_hub_store_revision",
            "The store's revision (read at scrape)",
            self.revision.clone(),
        );
    }

    /// Reads the members and the revision from the registry before each scrape.
    pub fn refresh(&self, registry: Registry) -> Refresh {
        let metrics = self.clone();
        Arc::new(move || {
            let metrics = metrics.clone();
            let registry = registry.clone();
            Box::pin(async move {
                match registry.list_clusters().await {
                    Ok((clusters, revision)) => {
                        metrics.members.set(clusters.len() as i64);
                        metrics.revision.set(revision as i64);
                    }
                    Err(e) => tracing::debug!(error = %e, "metrics: cannot list clusters"),
                }
            })
        })
    }
}

pub struct WatchGuard(Gauge);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

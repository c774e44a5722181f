//! fleetboard's metrics plumbing, shared by every daemon: the Prometheus text encoding of a
//! `prometheus-client` registry, `fleetboard_build_info`, the latency buckets, and a plain
//! HTTP endpoint that serves `GET /metrics` on the address a daemon's `--metrics-address`
//! names. Each daemon owns its metrics (names, labels) next to the code they count; this crate
//! holds no metric of its own beyond the build info.
//!
//! Dependency-light on purpose (prometheus-client, hyper's HTTP/1 server): contract crates and
//! client binaries (`fleet-hub-api`, `fleetctl`) do not link it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use prometheus_client;

/// The content type of the Prometheus text format the endpoint serves.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A connection that has not finished within this is dropped (a scrape takes microseconds).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Latency buckets for request and reconcile durations, in seconds: 100 µs to ~3.3 s, doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 16)
}

/// A histogram with [`latency_buckets`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// A family of histograms with [`latency_buckets`], one per label set.
pub type LatencyFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub fn latency_family<L: Clone + std::hash::Hash + Eq>() -> LatencyFamily<L> {
    Family::new_with_constructor(latency_histogram)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    version: String,
}

/// Registers `fleetboard_build_info{component, version} 1`.
pub fn register_build_info(registry: &mut Registry, component: &str, version: &str) {
    let info: Family<BuildLabels, Gauge> = Family::default();
    info.get_or_create(&BuildLabels {
        component: component.to_string(),
        version: version.to_string(),
    })
    .set(1);
    registry.register(
        "fleetboard_build_info",
        "The running fleetboard component and its version (always 1)",
        info,
    );
}

/// The registry in the Prometheus text format (0.0.4).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// Runs before each scrape is encoded, to update gauges whose source is async (e.g. a store
/// read); bounded by [`REFRESH_TIMEOUT`], after which the last values are served.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` and serves `GET /metrics` from `registry` until the task is aborted (or the
/// runtime stops). Returns the bound address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_with_refresh(addr, registry, None).await
}

/// [`serve`], with `refresh` awaited before each scrape.
pub async fn serve_with_refresh(
    addr: SocketAddr,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for /metrics on {addr}: {e} (choose another --metrics-address)"),
        )
    })?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "serving /metrics");
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let refresh = refresh.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let registry = registry.clone();
                    let refresh = refresh.clone();
                    async move {
                        if let Some(refresh) = refresh
                            && tokio::time::timeout(REFRESH_TIMEOUT, refresh())
                                .await
                                .is_err()
                        {
                            tracing::debug!("metrics refresh timed out; serving the last values");
                        }
                        Ok::<_, Infallible>(respond(&req, &registry))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection failed"),
                    Err(_) => tracing::debug!("metrics connection timed out"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    Ok((bound, task))
}

fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response")
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "only /metrics is served here\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET /metrics\n");
    }
    Response::builder()
        .header("content-type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(encode(registry))))
        .expect("metrics response")
}

/// Fetches `http://addr/metrics` (blocking; for tests and tools): the body of a 200 reply.
pub fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "GET /metrics on {addr}: {}",
            head.lines().next().unwrap_or("no reply")
        )));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn serves_the_registry_in_the_prometheus_text_format() {
        let mut registry = Registry::default();
        register_build_info(&mut registry, "test", "1.2.3");
        let hits: Counter = Counter::default();
        registry.register("fleetboard_test_hits", "Hits", hits.clone());
        let latency = latency_histogram();
        registry.register(
            "fleetboard_test_duration_seconds",
            "Latency",
            latency.clone(),
        );
        hits.inc();
        latency.observe(0.002);
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), Arc::new(registry))
            .await
            .unwrap();
        let body = tokio::task::spawn_blocking(move || scrape(addr))
            .await
            .unwrap()
            .unwrap();
        let parsed =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| s.value.clone())
        };
        assert_eq!(
            value("fleetboard_test_hits_total"),
            Some(prometheus_parse::Value::Counter(1.0))
        );
        assert_eq!(
            value("fleetboard_build_info"),
            Some(prometheus_parse::Value::Gauge(1.0))
        );
        let info = parsed
            .samples
            .iter()
            .find(|s| s.metric == "fleetboard_build_info")
            .unwrap();
        assert_eq!(info.labels.get("component"), Some("test"));
        match value("fleetboard_test_duration_seconds") {
            Some(prometheus_parse::Value::Histogram(h)) => {
                assert!(h.iter().any(|b| b.less_than >= 0.002 && b.count == 1.0))
            }
            other => panic!("no histogram: {other:?}"),
        }
        task.abort();
    }
}

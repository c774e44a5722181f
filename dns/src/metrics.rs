//! fleet-dns's metrics, kept off the hot path's budget: a query costs three relaxed atomic
//! increments (its (qtype, rcode) cell, its latency bucket, the latency sum) and a clock read;
//! no lock, no map, no allocation. The qtype is read from the raw question, the rcode from
//! the reply's header. Everything is turned into Prometheus series only at scrape time
//! ([`Collector`]). `dns/README.md` lists the series.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The query types counted by name; every other type is `other`.
const QTYPES: [(u16, &str); 9] = [
    (1, "A"),
    (28, "AAAA"),
    (33, "SRV"),
    (16, "TXT"),
    (6, "SOA"),
    (2, "NS"),
    (12, "PTR"),
    (5, "CNAME"),
    (255, "ANY"),
];
const QTYPE_OTHER: usize = QTYPES.len();
/// Index for a message whose question could not be read (FORMERR and the like).
const QTYPE_NONE: usize = QTYPES.len() + 1;
const QTYPE_LABELS: usize = QTYPES.len() + 2;

/// Header RCODEs (RFC 1035 §4.1.1, the low 4 bits; BADVERS shows as its low bits, NOERROR).
const RCODES: [&str; 6] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];
const RCODE_OTHER: usize = RCODES.len();
const RCODE_LABELS: usize = RCODES.len() + 1;

/// Answer latency bucket bounds, in nanoseconds (5 µs … 10 ms; the handler takes microseconds).
const BUCKETS_NS: [u64; 11] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

#[derive(Default)]
struct Inner {
    queries: [[AtomicU64; RCODE_LABELS]; QTYPE_LABELS],
    /// Queries that got no reply (a response, or shorter than a header).
    dropped: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS_NS.len() + 1],
    latency_sum_ns: AtomicU64,
    table_builds: AtomicU64,
    table_names: AtomicU64,
    hub_reachable: AtomicBool,
}

/// Shared counters; clones count into the same cells. Compares equal only to its own clones.
#[derive(Clone, Default)]
pub struct DnsMetrics(Arc<Inner>);

impl std::fmt::Debug for DnsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsMetrics")
    }
}

impl PartialEq for DnsMetrics {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for DnsMetrics {}

impl DnsMetrics {
    /// Counts one query: `reply` is what the handler answered (`None`: no reply).
    pub fn query(&self, query: &[u8], reply: Option<&[u8]>, took: Duration) {
        let Some(reply) = reply else {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let rcode = usize::from(reply.get(3).map_or(2, |b| b & 0x0f)).min(RCODE_OTHER);
        self.0.queries[qtype_index(query)][rcode].fetch_add(1, Ordering::Relaxed);
        let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        let bucket = BUCKETS_NS.partition_point(|&b| b < ns);
        self.0.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.0.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// A new table is being served, with this many names.
    pub fn table_built(&self, names: usize) {
        self.0.table_builds.fetch_add(1, Ordering::Relaxed);
        self.0.table_names.store(names as u64, Ordering::Relaxed);
    }

    pub fn set_hub_reachable(&self, reachable: bool) {
        self.0.hub_reachable.store(reachable, Ordering::Relaxed);
    }

    /// The collector to register (`registry.register_collector`).
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.clone())
    }

    /// Queries answered with this qtype and rcode label (for tests).
    pub fn answered(&self, qtype: &str, rcode: &str) -> u64 {
        let q = QTYPES
            .iter()
            .position(|(_, n)| *n == qtype)
            .unwrap_or(QTYPE_OTHER);
        let r = RCODES
            .iter()
            .position(|n| *n == rcode)
            .unwrap_or(RCODE_OTHER);
        self.0.queries[q][r].load(Ordering::Relaxed)
    }
}

/// The question's type, read from the raw message: header, then QNAME labels (no compression
/// in a question), then QTYPE.
fn qtype_index(query: &[u8]) -> usize {
    let mut at = 12;
    loop {
        let Some(&len) = query.get(at) else {
            return QTYPE_NONE;
        };
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return QTYPE_NONE;
        }
        at += 1 + usize::from(len);
    }
    let Some(qtype) = query.get(at + 1..at + 3) else {
        return QTYPE_NONE;
    };
    let qtype = u16::from_be_bytes([qtype[0], qtype[1]]);
    QTYPES
        .iter()
        .position(|(t, _)| *t == qtype)
        .unwrap_or(QTYPE_OTHER)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    qtype: &'static str,
    rcode: &'static str,
}

impl Collector for DnsMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.0;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        {
            let mut family = encoder.encode_descriptor(
                "fleetboard_dns_queries",
                "DNS queries answered, by question type and response code",
                None,
                MetricType::Counter,
            )?;
            for (q, row) in inner.queries.iter().enumerate() {
                for (r, cell) in row.iter().enumerate() {
                    let n = load(cell);
                    if n == 0 {
                        continue;
                    }
                    let labels = QueryLabels {
                        qtype: match q {
                            QTYPE_OTHER => "other",
                            QTYPE_NONE => "none",
                            q => QTYPES[q].1,
                        },
                        rcode: RCODES.get(r).copied().unwrap_or("other"),
                    };
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let dropped = ConstCounter::new(load(&inner.dropped));
        dropped.encode(encoder.encode_descriptor(
            "fleetboard_dns_queries_dropped",
            "DNS messages not answered (responses, or shorter than a header)",
            None,
            MetricType::Counter,
        )?)?;
        let mut buckets = Vec::with_capacity(BUCKETS_NS.len() + 1);
        let mut count = 0;
        for (i, cell) in inner.latency_buckets.iter().enumerate() {
            let n = load(cell);
            count += n;
            let bound = BUCKETS_NS
                .get(i)
                .map_or(f64::INFINITY, |ns| *ns as f64 / 1e9);
            buckets.push((bound, n));
        }
        encoder
            .encode_descriptor(
                "fleetboard_dns_answer_duration_seconds",
                "Time from a query received to its reply built (the handler, table lookup included)",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<Vec<(String, String)>>(
                load(&inner.latency_sum_ns) as f64 / 1e9,
                count,
                &buckets,
                None,
            )?;
        ConstCounter::new(load(&inner.table_builds)).encode(encoder.encode_descriptor(
            "fleetboard_dns_table_builds",
            "DNS tables built from the cluster's import records and swapped in",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(load(&inner.table_names) as i64).encode(encoder.encode_descriptor(
            "fleetboard_dns_table_names",
            "Names in the DNS table being served",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::from(inner.hub_reachable.load(Ordering::Relaxed))).encode(
            encoder.encode_descriptor(
                "fleetboard_dns_hub_reachable",
                "1 while the fleet mirror reaches the hub (0: serving the last table)",
                None,
                MetricType::Gauge,
            )?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qtype_is_read_from_the_raw_question() {
        // header, "web" "clusterset" "local" root, QTYPE SRV, QCLASS IN
        let mut q = vec![0u8; 12];
        for label in ["web", "clusterset", "local"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 33, 0, 1]);
        assert_eq!(QTYPES[qtype_index(&q)].1, "SRV");
        assert_eq!(qtype_index(&q[..q.len() - 4]), QTYPE_NONE);
        let m = DnsMetrics::default();
        let mut reply = q.clone();
        reply[3] = 3;
        m.query(&q, Some(&reply), Duration::from_micros(7));
        assert_eq!(m.answered("SRV", "NXDOMAIN"), 1);
    }
}

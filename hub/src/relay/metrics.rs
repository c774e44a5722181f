//! The relay process's Prometheus metrics (`--relay-metrics-address`): per peer (one per
//! member cluster, labelled by its WireGuard public key) the handshake age and the bytes each
//! way, read from the device right before each scrape. WireGuard's UAPI reports no packet or
//! drop counts, so there are none here.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fleet_gateway::{PeerStats, WireguardDevice, handshake_age};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// The device's peer statistics as of the last refresh.
#[derive(Clone, Default)]
pub struct RelayMetrics(Arc<Mutex<Vec<PeerStats>>>);

impl std::fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayMetrics")
    }
}

impl RelayMetrics {
    /// Reads the device's peers before each scrape.
    pub fn refresh(&self, device: Arc<dyn WireguardDevice>) -> fleet_metrics::Refresh {
        let metrics = self.clone();
        Arc::new(move || {
            let (metrics, device) = (metrics.clone(), device.clone());
            Box::pin(async move {
                match device.stats().await {
                    Ok(stats) => *metrics.0.lock().expect("relay metrics") = stats,
                    Err(e) => tracing::debug!(error = %e, "metrics: cannot read the relay's peers"),
                }
            })
        })
    }
}

impl Collector for RelayMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.lock().expect("relay metrics").clone();
        let now = SystemTime::now();
        ConstGauge::new(stats.len() as i64).encode(encoder.encode_descriptor(
            "fleetboard_relay_peers",
            "Peers on the relay's WireGuard device (one per member cluster)",
            None,
            MetricType::Gauge,
        )?)?;
        {
            let mut family = encoder.encode_descriptor(
                "fleetboard_relay_peer_handshake_age_seconds",
                "Seconds since the peer's last WireGuard handshake (absent: none yet)",
                None,
                MetricType::Gauge,
            )?;
            for s in &stats {
                if let Some(age) = handshake_age(s, now) {
                    let label = PeerLabel {
                        peer: s.public_key.to_string(),
                    };
                    ConstGauge::new(age.as_secs_f64()).encode(family.encode_family(&label)?)?;
                }
            }
        }
        for (name, help, bytes) in [
            (
                "fleetboard_relay_peer_received_bytes",
                "Bytes received from the peer",
                (|s: &PeerStats| s.rx_bytes) as fn(&PeerStats) -> u64,
            ),
            (
                "fleetboard_relay_peer_sent_bytes",
                "Bytes sent to the peer",
                |s: &PeerStats| s.tx_bytes,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &stats {
                let label = PeerLabel {
                    peer: s.public_key.to_string(),
                };
                ConstCounter::new(bytes(s)).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

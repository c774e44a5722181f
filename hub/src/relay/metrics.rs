//! The relay process's Prometheus metrics (`--relay-metrics-address`), read from the
//! forwarder at each scrape: per member (labelled by its WireGuard public key) the age of its
//! session with the relay and the bytes forwarded from and to it; datagrams forwarded by
//! WireGuard message type and dropped by reason; and how well the socket's I/O batches.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::SharedForwarder;
use super::forward::{DropReason, MemberStatus};
use super::udp::RelaySocket;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The forwarder's state and the socket's counters, read at each scrape.
#[derive(Clone)]
pub struct RelayMetrics(SharedForwarder, Arc<RelaySocket>);

impl std::fmt::Debug for RelayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayMetrics")
    }
}

impl RelayMetrics {
    pub fn new(forwarder: SharedForwarder, socket: Arc<RelaySocket>) -> Self {
        RelayMetrics(forwarder, socket)
    }
}

fn peer(m: &MemberStatus) -> PeerLabel {
    PeerLabel {
        peer: fleet_gateway::PublicKey::from_bytes(m.public_key).to_base64(),
    }
}

impl Collector for RelayMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (members, totals) = {
            let f = self.0.lock().expect("forwarder");
            (f.members(), f.totals().clone())
        };
        let now = Instant::now();
        ConstGauge::new(members.len() as i64).encode(encoder.encode_descriptor(
            "fleetboard_relay_peers",
            "Member clusters the relay forwards for",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(members.iter().filter(|m| m.addr.is_some()).count() as i64).encode(
            encoder.encode_descriptor(
                "fleetboard_relay_registered_peers",
                "Members whose mapped address the relay has authenticated",
                None,
                MetricType::Gauge,
            )?,
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "fleetboard_relay_peer_handshake_age_seconds",
                "Seconds since the member's last handshake with the relay (absent: none yet)",
                None,
                MetricType::Gauge,
            )?;
            for m in &members {
                if let Some(t) = m.last_handshake {
                    ConstGauge::new(now.duration_since(t).as_secs_f64())
                        .encode(family.encode_family(&peer(m))?)?;
                }
            }
        }
        for (name, help, bytes) in [
            (
                "fleetboard_relay_peer_received_bytes",
                "Bytes forwarded from the member",
                (|m: &MemberStatus| m.counters.rx_bytes) as fn(&MemberStatus) -> u64,
            ),
            (
                "fleetboard_relay_peer_sent_bytes",
                "Bytes forwarded to the member",
                |m: &MemberStatus| m.counters.tx_bytes,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for m in &members {
                ConstCounter::new(bytes(m)).encode(family.encode_family(&peer(m))?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "fleetboard_relay_forwarded_datagrams",
                "WireGuard datagrams forwarded between members, by message type",
                None,
                MetricType::Counter,
            )?;
            for (i, t) in ["initiation", "response", "cookie_reply", "data"]
                .into_iter()
                .enumerate()
            {
                ConstCounter::new(totals.forwarded[i])
                    .encode(family.encode_family(&TypeLabel { r#type: t })?)?;
            }
        }
        ConstCounter::new(totals.own).encode(encoder.encode_descriptor(
            "fleetboard_relay_own_session_datagrams",
            "Datagrams of the relay's own sessions with members (handshakes, keepalives)",
            None,
            MetricType::Counter,
        )?)?;
        let io = &self.1.counters;
        {
            let mut family = encoder.encode_descriptor(
                "fleetboard_relay_socket_calls",
                "Batched calls on the relay's socket: receive (recvmmsg that returned datagrams), send (sendmmsg or sendto)",
                None,
                MetricType::Counter,
            )?;
            for (call, n) in [("receive", &io.recv_calls), ("send", &io.send_calls)] {
                ConstCounter::new(n.load(Ordering::Relaxed))
                    .encode(family.encode_family(&CallLabel { call })?)?;
            }
        }
        ConstCounter::new(io.gro_datagrams.load(Ordering::Relaxed)).encode(
            encoder.encode_descriptor(
                "fleetboard_relay_gro_datagrams",
                "Datagrams received coalesced with others of their source (UDP GRO)",
                None,
                MetricType::Counter,
            )?,
        )?;
        ConstCounter::new(io.gso_datagrams.load(Ordering::Relaxed)).encode(
            encoder.encode_descriptor(
                "fleetboard_relay_gso_datagrams",
                "Datagrams sent in one UDP GSO send with others to the same member",
                None,
                MetricType::Counter,
            )?,
        )?;
        let mut family = encoder.encode_descriptor(
            "fleetboard_relay_dropped_datagrams",
            "Datagrams the relay did not forward, by reason",
            None,
            MetricType::Counter,
        )?;
        for reason in DropReason::ALL {
            ConstCounter::new(totals.dropped.get(&reason).copied().unwrap_or(0)).encode(
                family.encode_family(&ReasonLabel {
                    reason: reason.as_str(),
                })?,
            )?;
        }
        Ok(())
    }
}

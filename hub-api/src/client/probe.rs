//! [`HubClient::probe`]: one `list` on a fresh connection that also reports what a health check
//! needs beyond the answer — the certificates the hub presented (its CA's expiry), the hub's
//! clock (the HTTP `Date` header every reply carries) and the round trip that bounds how far
//! that clock reading can be off.

use std::time::{Duration, Instant, SystemTime};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use super::{HubClient, HubError, decode_reply, fleet_view};
use crate::model::FleetView;
use crate::wire::ListReply;

/// What one probe of the hub saw.
#[derive(Debug)]
pub struct Probe {
    /// The address that answered.
    pub endpoint: String,
    /// The certificates the hub presented, DER, server first (the pinned CA among them).
    pub chain: Vec<Vec<u8>>,
    /// The hub's clock from the reply's `Date` header (1 s resolution), if it sent one.
    pub hub_time: Option<SystemTime>,
    /// The local clock when the request was sent.
    pub sent_at: SystemTime,
    /// From sending the request to having the reply's headers.
    pub round_trip: Duration,
    /// The `list` answer: the fleet, or the hub refusing (e.g. the credential).
    pub answer: Result<FleetView, HubError>,
}

impl HubClient {
    /// Probes the hub's addresses in turn; the first one that completes a TLS handshake and
    /// answers (even with a refusal) is the probe. [`HubError::Unreachable`] when none does.
    pub async fn probe(&self) -> Result<Probe, HubError> {
        let mut errors = Vec::new();
        for endpoint in &self.inner.endpoints {
            let limit = self.inner.options.connect_timeout + self.inner.options.call_timeout;
            match tokio::time::timeout(limit, self.probe_one(endpoint)).await {
                Ok(Ok(probe)) => return Ok(probe),
                Ok(Err(e)) => errors.push(format!("{endpoint}: {e}")),
                Err(_) => errors.push(format!("{endpoint}: no answer within {limit:?}")),
            }
        }
        Err(HubError::Unreachable {
            endpoints: self.endpoints_text(),
            errors: errors.join("; "),
        })
    }

    async fn probe_one(&self, endpoint: &str) -> Result<Probe, String> {
        let tls = tokio::time::timeout(
            self.inner.options.connect_timeout,
            self.tls_connect(endpoint),
        )
        .await
        .map_err(|_| "connect timed out".to_string())??;
        let chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.to_vec()).collect())
            .unwrap_or_default();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let body = serde_json::to_vec(&()).expect("serialises");
        let request = self
            .request("/v1/list", body, true)
            .map_err(|e| e.to_string())?;
        let sent_at = SystemTime::now();
        let started = Instant::now();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let round_trip = started.elapsed();
        let hub_time = response
            .headers()
            .get(hyper::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        driver.abort();
        let answer = decode_reply::<ListReply>("list", status, &bytes).and_then(fleet_view);
        Ok(Probe {
            endpoint: endpoint.to_string(),
            chain,
            hub_time,
            sent_at,
            round_trip,
            answer,
        })
    }
}

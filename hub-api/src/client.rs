//! The hub's client library: what a member's controller, the relay, `fleetctl` and `fleet-dns`
//! use.
//!
//! [`HubClient`] dials one of the hub's addresses over TLS, trusting only the CA whose SHA-256
//! it was given (from the join string), and fails over to the next address when one is down.
//! Calls share one kept-alive connection; each [`HubClient::watch`] has its own, reconnects
//! with backoff, and resumes after the last change it delivered — nothing missed, nothing
//! repeated — until the hub says the history is gone ([`HubError::Relist`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

pub use crate::model::Lease;
use crate::model::{
    ClusterId, ClusterRecord, ClusterUpdate, FleetScope, FleetView, JoinRequest, RegistryEvent,
    Revision, TokenInfo,
};
use crate::tls::{CaHash, HUB_SERVER_NAME, pinned_client_config};
use crate::wire::{
    BoardLoginReply, ClusterRemoveCall, Credential, EndpointUpdate, ErrorBody, ErrorCode, JoinCall,
    JoinReply, JoinString, LeaseCall, LeaseReleaseCall, LeaseReply, ListCall, ListReply,
    RecordCall, RejoinCall, RelayRemoveCall, ReleasedReply, RemovedReply, RevisionReply,
    TokenCreateCall, TokenCreateReply, TokenListReply, TokenRevokeCall, UpdateCall,
    WATCH_HEARTBEAT, WATCH_IDLE_HEARTBEATS, WatchCall, WatchLine, decode_b64, encode_b64,
};

mod probe;
pub use probe::Probe;

#[derive(Clone, Debug, thiserror::Error)]
pub enum HubError {
    /// The hub refused the call; `code` says why.
    #[error("hub refused {call}: {message} ({code:?})")]
    Api {
        call: &'static str,
        code: ErrorCode,
        message: String,
    },
    /// The watch's position is no longer in the hub's history: list again, then watch from
    /// the listing's revision.
    #[error("the hub no longer has the changes after revision {after}: relist and watch again")]
    Relist { after: Revision },
    /// No endpoint answered: `errors` has each endpoint's reason, `"<endpoint>: <reason>"`,
    /// `; `-separated, in the order they were tried.
    #[error("no hub reachable at {endpoints}: {errors}")]
    Unreachable { endpoints: String, errors: String },
    #[error("hub call {call} failed in transit: {reason}")]
    Transport { call: &'static str, reason: String },
    #[error("hub call {call} did not answer within {timeout_ms} ms")]
    Timeout {
        call: &'static str,
        timeout_ms: u128,
    },
    #[error("hub answered {call} with something unreadable: {reason}")]
    Protocol { call: &'static str, reason: String },
    #[error("this client has no credential: join first, or give it one")]
    NoCredential,
    #[error("invalid client setup: {0}")]
    Setup(String),
}

impl HubError {
    /// The hub's error code, if the hub answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            HubError::Api { code, .. } => Some(*code),
            HubError::Relist { .. } => Some(ErrorCode::Compacted),
            _ => None,
        }
    }
}

/// Timeouts and backoff of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub call_timeout: Duration,
    /// A watch that hears nothing (not even a heartbeat) this long reconnects, to the next
    /// replica. Default: [`WATCH_IDLE_HEARTBEATS`] × the hub's [`WATCH_HEARTBEAT`] (3 s); raise
    /// it together with a hub's `--watch-heartbeat`.
    pub watch_idle_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// What [`HubClient::list`] and [`HubClient::watch`] ask for (and so the fleet mirror
    /// built on this client): [`FleetScope::Member`] for controllers and `fleet-dns`.
    pub scope: FleetScope,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(20),
            watch_idle_timeout: WATCH_HEARTBEAT * WATCH_IDLE_HEARTBEATS,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            scope: FleetScope::All,
        }
    }
}

/// What a join returns.
#[derive(Clone, Debug)]
pub struct Joined {
    pub record: ClusterRecord,
    /// Keep it (0600): it is the cluster's identity at the hub, for re-joins and every call.
    pub credential: Credential,
}

/// One reusable connection and when it was last used.
type ConnectionSlot = Mutex<Option<(SendRequest<Full<Bytes>>, Instant)>>;

struct Inner {
    endpoints: Vec<String>,
    tls: tokio_rustls::TlsConnector,
    options: ClientOptions,
    credential: std::sync::RwLock<Option<Credential>>,
    /// Index of the endpoint that last worked.
    current: AtomicUsize,
    /// The kept-alive call connection and when it was last used.
    connection: ConnectionSlot,
    /// Lease calls' own connection: a renewal never waits behind another call.
    lease_connection: ConnectionSlot,
}

/// A client of the hub's API. Cheap to clone; clones share the connection and credential.
#[derive(Clone)]
pub struct HubClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// The hub closes a connection that sends no request header for 30 s (its `idle_timeout`);
/// reuse one idle for less. Long enough for the controller's 5 s gateway records and a 15 s
/// lease's 5 s renewals to keep their TLS session (at 5 s every such call made a handshake).
const REUSE_IDLE_CONNECTION_FOR: Duration = Duration::from_secs(25);

impl HubClient {
    /// A client of the hub at `endpoints` (`host:port`, tried in turn), trusting only the CA
    /// with hash `ca`.
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        ca: CaHash,
        options: ClientOptions,
    ) -> Result<HubClient, HubError> {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(HubError::Setup("no hub address given".into()));
        }
        let config = pinned_client_config(ca).map_err(|e| HubError::Setup(e.to_string()))?;
        Ok(HubClient {
            inner: Arc::new(Inner {
                endpoints,
                tls: tokio_rustls::TlsConnector::from(config),
                options,
                credential: std::sync::RwLock::new(None),
                current: AtomicUsize::new(0),
                connection: Mutex::new(None),
                lease_connection: Mutex::new(None),
            }),
        })
    }

    /// A client of the same hub using `credential` (a member's from its join, or the hub's
    /// admin credential); it does not share connections or credential with `self`.
    pub fn with_credential(&self, credential: Credential) -> Self {
        HubClient {
            inner: Arc::new(Inner {
                endpoints: self.inner.endpoints.clone(),
                tls: self.inner.tls.clone(),
                options: self.inner.options.clone(),
                credential: std::sync::RwLock::new(Some(credential)),
                current: AtomicUsize::new(self.inner.current.load(Ordering::Relaxed)),
                connection: Mutex::new(None),
                lease_connection: Mutex::new(None),
            }),
        }
    }

    pub fn credential(&self) -> Option<Credential> {
        self.inner.credential.read().unwrap().clone()
    }

    fn endpoints_text(&self) -> String {
        self.inner.endpoints.join(",")
    }

    /// A new TLS connection to the first endpoint that answers, starting at the last good one.
    async fn connect(&self) -> Result<Sender, HubError> {
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let index = (start + i) % n;
            let endpoint = &self.inner.endpoints[index];
            let error =
                match tokio::time::timeout(self.inner.options.connect_timeout, self.dial(endpoint))
                    .await
                {
                    Ok(Ok(sender)) => {
                        self.inner.current.store(index, Ordering::Relaxed);
                        return Ok(sender);
                    }
                    Ok(Err(e)) => format!("{endpoint}: {e}"),
                    Err(_) => format!("{endpoint}: connect timed out"),
                };
            tracing::debug!(%endpoint, %error, "hub endpoint unusable");
            errors.push(error);
        }
        Err(HubError::Unreachable {
            endpoints: self.endpoints_text(),
            errors: errors.join("; "),
        })
    }

    /// TCP to `endpoint` (`host:port`, no delay), then a TLS handshake accepting only the
    /// pinned CA. Errors: `connect: <reason>`, or `TLS: <reason>` (e.g. a CA not matching the
    /// pin).
    async fn tls_connect(
        &self,
        endpoint: &str,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let tcp = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(HUB_SERVER_NAME).expect("valid name");
        self.inner
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))
    }

    /// One TLS handshake with each hub address in turn, each within the connect timeout,
    /// accepting only the pinned CA; sends no request, so it needs no credential and consumes
    /// no join token. The first address that passes; else [`HubError::Unreachable`] with every
    /// address's failure (refused, timed out, or the TLS error).
    pub async fn check_tls(&self) -> Result<String, HubError> {
        let limit = self.inner.options.connect_timeout;
        let mut errors = Vec::new();
        for endpoint in &self.inner.endpoints {
            match tokio::time::timeout(limit, self.tls_connect(endpoint)).await {
                Ok(Ok(_)) => return Ok(endpoint.clone()),
                Ok(Err(e)) => errors.push(format!("{endpoint}: {e}")),
                Err(_) => errors.push(format!("{endpoint}: no TLS handshake within {limit:?}")),
            }
        }
        Err(HubError::Unreachable {
            endpoints: self.endpoints_text(),
            errors: errors.join("; "),
        })
    }

    async fn dial(&self, endpoint: &str) -> Result<Sender, String> {
        let tls = self.tls_connect(endpoint).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "hub connection ended");
            }
        });
        Ok(sender)
    }

    fn request(
        &self,
        path: &str,
        body: Vec<u8>,
        auth: bool,
    ) -> Result<hyper::Request<Full<Bytes>>, HubError> {
        let mut builder = hyper::Request::post(path)
            .header(hyper::header::HOST, HUB_SERVER_NAME)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if auth {
            let credential = self.credential().ok_or(HubError::NoCredential)?;
            builder = builder.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", credential.expose()),
            );
        }
        builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HubError::Setup(e.to_string()))
    }

    /// One call on the shared connection. `retry` calls (idempotent ones) are sent again on a
    /// fresh connection if the first attempt fails in transit, times out, or the replica
    /// answers that it cannot serve (503 `unavailable`, 504 `timeout`) — then on the **next**
    /// replica, so a replica that is up but cut from its store is left within one call.
    async fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        name: &'static str,
        path: &str,
        body: &T,
        auth: bool,
        retry: bool,
    ) -> Result<R, HubError> {
        self.call_on(
            &self.inner.connection,
            self.inner.options.call_timeout,
            name,
            path,
            body,
            auth,
            retry,
        )
        .await
    }

    /// The watch found the current replica silent or unable to serve: calls must not wait on
    /// their kept-alive connections to it either. Drops those not in use (one in use times out
    /// on its own) and moves on to the next replica.
    fn abandon_current_replica(&self) {
        for slot in [&self.inner.connection, &self.inner.lease_connection] {
            if let Ok(mut slot) = slot.try_lock() {
                *slot = None;
            }
        }
        self.skip_current_replica();
    }

    /// Moves the next connection attempt to the replica after the current one.
    fn skip_current_replica(&self) {
        let n = self.inner.endpoints.len();
        if n > 1 {
            let current = self.inner.current.load(Ordering::Relaxed);
            self.inner
                .current
                .store((current + 1) % n, Ordering::Relaxed);
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_on<T: Serialize, R: DeserializeOwned>(
        &self,
        connection: &ConnectionSlot,
        timeout: Duration,
        name: &'static str,
        path: &str,
        body: &T,
        auth: bool,
        retry: bool,
    ) -> Result<R, HubError> {
        let body = serde_json::to_vec(body).expect("API calls serialise");
        let attempts = if retry {
            1 + self.inner.endpoints.len()
        } else {
            1
        };
        let mut last = None;
        for _ in 0..attempts {
            let request = self.request(path, body.clone(), auth)?;
            let once = async {
                let mut slot = connection.lock().await;
                // A connection idle longer than the hub's header timeout may be closing under us.
                let cached = match slot.take() {
                    Some((mut s, used)) if used.elapsed() < REUSE_IDLE_CONNECTION_FOR => {
                        s.ready().await.is_ok().then_some(s)
                    }
                    _ => None,
                };
                let mut sender = match cached {
                    Some(s) => s,
                    None => self.connect().await?,
                };
                let result = sender.send_request(request).await;
                if result.is_ok() {
                    *slot = Some((sender, Instant::now()));
                }
                drop(slot);
                let response = result.map_err(|e| HubError::Transport {
                    call: name,
                    reason: e.to_string(),
                })?;
                let status = response.status();
                let bytes = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| HubError::Transport {
                        call: name,
                        reason: e.to_string(),
                    })?
                    .to_bytes();
                decode_reply(name, status, &bytes)
            };
            match tokio::time::timeout(timeout, once).await {
                Ok(Err(e @ (HubError::Transport { .. } | HubError::Unreachable { .. }))) => {
                    last = Some(e)
                }
                Ok(Err(
                    e @ HubError::Api {
                        code: ErrorCode::Unavailable | ErrorCode::Timeout,
                        ..
                    },
                )) if retry => {
                    // Up but unable to serve: the next attempt goes to another replica.
                    *connection.lock().await = None;
                    self.skip_current_replica();
                    last = Some(e)
                }
                Ok(result) => return result,
                Err(_) => {
                    *connection.lock().await = None;
                    self.skip_current_replica();
                    last = Some(HubError::Timeout {
                        call: name,
                        timeout_ms: timeout.as_millis(),
                    })
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Joins the fleet with a join string; the client keeps the returned credential.
    pub async fn join(&self, join: &JoinString, request: JoinRequest) -> Result<Joined, HubError> {
        let call = JoinCall {
            token: join.token.expose_secret(),
            cluster: request.cluster,
            public_key: request.public_key,
            endpoint: request.endpoint,
        };
        let reply: JoinReply = self.call("join", "/v1/join", &call, false, false).await?;
        let credential =
            Credential::parse(&reply.credential).ok_or_else(|| HubError::Protocol {
                call: "join",
                reason: "malformed credential".into(),
            })?;
        *self.inner.credential.write().unwrap() = Some(credential.clone());
        Ok(Joined {
            record: reply.record,
            credential,
        })
    }

    /// Re-joins with this client's credential: same id and block, new key and endpoint.
    pub async fn rejoin(
        &self,
        public_key: crate::model::PublicKey,
        endpoint: Option<std::net::SocketAddr>,
    ) -> Result<ClusterRecord, HubError> {
        let call = RejoinCall {
            public_key,
            endpoint,
        };
        self.call("rejoin", "/v1/rejoin", &call, true, true).await
    }

    /// Changes cluster `target`'s record (the hub allows only the caller's own).
    pub async fn update(
        &self,
        target: &ClusterId,
        update: ClusterUpdate,
    ) -> Result<ClusterRecord, HubError> {
        let call = UpdateCall {
            cluster: Some(target.clone()),
            public_key: update.public_key,
            endpoint: update.endpoint.map(|e| match e {
                Some(addr) => EndpointUpdate::Set(addr),
                None => EndpointUpdate::Clear,
            }),
            gateway: update.gateway,
        };
        self.call("update", "/v1/update", &call, true, true).await
    }

    /// Publishes record `name` of cluster `owner` (the hub allows only the caller's own).
    pub async fn publish(
        &self,
        owner: &ClusterId,
        name: &str,
        value: &[u8],
    ) -> Result<Revision, HubError> {
        let call = RecordCall {
            owner: owner.clone(),
            name: name.to_string(),
            value: Some(encode_b64(value)),
        };
        let reply: RevisionReply = self
            .call("publish", "/v1/publish", &call, true, true)
            .await?;
        Ok(reply.revision)
    }

    /// Withdraws a record; false if it did not exist.
    pub async fn unpublish(&self, owner: &ClusterId, name: &str) -> Result<bool, HubError> {
        let call = RecordCall {
            owner: owner.clone(),
            name: name.to_string(),
            value: None,
        };
        let reply: RemovedReply = self
            .call("unpublish", "/v1/unpublish", &call, true, true)
            .await?;
        Ok(reply.removed)
    }

    /// Every cluster and record, at one revision (watch from it).
    pub async fn list(&self) -> Result<FleetView, HubError> {
        let call = ListCall {
            scope: self.inner.options.scope,
        };
        let reply: ListReply = self.call("list", "/v1/list", &call, true, true).await?;
        fleet_view(reply)
    }

    /// Acquires (or renews) this member's cluster lease for `holder` for `ttl`; refused
    /// (`granted: false`) while another holder's lease runs. Safe to retry: a retried
    /// acquire by the same holder is a renewal.
    pub async fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<Lease, HubError> {
        let call = LeaseCall {
            holder: holder.to_string(),
            ttl_ms: ttl.as_millis().try_into().unwrap_or(u64::MAX),
        };
        // Its own connection, and a timeout well below the TTL: a renewal that cannot finish
        // in ttl/3 has failed, and the next replica is tried while the lease still runs.
        let timeout = (ttl / 3).clamp(Duration::from_millis(200), self.inner.options.call_timeout);
        let reply: LeaseReply = self
            .call_on(
                &self.inner.lease_connection,
                timeout,
                "lease",
                "/v1/lease",
                &call,
                true,
                true,
            )
            .await?;
        Ok(Lease {
            granted: reply.granted,
            holder: reply.holder,
            generation: reply.generation,
            ttl: Duration::from_millis(reply.ttl_ms),
        })
    }

    /// Gives this member's cluster lease up if `holder` holds it (else nothing changes).
    pub async fn release_lease(&self, holder: &str) -> Result<(), HubError> {
        let call = LeaseReleaseCall {
            holder: holder.to_string(),
        };
        let _: ReleasedReply = self
            .call("release lease", "/v1/lease/release", &call, true, true)
            .await?;
        Ok(())
    }

    /// This member leaves the fleet: its cluster record, block, credential, lease and
    /// published records go. False if it was already gone.
    pub async fn leave(&self) -> Result<bool, HubError> {
        let reply: RemovedReply = self.call("leave", "/v1/leave", &(), true, true).await?;
        Ok(reply.removed)
    }

    /// Admin: removes cluster `id` (as [`HubClient::leave`] does for itself). False if it was
    /// not a member.
    pub async fn remove_cluster(&self, id: &ClusterId) -> Result<bool, HubError> {
        let call = ClusterRemoveCall { id: id.clone() };
        let reply: RemovedReply = self
            .call("remove cluster", "/v1/clusters/remove", &call, true, true)
            .await?;
        Ok(reply.removed)
    }

    /// Admin (the relay): publishes, replaces or renews a relay record, valid for `ttl` from
    /// the hub's now (the hub sets its `expires_at`; renew within `ttl` or it is swept).
    pub async fn publish_relay(
        &self,
        record: &crate::model::RelayRecord,
        ttl: Duration,
    ) -> Result<Revision, HubError> {
        let call = crate::wire::RelayPublishCall {
            record: record.clone(),
            ttl_ms: Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        };
        let reply: RevisionReply = self
            .call("publish relay", "/v1/relays/publish", &call, true, true)
            .await?;
        Ok(reply.revision)
    }

    /// Admin (the relay): withdraws relay `id`; false if it was not there.
    pub async fn remove_relay(&self, id: &str) -> Result<bool, HubError> {
        let call = RelayRemoveCall { id: id.to_string() };
        let reply: RemovedReply = self
            .call("remove relay", "/v1/relays/remove", &call, true, true)
            .await?;
        Ok(reply.removed)
    }

    /// Admin: creates a join token; returns the join string (token + this hub's CA hash).
    pub async fn create_token(
        &self,
        ttl: Duration,
        description: &str,
    ) -> Result<(JoinString, TokenInfo), HubError> {
        let call = TokenCreateCall {
            ttl_secs: ttl.as_secs(),
            description: description.to_string(),
        };
        let reply: TokenCreateReply = self
            .call("create token", "/v1/tokens/create", &call, true, false)
            .await?;
        let join = JoinString::parse(&reply.join).map_err(|e| HubError::Protocol {
            call: "create token",
            reason: e.to_string(),
        })?;
        Ok((join, reply.info))
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, HubError> {
        let reply: TokenListReply = self
            .call("list tokens", "/v1/tokens/list", &(), true, true)
            .await?;
        Ok(reply.tokens)
    }

    /// A one-time login link to the fleet board (admin): the path to open on this hub.
    pub async fn board_login(&self) -> Result<BoardLoginReply, HubError> {
        self.call("board login", "/v1/board/login", &(), true, false)
            .await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo, HubError> {
        let call = TokenRevokeCall { id: id.to_string() };
        self.call("revoke token", "/v1/tokens/revoke", &call, true, true)
            .await
    }

    /// Every change after revision `after`, in order, each once — across dropped connections
    /// and hub restarts or fail-overs. Ends after an error it cannot retry: [`HubError::Relist`]
    /// (history gone), or the hub refusing the credential.
    pub fn watch(
        &self,
        after: Revision,
    ) -> impl Stream<Item = Result<RegistryEvent, HubError>> + Send + 'static + use<> {
        let client = self.clone();
        async_stream::stream! {
            let options = client.inner.options.clone();
            // Position: everything up to `last` delivered, except that of the changes at
            // `last` itself only `seen_at_last` were (one transaction shares a revision).
            let mut last = after;
            let mut seen_at_last = 0usize;
            let mut backoff = options.backoff_min;
            loop {
                let from = if seen_at_last > 0 { last - 1 } else { last };
                let mut skip = seen_at_last;
                let mut stream = match client.open_watch(from).await {
                    Ok(s) => s,
                    Err(e) if retryable(&e) => {
                        tracing::debug!(error = %e, after = last, "watch: hub unavailable; retrying");
                        if matches!(e, HubError::Api { .. } | HubError::Timeout { .. }) {
                            // That replica answered (or hung) but cannot serve: try the next.
                            client.abandon_current_replica();
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(options.backoff_max);
                        continue;
                    }
                    Err(e) => { yield Err(e); return; }
                };
                backoff = options.backoff_min;
                loop {
                    let line = match tokio::time::timeout(options.watch_idle_timeout, stream.next_line()).await {
                        Err(_) => {
                            // No heartbeat: the replica's host is gone or it cannot serve.
                            tracing::debug!("watch: hub silent; reconnecting to the next replica");
                            client.abandon_current_replica();
                            break;
                        }
                        Ok(Err(e)) => { tracing::debug!(error = %e, "watch: stream broke; reconnecting"); break; }
                        Ok(Ok(None)) => { tracing::debug!("watch: hub ended the stream; reconnecting"); break; }
                        Ok(Ok(Some(line))) => line,
                    };
                    let event = match line {
                        WatchLine::Heartbeat => continue,
                        WatchLine::Error(body) => {
                            let e = api_error("watch", body, last);
                            if retryable(&e) {
                                // The replica said it cannot serve (its store went quiet).
                                tracing::debug!(error = %e, "watch: ended by the hub; reconnecting to the next replica");
                                client.abandon_current_replica();
                                break;
                            }
                            yield Err(e);
                            return;
                        }
                        other => match to_event(other) {
                            Ok(event) => event,
                            Err(reason) => { yield Err(HubError::Protocol { call: "watch", reason }); return; }
                        },
                    };
                    let revision = event.revision();
                    if revision == last && skip > 0 {
                        skip -= 1;
                        continue;
                    }
                    if revision < last || (revision == last && seen_at_last == 0) {
                        // Cannot happen with a correct hub; never deliver twice.
                        continue;
                    }
                    if revision == last {
                        seen_at_last += 1;
                    } else {
                        last = revision;
                        seen_at_last = 1;
                    }
                    yield Ok(event);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(options.backoff_max);
            }
        }
    }

    async fn open_watch(&self, after: Revision) -> Result<LineReader, HubError> {
        let mut sender = self.connect().await?;
        let body = serde_json::to_vec(&WatchCall {
            after,
            scope: self.inner.options.scope,
        })
        .expect("serialises");
        let request = self.request("/v1/watch", body, true)?;
        let timeout = self.inner.options.call_timeout;
        let response = tokio::time::timeout(timeout, sender.send_request(request))
            .await
            .map_err(|_| HubError::Timeout {
                call: "watch",
                timeout_ms: timeout.as_millis(),
            })?
            .map_err(|e| HubError::Transport {
                call: "watch",
                reason: e.to_string(),
            })?;
        if !response.status().is_success() {
            let status = response.status();
            let bytes = tokio::time::timeout(timeout, response.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let e = decode_reply::<()>("watch", status, &bytes).unwrap_err();
            return Err(match e {
                HubError::Api {
                    code: ErrorCode::Compacted,
                    ..
                } => HubError::Relist { after },
                e => e,
            });
        }
        Ok(LineReader {
            body: response.into_body(),
            buffer: Vec::new(),
            _sender: sender,
        })
    }
}

fn retryable(e: &HubError) -> bool {
    match e {
        HubError::Api { code, .. } => matches!(
            code,
            ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::Internal
        ),
        HubError::Unreachable { .. } | HubError::Transport { .. } | HubError::Timeout { .. } => {
            true
        }
        _ => false,
    }
}

fn api_error(call: &'static str, body: ErrorBody, after: Revision) -> HubError {
    if body.code == ErrorCode::Compacted {
        return HubError::Relist { after };
    }
    HubError::Api {
        call,
        code: body.code,
        message: body.message,
    }
}

/// The fleet a `list` reply carries.
fn fleet_view(reply: ListReply) -> Result<FleetView, HubError> {
    Ok(FleetView {
        fleet_cidr: reply.fleet_cidr,
        relays: reply.relays,
        clusters: reply.clusters,
        records: reply
            .records
            .into_iter()
            .map(|r| r.into_record())
            .collect::<Result<_, _>>()
            .map_err(|reason| HubError::Protocol {
                call: "list",
                reason,
            })?,
        revision: reply.revision,
    })
}

fn decode_reply<R: DeserializeOwned>(
    call: &'static str,
    status: hyper::StatusCode,
    bytes: &[u8],
) -> Result<R, HubError> {
    if status.is_success() {
        return serde_json::from_slice(bytes).map_err(|e| HubError::Protocol {
            call,
            reason: e.to_string(),
        });
    }
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => Err(HubError::Api {
            call,
            code: body.code,
            message: body.message,
        }),
        Err(_) => Err(HubError::Protocol {
            call,
            reason: format!("HTTP {status} without an error body"),
        }),
    }
}

fn to_event(line: WatchLine) -> Result<RegistryEvent, String> {
    Ok(match line {
        WatchLine::ClusterUpserted { record, revision } => {
            RegistryEvent::ClusterUpserted { record, revision }
        }
        WatchLine::ClusterRemoved { id, revision } => {
            RegistryEvent::ClusterRemoved { id, revision }
        }
        WatchLine::RecordPut {
            owner,
            name,
            value,
            revision,
        } => RegistryEvent::RecordPut {
            value: decode_b64(&value)?,
            owner,
            name,
            revision,
        },
        WatchLine::RecordDeleted {
            owner,
            name,
            revision,
        } => RegistryEvent::RecordDeleted {
            owner,
            name,
            revision,
        },
        WatchLine::RelayUpserted { record, revision } => {
            RegistryEvent::RelayUpserted { record, revision }
        }
        WatchLine::RelayRemoved { id, revision } => RegistryEvent::RelayRemoved { id, revision },
        WatchLine::Heartbeat | WatchLine::Error(_) => return Err("not an event".into()),
    })
}

/// Newline-delimited JSON from a streaming response body.
struct LineReader {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    /// Keeps the connection's request side alive while the body streams.
    _sender: Sender,
}

const MAX_LINE: usize = 16 * 1024 * 1024;

impl LineReader {
    async fn next_line(&mut self) -> Result<Option<WatchLine>, String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return serde_json::from_slice(&line[..end])
                    .map(Some)
                    .map_err(|e| format!("bad watch line: {e}"));
            }
            if self.buffer.len() > MAX_LINE {
                return Err("watch line too long".into());
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

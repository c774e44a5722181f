//! The API server: TLS accept loop, HTTP/1.1 connections, routing, authentication, and the
//! watch streams. Limits: request bodies of [`MAX_REQUEST_BYTES`], a TLS handshake within
//! [`ServerOptions::handshake_timeout`], each request header within
//! [`ServerOptions::idle_timeout`] of the connection's start or last answer, every call within
//! [`ServerOptions::request_timeout`], at most [`ServerOptions::max_connections`] connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::metrics::{HubMetrics, call_name};
use super::{
    BoardLoginReply, ClusterRemoveCall, Credential, DEFAULT_RELAY_TTL_MS, EndpointUpdate,
    ErrorBody, ErrorCode, HubIdentity, JoinCall, JoinReply, JoinString, LeaseCall,
    LeaseReleaseCall, LeaseReply, ListCall, ListReply, MAX_REQUEST_BYTES, RecordCall, RecordWire,
    RejoinCall, RelayPublishCall, RelayRemoveCall, ReleasedReply, RemovedReply, RevisionReply,
    TokenCreateCall, TokenCreateReply, TokenListReply, TokenRevokeCall, UpdateCall, WatchCall,
    WatchLine, decode_b64,
};
use crate::registry::{
    ClusterId, ClusterUpdate, FleetScope, JoinRequest, JoinToken, Registry, RegistryError,
};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub request_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A kept-alive connection that sends no (complete) request header this long after its
    /// start or its last answer is closed. Clients reuse a connection idle for less
    /// (`fleet_hub_api::client`, 25 s), so members calling every 5 s (gateway records) or
    /// renewing a 15 s lease keep one TLS session instead of a handshake per call.
    pub idle_timeout: Duration,
    /// A watch with nothing to say sends a heartbeat this often (while the store answers).
    pub heartbeat: Duration,
    /// The store is probed every `heartbeat`; once it has not answered for this long, every
    /// watch on this replica ends with `unavailable` and new ones are refused, so members
    /// fail over to a replica that can serve.
    pub store_quiet_after: Duration,
    /// Most connections at once; more are closed at accept. 16,384 here; `fleet-hub serve`
    /// sets [`crate::limits::connection_budget`] of its open-file limit (members hold ~3).
    pub max_connections: usize,
    /// How long shutdown waits for connections to finish.
    pub drain_timeout: Duration,
    /// Share the CA and admin credential with the other replicas through the store (replicas
    /// on etcd; see [`super::tls::share_identity`]).
    pub share_identity: bool,
    /// How often this replica deletes expired relay records (see
    /// [`Registry::sweep_relays`]); `None`: never.
    pub relay_sweep_interval: Option<Duration>,
    /// Serve Prometheus metrics on `http://<address>/metrics`; `None`: not served.
    pub metrics_address: Option<SocketAddr>,
}

/// How often a serving hub sweeps expired relay records unless told otherwise.
pub const DEFAULT_RELAY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl ServerOptions {
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        ServerOptions {
            listen,
            data_dir: data_dir.into(),
            request_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            heartbeat: super::WATCH_HEARTBEAT,
            store_quiet_after: Duration::from_secs(5),
            max_connections: 16_384,
            drain_timeout: Duration::from_secs(5),
            share_identity: false,
            relay_sweep_interval: Some(DEFAULT_RELAY_SWEEP_INTERVAL),
            metrics_address: None,
        }
    }
}

struct State {
    registry: Registry,
    board: Arc<crate::board::Board>,
    store_liveness: Arc<StoreLiveness>,
    identity: HubIdentity,
    options: ServerOptions,
    shutdown: watch::Receiver<bool>,
    metrics: HubMetrics,
}

/// A running API server; [`HubServer::shutdown`] stops it gracefully.
pub struct HubServer {
    local_addr: SocketAddr,
    ca_hash: super::CaHash,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
}

impl HubServer {
    /// Loads (or creates) the hub's TLS identity in the data dir, binds, and serves.
    pub async fn start(registry: Registry, options: ServerOptions) -> anyhow::Result<HubServer> {
        if options.share_identity {
            super::tls::share_identity(&options.data_dir, registry.store().as_ref()).await?;
        }
        let identity = HubIdentity::load_or_create(&options.data_dir)?;
        let listener = TcpListener::bind(options.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
        let local_addr = listener.local_addr()?;
        let ca_hash = identity.ca_hash;
        tracing::info!(listen = %local_addr, ca_sha256 = %ca_hash, admin_credential = %identity.admin_credential_path.display(), "hub API serving");
        let (stop, shutdown) = watch::channel(false);
        if let Some(every) = options.relay_sweep_interval {
            tokio::spawn(sweep_relays(registry.clone(), every, shutdown.clone()));
        }
        let store_liveness = Arc::new(StoreLiveness::new());
        tokio::spawn(probe_store(
            registry.clone(),
            store_liveness.clone(),
            options.heartbeat,
            options.store_quiet_after,
            shutdown.clone(),
        ));
        let metrics = HubMetrics::default();
        let metrics_task = match options.metrics_address {
            Some(addr) => {
                let mut r = prometheus_client::registry::Registry::default();
                fleet_metrics::register_build_info(&mut r, "fleet-hub", env!("CARGO_PKG_VERSION"));
                metrics.register(&mut r);
                let refresh = metrics.refresh(registry.clone());
                let (_, task) =
                    fleet_metrics::serve_with_refresh(addr, Arc::new(r), Some(refresh)).await?;
                Some(task)
            }
            None => None,
        };
        let state = Arc::new(State {
            board: Arc::new(crate::board::Board::new(registry.clone())),
            registry,
            store_liveness,
            identity,
            options,
            shutdown,
            metrics,
        });
        let task = tokio::spawn(accept_loop(listener, state));
        Ok(HubServer {
            local_addr,
            ca_hash,
            stop,
            task,
            metrics_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn ca_hash(&self) -> super::CaHash {
        self.ca_hash
    }

    /// Stops accepting, ends watch streams, lets calls in flight finish (bounded), returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(task) = self.metrics_task {
            task.abort();
        }
    }
}

/// When this replica's store last answered.
struct StoreLiveness {
    since: std::time::Instant,
    /// Milliseconds after `since` of the last answer.
    last_answer_ms: std::sync::atomic::AtomicU64,
}

impl StoreLiveness {
    fn new() -> Self {
        StoreLiveness {
            since: std::time::Instant::now(),
            last_answer_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn answered(&self) {
        let ms = self
            .since
            .elapsed()
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX);
        self.last_answer_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the store has not answered.
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(
            self.last_answer_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        self.since.elapsed().saturating_sub(last)
    }
}

/// Asks the store for its revision every `every` (each ask bounded by `quiet_after`) and
/// notes each answer: one probe per replica, however many watches it serves.
async fn probe_store(
    registry: Registry,
    liveness: Arc<StoreLiveness>,
    every: Duration,
    quiet_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(quiet_after, registry.store().revision()).await {
            Ok(Ok(_)) => {
                liveness.answered();
                if quiet {
                    quiet = false;
                    tracing::info!("the store answers again; watches are served");
                }
            }
            Ok(Err(e)) if !quiet && liveness.quiet_for() >= quiet_after => {
                quiet = true;
                tracing::warn!(error = %e, "the store does not answer; ending watches");
            }
            Err(_) if !quiet && liveness.quiet_for() >= quiet_after => {
                quiet = true;
                tracing::warn!(
                    quiet_after_ms = quiet_after.as_millis(),
                    "the store is silent; ending watches"
                );
            }
            _ => {}
        }
    }
}

/// The error a watch ends with when this replica's store went quiet.
fn store_quiet_error(quiet_for: Duration) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::Unavailable,
        message: format!(
            "this hub replica's store has not answered for {} ms; use another replica",
            quiet_for.as_millis()
        ),
    }
}

/// Every `every`, deletes the relay records past their expiry and marks clusters whose
/// controller lease lapsed as not live ([`Registry::sweep_leases`]), until shutdown. Every replica
/// runs one; the store's compare-and-delete keeps them (and renewals) from colliding. A record
/// is judged only once this sweeper has run for the record's TTL (see
/// [`Registry::sweep_relays`]).
async fn sweep_relays(registry: Registry, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let since = registry.clock_now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = registry.sweep_leases(since).await {
            tracing::debug!(error = %e, "lease sweep failed; retrying");
        }
        match registry.sweep_relays(since).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("relay sweep works again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "relay sweep failed; retrying");
            }
            Err(e) => tracing::debug!(error = %e, "relay sweep failed again"),
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(state.options.max_connections));
    let acceptor = tokio_rustls::TlsAcceptor::from(state.identity.server_config.clone());
    let mut shutdown = state.shutdown.clone();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    state.metrics.connection(false);
                    tracing::warn!(%peer, "connection refused: too many connections");
                    continue;
                };
                state.metrics.connection(true);
                let _ = tcp.set_nodelay(true);
                let state = state.clone();
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    serve_connection(state, acceptor, tcp, peer).await;
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    let drain = state.options.drain_timeout + Duration::from_secs(1);
    if tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            remaining = connections.len(),
            "connections did not drain in time; closing them"
        );
        connections.shutdown().await;
    }
    tracing::info!("hub API stopped");
}

async fn serve_connection(
    state: Arc<State>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls =
        match tokio::time::timeout(state.options.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed; connection closed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out; connection closed");
                return;
            }
        };
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.options.idle_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let mut shutdown = state.shutdown.clone();
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(state.options.drain_timeout, connection).await;
        }
    }
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("API replies serialise");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(bytes))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("static response parts")
}

fn error_response(code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        &ErrorBody {
            code,
            message: message.into(),
        },
    )
}

/// A failed call: the code and message the caller sees.
struct CallError(ErrorCode, String);

impl From<fleet_hub_api::model::ModelError> for CallError {
    fn from(e: fleet_hub_api::model::ModelError) -> Self {
        RegistryError::from(e).into()
    }
}

impl From<RegistryError> for CallError {
    fn from(e: RegistryError) -> Self {
        CallError(crate::api::error_code(&e), e.to_string())
    }
}

fn bad(message: impl Into<String>) -> CallError {
    CallError(ErrorCode::InvalidArgument, message.into())
}

async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, CallError> {
    let bytes = Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                CallError(
                    ErrorCode::TooLarge,
                    format!("request body exceeds {MAX_REQUEST_BYTES} bytes"),
                )
            } else {
                CallError(
                    ErrorCode::InvalidArgument,
                    format!("reading the request body: {e}"),
                )
            }
        })?
        .to_bytes();
    // No body at all reads as `null` (a listing without options, say).
    let bytes = if bytes.is_empty() {
        Bytes::from_static(b"null")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON request: {e}")))
}

/// Who is calling, from the `Authorization: Bearer` header.
enum Caller {
    Member(ClusterId),
    Admin,
}

/// The caller's own cluster for a scoped listing or watch; the member scope needs one.
fn scoped_caller(caller: &Caller, scope: FleetScope) -> Result<Option<&ClusterId>, CallError> {
    match (caller, scope) {
        (Caller::Member(id), _) => Ok(Some(id)),
        (Caller::Admin, FleetScope::Member) => Err(CallError(
            ErrorCode::InvalidArgument,
            "the member scope needs a member credential; an admin lists with scope all".into(),
        )),
        (Caller::Admin, _) => Ok(None),
    }
}

async fn authenticate(state: &State, req: &Request<Incoming>) -> Result<Caller, CallError> {
    let unauthenticated = |m: &str| CallError(ErrorCode::Unauthenticated, m.to_string());
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthenticated("this call needs `Authorization: Bearer <credential>`"))?;
    let text = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthenticated("the Authorization header must be `Bearer <credential>`"))?;
    let credential =
        Credential::parse(text).ok_or_else(|| unauthenticated("malformed credential"))?;
    match &credential {
        Credential::Admin(_) => {
            let hash = credential.secret_sha256();
            let local =
                crate::registry::constant_time_eq(&hash, &state.identity.admin_secret_sha256);
            // Replicas on one store accept each other's admin credentials, registered by hash.
            let registered = !local
                && state.options.share_identity
                && state
                    .registry
                    .store()
                    .get(&format!("{}{hash}", super::tls::ADMIN_HASHES))
                    .await
                    .map_err(|e| CallError::from(RegistryError::from(e)))?
                    .is_some();
            if local || registered {
                Ok(Caller::Admin)
            } else {
                tracing::warn!("refused a wrong admin credential");
                Err(unauthenticated("wrong admin credential"))
            }
        }
        Credential::Member { cluster, .. } => {
            state
                .registry
                .authenticate_member(cluster, &credential.secret_sha256())
                .await?;
            Ok(Caller::Member(cluster.clone()))
        }
    }
}

fn member(caller: Caller) -> Result<ClusterId, CallError> {
    match caller {
        Caller::Member(id) => Ok(id),
        Caller::Admin => Err(CallError(
            ErrorCode::PermissionDenied,
            "this call is for member clusters (use the member's credential)".into(),
        )),
    }
}

fn admin(caller: Caller, what: &str) -> Result<(), CallError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Member(id) => Err(CallError(
            ErrorCode::PermissionDenied,
            format!("cluster {id} may not {what}: this call needs the admin credential"),
        )),
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    // The fleet board: pages for a browser (see `crate::board`).
    if req.method() == hyper::Method::GET && req.uri().path().starts_with("/board") {
        return state.board.serve(&req, state.shutdown.clone()).await;
    }
    if req.method() != hyper::Method::POST {
        return error_response(ErrorCode::NotFound, "every call is POST /v1/<call>");
    }
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let name = call_name(&path);
    let response = answer(&state, &path, req).await;
    state
        .metrics
        .call(name, response.status().is_success(), started);
    response
}

async fn answer(state: &Arc<State>, path: &str, req: Request<Incoming>) -> Response<Body> {
    if path == "/v1/watch" {
        return match watch(state.clone(), req).await {
            Ok(response) => response,
            Err(CallError(code, message)) => error_response(code, message),
        };
    }
    let timeout = state.options.request_timeout;
    match tokio::time::timeout(timeout, call(state, path, req)).await {
        Ok(Ok(response)) => response,
        Ok(Err(CallError(code, message))) => {
            tracing::debug!(%path, ?code, "call failed");
            error_response(code, message)
        }
        Err(_) => error_response(
            ErrorCode::Timeout,
            format!(
                "{path} did not finish within {} ms; retry",
                timeout.as_millis()
            ),
        ),
    }
}

async fn call(
    state: &State,
    path: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, CallError> {
    let registry = &state.registry;
    let ok = |v: &dyn erased::Json| Ok(v.response());
    match path {
        "/v1/join" => {
            let call: JoinCall = read_json(req.into_body()).await?;
            let token = JoinToken::parse(&call.token)?;
            let secret = super::tls::random_secret()
                .map_err(|e| CallError(ErrorCode::Internal, e.to_string()))?;
            let credential = Credential::Member {
                cluster: call.cluster.clone(),
                secret,
            };
            let record = registry
                .join_with_credential(
                    &token,
                    JoinRequest {
                        cluster: call.cluster,
                        public_key: call.public_key,
                        endpoint: call.endpoint,
                    },
                    credential.secret_sha256(),
                )
                .await?;
            ok(&JoinReply {
                record,
                credential: credential.expose(),
            })
        }
        "/v1/rejoin" => {
            let id = member(authenticate(state, &req).await?)?;
            let call: RejoinCall = read_json(req.into_body()).await?;
            let update = ClusterUpdate {
                public_key: Some(call.public_key),
                endpoint: Some(call.endpoint),
                gateway: None,
            };
            let record = registry.update_cluster(&id, &id, update).await?;
            tracing::info!(cluster = %id, block = %record.block, "cluster re-joined with its credential");
            ok(&record)
        }
        "/v1/update" => {
            let id = member(authenticate(state, &req).await?)?;
            let call: UpdateCall = read_json(req.into_body()).await?;
            let target = call.cluster.unwrap_or_else(|| id.clone());
            let update = ClusterUpdate {
                public_key: call.public_key,
                endpoint: call.endpoint.map(|e| match e {
                    EndpointUpdate::Set(addr) => Some(addr),
                    EndpointUpdate::Clear => None,
                }),
                gateway: call.gateway,
            };
            ok(&registry.update_cluster(&id, &target, update).await?)
        }
        "/v1/publish" => {
            let id = member(authenticate(state, &req).await?)?;
            let call: RecordCall = read_json(req.into_body()).await?;
            let value = decode_b64(call.value.as_deref().unwrap_or_default()).map_err(bad)?;
            let revision = registry
                .publish(&id, &call.owner, &call.name, value)
                .await?;
            ok(&RevisionReply { revision })
        }
        "/v1/unpublish" => {
            let id = member(authenticate(state, &req).await?)?;
            let call: RecordCall = read_json(req.into_body()).await?;
            let removed = registry.unpublish(&id, &call.owner, &call.name).await?;
            ok(&RemovedReply { removed })
        }
        "/v1/list" => {
            let caller = authenticate(state, &req).await?;
            let call: Option<ListCall> = read_json(req.into_body()).await?;
            let scope = call.unwrap_or_default().scope;
            let own = scoped_caller(&caller, scope)?;
            let view = registry.view_scoped(scope, own).await?;
            ok(&ListReply {
                fleet_cidr: view.fleet_cidr,
                clusters: view.clusters,
                records: view.records.into_iter().map(RecordWire::from).collect(),
                relays: view.relays,
                revision: view.revision,
            })
        }
        "/v1/lease" => {
            let id = member(authenticate(state, &req).await?)?;
            let call: LeaseCall = read_json(req.into_body()).await?;
            let lease = registry
                .acquire_lease(&id, &call.holder, Duration::from_millis(call.ttl_ms))
                .await?;
            ok(&LeaseReply {
                granted: lease.granted,
                holder: lease.holder,
                generation: lease.generation,
                ttl_ms: lease.ttl.as_millis().try_into().unwrap_or(u64::MAX),
            })
        }
        "/v1/lease/release" => {
            let id = member(authenticate(state, &req).await?)?;
            let call: LeaseReleaseCall = read_json(req.into_body()).await?;
            let released = registry.release_lease(&id, &call.holder).await?;
            ok(&ReleasedReply { released })
        }
        "/v1/leave" => {
            let id = member(authenticate(state, &req).await?)?;
            let removed = registry.leave(&id, &id).await?;
            tracing::info!(cluster = %id, removed, "member left the fleet");
            ok(&RemovedReply { removed })
        }
        "/v1/clusters/remove" => {
            let caller = authenticate(state, &req).await?;
            let call: ClusterRemoveCall = read_json(req.into_body()).await?;
            let removed = match caller {
                Caller::Admin => registry.remove_cluster(&call.id).await?,
                // A member may remove only itself (the registry refuses another cluster).
                Caller::Member(id) => registry.leave(&id, &call.id).await?,
            };
            ok(&RemovedReply { removed })
        }
        "/v1/relays/publish" => {
            admin(authenticate(state, &req).await?, "publish relays")?;
            let call: RelayPublishCall = read_json(req.into_body()).await?;
            let ttl = Duration::from_millis(call.ttl_ms.unwrap_or(DEFAULT_RELAY_TTL_MS));
            let (revision, _) = registry.publish_relay(&call.record, ttl).await?;
            ok(&RevisionReply { revision })
        }
        "/v1/relays/remove" => {
            admin(authenticate(state, &req).await?, "withdraw relays")?;
            let call: RelayRemoveCall = read_json(req.into_body()).await?;
            let removed = registry.remove_relay(&call.id).await?;
            ok(&RemovedReply { removed })
        }
        "/v1/tokens/create" => {
            admin(authenticate(state, &req).await?, "manage join tokens")?;
            let call: TokenCreateCall = read_json(req.into_body()).await?;
            let (token, info) = registry
                .create_token(Duration::from_secs(call.ttl_secs), &call.description)
                .await?;
            let join = JoinString {
                token,
                ca_hash: state.identity.ca_hash,
            };
            ok(&TokenCreateReply {
                join: join.expose_secret(),
                info,
            })
        }
        "/v1/board/login" => {
            admin(authenticate(state, &req).await?, "open the fleet board")?;
            let token = state
                .board
                .mint_login()
                .map_err(|e| CallError(ErrorCode::Internal, e.to_string()))?;
            ok(&BoardLoginReply {
                path: format!("{}?token={token}", crate::board::LOGIN_PATH),
                expires_in_secs: crate::board::LOGIN_TTL.as_secs(),
            })
        }
        "/v1/tokens/list" => {
            admin(authenticate(state, &req).await?, "manage join tokens")?;
            ok(&TokenListReply {
                tokens: registry.list_tokens().await?,
            })
        }
        "/v1/tokens/revoke" => {
            admin(authenticate(state, &req).await?, "manage join tokens")?;
            let call: TokenRevokeCall = read_json(req.into_body()).await?;
            ok(&registry.revoke_token(&call.id).await?)
        }
        _ => Err(CallError(ErrorCode::NotFound, format!("no call {path}"))),
    }
}

/// Type-erased "serialise me as a 200 JSON reply", so `call`'s arms stay one line.
mod erased {
    use super::*;
    pub trait Json {
        fn response(&self) -> Response<Body>;
    }
    impl<T: Serialize> Json for T {
        fn response(&self) -> Response<Body> {
            json_response(StatusCode::OK, self)
        }
    }
}

fn line(value: &WatchLine) -> Result<Frame<Bytes>, std::io::Error> {
    let mut bytes = serde_json::to_vec(value).expect("watch lines serialise");
    bytes.push(b'\n');
    Ok(Frame::data(Bytes::from(bytes)))
}

async fn watch(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, CallError> {
    let timeout = state.options.request_timeout;
    let (caller, call) = tokio::time::timeout(timeout, async {
        let caller = authenticate(&state, &req).await?;
        let call: WatchCall = read_json(req.into_body()).await?;
        Ok::<_, CallError>((caller, call))
    })
    .await
    .map_err(|_| CallError(ErrorCode::Timeout, "watch request timed out".into()))??;
    let quiet_after = state.options.store_quiet_after;
    let quiet_for = state.store_liveness.quiet_for();
    if quiet_for >= quiet_after {
        let body = store_quiet_error(quiet_for);
        return Err(CallError(body.code, body.message));
    }
    let own = scoped_caller(&caller, call.scope)?.cloned();
    let events = tokio::time::timeout(
        timeout,
        state
            .registry
            .watch_scoped(call.after, call.scope, own.as_ref()),
    )
    .await
    .map_err(|_| {
        CallError(
            ErrorCode::Timeout,
            "opening the watch timed out; retry".into(),
        )
    })??;
    let who = match caller {
        Caller::Member(id) => id.to_string(),
        Caller::Admin => "admin".to_string(),
    };
    tracing::debug!(caller = %who, after = call.after, "watch opened");
    let heartbeat = state.options.heartbeat;
    let mut shutdown = state.shutdown.clone();
    let open = state.metrics.watch_open();
    let liveness = state.store_liveness.clone();
    let stream = async_stream::stream! {
        let _open = open;
        let mut events = Box::pin(events);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                next = tokio::time::timeout(heartbeat, events.next()) => match next {
                    // A heartbeat vouches for the store too: a replica cut from it goes silent
                    // on its own watches' behalf and ends them.
                    Err(_) => match liveness.quiet_for() {
                        quiet if quiet >= quiet_after => {
                            tracing::debug!(caller = %who, quiet_ms = quiet.as_millis(), "watch ended: the store went quiet");
                            yield line(&WatchLine::Error(store_quiet_error(quiet)));
                            break;
                        }
                        _ => yield line(&WatchLine::Heartbeat),
                    },
                    Ok(None) => break,
                    Ok(Some(Ok(event))) => yield line(&WatchLine::from(event)),
                    Ok(Some(Err(e))) => {
                        tracing::debug!(caller = %who, error = %e, "watch ended with an error");
                        yield line(&WatchLine::Error(ErrorBody {
                            code: crate::api::error_code(&e),
                            message: e.to_string(),
                        }));
                        break;
                    }
                },
            }
        }
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .expect("static response parts"))
}

/// Serves until SIGTERM or SIGINT, then shuts down gracefully (what `fleet-hub serve` runs).
pub async fn serve_until_signal(registry: Registry, options: ServerOptions) -> anyhow::Result<()> {
    serve_with_relay_until_signal(registry, options, None).await
}

/// [`serve_until_signal`], with the relay when `relay` is given: a `fleet-hub relay` process
/// (see [`crate::relay::process`]) started — or adopted — after the API is up, kept alive,
/// and stopped before the API on SIGTERM/SIGINT.
pub async fn serve_with_relay_until_signal(
    registry: Registry,
    options: ServerOptions,
    relay: Option<crate::relay::RelayOptions>,
) -> anyhow::Result<()> {
    use crate::relay::process::{RelayProcess, relay_args};
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let data_dir = options.data_dir.clone();
    let server = HubServer::start(registry, options).await?;
    let mut relay = match relay {
        None => None,
        Some(relay_options) => {
            let args = relay_args(&relay_options, &data_dir, server.local_addr());
            match RelayProcess::ensure(&data_dir, args) {
                Ok(relay) => Some(relay),
                Err(e) => {
                    server.shutdown().await;
                    return Err(anyhow::Error::new(e).context("starting the relay"));
                }
            }
        }
    };
    // A dead relay is restarted within this: members' traffic through it waits for it.
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => if let Some(relay) = &mut relay {
                relay.keep_alive();
            },
        }
    }
    tracing::info!("signal received; shutting down");
    if let Some(relay) = relay {
        relay.stop().await;
    }
    server.shutdown().await;
    Ok(())
}

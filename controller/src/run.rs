//! `fleet-controller run`: the identity, then the leadership loop. A standby waits for the
//! lease; the active replica re-joins (same block, its key), lists and watches the fleet,
//! hands out node plans and peers, tells the gateway node's `fleet-nri` the WireGuard
//! gateway's desired state and publishes its status. On a stop signal it gives the lease up;
//! on losing the lease it waits again — either way the gateway device stays up on its node
//! for the next active replica; if the cluster is removed from the fleet it clears the
//! gateway, tears down and fails.

use std::sync::Arc;
use std::time::Duration;

use fleet_hub_api::client::{ClientOptions, HubClient, HubError};
use fleet_hub_api::mirror::{Fleet, FleetMirror, FleetSource, MirrorReader, WatcherConfig};
use fleet_hub_api::model::{FleetScope, GatewayState, JoinRequest};
use fleet_hub_api::wire::ErrorCode;
use fleet_proto::wireguard::PublicKey;
use tokio::sync::watch;

use crate::config::{GATEWAY_MTU, LeaderElection, RunConfig};
use crate::gateway::{Gateway, GatewayConfig};
use crate::hub::{
    EventEffect, FleetSnapshot, Hub, MemberHub, check_hub_tls, is_removed, is_unavailable,
};
use crate::identity::{IdentityError, load_credential, store_credential, wait_for_credential};
use crate::kube_lease::{KubeLease, KubeLeaseError};
use crate::kube_mcs::{KubeMcs, KubeMcsError};
use crate::kube_secret::{CredentialSecret, SecretError};
use crate::leader::{HubLease, LeaseBackend, LeaseEvent, Role, Transition, lease_task, on_lease};
use crate::metrics::ControllerMetrics;
use crate::nodes::{api_node_specs, load_nodes, node_api};
use crate::plan::{GatewayMode, chosen_relay, node_peers, wireguard_peers};
use crate::reconcile::{ClusterNode, NodePlanConfig, PassReport, reconcile_nodes};
use crate::services::{ServiceConfig, ServiceSync};
use fleet_hub_api::records::GATEWAY_RECORD;
use fleet_proto::node::{GatewayRelay, NodeError};
use fleet_services::LivenessConfig;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Nodes(#[from] crate::nodes::NodesError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the gateway's WireGuard key from the gateway node {node}: {source}")]
    Key { node: String, source: NodeError },
    #[error(
        "no hub CA hash: give --ca <sha256> (or --join, whose last part is the CA hash; with \
         --credential-secret, a Secret written at the join holds it)"
    )]
    NoCa,
    #[error("joining the fleet as {cluster} failed: {source}")]
    Join { cluster: String, source: HubError },
    #[error("hub client: {0}")]
    Client(HubError),
    #[error(
        "cluster {cluster} has been removed from the fleet (or its credential is no longer \
         valid): {reason}. The gateway was removed; join again with a new token (delete the \
         credential file {credential_file} first)"
    )]
    Removed {
        cluster: String,
        reason: String,
        credential_file: String,
    },
    #[error("the hub refused the lease: {0}")]
    Lease(String),
    #[error("leader election by a Kubernetes Lease: {0}")]
    KubeLease(#[from] KubeLeaseError),
    #[error("the Kubernetes API (--kubernetes): {0}")]
    KubeMcs(#[from] KubeMcsError),
    #[error("the credential Secret: {0}")]
    Secret(#[from] SecretError),
    #[error("the node API's TLS files (--node-api-tls): {0}")]
    NodeTls(#[from] fleet_core::node_tls::NodeTlsError),
}

/// Reads of the gateway device that fail in a row before the hub is told the gateway is down
/// (one status interval each): one failure may be a restart of the node daemon in progress.
const GATEWAY_DOWN_AFTER_FAILED_READS: u32 = 2;

/// Hub timeouts fit for leadership: a lease call must fail well within a lease's life. The
/// controller watches only what it needs ([`FleetScope::Member`]): the fleet's shape, every
/// cluster's `export/*` records and its own records.
fn client_options(ttl: Duration) -> ClientOptions {
    ClientOptions {
        scope: FleetScope::Member,
        // A dead hub replica costs this much before the next address is tried.
        connect_timeout: (ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(3)),
        call_timeout: (ttl * 2).clamp(Duration::from_secs(2), Duration::from_secs(10)),
        ..ClientOptions::default()
    }
}

/// Waits until `stop` says so.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How the identity will be had, as far as [`check_identity`] can tell at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityStart {
    /// This cluster's credential file is there, or a Secret will be read (`--credential-secret`).
    Ready,
    /// No credential file yet; the join string joins.
    Join,
    /// No credential file and no join string: a standby replica, waiting for the replica that
    /// joins to write the file (logged as a WARN, since a lone replica would wait forever).
    WaitForAnotherReplica,
}

/// Checks what can be checked of the cluster's identity before waiting for anything: with a
/// credential file (no `--credential-secret`), the hub CA's hash is known (`--ca` or the join
/// string) and the file, if present, is readable, this cluster's and well-formed. (A
/// credential Secret is read from the Kubernetes API later.)
///
/// Errors: [`ControllerError::NoCa`], [`ControllerError::Identity`] (unreadable, malformed,
/// another cluster's, readable by others).
pub fn check_identity(cfg: &RunConfig) -> Result<IdentityStart, ControllerError> {
    if cfg.credential_secret.is_some() {
        return Ok(IdentityStart::Ready);
    }
    if cfg.ca.is_none() && cfg.join.is_none() {
        return Err(ControllerError::NoCa);
    }
    Ok(
        match (
            load_credential(&cfg.credential_file, &cfg.cluster)?,
            &cfg.join,
        ) {
            (Some(_), _) => IdentityStart::Ready,
            (None, Some(_)) => IdentityStart::Join,
            (None, None) => IdentityStart::WaitForAnotherReplica,
        },
    )
}

/// Probes the hub once in the background (a TLS handshake against the pinned CA, see
/// [`check_hub_tls`]) so that a wrong CA hash or an unreachable hub is logged at start, not
/// hidden behind the wait for the gateway node. Logs only; the run goes on either way.
fn spawn_hub_check(cfg: &RunConfig) {
    let Some(ca) = cfg.ca.or_else(|| cfg.join.as_ref().map(|j| j.ca_hash)) else {
        return;
    };
    let hubs = cfg.hubs.clone();
    let timeout = client_options(cfg.lease_ttl).call_timeout;
    tokio::spawn(async move {
        match check_hub_tls(&hubs, ca, timeout).await {
            Ok(hub) => tracing::info!(%hub, "hub reachable; its CA matches the pinned hash"),
            Err(problem) => tracing::warn!(
                %problem,
                "no hub address passed a TLS handshake with the pinned CA: check --hub, and \
                 --ca or the join string's CA hash (retrying when the hub is needed)"
            ),
        }
    });
}

/// The cluster's hub client with its credential: read from the credential file (or the
/// credential Secret, `--credential-secret`), or obtained by joining (and written), or — when
/// another replica joined first, or without a join string — waited for. `None` when stopped.
async fn identity(
    cfg: &RunConfig,
    key: &PublicKey,
    secret: Option<&CredentialSecret>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<HubClient>, ControllerError> {
    let ca = match (
        cfg.ca.or_else(|| cfg.join.as_ref().map(|j| j.ca_hash)),
        secret,
    ) {
        (Some(ca), _) => ca,
        // Neither --ca nor --join: the hub CA's hash the joining replica stored in the Secret.
        (None, Some(s)) => {
            let read = tokio::select! {
                r = s.read_ca() => r,
                _ = stopped(stop) => return Ok(None),
            };
            read?.ok_or(ControllerError::NoCa)?
        }
        (None, None) => return Err(ControllerError::NoCa),
    };
    let base = HubClient::new(cfg.hubs.clone(), ca, client_options(cfg.lease_ttl))
        .map_err(ControllerError::Client)?;
    let wait = async {
        match secret {
            Some(s) => Ok(s.wait(&cfg.cluster, Duration::from_millis(500)).await?),
            None => Ok::<_, ControllerError>(
                wait_for_credential(
                    &cfg.credential_file,
                    &cfg.cluster,
                    Duration::from_millis(500),
                )
                .await?,
            ),
        }
    };
    let stored = match secret {
        Some(s) => match s.read_retrying(&cfg.cluster, stop).await? {
            Some(read) => read,
            None => return Ok(None),
        },
        None => load_credential(&cfg.credential_file, &cfg.cluster)?,
    };
    if let Some(c) = stored {
        return Ok(Some(base.with_credential(c)));
    }
    let Some(join) = &cfg.join else {
        return tokio::select! {
            c = wait => Ok(Some(base.with_credential(c?))),
            _ = stopped(stop) => Ok(None),
        };
    };
    let request = JoinRequest {
        cluster: cfg.cluster.clone(),
        public_key: *key,
        endpoint: cfg.endpoint,
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = tokio::select! {
            r = base.join(join, request.clone()) => r,
            _ = stopped(stop) => return Ok(None),
        };
        match attempt {
            Ok(joined) => {
                match secret {
                    Some(s) => s.store_joined(&joined.credential, &ca, stop).await?,
                    None => store_credential(&cfg.credential_file, &joined.credential)?,
                }
                tracing::info!(cluster = %cfg.cluster, block = %joined.record.block, credential_file = %cfg.credential_file.display(), credential_secret = ?secret, "joined the fleet");
                return Ok(Some(base.with_credential(joined.credential)));
            }
            Err(e) if e.code() == Some(ErrorCode::AlreadyJoined) => {
                // Another replica joined first; it writes the credential file (or Secret).
                tracing::info!(
                    cluster = %cfg.cluster,
                    credential_file = %cfg.credential_file.display(),
                    credential_secret = ?secret,
                    "cluster already joined, by another replica: waiting for its credential (if \
                     the replica that joined lost it, remove the cluster at the hub and join again)"
                );
                return tokio::select! {
                    c = wait => Ok(Some(base.with_credential(c?))),
                    _ = stopped(stop) => Ok(None),
                };
            }
            Err(e) if is_unavailable(&e) => {
                tracing::warn!(error = %e, "hub unreachable for the join; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(stop) => return Ok(None),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(source) => {
                return Err(ControllerError::Join {
                    cluster: cfg.cluster.to_string(),
                    source,
                });
            }
        }
    }
}

/// Everything the active replica holds.
struct Active {
    /// The fleet, mirrored from the hub while this replica is active.
    _mirror: FleetMirror,
    reader: MirrorReader,
    /// The fleet as last acted on.
    snapshot: FleetSnapshot,
    /// The hub record says the gateway is up (set once the device exists).
    reported_up: bool,
    last_pass: PassReport,
    /// The latest mirrored fleet (what service discovery acts on).
    fleet: Arc<Fleet>,
    /// The task publishing the `gateway` record (the heartbeat); stops with the active role.
    heartbeat: Option<AbortOnDrop>,
    services: ServiceSync,
}

struct Controller {
    cfg: RunConfig,
    hub: Arc<dyn Hub>,
    /// Where the fleet mirror lists and watches.
    fleet: Arc<dyn FleetSource>,
    /// Where the leadership lease lives (`--leader-election`).
    lease: Arc<dyn LeaseBackend>,
    nodes: Vec<ClusterNode>,
    gateway: Gateway,
    plan_cfg: NodePlanConfig,
    /// The member cluster's Kubernetes API (`--kubernetes`): ServiceExports, Nodes.
    kube: Option<KubeMcs>,
    /// The last error reading it (to log only changes).
    kube_error: Option<String>,
    metrics: ControllerMetrics,
    /// The controller's client TLS for node daemons on TCP (`--node-api-tls`).
    node_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// Runs until `stop` turns true (Ok) or the cluster is removed or a fatal error (Err).
pub async fn run(cfg: RunConfig, stop: watch::Receiver<bool>) -> Result<(), ControllerError> {
    run_with_metrics(cfg, stop, ControllerMetrics::default()).await
}

/// [`run`], recording into `metrics` (served by `--metrics-address`).
pub async fn run_with_metrics(
    cfg: RunConfig,
    mut stop: watch::Receiver<bool>,
    metrics: ControllerMetrics,
) -> Result<(), ControllerError> {
    if check_identity(&cfg)? == IdentityStart::WaitForAnotherReplica {
        tracing::warn!(
            credential_file = %cfg.credential_file.display(),
            "no credential file and no join string: waiting for another replica of this \
             cluster to join and write it (to join from this one, give --join \
             <token id>.<token secret>.<CA sha256> or FLEET_JOIN)"
        );
    }
    spawn_hub_check(&cfg);
    let node_tls = match &cfg.node_api_tls {
        Some(dir) => Some(fleet_core::node_tls::client_config(dir)?),
        None => None,
    };
    let file_specs = match cfg.nodes_from_api {
        None => Some(load_nodes(&cfg.nodes_file, &cfg.gateway_node)?),
        Some(_) => None,
    };
    // Connect to the Kubernetes API first: a missing configuration fails before anything else.
    let kube_lease = match &cfg.leader_election {
        LeaderElection::Hub => None,
        LeaderElection::Kubernetes {
            namespace,
            name,
            kubeconfig,
        } => Some(KubeLease::connect(namespace, name, kubeconfig.as_deref(), cfg.lease_ttl).await?),
    };
    let mut kube = match &cfg.kubernetes {
        Some(api) => Some(KubeMcs::connect(api.kubeconfig.as_deref()).await?),
        None => None,
    };
    let specs = match (file_specs, cfg.nodes_from_api, kube.as_mut()) {
        (Some(specs), _, _) => specs,
        (None, Some(port), Some(kube)) => {
            match kube.wait_nodes(&cfg.gateway_node, port, &mut stop).await {
                Some(specs) => specs,
                None => return Ok(()),
            }
        }
        _ => unreachable!("validate: --nodes-from-kubernetes needs --kubernetes"),
    };
    let secret = match (&cfg.credential_secret, kube.as_ref()) {
        (Some((ns, name)), Some(kube)) => Some(CredentialSecret::new(kube.client(), ns, name)),
        _ => None,
    };
    let gateway_spec = specs
        .iter()
        .find(|n| n.name == cfg.gateway_node)
        .expect("load_nodes checked the gateway node")
        .clone();
    let gateway = Gateway::new(
        GatewayConfig {
            name: cfg.wg_name.clone(),
            listen_port: cfg.listen_port,
            mtu: GATEWAY_MTU,
            backend: cfg.wg_backend,
            node: gateway_spec.name.clone(),
            holder: cfg.holder.clone(),
        },
        node_api(&gateway_spec, node_tls.as_ref())?,
    );
    // The key lives on the gateway node: its public half is what the cluster joins with.
    let key = match gateway.wait_public_key(&mut stop).await {
        Ok(Some(k)) => k,
        Ok(None) => return Ok(()),
        Err(source) => {
            return Err(ControllerError::Key {
                node: gateway_spec.name.clone(),
                source,
            });
        }
    };
    let Some(client) = identity(&cfg, &key, secret.as_ref(), &mut stop).await? else {
        return Ok(());
    };
    let nodes = specs
        .into_iter()
        .map(|spec| {
            Ok(ClusterNode {
                api: node_api(&spec, node_tls.as_ref())?,
                spec,
            })
        })
        .collect::<Result<_, crate::nodes::NodesError>>()?;
    let hub = Arc::new(MemberHub {
        client: client.clone(),
        cluster: cfg.cluster.clone(),
    });
    let lease: Arc<dyn LeaseBackend> = match kube_lease {
        Some(k) => Arc::new(k),
        None => Arc::new(HubLease(hub.clone())),
    };
    let mut c = Controller {
        plan_cfg: NodePlanConfig {
            cluster: cfg.cluster.clone(),
            gateway_node: cfg.gateway_node.clone(),
            node_prefix: cfg.node_prefix,
            vip_range: cfg.vip_range,
        },
        hub,
        fleet: Arc::new(client),
        lease,
        cfg,
        nodes,
        gateway,
        kube,
        kube_error: None,
        metrics,
        node_tls,
    };
    c.lead(&mut stop).await
}

impl Controller {
    fn removed(&self, reason: impl Into<String>) -> ControllerError {
        ControllerError::Removed {
            cluster: self.cfg.cluster.to_string(),
            reason: reason.into(),
            credential_file: self.cfg.credential_file.display().to_string(),
        }
    }

    async fn lead(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), ControllerError> {
        let (mut lease, lease_handle) = lease_task(
            self.lease.clone(),
            self.cfg.holder.clone(),
            self.cfg.lease_ttl,
        );
        let _abort = AbortOnDrop(lease_handle);
        let mut role = Role::Standby;
        let mut active: Option<Active> = None;
        let mut hub_down = false;
        let mut held_by: Option<String> = None;
        let mut tick = tokio::time::interval(self.cfg.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.cfg.endpoint_poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(cluster = %self.cfg.cluster, holder = %self.cfg.holder, lease = %self.lease.describe(), "standby: waiting for the cluster lease");
        let result = loop {
            let liveness_deadline = active.as_ref().and_then(|a| a.services.next_deadline());
            let fleet_changed = async {
                match active.as_mut() {
                    Some(a) => a.reader.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopped(stop) => break Ok(()),
                changed = lease.changed() => {
                    if changed.is_err() {
                        break Err(ControllerError::Lease("the lease task ended".into()));
                    }
                    let Some(event) = lease.borrow_and_update().clone() else { continue };
                    self.metrics.hub_reachable(!matches!(event, LeaseEvent::HubUnavailable(_)));
                    match &event {
                        LeaseEvent::HubUnavailable(e) if !hub_down => {
                            hub_down = true;
                            if role == Role::Active {
                                tracing::warn!(error = %e, "hub unreachable: staying active, the gateway and node routes stay as they are");
                            } else {
                                tracing::warn!(error = %e, "hub unreachable: cannot take the lease");
                            }
                        }
                        LeaseEvent::Granted | LeaseEvent::HeldBy(_) if hub_down => {
                            hub_down = false;
                            tracing::info!("hub reachable again");
                        }
                        _ => {}
                    }
                    if let LeaseEvent::HeldBy(h) = &event
                        && role == Role::Standby
                        && held_by.as_ref() != Some(h)
                    {
                        tracing::info!(holder = %h, "another replica is active");
                        held_by = Some(h.clone());
                    }
                    match on_lease(role, &event) {
                        Transition::Stay => {}
                        Transition::Activate => match self.activate().await {
                            Ok(a) => {
                                self.metrics.set_active(true);
                                role = Role::Active;
                                held_by = None;
                                active = Some(a);
                            }
                            Err(e) if matches!(e, ControllerError::Removed { .. }) => break Err(e),
                            Err(e) => tracing::warn!(error = %e, "could not become active; retrying at the next lease renewal"),
                        },
                        Transition::StepDown => {
                            tracing::warn!(holder = ?event, "lost the lease to another replica: stepping down");
                            self.step_down().await;
                            self.metrics.set_active(false);
                            active = None;
                            role = Role::Standby;
                        }
                        Transition::Removed(reason) => break Err(self.removed(reason)),
                        Transition::Fatal(reason) => break Err(ControllerError::Lease(reason)),
                    }
                }
                changed = fleet_changed => {
                    let Some(a) = active.as_mut() else { continue };
                    if changed.is_err() {
                        break Err(ControllerError::Lease("the fleet mirror stopped".into()));
                    }
                    if let Err(e) = self.follow_fleet(a).await { break Err(e); }
                }
                _ = tick.tick(), if role == Role::Active => {
                    let Some(a) = active.as_mut() else { continue };
                    if let Err(e) = self.converge(a).await {
                        break Err(e);
                    }
                }
                _ = poll.tick(), if role == Role::Active => {
                    let Some(a) = active.as_mut() else { continue };
                    let kube_changed = self.read_kube(a).await;
                    if (a.services.poll_pods(&self.nodes).await | kube_changed)
                        && let Err(e) = self.sync_services(a).await
                    {
                        break Err(e);
                    }
                }
                _ = sleep_until(liveness_deadline), if liveness_deadline.is_some() => {
                    let Some(a) = active.as_mut() else { continue };
                    // Judge liveness on the newest fleet, not on one with changes still
                    // waiting in the mirror (a busy loop must not see a heartbeat as missed).
                    if let Err(e) = self.follow_fleet(a).await {
                        break Err(e);
                    }
                }
            }
        };
        self.metrics.set_active(false);
        match &result {
            Ok(()) => self.shut_down(role).await,
            Err(ControllerError::Removed { .. }) => {
                self.tear_down_removed(active.as_ref()).await;
            }
            // The gateway device stays on its node for the next active replica.
            Err(_) => {}
        }
        result
    }

    /// Becoming active: re-join with this replica's key (the block stays), mirror the fleet,
    /// converge once it is listed.
    async fn activate(&mut self) -> Result<Active, ControllerError> {
        // Asked each time: the gateway node is the key's owner.
        let key = self
            .gateway
            .public_key()
            .await
            .map_err(|source| ControllerError::Key {
                node: self.cfg.gateway_node.clone(),
                source,
            })?;
        let record = match self.hub.rejoin(key, self.cfg.endpoint).await {
            Ok(r) => r,
            Err(e) if is_removed(&e) => return Err(self.removed(e.to_string())),
            Err(e) => return Err(ControllerError::Client(e)),
        };
        tracing::info!(cluster = %record.id, block = %record.block, holder = %self.cfg.holder, "active: holding the cluster lease");
        let mirror = FleetMirror::spawn(self.fleet.clone(), WatcherConfig::default());
        let mut reader = mirror.reader();
        // The first listing, bounded like a hub call: without it there is nothing to plan.
        let bound = (self.cfg.lease_ttl * 2).clamp(Duration::from_secs(2), Duration::from_secs(10));
        let first = tokio::time::timeout(bound, async {
            loop {
                let state = reader.mark_seen();
                match (&state.fleet, state.error) {
                    (Some(_), _) => return Ok(()),
                    (None, Some(e)) if is_removed(&e) => return Err(e),
                    _ => {}
                }
                if reader.changed().await.is_err() {
                    return Ok(());
                }
            }
        })
        .await;
        match first {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.removed(e.to_string())),
            Err(_) => {
                let reason = reader
                    .state()
                    .error
                    .map_or("no listing in time".to_string(), |e| e.to_string());
                return Err(ControllerError::Client(HubError::Unreachable {
                    endpoints: "the hub (fleet listing)".into(),
                    errors: reason,
                }));
            }
        }
        let Some(fleet) = reader.fleet() else {
            return Err(ControllerError::Lease("the fleet mirror stopped".into()));
        };
        let mut a = Active {
            snapshot: FleetSnapshot::of(&fleet, &self.cfg.cluster),
            _mirror: mirror,
            reader,
            reported_up: false,
            last_pass: PassReport::default(),
            fleet,
            heartbeat: None,
            services: ServiceSync::new(self.service_config()),
        };
        if !a.snapshot.fleet.clusters.contains_key(&self.cfg.cluster) {
            return Err(self.removed("the cluster is not in the hub's listing"));
        }
        self.converge(&mut a).await?;
        a.heartbeat = Some(self.spawn_heartbeat());
        a.services.poll_pods(&self.nodes).await;
        self.read_kube(&mut a).await;
        self.sync_services(&mut a).await?;
        Ok(a)
    }

    fn service_config(&self) -> ServiceConfig {
        let liveness = LivenessConfig {
            hold_down: self.cfg.liveness_hold_down,
            ..LivenessConfig::default()
        };
        ServiceConfig {
            cluster: self.cfg.cluster.clone(),
            vip_range: self.cfg.vip_range,
            dns_backends: self.cfg.dns_backends.clone(),
            liveness,
            kubernetes: self.kube.is_some(),
        }
    }

    /// A service-discovery pass over the latest fleet.
    async fn sync_services(&mut self, a: &mut Active) -> Result<(), ControllerError> {
        let now = std::time::Instant::now();
        let result = a
            .services
            .sync(&a.fleet, &self.nodes, &a.last_pass.subnets, &*self.hub, now)
            .await;
        self.metrics.pass("services", result.is_ok(), now);
        if let Err(e) = result {
            return Err(self.removed(e.to_string()));
        }
        if let (Some(kube), Some(view)) = (self.kube.as_mut(), a.services.kube_view()) {
            for p in kube.write_statuses(view, a.services.own_statuses()).await {
                tracing::warn!(problem = %p, "ServiceExport status not written; retrying");
            }
            for p in kube.converge_imports(view, a.services.own_imports()).await {
                tracing::warn!(problem = %p, "ServiceImports and MCS EndpointSlices not converged; retrying");
            }
        }
        Ok(())
    }

    /// Reads the Kubernetes API into service discovery; true when it changed.
    async fn read_kube(&mut self, a: &mut Active) -> bool {
        let Some(kube) = self.kube.as_mut() else {
            return false;
        };
        match kube.read() {
            Ok(view) => {
                if self.kube_error.take().is_some() {
                    tracing::info!("the Kubernetes API is readable again");
                }
                let changes = kube.follow_nodes(&view);
                if let Some(port) = self.cfg.nodes_from_api
                    && !changes.is_empty()
                {
                    // The next pass (within --status-interval) plans and peers them.
                    self.nodes = api_node_specs(&view.nodes, port)
                        .into_iter()
                        .filter_map(|spec| {
                            let api = node_api(&spec, self.node_tls.as_ref()).ok()?;
                            Some(ClusterNode { spec, api })
                        })
                        .collect();
                }
                a.services.set_kube_view(view)
            }
            Err(e) => {
                if self.kube_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "reading the Kubernetes API failed; keeping the last read");
                    self.kube_error = Some(e);
                }
                false
            }
        }
    }

    /// The mirror changed: a removal of this cluster ends the run; a fleet change is a pass.
    async fn follow_fleet(&mut self, a: &mut Active) -> Result<(), ControllerError> {
        let state = a.reader.mark_seen();
        if let Some(e) = &state.error {
            if is_removed(e) {
                return Err(self.removed(e.to_string()));
            }
            tracing::debug!(error = %e, "following the fleet: the hub is unavailable; keeping the last fleet");
        }
        let reachable = state.error.is_none();
        let Some(fleet) = state.fleet else {
            return Ok(());
        };
        let next = FleetSnapshot::of(&fleet, &self.cfg.cluster);
        let effect = next.effect_since(Some(&a.snapshot), &self.cfg.cluster);
        a.snapshot = next;
        a.fleet = fleet;
        self.metrics
            .fleet(&self.cfg.cluster, a.fleet.clone(), reachable);
        match effect {
            EventEffect::OwnClusterRemoved => {
                return Err(self.removed("the hub reported this cluster removed"));
            }
            EventEffect::FleetChanged => self.converge(a).await?,
            EventEffect::OwnRecordChanged | EventEffect::Nothing => {}
        }
        // Any record may be an export, an import or a heartbeat.
        self.sync_services(a).await
    }

    /// One pass: nodes, the device, its peers.
    async fn converge(&mut self, a: &mut Active) -> Result<(), ControllerError> {
        let started = std::time::Instant::now();
        let report = reconcile_nodes(&self.plan_cfg, &a.snapshot, &self.nodes, &*self.hub).await;
        if report.removed {
            return Err(self.removed("the hub refused this cluster's credential"));
        }
        let mut problems = report.problems.clone();
        if let Some(own) = a.snapshot.fleet.clusters.get(&self.cfg.cluster) {
            self.gateway.set_own_block(own.block);
        }
        let mode = GatewayMode {
            keepalive: self.cfg.keepalive,
            public: self.cfg.endpoint.is_some(),
        };
        // Once the gateway node has its plan (its CNF netns exists).
        let relay = chosen_relay(&a.snapshot.fleet).map(|r| GatewayRelay {
            public_key: r.public_key,
            instance: r.instance.clone(),
        });
        if report.gateway_cnf_netns.is_some()
            && let Err(e) = self
                .gateway
                .set_peers(
                    wireguard_peers(&a.snapshot.fleet, &self.cfg.cluster, mode),
                    relay,
                )
                .await
        {
            problems.push(format!("setting the WireGuard gateway on its node: {e}"));
        }
        if self.gateway.is_up() && !a.reported_up {
            match self.hub.set_gateway_state(GatewayState::Up).await {
                Ok(()) => a.reported_up = true,
                Err(e) if is_removed(&e) => return Err(self.removed(e.to_string())),
                Err(e) => problems.push(format!("reporting the gateway up: {e}")),
            }
        }
        if problems.is_empty() {
            if !a.last_pass.problems.is_empty() {
                tracing::info!("converged");
            }
        } else if problems != a.last_pass.problems {
            for p in &problems {
                tracing::warn!(problem = %p, "not converged; retrying");
            }
        }
        self.metrics.pass("nodes", problems.is_empty(), started);
        a.last_pass = PassReport { problems, ..report };
        Ok(())
    }

    /// Publishes the `gateway` record (tunnel statistics for operators: `fleetctl status`, the
    /// fleet board; members do not watch each other's) every status interval from a task of
    /// its own, and reports the gateway down to the hub when its device cannot be read
    /// (other clusters judge this cluster's liveness by that and by its controller lease),
    /// up again when it can. Stops with the returned guard.
    fn spawn_heartbeat(&self) -> AbortOnDrop {
        let reader = self.gateway.reader();
        let hub = self.hub.clone();
        let metrics = self.metrics.clone();
        let interval = self.cfg.status_interval;
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Consecutive failed reads of the gateway device, and whether the hub was told
            // it is down: other clusters withdraw this cluster's services while it is.
            let mut failed_reads = 0u32;
            let mut reported_down = false;
            loop {
                tick.tick().await;
                let record = match reader.record().await {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(e) => {
                        failed_reads += 1;
                        tracing::warn!(error = %e, failed_reads, "reading the WireGuard statistics failed");
                        if failed_reads >= GATEWAY_DOWN_AFTER_FAILED_READS && !reported_down {
                            match hub.set_gateway_state(GatewayState::Down).await {
                                Ok(()) => {
                                    reported_down = true;
                                    tracing::warn!(
                                        "gateway device unreadable: reported down to the hub"
                                    );
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "reporting the gateway down failed")
                                }
                            }
                        }
                        continue;
                    }
                };
                failed_reads = 0;
                if reported_down {
                    match hub.set_gateway_state(GatewayState::Up).await {
                        Ok(()) => {
                            reported_down = false;
                            tracing::info!("gateway device readable again: reported up to the hub");
                        }
                        Err(e) => tracing::debug!(error = %e, "reporting the gateway up failed"),
                    }
                }
                let value = serde_json::to_vec(&record).expect("records serialise");
                match hub.publish(GATEWAY_RECORD, &value).await {
                    Ok(_) => metrics.published(),
                    Err(e) => tracing::debug!(error = %e, "publishing the gateway record failed"),
                }
            }
        }))
    }

    /// The device stays on the gateway node: the replica now active re-sends the same state.
    async fn step_down(&mut self) {}

    /// Clean stop: the lease is freed for a standby. The gateway device stays up on its node
    /// (and so does the hub's `up`): traffic does not notice a controller restart.
    async fn shut_down(&mut self, _role: Role) {
        tracing::info!("stopping; the WireGuard gateway stays up on its node");
        let bound = Duration::from_secs(2);
        match tokio::time::timeout(bound, self.lease.release(&self.cfg.holder)).await {
            Ok(Ok(())) => tracing::info!("lease released"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the lease failed; it expires by itself")
            }
            Err(_) => tracing::warn!("releasing the lease timed out; it expires by itself"),
        }
    }

    /// The cluster is gone: the device goes and the nodes stop routing other clusters' blocks
    /// (their own plans and the intra-cluster overlay stay).
    async fn tear_down_removed(&mut self, active: Option<&Active>) {
        if let Err(e) = self.gateway.delete().await {
            tracing::warn!(error = %e, "removing the gateway device failed");
        }
        let Some(a) = active else { return };
        for n in &self.nodes {
            if let Err(e) = n
                .api
                .set_services(fleet_proto::node::SetServicesRequest::default())
                .await
            {
                tracing::warn!(node = %n.spec.name, error = %e, "clearing the node's VIP table failed");
            }
        }
        let specs: Vec<_> = self.nodes.iter().map(|n| n.spec.clone()).collect();
        let peers = node_peers(&specs, &a.last_pass.subnets, &self.cfg.gateway_node, &[]);
        for n in &self.nodes {
            if let Some(p) = peers.get(&n.spec.name)
                && let Err(e) = n.api.set_peers(p.clone()).await
            {
                tracing::warn!(node = %n.spec.name, error = %e, "clearing routes to other clusters failed");
            }
        }
    }
}

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    //! The leadership loop against fakes: `FakeHub` and `FakeNode` (from `reconcile::fakes`)
    //! and `FakeFleet`, an in-memory fleet source the test pushes watch events into.

    use std::sync::Mutex;

    use fleet_hub_api::mirror::FleetSource;
    use fleet_hub_api::model::{
        ClusterId, ClusterRecord, FleetView, RegistryEvent, RelayRecord, Revision,
    };
    use futures::StreamExt;
    use futures::future::BoxFuture;
    use futures::stream::BoxStream;
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::LeaderElection;
    use crate::plan::NodeSpec;
    use crate::reconcile::fakes::{FAKE_GATEWAY_KEY, FakeHub, FakeNode};

    /// The hub's fleet for the mirror: a listing, and watches the test pushes events into.
    struct FakeFleet {
        view: Mutex<FleetView>,
        watches: Mutex<Vec<mpsc::UnboundedSender<Result<RegistryEvent, HubError>>>>,
    }

    impl FakeFleet {
        fn push(&self, event: RegistryEvent) {
            let mut view = self.view.lock().unwrap();
            view.revision = event.revision();
            match &event {
                RegistryEvent::ClusterUpserted { record, .. } => {
                    view.clusters.retain(|c| c.id != record.id);
                    view.clusters.push(record.clone());
                }
                RegistryEvent::ClusterRemoved { id, .. } => view.clusters.retain(|c| &c.id != id),
                _ => {}
            }
            self.watches
                .lock()
                .unwrap()
                .retain(|w| w.send(Ok(event.clone())).is_ok());
        }
    }

    impl FleetSource for FakeFleet {
        fn list(&self) -> BoxFuture<'_, Result<FleetView, HubError>> {
            let view = self.view.lock().unwrap().clone();
            Box::pin(async move { Ok(view) })
        }
        fn watch(&self, _after: Revision) -> BoxStream<'static, Result<RegistryEvent, HubError>> {
            let (tx, mut rx) = mpsc::unbounded_channel();
            self.watches.lock().unwrap().push(tx);
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
        }
    }

    fn cluster(id: &str, block: &str, key: u8, endpoint: Option<&str>) -> ClusterRecord {
        ClusterRecord {
            id: ClusterId::new(id).unwrap(),
            block: block.parse().unwrap(),
            public_key: fleet_proto::wireguard::PublicKey::from_bytes([key; 32]),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            gateway: GatewayState::Up,
            controller_live: true,
            joined_at: 1,
            token_id: "t".into(),
        }
    }

    fn config() -> RunConfig {
        RunConfig {
            cluster: ClusterId::new("aa").unwrap(),
            hubs: vec!["127.0.0.1:1".into()],
            credential_file: "/nonexistent/credential".into(),
            join: None,
            ca: None,
            data_dir: "/nonexistent".into(),
            nodes_file: "/nonexistent/nodes.json".into(),
            gateway_node: "n1".into(),
            endpoint: None,
            listen_port: 51820,
            wg_name: "fleet-wg".into(),
            wg_backend: None,
            holder: "h1".into(),
            lease_ttl: Duration::from_millis(600),
            leader_election: LeaderElection::Hub,
            keepalive: 25,
            node_prefix: 24,
            status_interval: Duration::from_millis(100),
            vip_range: "100.112.0.0/16".parse().unwrap(),
            dns_backends: Vec::new(),
            endpoint_poll_interval: Duration::from_millis(100),
            liveness_hold_down: Duration::from_secs(2),
            kubernetes: None,
            node_api_tls: None,
            nodes_from_api: None,
            credential_secret: None,
        }
    }

    #[test]
    fn what_can_be_checked_of_the_identity_is_checked_before_waiting() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let ca = Some(fleet_hub_api::wire::CaHash([1; 32]));
        let join = fleet_hub_api::wire::JoinString::parse(&format!(
            "{}.{}.{}",
            "a".repeat(12),
            "b".repeat(64),
            "01".repeat(32)
        ))
        .unwrap();
        use std::path::PathBuf;
        let cfg = |credential_file: PathBuf, join: Option<_>, ca| RunConfig {
            credential_file,
            join,
            ca,
            ..config()
        };
        let absent = PathBuf::from("/nonexistent/credential");
        let good = file(
            "aa.credential",
            &format!("m.aa.{}\n", "c".repeat(64)),
            0o600,
        );

        // Fine: a join string to join by, this cluster's credential, a Secret, or — a standby
        // replica — neither file nor join string yet.
        let start = |c: RunConfig| check_identity(&c).unwrap();
        assert_eq!(
            start(cfg(absent.clone(), Some(join.clone()), None)),
            IdentityStart::Join
        );
        assert_eq!(start(cfg(good.clone(), None, ca)), IdentityStart::Ready);
        assert_eq!(
            start(RunConfig {
                credential_secret: Some(("ns".into(), "c".into())),
                ..cfg(absent.clone(), None, None)
            }),
            IdentityStart::Ready
        );
        assert_eq!(
            start(cfg(absent.clone(), None, ca)),
            IdentityStart::WaitForAnotherReplica
        );

        let refused = |c: RunConfig| check_identity(&c).unwrap_err().to_string();
        let e = refused(cfg(good.clone(), None, None));
        assert!(e.contains("no hub CA hash") && e.contains("--ca"), "{e}");
        let e = refused(cfg(file("bad", "not a credential", 0o600), None, ca));
        assert!(e.contains("is not a member credential"), "{e}");
        // Refused even with a join string: the file is there, and wrong.
        let e = refused(cfg(
            file("bb", &format!("m.bb.{}", "c".repeat(64)), 0o600),
            Some(join),
            None,
        ));
        assert!(e.contains("belongs to cluster bb"), "{e}");
        let e = refused(cfg(
            file("open", &format!("m.aa.{}", "c".repeat(64)), 0o644),
            None,
            ca,
        ));
        assert!(e.contains("chmod 600"), "{e}");
        let unreadable = dir.path().join("a-directory");
        std::fs::create_dir(&unreadable).unwrap();
        std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = refused(cfg(unreadable, None, ca));
        assert!(e.contains("cannot read the credential file"), "{e}");
    }

    struct World {
        hub: Arc<FakeHub>,
        fleet: Arc<FakeFleet>,
        n1: Arc<FakeNode>,
        n2: Arc<FakeNode>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), ControllerError>>,
    }

    /// A controller of `aa` (nodes n1 = gateway, n2) leading against the fakes.
    fn start() -> World {
        start_with_hub(Arc::new(FakeHub::default()))
    }

    fn start_with_hub(hub: Arc<FakeHub>) -> World {
        let cfg = config();
        let own = cluster("aa", "100.96.0.0/20", FAKE_GATEWAY_KEY.as_bytes()[0], None);
        *hub.record.lock().unwrap() = Some(own.clone());
        let fleet = Arc::new(FakeFleet {
            view: Mutex::new(FleetView {
                fleet_cidr: "100.96.0.0/12".parse().unwrap(),
                clusters: vec![own],
                records: Vec::new(),
                relays: vec![RelayRecord {
                    id: "r1".into(),
                    public_key: fleet_proto::wireguard::PublicKey::from_bytes([9; 32]),
                    endpoint: "203.0.113.10:51820".parse().unwrap(),
                    expires_at: u64::MAX,
                    instance: String::new(),
                }],
                revision: 10,
            }),
            watches: Mutex::new(Vec::new()),
        });
        let (n1, n2) = (Arc::new(FakeNode::default()), Arc::new(FakeNode::default()));
        let spec = |name: &str, ip: &str| NodeSpec {
            name: name.into(),
            socket: format!("/nonexistent/{name}.sock").into(),
            underlay_ip: ip.parse().unwrap(),
            netns: format!("/run/netns/{name}").into(),
        };
        let nodes = vec![
            ClusterNode {
                spec: spec("n1", "198.51.100.11"),
                api: n1.clone(),
            },
            ClusterNode {
                spec: spec("n2", "198.51.100.12"),
                api: n2.clone(),
            },
        ];
        let gateway = Gateway::new(
            GatewayConfig {
                name: cfg.wg_name.clone(),
                listen_port: cfg.listen_port,
                mtu: GATEWAY_MTU,
                backend: None,
                node: "n1".into(),
                holder: cfg.holder.clone(),
            },
            n1.clone(),
        );
        let mut c = Controller {
            plan_cfg: NodePlanConfig {
                cluster: cfg.cluster.clone(),
                gateway_node: cfg.gateway_node.clone(),
                node_prefix: cfg.node_prefix,
                vip_range: cfg.vip_range,
            },
            hub: hub.clone(),
            fleet: fleet.clone(),
            lease: Arc::new(HubLease(hub.clone())),
            cfg,
            nodes,
            gateway,
            kube: None,
            kube_error: None,
            metrics: Default::default(),
            node_tls: None,
        };
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move { c.lead(&mut stopped).await });
        World {
            hub,
            fleet,
            n1,
            n2,
            stop,
            task,
        }
    }

    /// Polls `what` until true, for at most 5 s.
    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn gateway_peers(n: &FakeNode) -> Vec<(String, Vec<String>)> {
        n.gateway
            .lock()
            .unwrap()
            .as_ref()
            .map(|g| {
                g.peers
                    .iter()
                    .map(|p| (p.public_key.to_string(), p.allowed_ips.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn leads_converges_follows_the_fleet_and_a_stop_keeps_the_data_plane() {
        let w = start();
        let relay = fleet_proto::wireguard::PublicKey::from_bytes([9; 32]).to_string();
        // The relay itself as a peer without allowed IPs (its own session with us), and the
        // relay named as such in the request (a new instance resets sessions through it).
        until("the gateway device with the relay as its peer", || {
            gateway_peers(&w.n1) == vec![(relay.clone(), vec![])]
        })
        .await;
        assert_eq!(
            w.n1.gateway
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .relay
                .as_ref()
                .map(|r| r.public_key.to_string()),
            Some(relay.clone())
        );
        assert_eq!(
            w.n1.gateway
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .own_block
                .as_deref(),
            Some("100.96.0.0/20")
        );
        assert!(w.n1.plan.lock().unwrap().is_some() && w.n2.plan.lock().unwrap().is_some());
        assert_eq!(w.hub.holder.lock().unwrap().as_deref(), Some("h1"));

        // bb joins with a public endpoint: a direct peer, and n2 routes bb's block via n1.
        w.fleet.push(RegistryEvent::ClusterUpserted {
            record: cluster("bb", "100.96.16.0/20", 2, Some("198.51.100.2:51820")),
            revision: 11,
        });
        let bb_key = fleet_proto::wireguard::PublicKey::from_bytes([2; 32]).to_string();
        until("bb as a direct peer", || {
            gateway_peers(&w.n1).contains(&(bb_key.clone(), vec!["100.96.16.0/20".to_string()]))
        })
        .await;
        until("n2 routes bb's block through the gateway node", || {
            w.n2.peers
                .lock()
                .unwrap()
                .iter()
                .any(|p| p.name == "n1" && p.routed_cidrs.contains(&"100.96.16.0/20".to_string()))
        })
        .await;
        until("the gateway record published", || {
            w.hub
                .published
                .lock()
                .unwrap()
                .iter()
                .any(|(name, _)| name == "gateway")
        })
        .await;

        w.stop.send(true).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), w.task).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
        assert_eq!(*w.hub.holder.lock().unwrap(), None, "the lease is given up");
        assert!(
            w.n1.gateway.lock().unwrap().is_some(),
            "a stopping controller leaves the device in place"
        );
        assert_eq!(*w.n1.clear_gateway_calls.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn the_cluster_leaving_the_fleet_ends_the_run_and_clears_the_gateway() {
        let w = start();
        until("the gateway device", || {
            w.n1.gateway.lock().unwrap().is_some()
        })
        .await;
        w.fleet.push(RegistryEvent::ClusterRemoved {
            id: ClusterId::new("aa").unwrap(),
            revision: 11,
        });
        let result = tokio::time::timeout(Duration::from_secs(5), w.task).await;
        assert!(
            matches!(result, Ok(Ok(Err(ControllerError::Removed { .. })))),
            "{result:?}"
        );
        assert!(
            w.n1.gateway.lock().unwrap().is_none(),
            "the device is cleared"
        );
        assert_eq!(*w.n1.clear_gateway_calls.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_standby_waits_while_another_replica_holds_the_lease() {
        let hub = Arc::new(FakeHub::default());
        *hub.holder.lock().unwrap() = Some("other".into());
        let w = start_with_hub(hub.clone());
        // Absence needs a window: several lease asks (every ttl/6 = 100 ms) go by.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            w.n1.gateway.lock().unwrap().is_none(),
            "a standby programs nothing"
        );
        assert!(w.n1.plan.lock().unwrap().is_none());
        // The holder lets go: the standby takes over.
        *hub.holder.lock().unwrap() = None;
        until("the standby becomes active", || {
            w.n1.gateway.lock().unwrap().is_some()
        })
        .await;
        assert_eq!(hub.holder.lock().unwrap().as_deref(), Some("h1"));
        w.stop.send(true).unwrap();
        let _ = w.task.await;
    }
}

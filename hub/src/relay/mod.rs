//! The hub's relay: a UDP forwarder of WireGuard datagrams between member gateways that have
//! no direct tunnel (the default: members behind NAT). It forwards ciphertext; it cannot read
//! it.
//!
//! ```text
//! member A gateway (peer B: B's key, allowed IPs = B's block, endpoint = the relay)
//!   --UDP, WireGuard encrypted for B's key--> hub :<relay port> (one UDP socket, any number of
//!   members) -> forward::Forwarder picks B by mac1 (initiations) or by receiver index (the
//!   rest) -> the same datagram, unchanged, to B's mapped (NAT) address -> B decrypts
//! ```
//! Member gateways are WireGuard peers of each other end to end; the relay only moves their
//! datagrams (see [`forward`] for how it decides), so kernel-WireGuard gateways work the same.
//! Each member also keeps one peer for the relay itself (the relay's key, no allowed IPs,
//! persistent keepalive): the relay's own session with each member authenticates the
//! member's mapped address and follows it when it roams. The relay's key opens only those
//! keepalives: a compromised hub reads no member traffic.
//!
//! The relay follows the hub's API (list + watch with the admin credential), so joins, key
//! changes and removals reach the forwarder within one event, and it publishes its
//! [`RelayRecord`] (key, endpoint and an instance id new at every start) there and renews it
//! every TTL/3 (`--relay-ttl`, default 6 s): every serving replica sweeps records past their
//! expiry, so a relay that died with its host leaves members' views within TTL + one sweep
//! interval. A member whose controller sees the instance change resets its sessions with the
//! relay and with every relayed peer, so both sides register with the new relay and do fresh
//! handshakes through it at once (a restarted relay has no addresses and no indices).
//!
//! It runs as its own process (`fleet-hub relay`, see [`process`]): `fleet-hub serve
//! --relay-listen` starts one and stops it on SIGTERM, but a killed API process leaves it
//! running — relayed traffic keeps flowing while the registry is away, and the restarted hub
//! adopts it. While the API is unreachable the forwarder keeps its last members.

pub mod batch;
pub mod forward;
pub mod metrics;
pub mod process;
pub mod udp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_gateway::PrivateKey;
use tokio::sync::watch;

use crate::registry::{ClusterRecord, RelayRecord};
use fleet_hub_api::client::{HubClient, HubError};
use fleet_hub_api::mirror::{FleetMirror, WatcherConfig};
use forward::{Action, Forwarder, MemberSpec};

/// Receive and send buffer asked for on the relay's UDP socket (the kernel reports twice
/// that): 4 × a gateway's ([`fleet_gateway::userspace::UDP_BUFFER_BYTES`]), since one socket
/// carries every relayed member's datagrams. Set with `SO_RCVBUFFORCE` when the relay may
/// (root or `CAP_NET_ADMIN`), else capped by `net.core.rmem_max`, and logged.
pub const RELAY_UDP_BUFFER_BYTES: usize = 4 << 20;
/// The relay's private key in the hub's data dir (0600, kept across restarts).
pub const RELAY_KEY_FILE: &str = "relay.key";
/// How long a relay record lives without renewal unless told otherwise (`--relay-ttl`); the
/// relay renews it every third of that.
pub const DEFAULT_RELAY_TTL: Duration = Duration::from_secs(6);
/// The shortest `--relay-ttl` accepted.
pub const MIN_RELAY_TTL: Duration = Duration::from_millis(300);
/// How often the relay's own sessions' timers run and expired index entries go.
const TICK: Duration = Duration::from_secs(1);
/// The longest the forwarding thread waits in a receive before it checks for a stop and its
/// timers.
const WAKE: Duration = Duration::from_millis(200);

/// Parses `<n>ms` or `<n>s` (a positive duration of at most an hour).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("invalid duration {text:?}: use e.g. 1s or 500ms");
    let d = if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else if let Some(s) = text.strip_suffix('s') {
        Duration::from_secs(s.parse().map_err(|_| bad())?)
    } else {
        return Err(bad());
    };
    if d.is_zero() || d > crate::registry::MAX_RELAY_TTL {
        return Err(bad());
    }
    Ok(d)
}

/// Parses a relay TTL: `<n>ms` or `<n>s`, between [`MIN_RELAY_TTL`] and an hour.
pub fn parse_relay_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let ttl = parse_interval(text)
        .map_err(|_| format!("invalid relay TTL {text:?}: use e.g. 6s or 1500ms"))?;
    if ttl < MIN_RELAY_TTL || ttl > crate::registry::MAX_RELAY_TTL {
        return Err(format!(
            "invalid relay TTL {text:?}: it must be between {} ms and an hour",
            MIN_RELAY_TTL.as_millis()
        ));
    }
    Ok(ttl)
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay key: {0}")]
    Key(#[from] fleet_gateway::KeyError),
    #[error(
        "relay: cannot listen on UDP {addr}: {source}; is another relay or WireGuard device on that port?"
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("relay: the hub API: {0}")]
    Hub(#[from] HubError),
    #[error("relay: {0}")]
    Process(String),
}

/// How the relay runs (`fleet-hub serve --relay-*`).
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The relay's UDP socket (in the netns the relay process runs in).
    pub listen: SocketAddr,
    /// What members dial.
    pub endpoint: SocketAddr,
    /// Where the relay's private key is kept.
    pub key_path: PathBuf,
    /// The lifetime of its record at the hub; renewed every third of it.
    pub ttl: Duration,
    /// Serve the relay's Prometheus metrics here (`--relay-metrics-address`); `None`: not.
    pub metrics_address: Option<SocketAddr>,
}

impl RelayOptions {
    pub fn new(listen: SocketAddr, data_dir: &Path) -> Self {
        RelayOptions {
            listen,
            endpoint: listen,
            key_path: data_dir.join(RELAY_KEY_FILE),
            ttl: DEFAULT_RELAY_TTL,
            metrics_address: None,
        }
    }
}

/// The relay's members for these clusters: every cluster, by id (a key claimed by two
/// clusters goes to the first by id).
pub fn relay_members<'a>(clusters: impl IntoIterator<Item = &'a ClusterRecord>) -> Vec<MemberSpec> {
    clusters
        .into_iter()
        .map(|c| MemberSpec {
            id: c.id.to_string(),
            public_key: *c.public_key.as_bytes(),
        })
        .collect()
}

/// A new instance id: 8 random bytes in hex.
fn new_instance() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The forwarder, shared by the socket loop, the follower and the metrics.
pub type SharedForwarder = Arc<Mutex<Forwarder>>;

/// A running relay; [`Relay::stop`] takes it down.
pub struct Relay {
    forwarder: SharedForwarder,
    record: RelayRecord,
    client: HubClient,
    stop: watch::Sender<bool>,
    follower: tokio::task::JoinHandle<()>,
    renewer: tokio::task::JoinHandle<()>,
    forwarding: std::thread::JoinHandle<()>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the relay's UDP socket and starts following the hub through `client` (admin
    /// credential): members from its clusters, its record published there. The hub may be
    /// down at first; the relay keeps trying.
    pub async fn start(client: HubClient, options: RelayOptions) -> Result<Relay, RelayError> {
        let key = PrivateKey::load_or_generate(&options.key_path)?;
        let listen_error = |source| RelayError::Listen {
            addr: options.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(options.listen).map_err(listen_error)?;
        // The kernel's default 208 KiB overflowed while the relay forwarded one tunnel's
        // bursts (16-42 k receive-buffer drops per 5 s `cross-cluster-throughput` run, seen as
        // TCP retransmits inside the tunnel); every member's traffic shares this one socket.
        let (rcv, snd) = fleet_gateway::userspace::grow_buffers(&socket, RELAY_UDP_BUFFER_BYTES);
        let socket = udp::RelaySocket::new(socket, WAKE).map_err(listen_error)?;
        tracing::debug!(rcv, snd, gro = socket.gro(), "relay UDP socket");
        let socket = Arc::new(socket);
        let forwarder = Arc::new(Mutex::new(Forwarder::new(*key.as_bytes())));
        drop(key);
        let public_key = crate::registry::PublicKey::from_bytes(
            forwarder.lock().expect("forwarder").public_key(),
        );
        let record = RelayRecord {
            id: RelayRecord::id_for(&public_key),
            public_key,
            endpoint: options.endpoint,
            expires_at: 0,
            instance: new_instance(),
        };
        tracing::info!(relay = %record.id, instance = %record.instance, listen = %options.listen, endpoint = %record.endpoint, public_key = %record.public_key, "relay up (forwarding WireGuard datagrams between members)");
        let metrics_server = match options.metrics_address {
            Some(addr) => {
                let metrics = metrics::RelayMetrics::new(forwarder.clone(), socket.clone());
                let mut registry = prometheus_client::registry::Registry::default();
                fleet_metrics::register_build_info(
                    &mut registry,
                    "fleet-hub-relay",
                    env!("CARGO_PKG_VERSION"),
                );
                registry.register_collector(Box::new(metrics));
                match fleet_metrics::serve_with_refresh(addr, Arc::new(registry), None).await {
                    Ok((_, task)) => Some(task),
                    Err(e) => return Err(RelayError::Process(e.to_string())),
                }
            }
            None => None,
        };
        let (stop, stopped) = watch::channel(false);
        let forwarding = {
            let (forwarder, stopped) = (forwarder.clone(), stopped.clone());
            std::thread::Builder::new()
                .name("relay-forward".into())
                .spawn(move || forward_loop(&socket, &forwarder, &stopped))
                .map_err(|e| RelayError::Process(format!("starting the forwarding thread: {e}")))?
        };
        let follower = tokio::spawn(follow(client.clone(), forwarder.clone(), stopped.clone()));
        let renewer = tokio::spawn(renew(client.clone(), record.clone(), options.ttl, stopped));
        Ok(Relay {
            forwarder,
            record,
            client,
            stop,
            follower,
            renewer,
            forwarding,
            metrics_server,
        })
    }

    pub fn record(&self) -> &RelayRecord {
        &self.record
    }

    pub fn forwarder(&self) -> &SharedForwarder {
        &self.forwarder
    }

    /// Stops following, withdraws the relay record (members drop this relay; skipped after
    /// 5 s when the hub is away), closes the socket.
    pub async fn stop(self) {
        if let Some(task) = &self.metrics_server {
            task.abort();
        }
        let _ = self.stop.send(true);
        let _ = self.follower.await;
        // No renewal after this point: the withdrawal below is final.
        let _ = self.renewer.await;
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.client.remove_relay(&self.record.id),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(relay = %self.record.id, error = %e, "could not withdraw the relay record")
            }
            Err(_) => {
                tracing::warn!(relay = %self.record.id, "the hub did not answer; the relay record stays")
            }
        }
        let forwarding = self.forwarding;
        let _ = tokio::task::spawn_blocking(move || forwarding.join()).await;
        tracing::info!(relay = %self.record.id, "relay stopped");
    }
}

/// The forwarding thread: takes every datagram on the relay's socket in batches
/// ([`udp::RelaySocket::recv_batch`]), decides each one's fate with the forwarder (locked once
/// per batch), sends the forwarded ones in GSO runs per destination ([`batch::plan`]), and
/// runs the forwarder's timers every [`TICK`]. Its own thread with a blocking socket: one
/// `recvmmsg` per batch, no readiness wake-ups; it checks for a stop every [`WAKE`].
fn forward_loop(
    socket: &udp::RelaySocket,
    forwarder: &SharedForwarder,
    stopped: &watch::Receiver<bool>,
) {
    let mut batch = Batch::default();
    let mut next_tick = Instant::now() + TICK;
    // The sender gone (the relay dropped without `stop`) ends the thread too.
    while !*stopped.borrow() && stopped.has_changed().is_ok() {
        let received = match socket.recv_batch(&mut batch.bufs) {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors surface here (a member's port closed): not fatal.
                tracing::debug!(error = %e, "relay socket receive");
                0
            }
        };
        let now = Instant::now();
        if received > 0 {
            batch.forward(socket, forwarder, now);
        }
        if now >= next_tick {
            next_tick = now + TICK;
            let out = forwarder.lock().expect("forwarder").tick(now);
            for (addr, datagram) in out {
                socket.send_to(&datagram, addr);
            }
        }
    }
}

/// The forwarding thread's buffers, allocated once.
#[derive(Default)]
struct Batch {
    bufs: udp::RecvBuffers,
    scratch: udp::SendScratch,
    /// Per forwarded datagram: its receive buffer and its bytes there.
    forwarded: Vec<(usize, std::ops::Range<usize>)>,
    /// Per forwarded datagram: its length and destination.
    routes: Vec<(usize, SocketAddr)>,
    replies: Vec<(SocketAddr, Vec<u8>)>,
}

impl Batch {
    /// Does what the forwarder decides for every datagram of the last receive: forwarded ones
    /// leave in GSO runs per destination, the relay's own replies one by one.
    fn forward(&mut self, socket: &udp::RelaySocket, forwarder: &SharedForwarder, now: Instant) {
        let Batch {
            bufs,
            scratch,
            forwarded,
            routes,
            replies,
        } = self;
        forwarded.clear();
        routes.clear();
        {
            let mut f = forwarder.lock().expect("forwarder");
            for (i, r) in bufs.received().iter().enumerate() {
                let bytes = bufs.bytes(i);
                // A GRO buffer is one source's run: every datagram is routed on its own.
                for d in batch::datagrams(r.len, r.stride) {
                    match f.handle(r.src, &bytes[d.clone()], now) {
                        Action::Forward(to) => {
                            routes.push((d.len(), to));
                            forwarded.push((i, d));
                        }
                        Action::Reply(out) => replies.extend(out.into_iter().map(|o| (r.src, o))),
                        Action::Consumed | Action::Drop(_) => {}
                    }
                }
            }
        }
        let (order, runs) = batch::plan(routes);
        socket.send_runs(
            &runs,
            &order,
            |k| {
                let (i, d) = &forwarded[k];
                &bufs.bytes(*i)[d.clone()]
            },
            scratch,
        );
        for (to, reply) in replies.drain(..) {
            socket.send_to(&reply, to);
        }
    }
}

/// Publishes the relay's record at once and renews it every `ttl`/3 until stopped. A failed
/// renewal (the hub API away) is retried every `ttl`/3 too, each call bounded by `ttl`/3 so a
/// hanging hub cannot delay the next; meanwhile the relay keeps relaying. If the record
/// expired meanwhile (another replica swept it), the next renewal publishes it again.
async fn renew(
    client: HubClient,
    record: RelayRecord,
    ttl: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let every = ttl / 3;
    let mut failing = false;
    let mut published = false;
    loop {
        let outcome = tokio::select! {
            _ = stopped.changed() => return,
            outcome = tokio::time::timeout(every, client.publish_relay(&record, ttl)) => outcome,
        };
        match outcome {
            Ok(Ok(revision)) => {
                if !published || failing {
                    tracing::info!(relay = %record.id, revision, ttl_ms = ttl.as_millis() as u64, "relay record published");
                }
                published = true;
                failing = false;
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(relay = %record.id, error = %e, "could not renew the relay record; retrying (the relay keeps relaying)");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!(relay = %record.id, timeout_ms = every.as_millis() as u64, "the hub did not answer a relay renewal; retrying (the relay keeps relaying)");
            }
            Ok(Err(e)) => {
                tracing::debug!(relay = %record.id, error = %e, "relay renewal failed again")
            }
            Err(_) => tracing::debug!(relay = %record.id, "relay renewal timed out again"),
        }
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Keeps the forwarder's members equal to the hub's clusters, read from the fleet mirror
/// (which lists, watches, relists after the history is gone and rides out hub restarts and
/// fail-overs; meanwhile the forwarder keeps its members).
async fn follow(client: HubClient, forwarder: SharedForwarder, mut stopped: watch::Receiver<bool>) {
    let mirror = FleetMirror::spawn(Arc::new(client), WatcherConfig::default());
    let mut reader = mirror.reader();
    let mut applied: Option<Vec<MemberSpec>> = None;
    let mut last_error: Option<String> = None;
    loop {
        let state = reader.mark_seen();
        let error = state.error.as_ref().map(ToString::to_string);
        if error.is_some() && error != last_error {
            tracing::warn!(reason = ?error, "relay lost the hub; following it again");
        }
        last_error = error;
        if let Some(fleet) = state.fleet {
            let members = relay_members(fleet.clusters.values());
            if applied.as_ref() != Some(&members) {
                forwarder.lock().expect("forwarder").set_members(&members);
                tracing::debug!(members = members.len(), "relay members set");
                applied = Some(members);
            }
        }
        tokio::select! {
            _ = stopped.changed() => return,
            changed = reader.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_ttls_parse_in_ms_or_s_within_bounds() {
        assert_eq!(parse_relay_ttl("6s"), Ok(Duration::from_secs(6)));
        assert_eq!(parse_relay_ttl("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_relay_ttl("300ms"), Ok(MIN_RELAY_TTL));
        for bad in ["", "6", "s", "-1s", "1.5s", "299ms", "0s", "3601s", "6m"] {
            assert!(parse_relay_ttl(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_interval("0ms").is_err());
    }

    use forward::tests::{End, ipv4_packet, out};
    use gotatun::noise::TunnResult;
    use gotatun::x25519;
    use std::net::UdpSocket as StdSocket;

    /// A member gateway on a loopback socket, its WireGuard sessions made by hand.
    struct Gw {
        secret: x25519::StaticSecret,
        key: [u8; 32],
        socket: StdSocket,
    }

    impl Gw {
        fn new() -> Gw {
            let secret = x25519::StaticSecret::random();
            let socket = StdSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            Gw {
                key: *x25519::PublicKey::from(&secret).as_bytes(),
                secret,
                socket,
            }
        }

        /// The next datagram from the relay.
        fn recv(&self, relay: SocketAddr) -> Vec<u8> {
            let mut buf = [0u8; 2048];
            let (n, from) = self
                .socket
                .recv_from(&mut buf)
                .expect("a datagram within 5 s");
            assert_eq!(from, relay);
            buf[..n].to_vec()
        }
    }

    /// A relay socket on loopback and its forwarder with these members.
    fn relay_on_loopback(members: &[(&str, &Gw)]) -> (Arc<udp::RelaySocket>, SharedForwarder) {
        let forwarder: SharedForwarder = Arc::new(Mutex::new(Forwarder::new(
            x25519::StaticSecret::random().to_bytes(),
        )));
        let specs: Vec<MemberSpec> = members
            .iter()
            .map(|(id, g)| MemberSpec {
                id: (*id).into(),
                public_key: g.key,
            })
            .collect();
        forwarder.lock().unwrap().set_members(&specs);
        let socket = StdSocket::bind("127.0.0.1:0").unwrap();
        (
            Arc::new(udp::RelaySocket::new(socket, WAKE).unwrap()),
            forwarder,
        )
    }

    /// `g` registers with the relay (initiation, the relay's response, a keepalive); `step`
    /// lets the relay take what was sent (nothing when its thread runs).
    fn register(g: &Gw, relay_key: [u8; 32], relay: SocketAddr, step: &mut dyn FnMut()) {
        let mut session = End::new(&g.secret, relay_key);
        g.socket.send_to(&session.initiation(), relay).unwrap();
        step();
        let keepalive = out(session.receive(&g.recv(relay)));
        g.socket.send_to(&keepalive, relay).unwrap();
        step();
    }

    /// `a` and `b` do a handshake through the relay: their two ends of the session.
    fn handshake(a: &Gw, b: &Gw, relay: SocketAddr, step: &mut dyn FnMut()) -> (End, End) {
        let mut a_end = End::new(&a.secret, b.key);
        let mut b_end = End::new(&b.secret, a.key);
        a.socket.send_to(&a_end.initiation(), relay).unwrap();
        step();
        let response = out(b_end.receive(&b.recv(relay)));
        b.socket.send_to(&response, relay).unwrap();
        step();
        let confirm = out(a_end.receive(&a.recv(relay)));
        a.socket.send_to(&confirm, relay).unwrap();
        step();
        assert!(
            matches!(b_end.receive(&b.recv(relay)), TunnResult::WriteToTunnel(p) if p.is_empty())
        );
        (a_end, b_end)
    }

    /// The forwarding thread over real sockets on loopback: gateway aa sends one UDP GSO
    /// buffer holding data for two sessions (to bb and to cc) and one datagram with an index
    /// no handshake taught; the relay takes it as one GRO buffer, routes every datagram on
    /// its own and forwards each member's share as a GSO run: bb and cc receive exactly
    /// their datagrams, in order, and the counters count each datagram.
    #[test]
    fn a_gro_buffer_is_routed_per_datagram_and_forwarded_in_gso_runs() {
        use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;

        let (aa, bb, cc) = (Gw::new(), Gw::new(), Gw::new());
        let (socket, forwarder) = relay_on_loopback(&[("aa", &aa), ("bb", &bb), ("cc", &cc)]);
        let relay_key = forwarder.lock().unwrap().public_key();
        let relay = socket.socket().local_addr().unwrap();
        assert!(socket.gro(), "this kernel has UDP GRO");
        let (stop, stopped) = watch::channel(false);
        let thread = {
            let (socket, forwarder) = (socket.clone(), forwarder.clone());
            std::thread::spawn(move || forward_loop(&socket, &forwarder, &stopped))
        };
        // The relay takes datagrams in order: each registration comes before what follows.
        for g in [&aa, &bb, &cc] {
            register(g, relay_key, relay, &mut || {});
        }
        let mut sessions = [
            handshake(&aa, &bb, relay, &mut || {}),
            handshake(&aa, &cc, relay, &mut || {}),
        ];

        // One GSO send from aa: 12 same-sized datagrams, alternately for bb and cc, and one
        // (the 7th) whose receiver index no handshake taught.
        let mut datagrams = Vec::new();
        let mut expected: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        for i in 0..12u8 {
            let inner = ipv4_packet(&[i; 100]);
            let to = usize::from(i % 2);
            let mut d = sessions[to].0.send(&inner);
            if i == 6 {
                d[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
            } else {
                expected[to].push(d.clone());
            }
            datagrams.push(d);
        }
        let segment = datagrams[0].len() as u16;
        assert!(datagrams.iter().all(|d| d.len() == usize::from(segment)));
        let iov: Vec<IoSlice<'_>> = datagrams.iter().map(|d| IoSlice::new(d)).collect();
        sendmsg(
            aa.socket.as_raw_fd(),
            &iov,
            &[ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            Some(&SockaddrStorage::from(relay)),
        )
        .expect("a UDP GSO send on loopback");
        for (k, peer) in [&bb, &cc].into_iter().enumerate() {
            let got: Vec<Vec<u8>> = (0..expected[k].len()).map(|_| peer.recv(relay)).collect();
            assert_eq!(got, expected[k], "member {k}: the same datagrams, in order");
            for (d, i) in got.iter().zip((k as u8..12).step_by(2).filter(|i| *i != 6)) {
                match sessions[k].1.receive(d) {
                    TunnResult::WriteToTunnel(p) => {
                        assert_eq!(&p[..], &ipv4_packet(&[i; 100])[..])
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        let totals = forwarder.lock().unwrap().totals().clone();
        // 2 initiations, 2 responses, 2 confirmations + 11 data.
        assert_eq!(totals.forwarded, [2, 2, 0, 13]);
        assert_eq!(
            totals.dropped.get(&forward::DropReason::UnknownIndex),
            Some(&1)
        );
        // Bytes per member count each forwarded datagram (the GRO buffer held 12 x segment).
        let members: std::collections::HashMap<String, forward::MemberCounters> = forwarder
            .lock()
            .unwrap()
            .members()
            .into_iter()
            .map(|m| (m.id, m.counters))
            .collect();
        let data_bytes = |n: u64| n * u64::from(segment);
        // An initiation and a confirmation each, then the data: 5 to bb (one was the
        // stranger), 6 to cc.
        assert_eq!(members["bb"].tx_datagrams, 2 + 5);
        assert_eq!(members["cc"].tx_datagrams, 2 + 6);
        assert_eq!(members["aa"].rx_datagrams, 2 * 2 + 11);
        assert_eq!(
            members["bb"].tx_bytes + members["cc"].tx_bytes,
            members["aa"].rx_bytes,
            "what left aa arrived at bb and cc"
        );
        assert!(members["bb"].tx_bytes >= data_bytes(5));
        assert!(members["cc"].tx_bytes >= data_bytes(6));
        let io = &socket.counters;
        assert_eq!(
            io.gro_datagrams.load(std::sync::atomic::Ordering::Relaxed),
            12,
            "one GRO buffer of 12"
        );
        assert_eq!(
            io.gso_datagrams.load(std::sync::atomic::Ordering::Relaxed),
            11,
            "two GSO runs, 5 to bb and 6 to cc"
        );

        stop.send(true).unwrap();
        thread.join().unwrap();
    }

    /// A path whose MTU is below the datagrams (here: loopback at 1280 in a network namespace
    /// of the test's own; a 1400-byte internet link in `e2e/tests/path_mtu.rs`): the kernel
    /// refuses a GSO run (EINVAL), so the run leaves datagram by datagram, each fragmented
    /// as before batching; the receiver gets every datagram whole and in order, and the next
    /// run to that member is not tried as GSO again (one send call, not a failed one first).
    /// Needs root.
    #[test]
    fn runs_above_the_path_mtu_leave_datagram_by_datagram() {
        use std::sync::atomic::Ordering::Relaxed;
        std::thread::spawn(|| {
            // Only this thread (and what it starts) enters the new netns; it ends with it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a network namespace of the test's own (run as root)");
            let ip = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up", "mtu", "1280"])
                .status()
                .expect("ip");
            assert!(ip.success(), "ip link set lo up mtu 1280");

            let (aa, bb) = (Gw::new(), Gw::new());
            let (socket, forwarder) = relay_on_loopback(&[("aa", &aa), ("bb", &bb)]);
            let relay_key = forwarder.lock().unwrap().public_key();
            let relay = socket.socket().local_addr().unwrap();
            // No thread: each step takes whatever is queued, so a run is certain.
            let mut batch = Batch::default();
            let mut step = || {
                assert!(socket.recv_batch(&mut batch.bufs).unwrap() > 0);
                batch.forward(&socket, &forwarder, Instant::now());
            };
            register(&aa, relay_key, relay, &mut step);
            register(&bb, relay_key, relay, &mut step);
            let (mut ab, mut ba) = handshake(&aa, &bb, relay, &mut step);
            for round in 0..2u8 {
                let inner: Vec<Vec<u8>> = (0..10u8)
                    .map(|i| ipv4_packet(&[round * 10 + i; 1400]))
                    .collect();
                let sent: Vec<Vec<u8>> = inner.iter().map(|p| ab.send(p)).collect();
                assert!(sent[0].len() + 28 > 1280, "datagrams above the path MTU");
                for d in &sent {
                    aa.socket.send_to(d, relay).unwrap();
                }
                let calls = socket.counters.send_calls.load(Relaxed);
                step();
                let calls = socket.counters.send_calls.load(Relaxed) - calls;
                for (d, p) in sent.iter().zip(&inner) {
                    let got = bb.recv(relay);
                    assert_eq!(&got, d, "round {round}: whole and in order");
                    match ba.receive(&got) {
                        TunnResult::WriteToTunnel(q) => assert_eq!(&q[..], &p[..]),
                        other => panic!("{other:?}"),
                    }
                }
                // Round 0: the refused GSO call, then 10 single sends; round 1: one sendmmsg.
                assert_eq!(calls, if round == 0 { 11 } else { 1 }, "round {round}");
            }
            assert_eq!(socket.counters.gso_datagrams.load(Relaxed), 0);
            assert_eq!(forwarder.lock().unwrap().totals().forwarded[3], 1 + 20);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn instances_differ_per_start() {
        let (a, b) = (new_instance(), new_instance());
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}

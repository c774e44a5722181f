//! Userspace WireGuard: gotatun in-process, on a TUN device inside the device's netns.
//!
//! Each device owns one OS thread that enters the netns (so the TUN device and its netlink
//! socket live there), then moves to the underlay netns (`DeviceConfig::underlay_netns`, the
//! same netns when unset) where gotatun binds the encrypted UDP socket, and runs the device's
//! tokio runtime: 2 worker threads by default, started in the underlay netns
//! ([`device_threads_from_env`]; gateway/README.md, "Threads per device"). The rest of the
//! process talks to it over a
//! command channel. It serves the standard UAPI socket `/var/run/wireguard/<name>.sock`, so
//! `wg show <name>` works from any netns.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use gotatun::device::uapi::UapiServer;
use gotatun::device::{Device, DeviceBuilder};
use gotatun::udp::socket::{UdpSocket, UdpSocketFactory};
use gotatun::udp::{UdpTransportFactory, UdpTransportFactoryParams};
use gotatun::x25519;
use nix::sched::{CloneFlags, setns};
use tokio::sync::{mpsc, oneshot};

use crate::offload_tun::{Offloads, TunRecv, TunSend, open_tun};
use crate::udp_gso::GsoUdp;
use crate::{
    BackendKind, DeviceConfig, GatewayError, Peer, PeerStats, PublicKey, Result, WireguardDevice,
    check_peers, link, routed_prefixes,
};

/// Where gotatun (and wireguard-go, and `wg`) put UAPI sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";

pub fn uapi_socket(name: &str) -> PathBuf {
    PathBuf::from(UAPI_DIR).join(format!("{name}.sock"))
}

enum Command {
    SetPeers(Vec<Peer>, oneshot::Sender<Result<()>>),
    Stats(oneshot::Sender<Result<Vec<PeerStats>>>),
    Stop(oneshot::Sender<Result<()>>),
}

/// A running userspace device. Dropping it stops the device thread (the TUN device, and with
/// it the routes, go away when the thread closes it); [`WireguardDevice::delete`] waits for that.
#[derive(Debug)]
pub struct UserspaceDevice {
    name: String,
    public_key: PublicKey,
    listen_port: u16,
    commands: mpsc::Sender<Command>,
}

impl UserspaceDevice {
    pub async fn create(config: DeviceConfig) -> Result<Self> {
        config.validate()?;
        // Both netns are opened here, so a missing one is reported before anything is made.
        let netns = fleet_core::netns::open(&config.netns)?;
        let underlay = match &config.underlay_netns {
            Some(path) => Some(fleet_core::netns::open(path)?),
            None => None,
        };
        let name = config.name.clone();
        let public_key = config.private_key.public_key();
        let listen_port = config.listen_port;
        let (commands, rx) = mpsc::channel(16);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_err = |reason: String| GatewayError::Userspace {
            name: name.clone(),
            op: "start the device thread".into(),
            reason,
        };
        std::thread::Builder::new()
            .name(format!("wg-{name}"))
            .spawn(move || {
                let setup = match Setup::in_netns(&config, netns, underlay) {
                    Ok(setup) => setup,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let Setup { rt, h, builder } = setup;
                rt.block_on(run(config, h, builder, ready_tx, rx));
            })
            .map_err(|e| thread_err(e.to_string()))?;
        ready_rx
            .await
            .map_err(|_| thread_err("the thread exited before the device was up".into()))??;
        tracing::info!(device = %name, port = listen_port, %public_key, "userspace WireGuard device up");
        Ok(Self {
            name,
            public_key,
            listen_port,
            commands,
        })
    }

    async fn call<T>(&self, cmd: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let gone = || GatewayError::DeviceGone {
            name: self.name.clone(),
        };
        let (tx, rx) = oneshot::channel();
        self.commands.send(cmd(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

#[async_trait::async_trait]
impl WireguardDevice for UserspaceDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> BackendKind {
        BackendKind::Userspace
    }
    fn public_key(&self) -> PublicKey {
        self.public_key
    }
    fn listen_port(&self) -> u16 {
        self.listen_port
    }
    async fn set_peers(&self, peers: &[Peer]) -> Result<()> {
        check_peers(&self.name, peers)?;
        self.call(|tx| Command::SetPeers(peers.to_vec(), tx)).await
    }
    async fn stats(&self) -> Result<Vec<PeerStats>> {
        self.call(Command::Stats).await
    }
    async fn delete(&self) -> Result<()> {
        match self.call(Command::Stop).await {
            Err(GatewayError::DeviceGone { .. }) => Ok(()),
            other => other,
        }
    }
}

impl Drop for UserspaceDevice {
    fn drop(&mut self) {
        // The thread stops on its own once the channel closes, but the process may exit
        // before it gets there: do not leave a dead UAPI socket behind.
        if !self.commands.is_closed() {
            let _ = std::fs::remove_file(uapi_socket(&self.name));
        }
    }
}

type GotaDevice = Device<(BufferedUdp, TunSend, TunRecv)>;
type GotaBuilder = DeviceBuilder<BufferedUdp, TunSend, TunRecv>;

/// Receive and send buffer asked for on the device's UDP socket (the kernel reports twice
/// that). The kernel default (208 KiB, `net.core.rmem_default`) overflows while the single
/// device thread is busy with a burst from the TUN side: datagrams that already cost the
/// peers' crypto are dropped (`UdpRcvbufErrors`) and TCP inside the tunnel retransmits them.
/// 1 MiB removed every such drop in the cross-cluster bench (three devices on 2 cores); 8 MiB
/// did too, but in its one run ours was slower (longer queues, we think). See README.md.
pub const UDP_BUFFER_BYTES: usize = 1 << 20;

/// gotatun's UDP socket factory, plus socket buffers of [`UDP_BUFFER_BYTES`] set after each
/// bind: with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (root, or `CAP_NET_ADMIN`), which are not
/// capped by `net.core.rmem_max`/`wmem_max`; else with `SO_RCVBUF`/`SO_SNDBUF` (capped). No
/// host sysctl is changed. A buffer that cannot be set is logged, not fatal: the tunnel works
/// with the default, only slower under load.
/// Sends with UDP GSO when `offloads.gso` is set (`crate::udp_gso`); receives with UDP GRO
/// (gotatun's default) unless `offloads.gro` is unset.
#[derive(Debug)]
pub struct BufferedUdp {
    inner: UdpSocketFactory,
    offloads: Offloads,
}

impl BufferedUdp {
    pub fn new(offloads: Offloads) -> Self {
        BufferedUdp {
            inner: UdpSocketFactory::default(),
            offloads,
        }
    }
}

impl UdpTransportFactory for BufferedUdp {
    type Send = GsoUdp;
    type Recv = UdpSocket;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> std::io::Result<(GsoUdp, UdpSocket)> {
        let (send, recv) = self.inner.bind(params).await?;
        let send = GsoUdp::new(send, self.offloads.gso);
        // `send` and `recv` are clones of one socket.
        grow_buffers(&send, UDP_BUFFER_BYTES);
        allow_fragmentation(&send);
        if !self.offloads.gro
            && let Err(e) = nix::sys::socket::setsockopt(
                &send.as_fd(),
                nix::sys::socket::sockopt::UdpGroSegment,
                &false,
            )
        {
            tracing::warn!(error = %e, "cannot turn UDP GRO off on the WireGuard socket");
        }
        Ok((send, recv))
    }
}

/// Sends the encrypted IPv4 datagrams without the don't-fragment bit (`IP_PMTUDISC_DONT`), as
/// kernel WireGuard does: a datagram larger than some hop's MTU on the way (the inner packet
/// plus 60 bytes of IPv4, UDP and WireGuard overhead) is fragmented by that router instead of
/// dropped — dropped silently, when the router's "fragmentation needed" is filtered, which
/// would black-hole TCP inside the tunnel (`e2e/tests/path_mtu.rs`). The socket is dual-stack
/// (`::`); the IPv4 option applies to its IPv4 traffic. IPv6 routers never fragment: IPv6
/// keeps the kernel's path MTU discovery. A failure is logged, not fatal.
pub fn allow_fragmentation(socket: &impl AsFd) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_fd().as_raw_fd();
    let value: nix::libc::c_int = nix::libc::IP_PMTUDISC_DONT;
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd,
            nix::libc::IPPROTO_IP,
            nix::libc::IP_MTU_DISCOVER,
            (&value as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot clear don't-fragment on the WireGuard UDP socket");
    }
}

/// Sets both buffers of `socket` to `bytes` (the kernel doubles the value for its
/// bookkeeping) and returns what the kernel reports afterwards, (receive, send).
pub fn grow_buffers(socket: &impl AsFd, bytes: usize) -> (usize, usize) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let fd = socket.as_fd();
    if let Err(forced) = setsockopt(&fd, sockopt::RcvBufForce, &bytes)
        && let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &bytes)
    {
        tracing::warn!(%forced, error = %e, bytes, "cannot grow the WireGuard UDP receive buffer");
    }
    if let Err(forced) = setsockopt(&fd, sockopt::SndBufForce, &bytes)
        && let Err(e) = setsockopt(&fd, sockopt::SndBuf, &bytes)
    {
        tracing::warn!(%forced, error = %e, bytes, "cannot grow the WireGuard UDP send buffer");
    }
    let rcv = getsockopt(&fd, sockopt::RcvBuf).unwrap_or(0);
    let snd = getsockopt(&fd, sockopt::SndBuf).unwrap_or(0);
    tracing::debug!(rcv, snd, "WireGuard UDP socket buffers");
    (rcv, snd)
}

/// Threads that run one userspace device: `FLEET_GATEWAY_THREADS` (1 to 8), else 2 (1 where
/// the process may use only one CPU).
///
/// 1 is a current-thread tokio runtime on the device thread: every task of the device (UDP
/// receive, decryption, TUN writes, TUN reads, encryption, UDP sends) on one OS thread. N > 1
/// is a multi-thread runtime with N workers, which spread those tasks over cores. Why 2:
/// gateway/README.md, "Threads per device". Anything but 1 to 8 is an error naming the
/// variable.
pub fn device_threads_from_env() -> std::result::Result<usize, String> {
    match std::env::var("FLEET_GATEWAY_THREADS") {
        Err(_) => Ok(DEFAULT_THREADS
            .min(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n @ 1..=8) => Ok(n),
            _ => Err(format!(
                "FLEET_GATEWAY_THREADS: {v:?} is not a thread count from 1 to 8"
            )),
        },
    }
}

/// Threads per device unless `FLEET_GATEWAY_THREADS` says otherwise.
pub const DEFAULT_THREADS: usize = 2;

/// What the device thread makes before its runtime runs: the runtime, a netlink handle in
/// `netns` and the TUN device in `netns`; the thread itself is left in the underlay netns.
struct Setup {
    rt: tokio::runtime::Runtime,
    h: rtnetlink::Handle,
    builder: GotaBuilder,
}

impl Setup {
    /// Runs on the device thread. A socket stays in the netns it was opened in, and the TUN
    /// device (like the `tun` crate's control socket, which gotatun's MTU watcher uses by
    /// name) is made in the netns of the thread that opens it: so the netlink socket and the
    /// TUN are opened in `netns`, then the thread moves to the underlay netns, where gotatun
    /// binds its UDP socket once the key is set (and rebinds, should the port change). Nothing
    /// is moved between namespaces afterwards.
    fn in_netns(config: &DeviceConfig, netns: File, underlay: Option<File>) -> Result<Self> {
        let name = &config.name;
        let enter = |file: &File, path: &Path| {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| fail(name, format!("enter netns {}", path.display()), e))
        };
        let threads = device_threads_from_env().map_err(|e| fail(name, "read its threads", e))?;
        let rt = if threads == 1 {
            enter(&netns, &config.netns)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            // The workers start at `build` and stay in the netns of the thread that builds
            // the runtime: build it in the underlay netns, where gotatun binds (and rebinds,
            // on whichever worker) its UDP socket; the TUN is opened in `netns` after.
            match (&underlay, &config.underlay_netns) {
                (Some(file), Some(path)) => enter(file, path)?,
                _ => enter(&netns, &config.netns)?,
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(format!("wg-{name}"))
                .enable_all()
                .build();
            enter(&netns, &config.netns)?;
            rt
        }
        .map_err(|e| fail(name, "build its runtime", e))?;
        drop(netns);
        let (h, builder) = {
            let _in_runtime = rt.enter();
            let (conn, h, _) =
                rtnetlink::new_connection().map_err(|e| fail(name, "open a netlink socket", e))?;
            rt.spawn(conn);
            let offloads = Offloads::from_env().map_err(|e| fail(name, "read its offloads", e))?;
            let mtu = u16::try_from(config.mtu)
                .map_err(|e| fail(name, format!("use MTU {}", config.mtu), e))?;
            let (send, recv) = open_tun(name, mtu, offloads)
                .map_err(|e| fail(name, "create the TUN device", e))?;
            tracing::debug!(device = %name, ?offloads, "TUN device created");
            let builder = DeviceBuilder::new()
                .with_udp(BufferedUdp::new(offloads))
                .with_ip_pair(send, recv);
            (h, builder)
        };
        if let (Some(file), Some(path)) = (&underlay, &config.underlay_netns) {
            // On failure the TUN device is closed with `builder`, which removes its link.
            enter(file, path)?;
        }
        Ok(Self { rt, h, builder })
    }
}

/// The device thread: bring the device up, report, then serve commands until told to stop or
/// every handle is dropped.
async fn run(
    config: DeviceConfig,
    h: rtnetlink::Handle,
    builder: GotaBuilder,
    ready: oneshot::Sender<Result<()>>,
    mut commands: mpsc::Receiver<Command>,
) {
    let device = match start(&config, &h, builder).await {
        Ok(d) => d,
        Err(e) => {
            let _ = link::delete(&h, &config.name).await;
            let _ = std::fs::remove_file(uapi_socket(&config.name));
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        device.stop().await;
        let _ = std::fs::remove_file(uapi_socket(&config.name));
        return;
    }
    let name = config.name.clone();
    let mut stopped = None;
    while let Some(cmd) = commands.recv().await {
        match cmd {
            Command::SetPeers(peers, reply) => {
                let _ = reply.send(set_peers(&device, &h, &name, peers).await);
            }
            Command::Stats(reply) => {
                let _ = reply.send(Ok(stats(&device).await));
            }
            Command::Stop(reply) => {
                stopped = Some(reply);
                break;
            }
        }
    }
    device.stop().await;
    // The TUN device is not persistent: closing it (the device is dropped now) removes the
    // link and its routes; delete explicitly in case another handle keeps it open. `h` was
    // opened in the device's netns, whatever netns this thread is in now.
    let result = link::delete(&h, &name).await;
    let _ = std::fs::remove_file(uapi_socket(&name));
    tracing::info!(device = %name, "userspace WireGuard device stopped");
    if let Some(reply) = stopped {
        let _ = reply.send(result);
    }
}

async fn start(
    config: &DeviceConfig,
    h: &rtnetlink::Handle,
    builder: GotaBuilder,
) -> Result<GotaDevice> {
    let name = &config.name;
    let uapi = serve_uapi(name).map_err(|e| {
        fail(
            name,
            format!("serve UAPI on {}", uapi_socket(name).display()),
            e,
        )
    })?;
    let device = builder
        .with_listen_port(config.listen_port)
        .with_uapi(uapi)
        .build()
        .await
        .map_err(|e| fail(name, "build the device", e))?;
    // Setting the key on a built device binds the UDP socket (in the netns this thread is in:
    // the underlay) and starts the tunnel tasks (the builder only does that when it is given
    // peers).
    device
        .set_private_key(x25519::StaticSecret::from(*config.private_key.as_bytes()))
        .await
        .map_err(|e| {
            fail(
                name,
                format!("bind UDP port {} and start", config.listen_port),
                e,
            )
        })?;
    link::configure(h, name, config.mtu, &config.addresses).await?;
    Ok(device)
}

async fn set_peers(
    device: &GotaDevice,
    h: &rtnetlink::Handle,
    name: &str,
    peers: Vec<Peer>,
) -> Result<()> {
    let routes = routed_prefixes(&peers);
    let desired: Vec<x25519::PublicKey> = peers
        .iter()
        .map(|p| x25519::PublicKey::from(*p.public_key.as_bytes()))
        .collect();
    device
        .write(async |w| {
            for stale in w
                .peers()
                .await
                .into_iter()
                .map(|s| s.peer.public_key)
                .filter(|k| !desired.contains(k))
            {
                w.remove_peer(&stale).await;
            }
            for p in peers {
                let key = x25519::PublicKey::from(*p.public_key.as_bytes());
                let updated = w
                    .modify_peer(&key, |m| {
                        m.clear_allowed_ips();
                        m.add_allowed_ips(p.allowed_ips.iter().copied());
                        // An unset endpoint keeps the one learned from the peer's handshakes.
                        if p.endpoint.is_some() {
                            m.set_endpoint(p.endpoint);
                        }
                        m.set_keepalive(p.persistent_keepalive);
                    })
                    .await;
                if !updated {
                    let mut new = gotatun::device::Peer::new(key)
                        .with_allowed_ips(p.allowed_ips.iter().copied());
                    new.endpoint = p.endpoint;
                    new.keepalive = p.persistent_keepalive;
                    w.add_peer(new);
                }
            }
        })
        .await
        .map_err(|e| fail(name, "apply the peer set", e))?;
    link::sync_routes(h, name, &routes).await
}

async fn stats(device: &GotaDevice) -> Vec<PeerStats> {
    let now = SystemTime::now();
    device
        .peers()
        .await
        .into_iter()
        .map(|s| PeerStats {
            public_key: PublicKey::from_bytes(s.peer.public_key.to_bytes()),
            endpoint: s.peer.endpoint,
            allowed_ips: s.peer.allowed_ips.clone(),
            last_handshake: s
                .stats
                .last_handshake
                .and_then(|ago: Duration| now.checked_sub(ago)),
            rx_bytes: s.stats.rx_bytes as u64,
            tx_bytes: s.stats.tx_bytes as u64,
        })
        .collect()
}

/// Serves the standard UAPI socket. gotatun's own `default_unix_socket` binds with the process
/// umask (0777 under umask 000, and `/var/run/wireguard` too when it makes it), and `get=1`
/// answers the private key: so the socket is bound here, 0600 from its first instant, in a
/// directory made 0700 (as wireguard-go makes it) and never writable by others.
fn serve_uapi(name: &str) -> std::io::Result<UapiServer> {
    fleet_core::private_socket::ensure_dir(Path::new(UAPI_DIR), 0o700)?;
    let listener = fleet_core::private_socket::bind_private(&uapi_socket(name))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let (client, server) = UapiServer::new();
    let device = name.to_owned();
    // On the device thread's runtime: the loop ends with the device.
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let stream = stream.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            });
            match stream {
                Ok(s) => client.clone().wrap_read_write(s),
                Err(e) => tracing::warn!(%device, error = %e, "cannot serve a UAPI connection"),
            }
        }
    });
    Ok(server)
}

fn fail(name: &str, op: impl Into<String>, e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Userspace {
        name: name.into(),
        op: op.into(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

    /// The dual-stack socket gotatun binds (`::`) sends its IPv4 datagrams without DF.
    #[test]
    fn allow_fragmentation_clears_df_on_a_dual_stack_socket() {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("a UDP socket");
        let get = || {
            use std::os::fd::AsRawFd;
            let mut value: nix::libc::c_int = -1;
            let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
            // SAFETY: a valid fd, a c_int buffer and its length.
            let rc = unsafe {
                nix::libc::getsockopt(
                    fd.as_raw_fd(),
                    nix::libc::IPPROTO_IP,
                    nix::libc::IP_MTU_DISCOVER,
                    (&mut value as *mut nix::libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            value
        };
        assert_ne!(get(), nix::libc::IP_PMTUDISC_DONT);
        allow_fragmentation(&fd);
        assert_eq!(get(), nix::libc::IP_PMTUDISC_DONT);
    }

    /// Needs root (`SO_RCVBUFFORCE`): asks for more than this host's `net.core.rmem_max` and
    /// `wmem_max` allow an unprivileged `SO_RCVBUF`, so the cap is shown to be bypassed. The
    /// socket is never bound: no network is touched.
    #[test]
    fn grow_buffers_bypasses_rmem_max_as_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (SO_RCVBUFFORCE)"
        );
        let cap = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .expect("read the sysctl")
                .trim()
                .parse()
                .expect("a number")
        };
        let bytes = 2 * cap("rmem_max").max(cap("wmem_max")).max(UDP_BUFFER_BYTES);
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("a UDP socket");
        let (rcv, snd) = grow_buffers(&fd, bytes);
        // The kernel doubles what it is given; capped, it would report 2 * rmem_max at most.
        assert_eq!(rcv, 2 * bytes);
        assert_eq!(snd, 2 * bytes);
    }
}

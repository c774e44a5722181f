//! The hub's relay, for real (root): `fleet-hub serve --relay-listen ...` in a netns of its
//! own ("the hub host") and two fake members — plain fleet-gateway userspace devices in their
//! own netns that join through `HubClient`. Each member's [`Follower`] does what the
//! controller and `fleet-nri` do: it peers the device with the first relay by id (its key, no
//! allowed IPs, keepalive) and with every other member end to end (the member's key and
//! block, endpoint = the relay), and resets those sessions when the relay's instance changes.
//! Member A pings member B's block address through the relay, which only forwards their
//! WireGuard datagrams: a capture at the hub shows only WireGuard messages between the
//! members' keys, none of which the relay's key opens. The API process is killed and the
//! pings go on (the relay is its own process), the restarted hub adopts the relay; the relay
//! killed, the hub restarts it and traffic resumes within seconds; once B is removed from the
//! fleet the relay drops B and the ping stops; SIGTERM takes the relay down.
//!
//! The fail-over test: two replicas on one etcd (in the hub netns), each with its relay; the
//! fake members use the first relay by id; that replica's host dies (kill -9 of both its
//! processes) and the members move to the other relay once its record expires.
//!
//! ```text
//!  netns A (192.0.2.2) ──veth──┐            ┌──veth── netns B (192.0.2.3)
//!   fha<pid> 100.96.0.1/20     br0 192.0.2.1 (netns H: fleet-hub serve, relay UDP :51820)
//! ```

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleet_gateway::{BackendKind, DeviceConfig, Peer, PrivateKey, WireguardDevice};
use fleet_hub::api::{CaHash, Credential, JoinString};
use fleet_hub::registry::{ClusterId, JoinRequest, PublicKey};
use fleet_hub::relay::forward::{INIT_MAC1, RESPONSE_MAC1, mac1_key, mac1_matches};
use fleet_hub_api::client::{ClientOptions, HubClient};

const HUB_IP: &str = "192.0.2.1";
const API_PORT: u16 = 7443;
const RELAY_PORT: u16 = 51820;
/// The relay process's `/metrics`, on the hub's IP in its netns.
const RELAY_METRICS_PORT: u16 = 9651;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the relay test creates network namespaces and WireGuard devices: run it as root (CI is root)"
    );
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named netns made by this test (PID-unique), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("fhr-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args);
        run("ip", &all)
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend(args);
        run("ip", &all)
    }

    /// One ICMP echo from `from` to `to`, answered within a second.
    fn ping(&self, from: &str, to: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &self.name, "busybox", "ping", "-q", "-c", "1", "-W", "1",
            ])
            .args(["-I", from, to])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `work` on a thread inside this netns with its own runtime (its sockets live here).
    fn block_on<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let file = File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(work)
        })
        .join()
        .unwrap()
    }

    /// Whether a UDP socket is bound to `port` in this netns.
    fn has_udp_port(&self, port: u16) -> bool {
        let needle = format!(":{port:04X} ");
        self.exec(&["cat", "/proc/net/udp", "/proc/net/udp6"])
            .lines()
            .any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|local| format!("{local} ").contains(&needle))
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(2),
        call_timeout: Duration::from_secs(10),
        watch_idle_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..ClientOptions::default()
    }
}

/// `fleet-hub serve` with the relay, inside netns `hub`; stopped by PID (SIGTERM) on drop.
struct HubInNetns {
    child: Option<Child>,
    dir: tempfile::TempDir,
    netns: PathBuf,
    /// API and relay IP.
    ip: String,
    relay_port: u16,
    /// Store flags (before `serve`).
    store: Vec<String>,
}

impl HubInNetns {
    fn start(hub: &Netns) -> HubInNetns {
        Self::replica(hub, HUB_IP, RELAY_PORT, &[])
    }

    /// A hub (replica) at `ip` (API :7443, relay UDP :`relay_port`) with store flags `store`.
    fn replica(hub: &Netns, ip: &str, relay_port: u16, store: &[&str]) -> HubInNetns {
        let mut hub = HubInNetns {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("fleet-hub-relay-")
                .tempdir()
                .unwrap(),
            netns: hub.path(),
            ip: ip.to_string(),
            relay_port,
            store: store.iter().map(|s| s.to_string()).collect(),
        };
        hub.spawn();
        hub
    }

    fn api(&self) -> String {
        format!("{}:{API_PORT}", self.ip)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hub.log"))
            .unwrap();
        let netns = File::open(&self.netns).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleet-hub"));
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.store)
            .args(["serve", "--listen", &self.api()])
            .args([
                "--relay-listen",
                &format!("{}:{}", self.ip, self.relay_port),
            ])
            .args([
                "--relay-metrics-address",
                &format!("{}:{RELAY_METRICS_PORT}", self.ip),
            ])
            .env("FLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        let fd = netns.as_raw_fd();
        // SAFETY: only setns and prctl (plain syscalls) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let file = std::os::fd::BorrowedFd::borrow_raw(fd);
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        self.child = Some(command.spawn().expect("start fleet-hub serve"));
    }

    /// SIGKILL of the API process by PID (a crash); its relay process is not its to take.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The relay process's PID, from `relay.pid`.
    fn relay_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data_dir().join("relay.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    fn ca_hash(&self) -> CaHash {
        CaHash::of_pem(&std::fs::read_to_string(self.data_dir().join("ca.pem")).unwrap()).unwrap()
    }

    fn admin_credential(&self) -> Credential {
        Credential::parse(
            &std::fs::read_to_string(self.data_dir().join("admin.credential")).unwrap(),
        )
        .unwrap()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// SIGTERM by PID, then wait (SIGKILL after 10 s).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for HubInNetns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the hub answers (from inside `client_ns`) and lists its relay.
fn wait_for_relay(hub: &mut HubInNetns, client_ns: &Netns) {
    let ready = eventually(Duration::from_secs(30), || {
        if let Some(status) = hub.exited() {
            panic!("fleet-hub exited with {status}; log:\n{}", hub.log());
        }
        if !hub.data_dir().join("admin.credential").exists() {
            return false;
        }
        let admin = HubClient::new([hub.api()], hub.ca_hash(), options())
            .unwrap()
            .with_credential(hub.admin_credential());
        let relay_port = hub.relay_port;
        client_ns.block_on(async move {
            admin
                .list()
                .await
                .is_ok_and(|v| v.relays.iter().any(|r| r.endpoint.port() == relay_port))
        })
    });
    assert!(
        ready,
        "the hub did not come up with its relay; log:\n{}",
        hub.log()
    );
}

/// `ns` joins the bridge `br0` of `hub` with address `addr` on its `ul0`.
fn wire(hub: &Netns, ns: &Netns, tag: &str, addr: &str) {
    let host_end = format!("v{tag}");
    hub.ip(&[
        "link", "add", &host_end, "type", "veth", "peer", "name", "ul0", "netns", &ns.name,
    ]);
    hub.ip(&["link", "set", &host_end, "master", "br0", "up"]);
    ns.ip(&["addr", "add", addr, "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
}

/// etcd inside `ns` (its 127.0.0.1:2379), stopped by PID on drop.
struct EtcdInNetns {
    child: Child,
    _dir: tempfile::TempDir,
}

impl EtcdInNetns {
    const URL: &str = "http://127.0.0.1:2379";

    fn start(ns: &Netns) -> EtcdInNetns {
        let dir = tempfile::Builder::new()
            .prefix("fleet-hub-relay-etcd-")
            .tempdir()
            .unwrap();
        let log = File::create(dir.path().join("etcd.log")).unwrap();
        let netns = File::open(ns.path()).unwrap();
        let fd = netns.as_raw_fd();
        let peer = "http://127.0.0.1:2380";
        let mut command = Command::new("/usr/bin/etcd");
        command
            .arg("--name=fleet-test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={}", Self::URL))
            .arg(format!("--advertise-client-urls={}", Self::URL))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=fleet-test={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        // SAFETY: only setns and prctl (plain syscalls) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let file = std::os::fd::BorrowedFd::borrow_raw(fd);
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().expect("start etcd (/usr/bin/etcd)");
        drop(netns);
        let up = eventually(Duration::from_secs(20), || {
            ns.block_on(async {
                tokio::net::TcpStream::connect("127.0.0.1:2379")
                    .await
                    .is_ok()
            })
        });
        assert!(up, "etcd did not come up in the hub netns");
        EtcdInNetns { child, _dir: dir }
    }
}

impl Drop for EtcdInNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake member's controller + gateway daemon: polls the hub's view (through any replica)
/// and keeps the device's peers as the controller plans them — the first relay by id (its
/// key, no allowed IPs, keepalive 1 s) and every other cluster end to end through that relay
/// — and, like `fleet-nri`, resets the sessions through the relay when its instance changes
/// and re-adds peers that have no handshake yet every second (for 15 s after a change).
struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The relay id it currently uses.
    current: Arc<std::sync::Mutex<Option<String>>>,
}

/// The peers the controller plans for `own` (see `fleet_controller::plan::wireguard_peers`).
fn planned_peers(view: &fleet_hub_api::model::FleetView, own: &ClusterId) -> Vec<Peer> {
    let Some(relay) = view.relays.iter().min_by_key(|r| r.id.clone()) else {
        return Vec::new();
    };
    let key = |k: &PublicKey| fleet_gateway::PublicKey::from_bytes(*k.as_bytes());
    let mut peers = vec![Peer {
        public_key: key(&relay.public_key),
        endpoint: Some(relay.endpoint),
        allowed_ips: Vec::new(),
        persistent_keepalive: Some(1),
    }];
    for c in view.clusters.iter().filter(|c| &c.id != own) {
        peers.push(Peer {
            public_key: key(&c.public_key),
            endpoint: Some(relay.endpoint),
            allowed_ips: vec![ipnetwork::IpNetwork::V4(c.block)],
            persistent_keepalive: Some(1),
        });
    }
    peers
}

impl Follower {
    fn start(
        ns: &Netns,
        client: HubClient,
        device: Arc<dyn WireguardDevice>,
        own: ClusterId,
    ) -> Follower {
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(std::sync::Mutex::new(None));
        let file = File::open(ns.path()).unwrap();
        let (stop2, current2) = (stop.clone(), current.clone());
        let thread = std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut applied: Vec<Peer> = Vec::new();
                let mut relay_seen: Option<(String, String)> = None;
                let mut changed_at: Option<Instant> = None;
                let mut kicked_at = Instant::now();
                while !stop2.load(Ordering::SeqCst) {
                    if let Ok(Ok(view)) =
                        tokio::time::timeout(Duration::from_secs(2), client.list()).await
                    {
                        let peers = planned_peers(&view, &own);
                        let relay = view
                            .relays
                            .iter()
                            .min_by_key(|r| r.id.clone())
                            .map(|r| (r.id.clone(), r.instance.clone()));
                        if peers != applied {
                            device.set_peers(&peers).await.unwrap();
                            applied = peers;
                            changed_at = Some(Instant::now());
                        }
                        if relay_seen.is_some() && relay.is_some() && relay != relay_seen {
                            // Fresh sessions: a new relay knows no address and no index.
                            device.set_peers(&[]).await.unwrap();
                            device.set_peers(&applied).await.unwrap();
                            changed_at = Some(Instant::now());
                            kicked_at = Instant::now();
                        }
                        *current2.lock().unwrap() = relay.as_ref().map(|(id, _)| id.clone());
                        relay_seen = relay;
                    }
                    if changed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(15))
                        && kicked_at.elapsed() >= Duration::from_secs(1)
                    {
                        let stats = device.stats().await.unwrap();
                        let stalled: Vec<_> = stats
                            .iter()
                            .filter(|s| s.last_handshake.is_none())
                            .map(|s| s.public_key)
                            .collect();
                        if !stalled.is_empty() {
                            let without: Vec<Peer> = applied
                                .iter()
                                .filter(|p| !stalled.contains(&p.public_key))
                                .cloned()
                                .collect();
                            device.set_peers(&without).await.unwrap();
                            device.set_peers(&applied).await.unwrap();
                        }
                        kicked_at = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        });
        Follower {
            stop,
            thread: Some(thread),
            current,
        }
    }

    fn current(&self) -> Option<String> {
        self.current.lock().unwrap().clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A fake member: joins through any of `apis`, a userspace device with the first address of
/// its block and no peers yet (its [`Follower`] adds them).
struct Member {
    id: ClusterId,
    client: HubClient,
    address: String,
    /// Its block, e.g. `100.96.0.0/20`.
    block: String,
    public_key: [u8; 32],
    device: Arc<dyn WireguardDevice>,
}

async fn member(
    ns: &Netns,
    name: &str,
    join: &JoinString,
    wg_name: &str,
    apis: &[String],
) -> Member {
    let key = PrivateKey::generate();
    let public_key = *key.public_key().as_bytes();
    let client = HubClient::new(apis.to_vec(), join.ca_hash, options()).unwrap();
    let request = JoinRequest {
        cluster: ClusterId::new(name).unwrap(),
        public_key: PublicKey::from_bytes(public_key),
        endpoint: None,
    };
    let joined = ns.block_on({
        let client = client.clone();
        let join = join.clone();
        async move { client.join(&join, request).await.unwrap() }
    });
    let block = joined.record.block;
    let first = std::net::Ipv4Addr::from(u32::from(block.network()) + 1);
    let device = fleet_gateway::create_device(
        BackendKind::Userspace,
        DeviceConfig {
            name: wg_name.into(),
            netns: ns.path(),
            underlay_netns: None,
            private_key: key,
            listen_port: RELAY_PORT,
            mtu: 1420,
            addresses: vec![format!("{first}/{}", block.prefix()).parse().unwrap()],
        },
    )
    .await
    .unwrap();
    Member {
        id: joined.record.id,
        client,
        address: first.to_string(),
        block: block.to_string(),
        public_key,
        device: Arc::from(device),
    }
}

/// `tcpdump` on `dev` in `ns` writing a pcap of UDP port `port` (full datagrams), stopped by
/// PID.
struct Capture {
    child: Child,
    file: tempfile::NamedTempFile,
}

impl Capture {
    fn start(ns: &Netns, dev: &str, port: u16) -> Capture {
        let file = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("ip")
            // Immediate mode: without it libpcap hands packets over in blocks (1 s timeout),
            // and a block still pending at SIGINT is lost.
            .args(["netns", "exec", &ns.name, "tcpdump", "--immediate-mode"])
            .args(["-i", dev, "-U", "-s", "0", "-w"])
            .arg(file.path())
            .args(["udp", "port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (scripts/install-deps.sh installs it)");
        let capture = Capture { child, file };
        // tcpdump writes the pcap header once it listens.
        let ready = eventually(Duration::from_secs(10), || {
            std::fs::metadata(capture.file.path()).is_ok_and(|m| m.len() >= 24)
        });
        assert!(ready, "tcpdump did not start");
        capture
    }

    /// Stops tcpdump (SIGINT: it flushes) and returns the UDP payloads it saw, with their
    /// source and destination ports.
    fn finish(mut self) -> Vec<(u16, u16, Vec<u8>)> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        udp_payloads(&std::fs::read(self.file.path()).unwrap())
    }
}

/// The UDP payloads of a classic little-endian pcap of Ethernet frames carrying IPv4.
fn udp_payloads(raw: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= raw.len() {
        let caplen = u32::from_le_bytes(raw[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &raw[at + 16..(at + 16 + caplen).min(raw.len())];
        at += 16 + caplen;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        let udp = &ip[ihl..];
        let port = |i: usize| u16::from_be_bytes([udp[i], udp[i + 1]]);
        out.push((port(0), port(2), udp[8..].to_vec()));
    }
    out
}

/// The datagrams of one captured UDP payload. Members and the relay send runs of same-size
/// datagrams with UDP GSO, and the hub's bridge (where the capture is taken) passes such a
/// run on unsegmented — one payload holding back-to-back messages of one size, the last maybe
/// shorter — where a wire would carry them one by one. Handshake and cookie messages have fixed
/// sizes; for transport data the smallest size at which every piece starts as a data message
/// (ciphertext makes a false match a 2^-32 chance per piece).
fn gso_segments(d: &[u8]) -> Vec<&[u8]> {
    let starts_data = |c: &[u8]| c.len() >= 32 && c[..4] == [4, 0, 0, 0];
    let size = match d.first() {
        Some(1) => 148,
        Some(2) => 92,
        Some(3) => 64,
        Some(4) => (32..d.len())
            .step_by(16)
            .find(|s| d.len() > *s && d.chunks(*s).all(starts_data))
            .unwrap_or(d.len()),
        _ => d.len(),
    };
    d.chunks(size.max(1)).collect()
}

#[test]
fn captured_gso_runs_are_cut_into_their_datagrams() {
    let init = |n: u8| {
        let mut m = vec![1, 0, 0, 0];
        m.resize(148, n);
        m
    };
    let data = |len: usize, n: u8| {
        let mut m = vec![4, 0, 0, 0];
        m.resize(len, n | 0x80);
        m
    };
    let two_inits = [init(1), init(2)].concat();
    assert_eq!(gso_segments(&two_inits), [&init(1)[..], &init(2)[..]]);
    let run = [data(1440, 1), data(1440, 2), data(96, 3)].concat();
    assert_eq!(
        gso_segments(&run),
        [&data(1440, 1)[..], &data(1440, 2)[..], &data(96, 3)[..]]
    );
    let one = data(1440, 1);
    assert_eq!(gso_segments(&one), [&one[..]]);
    let keepalive = data(32, 0);
    assert_eq!(gso_segments(&keepalive), [&keepalive[..]]);
}

/// Every datagram to or from the relay is a WireGuard message; every handshake message is
/// addressed (mac1) to a member or to the relay; every member-to-member initiation is sealed
/// against the relay's key. Returns the number of member-to-member initiations and of
/// transport data messages seen.
fn assert_only_wireguard_between_member_keys(
    datagrams: &[(u16, u16, Vec<u8>)],
    members: &[[u8; 32]],
    relay_private: &PrivateKey,
) -> (usize, usize) {
    use gotatun::x25519;
    let relay_secret = x25519::StaticSecret::from(*relay_private.as_bytes());
    let relay_public = x25519::PublicKey::from(&relay_secret);
    let member_macs: Vec<[u8; 32]> = members.iter().map(mac1_key).collect();
    let relay_mac = mac1_key(relay_public.as_bytes());
    let (mut between_members, mut data) = (0, 0);
    for d in datagrams.iter().flat_map(|(_, _, d)| gso_segments(d)) {
        assert!(d.len() >= 4 && d[1..4] == [0, 0, 0], "not WireGuard: {d:?}");
        match (d[0], d.len()) {
            (1, 148) => {
                let to_member = member_macs.iter().any(|k| mac1_matches(k, d, INIT_MAC1));
                let to_relay = mac1_matches(&relay_mac, d, INIT_MAC1);
                assert!(to_member ^ to_relay, "an initiation to no known key");
                if to_member {
                    between_members += 1;
                    let packet = gotatun::packet::Packet::from_bytes(bytes::BytesMut::from(d))
                        .try_into_wg()
                        .unwrap();
                    let gotatun::packet::WgKind::HandshakeInit(init) = packet else {
                        unreachable!()
                    };
                    assert!(
                        gotatun::noise::handshake::parse_handshake_anon(
                            &relay_secret,
                            &relay_public,
                            &init
                        )
                        .is_err(),
                        "the relay's key opened a member-to-member initiation"
                    );
                }
            }
            (2, 92) => assert!(
                member_macs
                    .iter()
                    .any(|k| mac1_matches(k, d, RESPONSE_MAC1)),
                "a response to no member key"
            ),
            (3, 64) => {}
            (4, n) if n >= 32 && (n - 16) % 16 == 0 => data += 1,
            other => panic!("not a WireGuard message: type/len {other:?}"),
        }
    }
    (between_members, data)
}

/// Members peered end to end through the relay; the capture at the hub; the API killed and
/// the relay outliving it; the relay killed and restarted (traffic resumes within seconds);
/// a member removed; a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_reach_each_other_through_the_relay_until_one_is_removed() {
    require_root();
    // The relay outlives a killed hub process; orphaned, it becomes ours to reap.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let pid = std::process::id();
    let hub_ns = Netns::new("h");
    let a_ns = Netns::new("a");
    let b_ns = Netns::new("b");
    hub_ns.ip(&["link", "add", "br0", "type", "bridge"]);
    hub_ns.ip(&["addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"]);
    hub_ns.ip(&["link", "set", "br0", "up"]);
    wire(&hub_ns, &a_ns, "a", "192.0.2.2/24");
    wire(&hub_ns, &b_ns, "b", "192.0.2.3/24");

    let mut hub = HubInNetns::start(&hub_ns);
    wait_for_relay(&mut hub, &a_ns);
    let apis = vec![hub.api()];
    let admin = HubClient::new(apis.clone(), hub.ca_hash(), options())
        .unwrap()
        .with_credential(hub.admin_credential());

    // The relay is one UDP socket in the hub's netns: no interface, no TUN.
    assert!(
        hub_ns.has_udp_port(RELAY_PORT),
        "relay UDP in the hub netns"
    );
    let links = hub_ns.ip(&["-o", "link", "show"]);
    assert!(
        links.lines().all(|l| ["lo", "br0", "va", "vb"]
            .iter()
            .any(|n| l.contains(&format!(": {n}")))),
        "the relay made an interface: {links}"
    );
    let key_path = hub.data_dir().join("relay.key");
    let key_mode = std::fs::metadata(&key_path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );

    let (join, _) = {
        let admin = admin.clone();
        a_ns.block_on(async move { admin.create_token(Duration::from_secs(600), "relay").await })
            .unwrap()
    };
    let a = member(&a_ns, "aa", &join, &format!("fha{pid}"), &apis).await;
    let b = member(&b_ns, "bb", &join, &format!("fhb{pid}"), &apis).await;
    assert_ne!(a.address, b.address);

    // Everything the relay sees from here on, captured on the hub's bridge.
    let capture = Capture::start(&hub_ns, "br0", RELAY_PORT);
    let a_follow = Follower::start(&a_ns, a.client.clone(), a.device.clone(), a.id.clone());
    let b_follow = Follower::start(&b_ns, b.client.clone(), b.device.clone(), b.id.clone());

    // A -> relay -> B and back: ICMP between the two blocks.
    let reached = eventually(Duration::from_secs(20), || {
        a_ns.ping(&a.address, &b.address)
    });
    assert!(
        reached,
        "A could not reach B through the relay; hub log:\n{}",
        hub.log()
    );
    assert!(b_ns.ping(&b.address, &a.address), "and B reaches A");
    // Each gateway has the other member as a peer (its key), reached at the relay's address.
    let a_stats = a.device.stats().await.unwrap();
    let b_on_a = a_stats
        .iter()
        .find(|s| s.public_key.as_bytes() == &b.public_key)
        .expect("B is A's peer");
    assert!(
        b_on_a.last_handshake.is_some() && b_on_a.rx_bytes > 0,
        "{b_on_a:?}"
    );
    assert_eq!(
        b_on_a.endpoint.map(|e| e.to_string()),
        Some(format!("{HUB_IP}:{RELAY_PORT}"))
    );

    // The security claim: the capture holds only WireGuard messages between the members'
    // keys (and their keepalive sessions with the relay), and the relay's key — the only key
    // in the relay's data dir — opens none of the member-to-member handshakes.
    let datagrams = capture.finish();
    let relay_key = PrivateKey::load(&key_path).unwrap();
    let (initiations, data) = assert_only_wireguard_between_member_keys(
        &datagrams,
        &[a.public_key, b.public_key],
        &relay_key,
    );
    assert!(
        initiations > 0 && data > 0,
        "{initiations} initiations, {data} data in {} datagrams",
        datagrams.len()
    );
    println!(
        "CAPTURE at the hub: {} datagrams, {initiations} member-to-member initiations, {data} \
         transport data, all WireGuard between member keys",
        datagrams.len()
    );

    // The relay's /metrics (scraped from the hub's netns): both members, each with a session
    // with the relay and bytes forwarded from it; datagrams forwarded by type, none dropped
    // for want of an address.
    let scrape = relay_metrics(&hub);
    let relay_value = |name: &str, label: Option<(&str, &str)>| -> Vec<f64> {
        scrape
            .samples
            .iter()
            .filter(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .filter_map(|x| match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => Some(v),
                _ => None,
            })
            .collect()
    };
    assert_eq!(relay_value("fleetboard_relay_peers", None), vec![2.0]);
    assert_eq!(
        relay_value("fleetboard_relay_registered_peers", None),
        vec![2.0]
    );
    let ages = relay_value("fleetboard_relay_peer_handshake_age_seconds", None);
    assert!(
        ages.len() == 2 && ages.iter().all(|a| *a < 60.0),
        "{ages:?}"
    );
    let received = relay_value("fleetboard_relay_peer_received_bytes_total", None);
    assert!(
        received.len() == 2 && received.iter().all(|b| *b > 0.0),
        "{received:?}"
    );
    let forwarded = |t| {
        relay_value(
            "fleetboard_relay_forwarded_datagrams_total",
            Some(("type", t)),
        )
    };
    assert!(forwarded("initiation")[0] >= 1.0 && forwarded("data")[0] >= 2.0);
    // The batched socket's counters: each counted receive call took at least one datagram,
    // so there are no more of them than datagrams handled (forwarded, own, dropped).
    let calls = |c| relay_value("fleetboard_relay_socket_calls_total", Some(("call", c)));
    let handled: f64 = [
        "fleetboard_relay_forwarded_datagrams_total",
        "fleetboard_relay_own_session_datagrams_total",
        "fleetboard_relay_dropped_datagrams_total",
    ]
    .into_iter()
    .flat_map(|name| relay_value(name, None))
    .sum();
    let received = calls("receive")[0];
    assert!(
        received >= 1.0 && received <= handled,
        "{received} receive calls for {handled} datagrams"
    );
    assert!(calls("send")[0] >= 1.0, "{:?}", calls("send"));
    assert_eq!(
        relay_value("fleetboard_relay_gro_datagrams_total", None).len(),
        1
    );
    assert_eq!(
        relay_value("fleetboard_relay_gso_datagrams_total", None).len(),
        1
    );

    // The API process killed: the relay is its own process and keeps relaying.
    let relay_pid = hub.relay_pid().expect("relay.pid");
    hub.kill9();
    // Running (a zombie — exited, its new parent not yet reaping — does not count).
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    assert!(alive(relay_pid), "the relay outlives a killed hub");
    for _ in 0..5 {
        assert!(
            a_ns.ping(&a.address, &b.address),
            "relayed traffic stopped with the hub killed; log:\n{}",
            hub.log()
        );
    }
    // The hub restarts and adopts the running relay (no second one).
    hub.spawn();
    wait_for_relay(&mut hub, &a_ns);
    assert_eq!(hub.relay_pid(), Some(relay_pid));
    assert!(
        hub.log().contains("adopted the running relay"),
        "{}",
        hub.log()
    );

    // The relay itself killed: the hub starts it again with a new instance; the members
    // reset their sessions through it and traffic resumes at once.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(relay_pid), None);
    let mut both_ways = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if a_ns.ping(&a.address, &b.address) && b_ns.ping(&b.address, &a.address) {
            both_ways = Some(killed.elapsed());
            break;
        }
    }
    let Some(took) = both_ways else {
        panic!(
            "no traffic through the restarted relay; log:\n{}",
            hub.log()
        );
    };
    println!(
        "RECOVERY relay killed -> restarted by the hub -> ping both ways after {took:?} \
         (includes the hub's restart of the relay)"
    );
    let relay_pid = hub.relay_pid().unwrap();
    assert!(alive(relay_pid));

    // The admin removes B: the relay (its watch resumed against the restarted hub) forgets B,
    // and A's pings stop.
    let removed = {
        let admin = admin.clone();
        let id = b.id.clone();
        a_ns.block_on(async move { admin.remove_cluster(&id).await })
    };
    assert!(removed.unwrap());
    let stopped = eventually(Duration::from_secs(15), || {
        !a_ns.ping(&a.address, &b.address)
    });
    assert!(stopped, "traffic to a removed member still flows");
    assert!(
        eventually(Duration::from_secs(10), || relay_value_now(
            &hub,
            "fleetboard_relay_peers"
        ) == Some(1.0)),
        "the relay still forwards for B"
    );
    drop(b_follow);
    // ... and B cannot reach A either: its device still peers with A through the relay,
    // but the relay no longer forwards for B.
    assert!(!eventually(Duration::from_secs(3), || b_ns.ping(&b.address, &a.address)));
    let (a_client, b_client) = (a.client.clone(), b.client.clone());
    let (a_view, b_refused) = a_ns.block_on(async move {
        (
            a_client.list().await.unwrap(),
            b_client.list().await.unwrap_err(),
        )
    });
    assert_eq!(a_view.clusters.len(), 1, "only A is left");
    assert_eq!(
        b_refused.code(),
        Some(fleet_hub::api::ErrorCode::Unauthenticated)
    );

    // SIGTERM: the relay closes its socket and withdraws, the hub exits cleanly.
    drop(a_follow);
    let status = hub.stop().expect("the hub was running");
    assert!(status.success(), "{status}; log:\n{}", hub.log());
    assert!(hub.log().contains("relay stopped"), "{}", hub.log());
    assert!(!alive(relay_pid), "the relay process is gone");
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(relay_pid), None);
    assert!(!hub.data_dir().join("relay.pid").exists());
    assert!(
        !hub_ns.has_udp_port(RELAY_PORT),
        "the relay's socket is closed"
    );
    a.device.delete().await.unwrap();
    b.device.delete().await.unwrap();
}

/// One gauge of the relay's metrics now.
fn relay_value_now(hub: &HubInNetns, name: &str) -> Option<f64> {
    relay_metrics(hub)
        .samples
        .iter()
        .find(|x| x.metric == name)
        .and_then(|x| match x.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => Some(v),
            _ => None,
        })
}

/// The relay forwards standard WireGuard messages only, so any implementation works as a
/// member: B is Debian's wireguard-go (configured with `wg`, as a kernel-WireGuard gateway
/// would be), A is ours; they reach each other end to end through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wireguard_go_member_and_ours_talk_through_the_relay() {
    require_root();
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let pid = std::process::id();
    let hub_ns = Netns::new("gh");
    let a_ns = Netns::new("ga");
    let b_ns = Netns::new("gb");
    hub_ns.ip(&["link", "add", "br0", "type", "bridge"]);
    hub_ns.ip(&["addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"]);
    hub_ns.ip(&["link", "set", "br0", "up"]);
    wire(&hub_ns, &a_ns, "a", "192.0.2.2/24");
    wire(&hub_ns, &b_ns, "b", "192.0.2.3/24");
    let mut hub = HubInNetns::start(&hub_ns);
    wait_for_relay(&mut hub, &a_ns);
    let apis = vec![hub.api()];
    let admin = HubClient::new(apis.clone(), hub.ca_hash(), options())
        .unwrap()
        .with_credential(hub.admin_credential());
    let (join, _) = {
        let admin = admin.clone();
        a_ns.block_on(async move { admin.create_token(Duration::from_secs(600), "relay").await })
            .unwrap()
    };
    let a = member(&a_ns, "aa", &join, &format!("fga{pid}"), &apis).await;
    let _a_follow = Follower::start(&a_ns, a.client.clone(), a.device.clone(), a.id.clone());

    // B: a key file for wg, a join, wireguard-go in b's netns.
    let dir = tempfile::tempdir().unwrap();
    let b_key_file = dir.path().join("b.key");
    let b_key = PrivateKey::load_or_generate(&b_key_file).unwrap();
    let b_client = HubClient::new(apis.clone(), join.ca_hash, options()).unwrap();
    let request = JoinRequest {
        cluster: ClusterId::new("bb").unwrap(),
        public_key: PublicKey::from_bytes(*b_key.public_key().as_bytes()),
        endpoint: None,
    };
    let (joined, view) = b_ns.block_on({
        let join = join.clone();
        async move {
            let joined = b_client.join(&join, request).await.unwrap();
            let view = b_client.list().await.unwrap();
            (joined, view)
        }
    });
    let relay = &view.relays[0];
    let go_name = format!("fgo{pid}");
    let sock = format!("/var/run/wireguard/{go_name}.sock");
    let mut go = Command::new("ip")
        .args(["netns", "exec", &b_ns.name, "wireguard-go", "-f", &go_name])
        .env("LOG_LEVEL", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wireguard-go (scripts/install-deps.sh installs it)");
    assert!(
        eventually(Duration::from_secs(10), || Path::new(&sock).exists()),
        "wireguard-go did not open {sock}"
    );
    let relay_endpoint = relay.endpoint.to_string();
    run(
        "wg",
        &[
            "set",
            &go_name,
            "private-key",
            b_key_file.to_str().unwrap(),
            "listen-port",
            &RELAY_PORT.to_string(),
            "peer",
            &fleet_gateway::PublicKey::from_bytes(*relay.public_key.as_bytes()).to_base64(),
            "endpoint",
            &relay_endpoint,
            "persistent-keepalive",
            "1",
            "peer",
            &fleet_gateway::PublicKey::from_bytes(a.public_key).to_base64(),
            "endpoint",
            &relay_endpoint,
            "allowed-ips",
            &a.block,
            "persistent-keepalive",
            "1",
        ],
    );
    let block = joined.record.block;
    let b_address = std::net::Ipv4Addr::from(u32::from(block.network()) + 1).to_string();
    b_ns.ip(&[
        "addr",
        "add",
        &format!("{b_address}/{}", block.prefix()),
        "dev",
        &go_name,
    ]);
    b_ns.ip(&["link", "set", &go_name, "mtu", "1420", "up"]);
    b_ns.ip(&["route", "add", &a.block, "dev", &go_name]);

    let reached = eventually(Duration::from_secs(20), || {
        a_ns.ping(&a.address, &b_address)
    });
    let _ = go.try_wait();
    assert!(
        reached,
        "ours could not reach wireguard-go through the relay; hub log:\n{}",
        hub.log()
    );
    assert!(
        b_ns.ping(&b_address, &a.address),
        "and wireguard-go reaches ours"
    );
    let handshakes = run("wg", &["show", &go_name, "latest-handshakes"]);
    assert!(
        handshakes.contains(&fleet_gateway::PublicKey::from_bytes(a.public_key).to_base64()),
        "{handshakes}"
    );

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(go.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = go.wait();
    let _ = std::fs::remove_file(&sock);
    drop(_a_follow);
    a.device.delete().await.unwrap();
    let status = hub.stop().expect("the hub was running");
    assert!(status.success(), "{status}; log:\n{}", hub.log());
}

/// Two hub replicas on one etcd, each with its relay (default TTL 6 s, sweep 1 s), and two
/// NATless fake members whose controllers use the first relay by id. The replica whose relay
/// they use dies like a host (kill -9 of its API process and of its relay process): the
/// survivor's sweeper removes the dead relay's record once its TTL runs out, the members
/// switch to the surviving relay and their ping resumes. Prints the recovery time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_fail_over_to_the_surviving_replicas_relay_when_a_replica_host_dies() {
    require_root();
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let pid = std::process::id();
    let hub_ns = Netns::new("fh");
    let a_ns = Netns::new("fa");
    let b_ns = Netns::new("fb");
    hub_ns.ip(&["link", "add", "br0", "type", "bridge"]);
    hub_ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"]);
    hub_ns.ip(&["addr", "add", "192.0.2.4/24", "dev", "br0"]);
    hub_ns.ip(&["link", "set", "br0", "up"]);
    wire(&hub_ns, &a_ns, "a", "192.0.2.2/24");
    wire(&hub_ns, &b_ns, "b", "192.0.2.3/24");
    let _etcd = EtcdInNetns::start(&hub_ns);
    let store = ["--etcd", EtcdInNetns::URL];
    let mut one = HubInNetns::replica(&hub_ns, "192.0.2.1", 51820, &store);
    wait_for_relay(&mut one, &a_ns);
    let mut two = HubInNetns::replica(&hub_ns, "192.0.2.4", 51821, &store);
    wait_for_relay(&mut two, &a_ns);
    let apis = vec![one.api(), two.api()];
    let admin = HubClient::new(apis.clone(), one.ca_hash(), options())
        .unwrap()
        .with_credential(one.admin_credential());
    let (join, _) = {
        let admin = admin.clone();
        a_ns.block_on(async move { admin.create_token(Duration::from_secs(600), "relay").await })
            .unwrap()
    };
    let a = member(&a_ns, "aa", &join, &format!("fha{pid}"), &apis).await;
    let b = member(&b_ns, "bb", &join, &format!("fhb{pid}"), &apis).await;
    let (a_client, a_addr, a_dev) = (a.client.clone(), a.address.clone(), a.device.clone());
    let (b_addr, b_dev) = (b.address.clone(), b.device.clone());
    let a_follow = Follower::start(&a_ns, a_client.clone(), a_dev.clone(), a.id.clone());
    let b_follow = Follower::start(&b_ns, b.client.clone(), b_dev.clone(), b.id.clone());
    let reached = eventually(Duration::from_secs(30), || a_ns.ping(&a_addr, &b_addr));
    assert!(
        reached,
        "no traffic through the first relay; logs:\n{}\n{}",
        one.log(),
        two.log()
    );

    // Which replica's relay do the members use? That host dies.
    let view = {
        let c = a_client.clone();
        a_ns.block_on(async move { c.list().await.unwrap() })
    };
    assert_eq!(view.relays.len(), 2, "{view:?}");
    let first = view.relays.iter().min_by_key(|r| r.id.clone()).unwrap();
    let survivor_relay = view
        .relays
        .iter()
        .find(|r| r.id != first.id)
        .unwrap()
        .clone();
    assert_eq!(a_follow.current().as_deref(), Some(first.id.as_str()));
    assert_eq!(b_follow.current().as_deref(), Some(first.id.as_str()));
    let (victim, survivor) = if first.endpoint.port() == 51820 {
        (&mut one, &mut two)
    } else {
        (&mut two, &mut one)
    };
    let relay_pid = victim.relay_pid().expect("relay.pid");
    victim.kill9();
    let relay_pid = nix::unistd::Pid::from_raw(relay_pid);
    nix::sys::signal::kill(relay_pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let died = Instant::now();
    // Ours to reap: orphaned by the killed API process.
    let _ = nix::sys::wait::waitpid(relay_pid, None);

    let mut recovered = None;
    while died.elapsed() < Duration::from_secs(40) {
        if a_ns.ping(&a_addr, &b_addr) {
            recovered = Some(died.elapsed());
            break;
        }
    }
    let Some(took) = recovered else {
        panic!(
            "the members did not fail over to the surviving relay; survivor log:\n{}",
            survivor.log()
        );
    };
    println!(
        "RECOVERY replica host with the members' relay killed -> ping through the surviving \
         relay after {took:?} (relay TTL 6 s, sweep 1 s)"
    );
    assert!(b_ns.ping(&b_addr, &a_addr), "and B reaches A");
    assert_eq!(a_follow.current(), Some(survivor_relay.id.clone()));
    assert_eq!(b_follow.current(), Some(survivor_relay.id.clone()));
    let view = {
        let c = a_client.clone();
        a_ns.block_on(async move { c.list().await.unwrap() })
    };
    assert_eq!(view.relays.len(), 1, "{view:?}");
    assert!(view.relays[0].same_relay(&survivor_relay));
    assert!(
        survivor.log().contains("relay record expired"),
        "{}",
        survivor.log()
    );
    // TTL + one sweep + handshakes and slack.
    assert!(took < Duration::from_secs(12), "fail-over took {took:?}");

    drop(a_follow);
    drop(b_follow);
    a_dev.delete().await.unwrap();
    b_dev.delete().await.unwrap();
    let status = survivor.stop().expect("the survivor was running");
    assert!(status.success(), "{status}; log:\n{}", survivor.log());
}

/// The relay process's `/metrics`, fetched from a thread inside the hub's netns.
fn relay_metrics(hub: &HubInNetns) -> prometheus_parse::Scrape {
    let netns = File::open(&hub.netns).unwrap();
    let addr: std::net::SocketAddr = format!("{}:{RELAY_METRICS_PORT}", hub.ip).parse().unwrap();
    let body = std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fleet_metrics::scrape(addr) {
                Ok(body) => return body,
                Err(e) if Instant::now() > deadline => panic!("scraping the relay: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
    .join()
    .unwrap();
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid text")
}

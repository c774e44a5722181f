//! Test topology: network namespaces this test creates, joined by a veth on 192.0.2.0/24
//! (TEST-NET-1, the simulated internet). Nothing touches the host's interfaces; guards delete
//! the netns and stop the processes they started (by PID), also when a test fails.

#![allow(dead_code)]

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_gateway::{
    BackendKind, DeviceConfig, Peer, PrivateKey, PublicKey, WireguardDevice, create_device,
};

pub const PORT: u16 = 51820;
pub const MTU: u32 = 1420;

/// Fails (never skips) when not root: these tests need netns, veth and TUN.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and TUN devices: run it as root (CI is root)"
    );
}

/// Fails when the environment already sets `var` (a `FLEET_GATEWAY_*` lever read when a
/// device is created): the calling test sets it itself, or checks the default.
pub fn require_unset(var: &str, why: &str) {
    assert!(
        std::env::var_os(var).is_none(),
        "run without {var}: this test {why}"
    );
}

/// A named netns, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("fgw-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip netns exec <ns> <cmd>`; output of a command that must succeed.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend(cmd);
        run("ip", &args)
    }

    pub fn exec_ok(&self, cmd: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend(args);
        run("ip", &all)
    }

    pub fn ping(&self, addr: &str) -> bool {
        // busybox-static is installed by scripts/install-deps.sh; iputils-ping is not.
        self.exec_ok(&["busybox", "ping", "-q", "-c", "1", "-W", "1", addr])
    }

    /// Runs `f` on a thread inside this netns (sockets it opens live there).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two netns joined by a veth `ul0`: `a` is 192.0.2.1/24, `b` is 192.0.2.2/24.
pub struct Underlay {
    pub a: Netns,
    pub b: Netns,
}

impl Underlay {
    pub fn new(tag: &str) -> Self {
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        a.ip(&[
            "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &b.name,
        ]);
        for (ns, addr) in [(&a, "192.0.2.1/24"), (&b, "192.0.2.2/24")] {
            ns.ip(&["addr", "add", addr, "dev", "ul0"]);
            ns.ip(&["link", "set", "ul0", "up"]);
        }
        Self { a, b }
    }
}

/// Two userspace devices made by [`peered_pair`], and their interface names.
pub struct Pair {
    pub a: Box<dyn WireguardDevice>,
    pub b: Box<dyn WireguardDevice>,
    pub name_a: String,
    pub name_b: String,
}

/// Two userspace devices, peers of each other over `net`: `a` (198.51.100.1/32, key `keys.0`)
/// in `ends.0`, `b` (198.51.100.2/32) in `ends.1`, their UDP on `net.a` / `net.b`
/// (192.0.2.1 / .2, port [`PORT`]) — the underlay netns set where a device's netns is not its
/// node's. Interfaces `wg_name("<tag>a")` and `wg_name("<tag>b")`. Nothing is sent yet.
pub async fn peered_pair(
    net: &Underlay,
    ends: (&Netns, &Netns),
    tag: &str,
    keys: (PrivateKey, PrivateKey),
) -> Pair {
    let (pub_a, pub_b) = (keys.0.public_key(), keys.1.public_key());
    let (name_a, name_b) = (wg_name(&format!("{tag}a")), wg_name(&format!("{tag}b")));
    let make = |name: &str, ns: &Netns, node: &Netns, key: PrivateKey, address: &str| {
        let mut cfg = config(name, ns, key, address);
        if ns.name != node.name {
            cfg.underlay_netns = Some(node.path());
        }
        create_device(BackendKind::Userspace, cfg)
    };
    let a = make(&name_a, ends.0, &net.a, keys.0, "198.51.100.1/32")
        .await
        .unwrap();
    let b = make(&name_b, ends.1, &net.b, keys.1, "198.51.100.2/32")
        .await
        .unwrap();
    a.set_peers(&[peer(pub_b, "192.0.2.2:51820", "198.51.100.2/32")])
        .await
        .unwrap();
    b.set_peers(&[peer(pub_a, "192.0.2.1:51820", "198.51.100.1/32")])
        .await
        .unwrap();
    Pair {
        a,
        b,
        name_a,
        name_b,
    }
}

/// A [`tcp_bulk`] of `bytes` from `a`'s end to `b`'s (198.51.100.2) and one back, each
/// arriving whole and in order; `what` names the case in a failure.
pub fn bulk_both_ways(ends: (&Netns, &Netns), bytes: usize, what: &str) {
    for (server, client, addr) in [
        (ends.1, ends.0, "198.51.100.2"),
        (ends.0, ends.1, "198.51.100.1"),
    ] {
        let (sent, got, sent_hash, got_hash) = tcp_bulk(server, client, addr, bytes);
        assert_eq!(
            (got, got_hash),
            (sent, sent_hash),
            "{what}: bulk transfer to {addr}"
        );
    }
}

/// A WireGuard interface name unique on this host (UAPI sockets are shared by all netns).
pub fn wg_name(tag: &str) -> String {
    format!("fg{tag}{}", std::process::id())
}

pub fn config(name: &str, ns: &Netns, key: PrivateKey, address: &str) -> DeviceConfig {
    DeviceConfig {
        name: name.into(),
        netns: ns.path(),
        underlay_netns: None,
        private_key: key,
        listen_port: PORT,
        mtu: MTU,
        addresses: vec![address.parse().unwrap()],
    }
}

pub fn peer(key: PublicKey, endpoint: &str, allowed: &str) -> Peer {
    Peer {
        public_key: key,
        endpoint: Some(endpoint.parse().unwrap()),
        allowed_ips: vec![allowed.parse().unwrap()],
        persistent_keepalive: None,
    }
}

/// Polls `f` until it is true or `within` has passed.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process stopped by PID on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }

    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `msg` over TCP from `client` to `server_addr` (bound in `server`) and returns what
/// the server read and what the client got back.
pub fn tcp_exchange(
    server: &Netns,
    client: &Netns,
    server_addr: &str,
    msg: &str,
) -> (String, String) {
    use std::io::{Read, Write};
    let listener = server.run_in({
        let addr = format!("{server_addr}:7000");
        move || std::net::TcpListener::bind(addr).unwrap()
    });
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0; 4096];
        let n = s.read(&mut buf).unwrap();
        let got = String::from_utf8_lossy(&buf[..n]).to_string();
        s.write_all(format!("ack:{got}").as_bytes()).unwrap();
        got
    });
    let target: std::net::SocketAddr = format!("{server_addr}:7000").parse().unwrap();
    let msg = msg.to_string();
    let reply = client.run_in(move || {
        let mut c = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0; 4096];
        let n = c.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    (srv.join().unwrap(), reply)
}

/// `tcpdump -w` on `dev` in `ns`, started and confirmed listening.
pub fn capture(ns: &Netns, dev: &str, file: &Path) -> Proc {
    let log = file.with_extension("log");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "tcpdump",
            "--immediate-mode",
            "-i",
            dev,
            "-n",
            "-U",
            "-w",
        ])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("tcpdump (scripts/install-deps.sh installs it)");
    let p = Proc(child);
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")),
        "tcpdump did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    p
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Sends `bytes` of a deterministic pseudo-random stream over one TCP connection from
/// `client` to `server_addr` (bound in `server`, port 7001) and returns (bytes sent, bytes
/// the server read, the sender's FNV-1a hash, the receiver's): a bulk transfer large enough
/// to make the kernel hand the TUN super-packets and the device coalesce on write.
pub fn tcp_bulk(
    server: &Netns,
    client: &Netns,
    server_addr: &str,
    bytes: usize,
) -> (usize, usize, u64, u64) {
    use std::io::{Read, Write};
    let listener = server.run_in({
        let addr = format!("{server_addr}:7001");
        move || std::net::TcpListener::bind(addr).unwrap()
    });
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0; 1 << 16];
        let (mut n, mut hash) = (0usize, Fnv::new());
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    hash.write(&buf[..k]);
                    n += k;
                }
                Err(e) => panic!("bulk read after {n} bytes: {e}"),
            }
        }
        (n, hash.0)
    });
    let target: std::net::SocketAddr = format!("{server_addr}:7001").parse().unwrap();
    let (sent, sent_hash) = client.run_in(move || {
        let mut c = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10)).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let (mut rng, mut hash, mut sent) = (0x9e37_79b9_7f4a_7c15u64, Fnv::new(), 0usize);
        let mut chunk = vec![0u8; 1 << 16];
        while sent < bytes {
            let k = chunk.len().min(bytes - sent);
            for b in chunk[..k].chunks_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let r = rng.to_le_bytes();
                b.copy_from_slice(&r[..b.len()]);
            }
            c.write_all(&chunk[..k]).unwrap();
            hash.write(&chunk[..k]);
            sent += k;
        }
        (sent, hash.0)
    });
    let (got, got_hash) = srv.join().unwrap();
    (sent, got, sent_hash, got_hash)
}

/// FNV-1a, 64 bits: enough to tell a reordered or corrupted stream.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// `ethtool -k <dev>` in `ns`: the device's offload features, e.g. `tcp-segmentation-offload`.
pub fn offload_feature(ns: &Netns, dev: &str, feature: &str) -> String {
    ns.exec(&["ethtool", "-k", dev])
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{feature}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The wireguard-go builds the interop tests run: bookworm's 0.0.20220316 (no offloads) and
/// trixie's 0.0.20231211 (TUN and UDP offloads), unpacked by scripts/install-deps.sh.
pub const WG_GO_2022: &str = "/usr/bin/wireguard-go";
pub fn wg_go_2023() -> String {
    let path = std::env::var("FLEET_BENCH_WG_GO_TRIXIE").unwrap_or_else(|_| {
        "/opt/fleetboard-bench/wireguard-go-trixie/usr/bin/wireguard-go".into()
    });
    assert!(
        Path::new(&path).is_file(),
        "trixie's wireguard-go is not at {path}: run scripts/install-deps.sh"
    );
    path
}

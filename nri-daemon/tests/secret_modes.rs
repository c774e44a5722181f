//! Issue 12 item 11: under umask 000 nothing secret of the node daemon is reachable by anyone
//! but root at any instant — the node API socket (bound before its chmod, it took requests from
//! a non-root user in 11 of 17 starts), the userspace WireGuard UAPI socket (`get=1` answers the
//! private key) and its directory, the key and the gateway state. The daemon runs with the
//! umask this test sets (its own test binary: the umask is process-wide), and a thread that
//! dropped to uid/gid 65534 (nobody) keeps trying to connect. Needs root.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fleet_e2e::{FleetNri, FleetNriOpts, TestNetns, require_root};
use fleet_proto::node::{GatewayPeer, SetGatewayRequest, SetPlanRequest, WireguardBackend};

/// Connect attempts by `nobody`, and how many got in.
#[derive(Default)]
struct Tries {
    attempts: AtomicU64,
    connected: AtomicU64,
}

/// A thread that drops to uid/gid 65534 (the raw syscalls change only this thread, unlike
/// libc's wrappers) and connects to each of `paths` in a loop until `stop`.
fn nobody_connecting(
    paths: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    tries: Arc<Tries>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use nix::libc;
        // SAFETY: plain syscalls on this thread's credentials; no memory is involved.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        while !stop.load(Ordering::Relaxed) {
            for p in &paths {
                tries.attempts.fetch_add(1, Ordering::Relaxed);
                if UnixStream::connect(p).is_ok() {
                    tries.connected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn nothing_secret_is_reachable_by_others_under_umask_000() {
    require_root("nothing_secret_is_reachable_by_others_under_umask_000");
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let node = TestNetns::new("um-node");
    let mut d = FleetNri::start_with(FleetNriOpts {
        node_subnet: None,
        nri_socket: None,
        netns: Some(node.path()),
    })
    .unwrap();
    let name = format!("fum{}", std::process::id() % 1_000_000);
    let uapi = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
    let uapi_dir_existed = Path::new("/var/run/wireguard").exists();
    let stop = Arc::new(AtomicBool::new(false));
    let tries = Arc::new(Tries::default());
    let connector = nobody_connecting(vec![d.socket(), uapi.clone()], stop.clone(), tries.clone());

    // Starts of the daemon while nobody keeps connecting.
    const STARTS: usize = 20;
    for _ in 0..STARTS {
        d.kill9();
        d.spawn().unwrap();
    }
    assert_eq!(mode(&d.socket()), 0o600, "node API socket");

    // The gateway as the controller has it made: a userspace device in the daemon.
    let c = d.client();
    c.set_plan(SetPlanRequest {
        fleet_cidr: "100.96.0.0/12".into(),
        vip_range: "100.112.0.0/16".into(),
        node_subnet: "100.96.60.0/24".into(),
    })
    .unwrap();
    let req = SetGatewayRequest {
        name: name.clone(),
        listen_port: 51820,
        mtu: 1420,
        backend: Some(WireguardBackend::Userspace),
        own_block: Some("100.96.48.0/20".into()),
        relay: None,
        peers: vec![GatewayPeer {
            public_key: fleet_gateway::PrivateKey::generate().public_key(),
            endpoint: Some("192.0.2.200:51820".parse().unwrap()),
            allowed_ips: vec!["100.96.0.0/12".into()],
            keepalive: Some(25),
            fallback: None,
        }],
    };
    let result = c.set_gateway(req);
    let stop_connecting = || {
        stop.store(true, Ordering::Relaxed);
    };
    if let Err(e) = result {
        stop_connecting();
        panic!("set_gateway: {e}\n{}", d.log());
    }
    // Keep trying through the gateway's start and a daemon restart (it re-creates the device).
    d.kill9();
    d.spawn().unwrap();
    let before = tries.attempts.load(Ordering::Relaxed);
    fleet_e2e::poll_until(
        "nobody to try the sockets a while longer",
        std::time::Duration::from_secs(10),
        || (tries.attempts.load(Ordering::Relaxed) > before + 2000).then_some(()),
    )
    .unwrap();
    stop_connecting();
    connector.join().unwrap();

    let uapi_mode = mode(&uapi);
    let dir_mode = mode(Path::new("/var/run/wireguard"));
    let key_mode = mode(&d.data_dir().join("wg.key"));
    let state_mode = mode(&d.data_dir().join("gateway.json"));
    let data_mode = mode(&d.data_dir());
    let _ = c.clear_gateway();
    drop(d);
    let _ = std::fs::remove_file(&uapi);

    let (attempts, connected) = (
        tries.attempts.load(Ordering::Relaxed),
        tries.connected.load(Ordering::Relaxed),
    );
    eprintln!("nobody: {connected} of {attempts} connects got in over {STARTS} starts");
    assert!(attempts > 1000, "the connector ran: {attempts}");
    assert_eq!(connected, 0, "connections by uid 65534 that got in");
    assert_eq!(uapi_mode, 0o600, "UAPI socket");
    if uapi_dir_existed {
        assert_eq!(dir_mode & 0o022, 0, "/var/run/wireguard writable by others");
    } else {
        assert_eq!(dir_mode, 0o700, "/var/run/wireguard as we made it");
    }
    assert_eq!(key_mode, 0o600, "wg.key");
    assert_eq!(state_mode, 0o600, "gateway.json");
    assert_eq!(data_mode, 0o700, "data dir (holds wg.key)");
}

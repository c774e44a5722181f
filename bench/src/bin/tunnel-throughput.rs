//! `tunnel-throughput`: pod-to-pod-like TCP throughput through fleetboard's userspace tunnel
//! (fleet-gateway, gotatun on its own runtime per device: 2 worker threads by default; with
//! `--threads` also 1) against `wireguard-go`
//! in the same topology — trixie's 0.0.20231211 (the baseline: TUN and UDP offloads) and
//! bookworm's 0.0.20220316 (second column) — and against plain routing over the veth. Each
//! run also prints the CPU seconds per GB of each tunnel process (or device thread, for ours)
//! with its user share; runs of ours also the machine's busy CPU per GB and the ceiling of a
//! userspace device (`fleet_bench::ceiling`), whose median is printed before the last line.
//!
//! Topology, one pair per mode (all built up front, runs interleaved):
//! ```text
//! netns c: iperf3 -c 198.51.100.2 -> wg (198.51.100.1/32, mtu 1420) -> UDP
//!          -> ul0 192.0.2.1/24 == veth == 192.0.2.2/24 ul0 -> wg (198.51.100.2/32)
//! netns s: iperf3 -s
//! ```
//! `plain` runs iperf3 straight over the veth. With `--candidates`, boringtun 0.7 (1 thread,
//! no multiqueue: its defaults lose on 2 cores) runs in the same topology too: that is how
//! the userspace implementation was chosen (numbers and reasons in gateway/README.md).
//!
//! Last line: `bench tunnel-throughput ours=<Gbit/s> baseline=<wireguard-go 0.0.20231211
//! Gbit/s> ratio=.. target=1.5`. Everything lives in netns this binary creates (documentation ranges only);
//! guards delete them and stop its processes by PID, also on failure.

use fleet_bench::Proc;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fleet_bench::ceiling::{self, AeadCost, Ceiling, RunCost, busy_cpu_seconds};
use fleet_bench::stats::median_of;
use fleet_bench::wg_go::{CpuTimes, GoBuild, cpu_times, own_threads_cpu};
use fleet_gateway::{BackendKind, DeviceConfig, Peer, PrivateKey, WireguardDevice};

#[derive(Parser)]
#[command(about = "TCP throughput: fleet-gateway userspace tunnel vs wireguard-go vs plain veth")]
struct Args {
    /// Measured runs per mode (interleaved).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Also measure the userspace implementations that were not chosen (boringtun).
    #[arg(long)]
    candidates: bool,
    /// Also measure our device with each offload lever alone (`FLEET_GATEWAY_OFFLOADS` =
    /// none, batch, tun, gso, gro), with all but UDP GRO and with all but UDP GSO; ours is the
    /// default, all of them (see gateway/README.md).
    #[arg(long)]
    levers: bool,
    /// Also measure our device run by one thread each (`FLEET_GATEWAY_THREADS=1`: a
    /// current-thread runtime) beside the default of 2 workers.
    #[arg(long)]
    threads: bool,
}

/// `FLEET_GATEWAY_OFFLOADS` of the `--levers` modes.
const LEVERS: [&str; 7] = [
    "none",
    "batch",
    "tun",
    "gso",
    "gro",
    "tun,batch,gso",
    "tun,batch,gro",
];

/// The issue's target: ours ≥ 1.5 × trixie's wireguard-go.
const TARGET: f64 = 1.5;
const PORT: u16 = 51820;
const MTU: u32 = 1420;
const CLIENT_TUN: &str = "198.51.100.1";
const SERVER_TUN: &str = "198.51.100.2";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Ours,
    /// Ours with only the offloads `LEVERS[i]`.
    OursLever(usize),
    /// Ours with all offloads, each device run by one thread.
    OursOneThread,
    /// The wireguard-go build at this index of `fleet_bench::wg_go::builds` (0: baseline).
    WireguardGo(usize),
    Boringtun,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "plain-veth",
            Mode::Ours => "fleet-gateway (gotatun, default threads)",
            Mode::OursLever(0) => "fleet-gateway, offloads none",
            Mode::OursLever(1) => "fleet-gateway, offloads batch",
            Mode::OursLever(2) => "fleet-gateway, offloads tun",
            Mode::OursLever(3) => "fleet-gateway, offloads gso",
            Mode::OursLever(4) => "fleet-gateway, offloads gro",
            Mode::OursLever(5) => "fleet-gateway, offloads all but gro",
            Mode::OursLever(_) => "fleet-gateway, offloads all but gso",
            Mode::OursOneThread => "fleet-gateway (gotatun, 1 thread)",
            Mode::WireguardGo(0) => "wireguard-go 0.0.20231211",
            Mode::WireguardGo(_) => "wireguard-go 0.0.20220316",
            Mode::Boringtun => "boringtun 0.7 (1 thread)",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Mode::Plain => "p",
            Mode::Ours => "o",
            Mode::OursLever(0) => "x",
            Mode::OursLever(1) => "y",
            Mode::OursLever(2) => "z",
            Mode::OursLever(3) => "u",
            Mode::OursLever(4) => "v",
            Mode::OursLever(5) => "w",
            Mode::OursLever(_) => "q",
            Mode::OursOneThread => "t",
            Mode::WireguardGo(0) => "g",
            Mode::WireguardGo(_) => "h",
            Mode::Boringtun => "b",
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    fleet_bench::require_root("tunnel-throughput")?;
    for tool in ["iperf3", "wg", "ip"] {
        if which(tool).is_none() {
            bail!("tunnel-throughput: {tool} is missing; run scripts/install-deps.sh");
        }
    }
    let builds = fleet_bench::wg_go::builds()?;
    println!("tunnel-throughput: {}", fleet_bench::load_line());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut modes = vec![
        Mode::Plain,
        Mode::Ours,
        Mode::WireguardGo(0),
        Mode::WireguardGo(1),
    ];
    if args.candidates {
        modes.push(Mode::Boringtun);
    }
    if args.levers {
        modes.extend((0..LEVERS.len()).map(Mode::OursLever));
    }
    if args.threads {
        modes.push(Mode::OursOneThread);
    }
    let mut setups = Vec::new();
    for &mode in &modes {
        setups.push(
            rt.block_on(Setup::new(mode, &builds))
                .with_context(|| mode.label())?,
        );
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // The ceiling of a userspace device here (fleet_bench::ceiling): ours' runs, and the AEAD.
    let aead = AeadCost::measure(MTU as usize)?;
    let mut ceilings: Vec<Ceiling> = Vec::new();
    // Warm-up (handshakes, caches), not counted.
    for s in &setups {
        s.iperf(1)?;
    }
    for run in 0..args.runs {
        // Rotate the order every run so no mode always goes first.
        for k in 0..setups.len() {
            let i = (k + run) % setups.len();
            let cpu_before = setups[i].cpu();
            let busy_before = busy_cpu_seconds()?;
            let (gbps, bytes) = setups[i].iperf(args.seconds)?;
            let busy = busy_cpu_seconds()? - busy_before;
            let gb = (bytes / 1e9).max(1e-9);
            let used: Vec<(String, CpuTimes)> = setups[i]
                .cpu()
                .into_iter()
                .zip(cpu_before)
                .map(|((name, after), (_, before))| (name, after - before))
                .collect();
            let mut cpu = if used.is_empty() {
                String::new()
            } else {
                let each: Vec<String> = used
                    .iter()
                    .map(|(name, t)| {
                        format!(
                            "{name} {:.1} ({:.0}% user)",
                            t.total() / gb,
                            t.user_percent()
                        )
                    })
                    .collect();
                format!("  (cpu-s/GB: {})", each.join(", "))
            };
            if modes[i] == Mode::Ours {
                let run_cost = RunCost {
                    busy,
                    devices_user: used.iter().map(|(_, t)| t.user).sum(),
                    payload_bytes: bytes,
                    mtu: MTU as usize,
                };
                if let Some(c) = Ceiling::of(&run_cost, &aead, ceiling::cpus()) {
                    cpu += &format!(
                        "  machine busy {:.1} cpu-s/GB, ceiling {:.2} Gbit/s",
                        busy / gb,
                        c.gbps
                    );
                    ceilings.push(c);
                }
            }
            println!("run {run} {:<42} {gbps:.2} Gbit/s{cpu}", modes[i].label());
            results[i].push(gbps);
        }
    }
    let median = |i: usize| median_of(&results[i]);
    for (i, m) in modes.iter().enumerate() {
        println!(
            "tunnel-throughput {:<42} median {:.2} Gbit/s (runs {:?})",
            m.label(),
            median(i),
            results[i]
                .iter()
                .map(|g| format!("{g:.2}"))
                .collect::<Vec<_>>()
        );
    }
    println!(
        "tunnel-throughput plain-veth median {:.2} Gbit/s; the 2022 build, {} median {:.2} Gbit/s (ours/it {:.3})",
        median(0),
        Mode::WireguardGo(1).label(),
        median(3),
        median(1) / median(3)
    );
    println!(
        "tunnel-throughput: {} after the runs",
        fleet_bench::load_line()
    );
    let (ours, baseline) = (median(1), median(2));
    let (seal, open) = aead.seconds_per_gb();
    let ceiling_gbps = median_of(&ceilings.iter().map(|c| c.gbps).collect::<Vec<_>>());
    println!(
        "tunnel-throughput ceiling of a userspace device that spent no CPU but ChaCha20-Poly1305 \
         (seal {seal:.2}, open {open:.2} cpu-s per GB of {MTU}-byte packets here; bench/README.md \
         \"Ceiling\"): median {ceiling_gbps:.2} Gbit/s, ratio {:.3} to {}; {}",
        ceiling_gbps / baseline,
        Mode::WireguardGo(0).label(),
        ceiling::verdict(ceiling_gbps / baseline, TARGET),
    );
    for s in &setups {
        if let Tunnel::Ours { devices } = &s.tunnel {
            for d in devices {
                rt.block_on(d.delete())?;
            }
        }
    }
    drop(setups);
    println!(
        "{}",
        fleet_bench::stats::last_line(
            "tunnel-throughput",
            &format!("{ours:.2}"),
            &format!("{baseline:.2}"),
            ours / baseline,
            &format!("{TARGET:.1}")
        )
    );
    Ok(())
}

/// One client/server netns pair with its tunnel (fields drop in order: tunnel, server, netns).
struct Setup {
    mode: Mode,
    target: &'static str,
    tunnel: Tunnel,
    _server: Proc,
    client: Netns,
    _server_ns: Netns,
}

/// Held until the setup drops: dropping stops the devices and processes.
enum Tunnel {
    None,
    Ours {
        devices: Vec<Box<dyn WireguardDevice>>,
    },
    Procs {
        procs: Vec<Proc>,
    },
    Boringtun {
        _devices: Vec<BoringtunDevice>,
    },
}

impl Setup {
    async fn new(mode: Mode, builds: &[GoBuild]) -> Result<Self> {
        let c = Netns::new(&format!("{}c", mode.tag()))?;
        let s = Netns::new(&format!("{}s", mode.tag()))?;
        c.ip(&[
            "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &s.name,
        ])?;
        for (ns, addr) in [(&c, "192.0.2.1/24"), (&s, "192.0.2.2/24")] {
            ns.ip(&["addr", "add", addr, "dev", "ul0"])?;
            ns.ip(&["link", "set", "ul0", "up"])?;
        }
        let (kc, ks) = (PrivateKey::generate(), PrivateKey::generate());
        let names = [wg_name(mode, 'c'), wg_name(mode, 's')];
        let ends = [
            (
                &c,
                &names[0],
                &kc,
                CLIENT_TUN,
                ks.public_key(),
                "192.0.2.2",
                SERVER_TUN,
            ),
            (
                &s,
                &names[1],
                &ks,
                SERVER_TUN,
                kc.public_key(),
                "192.0.2.1",
                CLIENT_TUN,
            ),
        ];
        let (tunnel, target) = match mode {
            Mode::Plain => (Tunnel::None, "192.0.2.2"),
            Mode::Ours | Mode::OursLever(_) | Mode::OursOneThread => {
                let offloads = match mode {
                    Mode::OursLever(i) => LEVERS[i],
                    _ => "all",
                };
                // SAFETY: read by the device thread `create_device` starts; the setups are
                // made one after another and no other thread reads the environment meanwhile.
                unsafe {
                    std::env::set_var("FLEET_GATEWAY_OFFLOADS", offloads);
                    if mode == Mode::OursOneThread {
                        std::env::set_var("FLEET_GATEWAY_THREADS", "1");
                    } else {
                        // The product's default (2 workers; 1 on a one-CPU machine).
                        std::env::remove_var("FLEET_GATEWAY_THREADS");
                    }
                }
                let mut devs = Vec::new();
                for (ns, name, key, addr, peer_key, peer_ip, peer_tun) in ends {
                    let dev = fleet_gateway::create_device(
                        BackendKind::Userspace,
                        DeviceConfig {
                            name: name.clone(),
                            netns: ns.path(),
                            underlay_netns: None,
                            private_key: key.clone(),
                            listen_port: PORT,
                            mtu: MTU,
                            addresses: vec![format!("{addr}/32").parse()?],
                        },
                    )
                    .await?;
                    dev.set_peers(&[Peer {
                        public_key: peer_key,
                        endpoint: Some(format!("{peer_ip}:{PORT}").parse()?),
                        allowed_ips: vec![format!("{peer_tun}/32").parse()?],
                        persistent_keepalive: None,
                    }])
                    .await?;
                    devs.push(dev);
                }
                (Tunnel::Ours { devices: devs }, SERVER_TUN)
            }
            Mode::WireguardGo(b) => {
                let mut procs = Vec::new();
                for (ns, name, key, addr, peer_key, peer_ip, peer_tun) in ends {
                    let child = Command::new("ip")
                        .args(["netns", "exec", &ns.name])
                        .arg(&builds[b].path)
                        .args(["-f", name])
                        .env("LOG_LEVEL", "error")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .context("start wireguard-go")?;
                    procs.push(Proc(child));
                    wait_for(&uapi(name), "wireguard-go's UAPI socket")?;
                    configure_uapi_device(
                        ns,
                        name,
                        key,
                        addr,
                        &peer_key.to_base64(),
                        peer_ip,
                        peer_tun,
                    )?;
                }
                (Tunnel::Procs { procs }, SERVER_TUN)
            }
            Mode::Boringtun => {
                let mut devs = Vec::new();
                for (ns, name, key, addr, peer_key, peer_ip, peer_tun) in ends {
                    devs.push(BoringtunDevice::start(ns, name)?);
                    wait_for(&uapi(name), "boringtun's UAPI socket")?;
                    configure_uapi_device(
                        ns,
                        name,
                        key,
                        addr,
                        &peer_key.to_base64(),
                        peer_ip,
                        peer_tun,
                    )?;
                }
                (Tunnel::Boringtun { _devices: devs }, SERVER_TUN)
            }
        };
        let server = Proc(
            Command::new("ip")
                .args(["netns", "exec", &s.name, "iperf3", "-s", "-B", target])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start iperf3 -s")?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.exec(&["ss", "-ltn"])?.contains(":5201") {
            if Instant::now() > deadline {
                bail!("iperf3 -s did not listen in {}", s.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.exec_ok(&["busybox", "ping", "-q", "-c", "1", "-W", "1", target]) {
            if Instant::now() > deadline {
                bail!("{}: no ping to {target} through the tunnel", mode.label());
            }
        }
        Ok(Self {
            mode,
            target,
            tunnel,
            _server: server,
            client: c,
            _server_ns: s,
        })
    }

    /// CPU seconds so far of each process (or, for ours, device thread) of the tunnel.
    fn cpu(&self) -> Vec<(String, CpuTimes)> {
        match &self.tunnel {
            // The device threads are named `wg-<device>`, the devices `ftb<tag><end><pid>`.
            Tunnel::Ours { .. } => own_threads_cpu(&format!("wg-ftb{}", self.mode.tag())),
            Tunnel::Procs { procs } => procs
                .iter()
                .zip(["client", "server"])
                .map(|(p, end)| (end.to_string(), cpu_times(p.0.id())))
                .collect(),
            Tunnel::None | Tunnel::Boringtun { .. } => Vec::new(),
        }
    }

    /// One iperf3 run from the client netns; received Gbit/s and bytes.
    fn iperf(&self, seconds: u32) -> Result<(f64, f64)> {
        let out = self.client.exec(&[
            "iperf3",
            "-c",
            self.target,
            "-t",
            &seconds.to_string(),
            "-J",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        let received = &v["end"]["sum_received"];
        let gbps = received["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| format!("iperf3 reported no throughput: {out}"))?;
        Ok((gbps, received["bytes"].as_f64().unwrap_or(0.0)))
    }
}

/// Address, MTU, route and `wg set` for a device that serves UAPI (wireguard-go, boringtun).
fn configure_uapi_device(
    ns: &Netns,
    name: &str,
    key: &PrivateKey,
    addr: &str,
    peer_key: &str,
    peer_ip: &str,
    peer_tun: &str,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("key");
    key.save(&key_file)?;
    let out = Command::new("wg")
        .args(["set", name, "private-key"])
        .arg(&key_file)
        .args([
            "listen-port",
            &PORT.to_string(),
            "peer",
            peer_key,
            "endpoint",
        ])
        .arg(format!("{peer_ip}:{PORT}"))
        .args(["allowed-ips", &format!("{peer_tun}/32")])
        .output()?;
    if !out.status.success() {
        bail!("wg set {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", name])?;
    ns.ip(&["link", "set", name, "mtu", &MTU.to_string(), "up"])?;
    ns.ip(&["route", "add", &format!("{peer_tun}/32"), "dev", name])?;
    Ok(())
}

/// A boringtun device created on a thread inside the netns (its worker threads inherit it).
struct BoringtunDevice {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BoringtunDevice {
    fn start(ns: &Netns, name: &str) -> Result<Self> {
        let file = std::fs::File::open(ns.path())?;
        let name = name.to_string();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            if let Err(e) = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
            let config = boringtun::device::DeviceConfig {
                n_threads: 1,
                use_connected_socket: true,
                use_multi_queue: false,
                uapi_fd: -1,
            };
            match boringtun::device::DeviceHandle::new(&name, config) {
                Ok(handle) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = stopped.recv();
                    drop(handle);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:?}")));
                }
            }
        });
        ready
            .recv()
            .context("boringtun thread exited")?
            .map_err(|e| anyhow::anyhow!("boringtun: {e}"))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for BoringtunDevice {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wg_name(mode: Mode, end: char) -> String {
    format!("ftb{}{end}{}", mode.tag(), std::process::id())
}

fn uapi(name: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{name}.sock"))
}

fn wait_for(path: &Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{what} {} did not appear", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.exists())
    })
}

/// A named netns, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("ftb-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args);
        run("ip", &all)
    }
    fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend(cmd);
        run("ip", &all)
    }
    fn exec_ok(&self, cmd: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("{cmd} {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

//! fleet-sandbox: a local fleet node on this machine, for trying fleetboard by hand.
//!
//! Starts containerd 1.7 in its own network namespace with Debian's bridge + host-local as the
//! primary CNI and fleet-cni chained after them, runs fleet-nri on its NRI socket, starts
//! `--pods` busybox pods, and shows each pod's `eth0` and `eth-fleet`, the fleet IP its
//! container sees, and the pods reaching each other over the fleet network. Then it stays up
//! until Ctrl-C (or exits at once with `--once`) and tears everything down.
//!
//! Everything lives in network namespaces this program creates; nothing touches the host's
//! interfaces.

use std::time::Duration;

use fleet_e2e::{
    BridgeNetwork, Containerd, ContainerdOpts, FleetNri, PodSpec, poll_until, workspace_bin,
};

const EXEC: Duration = Duration::from_secs(10);

fn main() {
    if let Err(e) = run() {
        eprintln!("fleet-sandbox: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let once = args.iter().any(|a| a == "--once");
    let pods: usize = args
        .iter()
        .position(|a| a == "--pods")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(2)
        .max(1);
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "run as root: the sandbox creates network namespaces and runs containerd".into(),
        );
    }
    // Before any thread exists, so every thread inherits the blocked mask and Ctrl-C reaches
    // only the waiting thread: teardown always runs.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    ctrlc_channel(stop_tx)?;

    println!("== starting containerd (own netns) with bridge + host-local, fleet-cni chained");
    let containerd =
        Containerd::start(ContainerdOpts::new("sandbox").cni_plugin(workspace_bin("fleet-cni")))?;
    println!("== starting fleet-nri (node subnet 100.96.1.0/24) on containerd's NRI socket");
    let nri = FleetNri::start("100.96.1.0/24", Some(&containerd.nri_socket()))?;
    poll_until(
        "fleet-nri to register over NRI",
        Duration::from_secs(15),
        || nri.status().ok().filter(|s| s.nri_registered),
    )?;
    BridgeNetwork::new("podnet", "sandbox-br0", "10.244.1.0/24")
        .chain(nri.cni_entry())
        .write_to(&containerd)?;
    let cri = containerd.cri()?;
    cri.wait_network_ready(Duration::from_secs(15))?;

    let mut running = Vec::new();
    for i in 0..pods {
        let name = format!("pod-{i}");
        let (sandbox, container) =
            cri.run_busybox_pod(&PodSpec::new(&name).label("app", "sandbox"))?;
        let netns = cri.pod_netns_path(&sandbox)?;
        let eth0 = cri.exec_sync(
            &container,
            &["ip", "-4", "-o", "addr", "show", "eth0"],
            EXEC,
        )?;
        let fleet = cri.exec_sync(
            &container,
            &["ip", "-4", "-o", "addr", "show", "eth-fleet"],
            EXEC,
        )?;
        let env = cri.exec_sync(&container, &["sh", "-c", "echo $FLEETBOARD_IP"], EXEC)?;
        println!("\n== {name} (sandbox {})", &sandbox[..12]);
        println!("   eth0       {}", inet(&eth0.stdout));
        println!("   eth-fleet  {}", inet(&fleet.stdout));
        println!("   FLEETBOARD_IP in the container: {}", env.stdout.trim());
        println!("   look inside: nsenter --net={} ip addr", netns.display());
        running.push((name, container, env.stdout.trim().to_string()));
    }
    if running.len() > 1 {
        let (from, c, _) = &running[0];
        for (to, _, ip) in &running[1..] {
            let ping = cri.exec_sync(
                c,
                &["ping", "-c", "2", "-W", "2", "-I", "eth-fleet", ip],
                EXEC,
            )?;
            let verdict = if ping.success() {
                "reachable"
            } else {
                "NOT reachable"
            };
            println!("\n== {from} -> {to} ({ip}) over eth-fleet: {verdict}");
        }
    }
    println!("\n== node allocations (node API list_attachments):");
    for a in nri.client().list_attachments()? {
        println!(
            "   {:<15} {}/{} host veth {}",
            a.address, a.pod.namespace, a.pod.name, a.host_veth
        );
    }
    println!("\n   fleet-nri node API socket: {}", nri.socket().display());
    println!("   CNF netns: ip -n {} link", nri.cnf_netns());

    if !once {
        println!("\n== up; press Ctrl-C to tear everything down");
        let _ = stop_rx.recv();
    }
    println!("== tearing down");
    for pod in cri.list_pods()? {
        let _ = cri.stop_pod(&pod.id);
        let _ = cri.remove_pod(&pod.id);
    }
    drop(cri);
    drop(containerd);
    drop(nri);
    Ok(())
}

fn inet(ip_output: &str) -> String {
    ip_output
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or("(none)")
        .to_string()
}

/// Delivers SIGINT/SIGTERM to a channel (blocking the signals in this thread and waiting).
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> Result<(), Box<dyn std::error::Error>> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || {
        let _ = set.wait();
        let _ = tx.send(());
    });
    Ok(())
}

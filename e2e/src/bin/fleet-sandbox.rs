//! fleet-sandbox: a whole fleet on this machine, for trying fleetboard by hand.
//!
//! Builds the sandbox of `fleet_e2e::fleet`: a simulated internet (203.0.113.0/24) with the
//! hub `cc` (fleet-hub, embedded store, relay) at 203.0.113.10, and members `aa` and `bb`,
//! each behind its own NAT router on the same LAN range (198.51.100.0/24) with two nodes
//! running containerd 1.7 + fleet-nri + fleet-cni (identical primary pod CIDR 10.244.1.0/24).
//! Each member's fleet-controller joins the hub with a token. Then it starts `--pods N`
//! busybox pods per member (spread over the nodes), shows their addresses, a cross-cluster
//! ping and TCP exchange; then service discovery: a web service of two pods in `aa`, exported
//! with `fleetctl export`, fetched from a pod of `bb` by its name
//! `web.default.svc.clusterset.local` (resolved by bb's fleet-dns to a ClusterSetIP VIP of bb,
//! which bb's nodes send to aa's pods over the tunnel), and `fleetctl status`; then, up, prints
//! ready-to-paste operator commands (`fleetctl status`/`doctor` as aa, the hub's admin view,
//! the board's login link and how to reach the hub's netns from a browser) and stays up
//! until Ctrl-C (or exits at once with `--once`, non-zero if any step failed) and tears
//! everything down.
//!
//! Everything lives in network namespaces this program creates; nothing touches the host's
//! interfaces.

use std::time::{Duration, Instant};

use fleet_e2e::fleet::DNS_VIP;
use fleet_e2e::{Pod, SandboxFleet, poll_until};

fn main() {
    if let Err(e) = run() {
        eprintln!("fleet-sandbox: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: fleet-sandbox [--once] [--pods N]\n  --once    tear down right after the demo\n  \
             --pods N  busybox pods per member cluster (default 2)"
        );
        return Ok(());
    }
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

    let t0 = Instant::now();
    println!("== building the sandbox fleet: internet 203.0.113.0/24, hub cc at 203.0.113.10,");
    println!("   members aa and bb behind NAT (LAN 198.51.100.0/24 each), 2 nodes each");
    let mut fleet = SandboxFleet::standard()?;
    println!("== starting fleet-controller in aa and bb (join with a token from fleet-hub)");
    fleet.start_controllers(false)?;
    println!("   every node has its plan after {}", human(t0.elapsed()));
    println!(
        "== starting fleet-dns in aa and bb (in each gateway node's CNF netns, behind the DNS VIP {DNS_VIP})"
    );
    fleet.start_dns("aa")?;
    fleet.start_dns("bb")?;

    let mut running = Vec::new();
    for id in ["aa", "bb"] {
        let nodes = fleet.member(id).nodes.len();
        for i in 0..pods {
            let node = (i + 1) % nodes; // the first pod on a non-gateway node
            let pod = fleet.run_pod(id, node, &format!("{id}-pod-{i}"))?;
            println!(
                "\n== {} on {}: eth0 {}  eth-fleet {}",
                pod.name,
                fleet.member(id).nodes[node].name,
                pod.primary_ip,
                pod.fleet_ip
            );
            if !once {
                // The netns goes with the teardown: shown only while the fleet stays up.
                println!(
                    "   look inside: nsenter --net={} ip addr",
                    pod.netns.display()
                );
            }
            running.push(pod);
        }
    }
    println!(
        "\n   (eth0 is the primary CNI's, and every node here hands out the same pod range on \
         purpose — overlapping pod CIDRs; eth-fleet addresses are unique across the fleet)"
    );
    let client = running
        .iter()
        .find(|p| p.member == "bb")
        .ok_or("no pod in bb")?;
    let server = running
        .iter()
        .find(|p| p.member == "aa")
        .ok_or("no pod in aa")?;
    let t = Instant::now();
    let reached = fleet.time_until_ping(client, server, t, Duration::from_secs(45));
    match &reached {
        Ok(took) => println!(
            "\n== {} (bb) -> {} (aa) {} over eth-fleet: reachable (first ping after {})",
            client.name,
            server.name,
            server.fleet_ip,
            human(*took)
        ),
        Err(e) => println!(
            "\n== {} -> {}: NOT reachable: {e}",
            client.name, server.name
        ),
    }
    if reached.is_ok() {
        fleet.exec(
            server,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo hello-from-aa > /www/index.html && httpd -p 8080 -h /www",
            ],
        )?;
        let url = format!("http://{}:8080/", server.fleet_ip);
        let got = fleet.exec(client, &["timeout", "5", "wget", "-q", "-O", "-", &url])?;
        println!("== TCP: {} fetched {url}: {}", client.name, got.trim());
    }
    let discovered = service_discovery(&fleet, client);
    if let Err(e) = &discovered {
        println!("== service discovery FAILED: {e}");
    }
    let status = fleet.fleetctl("bb", &["status"])?;
    println!(
        "\n== fleetctl status (from bb):\n{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    if !once {
        // The logs live in the sandbox's directory, which the teardown removes: shown only
        // while they can be read.
        println!(
            "   hub log: {}",
            fleet.hub.replicas[0].process.log_path().display()
        );
        for m in &fleet.members {
            for c in &m.controllers {
                println!("   {} log: {}", c.holder, c.process.log_path().display());
            }
        }
        println!("\n== up; press Ctrl-C to tear everything down");
        println!("== operator commands (paste into a root shell on this machine):");
        println!("{}", indent(&fleet.operator_commands("aa")?));
        let _ = stop_rx.recv();
    }
    println!("== tearing down");
    drop(fleet);
    println!("== torn down: the sandbox's netns, processes and files are gone");
    reached?;
    discovered?;
    Ok(())
}

/// Deploys `web` (two pods labelled app=web) in aa, exports it, and fetches it by name from
/// `client` in bb, printing each step.
fn service_discovery(fleet: &SandboxFleet, client: &Pod) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n== service discovery: two httpd pods labelled app=web in aa");
    for (node, name) in [(0, "web-1"), (1, "web-2")] {
        let pod =
            fleet.run_http_pod("aa", node, name, "web", &format!("hello from {name} in aa"))?;
        println!(
            "   {name} on {}: eth-fleet {}",
            fleet.member("aa").nodes[node].name,
            pod.fleet_ip
        );
    }
    let export = [
        "export",
        "web",
        "-n",
        "default",
        "--selector",
        "app=web",
        "--port",
        "http:tcp:80",
    ];
    println!("== fleetctl {} (as aa)", export.join(" "));
    let out = fleet.fleetctl("aa", &export)?;
    print!("   {}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(format!("fleetctl export: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let url = "http://web.default.svc.clusterset.local/";
    let t = Instant::now();
    let body = poll_until(
        "the service by its clusterset name",
        Duration::from_secs(45),
        || {
            fleet
                .exec(client, &["timeout", "4", "wget", "-q", "-O", "-", url])
                .ok()
        },
    )?;
    println!(
        "== {} (bb) fetched {url} {} after the export: {}",
        client.name,
        human(t.elapsed()),
        body.trim()
    );
    let lookup = fleet.exec(client, &["nslookup", "web.default.svc.clusterset.local"])?;
    println!("   nslookup in {} (bb):\n{}", client.name, indent(&lookup));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        if let Ok(b) = fleet.exec(client, &["timeout", "4", "wget", "-q", "-O", "-", url]) {
            seen.insert(b.trim().to_string());
        }
    }
    println!(
        "   20 more requests were answered by: {}",
        seen.iter().cloned().collect::<Vec<_>>().join("; ")
    );
    if seen.len() < 2 {
        return Err("the requests did not reach both of aa's pods".into());
    }
    let services = fleet.fleetctl("bb", &["services"])?;
    println!(
        "== fleetctl services (from bb):\n{}",
        String::from_utf8_lossy(&services.stdout)
    );
    Ok(())
}

/// `text` indented for the demo's output, without its blank lines.
fn indent(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| format!("     {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A duration as a person reads it: "3 ms", "1.1 s".
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
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

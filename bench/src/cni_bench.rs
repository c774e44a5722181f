//! The CNI latency benchmark behind `cni-add` and `cni-del`: fleet-cni against Debian's
//! `bridge` + `host-local`, each plugin exec'd inside the same benchmark "host" netns, a fresh
//! pod netns per call, the two sides interleaved (order alternating) so they share the noise.
//!
//! Per iteration, with two fresh pod netns (creation is not timed):
//! - baseline: `bridge` ADD (timed), later `bridge` DEL (timed);
//! - ours: `bridge` ADD (untimed; its result is fleet-cni's prevResult), `fleet-cni` ADD (timed),
//!   later `fleet-cni` DEL (timed) then `bridge` DEL (untimed): the runtime's reverse order.
//!
//! Then a breakdown of fleet-cni's cost: the bare exec (`VERSION`, no daemon call), the node
//! API round trip alone (`status`), and attach/detach called directly on the daemon (IPAM +
//! netlink, no exec).

use std::time::{Duration, Instant};

use anyhow::Context;
use fleet_e2e::TestNetns;
use fleet_proto::node::{AttachRequest, AttachmentKey, DetachRequest, PodMeta};
use serde_json::{Value, json};

use crate::bins::{SYSTEM_CNI_DIR, release_bin};
use crate::cni::{Call, Plugin, plugin_config};
use crate::daemon::{DaemonOpts, FleetNri};
use crate::stats::{Samples, last_line};

pub const CNI_VERSION: &str = "1.0.0";
const NETWORK: &str = "benchnet";

/// Which operation the last line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
}

#[derive(Debug, Clone, clap::Parser)]
pub struct Flags {
    /// Measured iterations (each: one ADD and one DEL per side).
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
    /// Unmeasured iterations first (bridge creation, page cache).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Stop measuring after this many seconds even if iterations remain.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// Calls per part in the fleet-cni cost breakdown (0 skips it).
    #[arg(long, default_value_t = 100)]
    pub breakdown: usize,
}

pub fn run(op: Op, flags: &Flags) -> anyhow::Result<()> {
    let name = match op {
        Op::Add => "cni-add",
        Op::Del => "cni-del",
    };
    crate::require_root(name)?;
    println!("{name}: {}", crate::load_line());
    let pid = std::process::id();
    let host = TestNetns::try_new("fbh")?;
    let ipam = tempfile::Builder::new().prefix("fbench-ipam-").tempdir()?;
    let bridge = Plugin::new(
        format!("{SYSTEM_CNI_DIR}/bridge").into(),
        SYSTEM_CNI_DIR,
        &host.path(),
    )?;
    let fleet = Plugin::new(release_bin("fleet-cni")?, SYSTEM_CNI_DIR, &host.path())?;
    let daemon = FleetNri::start(&DaemonOpts {
        binary: release_bin("fleet-nri")?,
        node_subnet: "100.96.3.0/24".into(),
        nri_socket: None,
        netns: host.path(),
        cnf_netns: format!("fbench-cnf-{pid}"),
    })?;
    let bridge_entry = json!({
        "type": "bridge",
        "bridge": "fbbr0",
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.0.0/16"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": ipam.path(),
        },
    });
    let fleet_entry = json!({"type": "fleet-cni", "socket": daemon.socket()});
    let sides = Sides {
        bridge: &bridge,
        fleet: &fleet,
        bridge_entry: &bridge_entry,
        fleet_entry: &fleet_entry,
    };

    let mut s = Measured {
        base_add: Samples::new("bridge ADD (baseline)"),
        base_del: Samples::new("bridge DEL (baseline)"),
        ours_add: Samples::new("fleet-cni ADD (ours)"),
        ours_del: Samples::new("fleet-cni DEL (ours)"),
        chain_add: Samples::new("bridge+fleet-cni ADD (chain)"),
    };
    let started = Instant::now();
    let limit = Duration::from_secs(flags.max_seconds);
    for i in 0..flags.warmup + flags.iterations {
        if started.elapsed() > limit {
            println!("stopping after {:?} (--max-seconds)", started.elapsed());
            break;
        }
        crate::check_interrupted()?;
        let record = i >= flags.warmup;
        sides.iteration(i, record, &mut s)?;
    }
    println!(
        "{} iterations in {:.1}s; {}",
        s.base_add.len(),
        started.elapsed().as_secs_f64(),
        crate::load_line()
    );
    for x in [
        &s.base_add,
        &s.ours_add,
        &s.chain_add,
        &s.base_del,
        &s.ours_del,
    ] {
        println!("{}", x.summary());
    }

    if flags.breakdown > 0 {
        breakdown(flags.breakdown, &sides, &daemon)?;
    }
    let (ours, base) = match op {
        Op::Add => (&s.ours_add, &s.base_add),
        Op::Del => (&s.ours_del, &s.base_del),
    };
    let ratio = ours.median() / base.median();
    println!(
        "target: fleet-cni {} median <= 0.5 x bridge's ({})",
        if op == Op::Add { "ADD" } else { "DEL" },
        if ratio <= 0.5 { "met" } else { "MISSED" }
    );
    println!(
        "{}",
        last_line(
            name,
            &format!("{:.3}ms", ours.median()),
            &format!("{:.3}ms", base.median()),
            ratio,
            "0.50"
        )
    );
    Ok(())
}

struct Measured {
    base_add: Samples,
    base_del: Samples,
    ours_add: Samples,
    ours_del: Samples,
    chain_add: Samples,
}

struct Sides<'a> {
    bridge: &'a Plugin,
    fleet: &'a Plugin,
    bridge_entry: &'a Value,
    fleet_entry: &'a Value,
}

fn pod_args(pod: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={pod};K8S_POD_UID=uid-{pod}"
    )
}

impl Sides<'_> {
    fn call(
        &self,
        plugin: &Plugin,
        entry: &Value,
        command: &str,
        pod: &str,
        netns: &TestNetns,
        prev: Option<&Value>,
    ) -> anyhow::Result<crate::cni::Reply> {
        let config = plugin_config(entry, CNI_VERSION, NETWORK, prev);
        let args = pod_args(pod);
        plugin.call(&Call {
            command,
            container_id: pod,
            netns: &netns.path(),
            ifname: "eth0",
            args: &args,
            config: &config,
        })
    }

    fn iteration(&self, i: usize, record: bool, s: &mut Measured) -> anyhow::Result<()> {
        let pid = std::process::id();
        let base_ns = TestNetns::try_new("fbpb")?;
        let ours_ns = TestNetns::try_new("fbpo")?;
        let base_pod = format!("b{pid}x{i}");
        let ours_pod = format!("o{pid}x{i}");
        let ours_first = i % 2 == 1;

        // ADD
        let mut base_result = None;
        let mut ours_result = None;
        for turn in 0..2 {
            if (turn == 0) == ours_first {
                let prev = self.call(
                    self.bridge,
                    self.bridge_entry,
                    "ADD",
                    &ours_pod,
                    &ours_ns,
                    None,
                )?;
                let r = self.call(
                    self.fleet,
                    self.fleet_entry,
                    "ADD",
                    &ours_pod,
                    &ours_ns,
                    Some(&prev.stdout),
                )?;
                if record {
                    s.ours_add.push(r.elapsed);
                    s.chain_add.push(prev.elapsed + r.elapsed);
                }
                ours_result = Some(r.stdout);
            } else {
                let r = self.call(
                    self.bridge,
                    self.bridge_entry,
                    "ADD",
                    &base_pod,
                    &base_ns,
                    None,
                )?;
                if record {
                    s.base_add.push(r.elapsed);
                }
                base_result = Some(r.stdout);
            }
        }
        // DEL, in the other order than ADD this time.
        for turn in 0..2 {
            if (turn == 0) != ours_first {
                let r = self.call(
                    self.fleet,
                    self.fleet_entry,
                    "DEL",
                    &ours_pod,
                    &ours_ns,
                    ours_result.as_ref(),
                )?;
                self.call(
                    self.bridge,
                    self.bridge_entry,
                    "DEL",
                    &ours_pod,
                    &ours_ns,
                    ours_result.as_ref(),
                )?;
                if record {
                    s.ours_del.push(r.elapsed);
                }
            } else {
                let r = self.call(
                    self.bridge,
                    self.bridge_entry,
                    "DEL",
                    &base_pod,
                    &base_ns,
                    base_result.as_ref(),
                )?;
                if record {
                    s.base_del.push(r.elapsed);
                }
            }
        }
        Ok(())
    }
}

/// Where fleet-cni's time goes: exec alone, the socket round trip alone, the daemon's work alone.
fn breakdown(n: usize, sides: &Sides, daemon: &FleetNri) -> anyhow::Result<()> {
    println!("fleet-cni cost breakdown ({n} calls each, interleaved):");
    let mut exec_fleet = Samples::new("exec fleet-cni VERSION");
    let mut exec_bridge = Samples::new("exec bridge VERSION");
    let mut rtt = Samples::new("node API status round trip");
    let mut attach = Samples::new("daemon attach (direct)");
    let mut detach = Samples::new("daemon detach (direct)");
    let version = json!({"cniVersion": CNI_VERSION});
    let client = daemon.client();
    let pid = std::process::id();
    for i in 0..n {
        crate::check_interrupted()?;
        let ns = TestNetns::try_new("fbpd")?;
        for (plugin, samples) in [
            (sides.fleet, &mut exec_fleet),
            (sides.bridge, &mut exec_bridge),
        ] {
            let r = plugin.call(&Call {
                command: "VERSION",
                container_id: "",
                netns: &ns.path(),
                ifname: "",
                args: "",
                config: &version,
            })?;
            samples.push(r.elapsed);
        }
        let t = Instant::now();
        client.status().context("node API status")?;
        rtt.push(t.elapsed());

        let key = AttachmentKey {
            container_id: format!("d{pid}x{i}"),
            ifname: "eth0".into(),
        };
        let t = Instant::now();
        client
            .attach(AttachRequest {
                key: key.clone(),
                network: NETWORK.into(),
                netns: ns.path().display().to_string(),
                pod: PodMeta {
                    namespace: "bench".into(),
                    name: key.container_id.clone(),
                    ..PodMeta::default()
                },
                primary: vec![],
            })
            .context("direct attach")?;
        attach.push(t.elapsed());
        let t = Instant::now();
        client
            .detach(DetachRequest {
                key,
                network: NETWORK.into(),
                netns: ns.path().display().to_string(),
            })
            .context("direct detach")?;
        detach.push(t.elapsed());
    }
    for x in [&exec_fleet, &exec_bridge, &rtt, &attach, &detach] {
        println!("  {}", x.summary());
    }
    Ok(())
}

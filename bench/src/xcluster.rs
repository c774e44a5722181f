//! The cross-cluster benchmarks' common ground (`cross-cluster-latency`,
//! `cross-cluster-throughput`): fleet-e2e's sandbox fleet — hub `cc` with its relay, members
//! `aa` and `bb` behind NAT with two real containerd nodes each, one `fleet-controller` per
//! member on its gateway node (node 1) — and three busybox pods:
//!
//! - `P1` on aa's node 2 (not the gateway node),
//! - `P2` on aa's node 1 (the gateway node),
//! - `P3` on bb's node 2 (not the gateway node).
//!
//! P1 ↔ P2 is the intra-cluster path (eth-fleet → CNF netns → VXLAN → CNF netns → eth-fleet);
//! P3 → P1 the cross-cluster one (VXLAN to bb's gateway node → WireGuard → bb's NAT → hub
//! relay → aa's NAT → aa's gateway → VXLAN → P1). Tools run "in the pod" with `nsenter
//! --net=<the pod's netns path from CRI>`: the host's binaries (busybox, iperf3) in the pod's
//! network namespace.
//!
//! Everything is dropped with the [`SandboxFleet`] (pods, controllers, nodes, routers, hub,
//! internet; processes by PID).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleet_e2e::fleet::{HUB_IP, RELAY_PORT};
use fleet_e2e::{Pod, SandboxFleet};

/// The sandbox with its three pods. Field order: pods are plain data, the fleet drops last.
pub struct CrossClusterPods {
    /// aa node 2.
    pub p1: Pod,
    /// aa node 1 (gateway node).
    pub p2: Pod,
    /// bb node 2.
    pub p3: Pod,
    pub fleet: SandboxFleet,
}

impl CrossClusterPods {
    /// Starts the fleet, its controllers and the pods; returns once P3 reaches P1 through the
    /// relay and P1 reaches P2, and after checking that each gateway's only peer is the
    /// hub relay (so the cross path is the relayed one).
    pub fn start(bench: &str) -> Result<CrossClusterPods> {
        let t0 = Instant::now();
        let mut fleet = SandboxFleet::standard().context("start the sandbox fleet")?;
        fleet
            .start_controllers(false)
            .context("start the controllers")?;
        println!(
            "{bench}: sandbox fleet up (hub cc + relay, aa and bb with 2 nodes each, controllers) in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        let p1 = fleet.run_pod("aa", 1, "p1")?;
        let p2 = fleet.run_pod("aa", 0, "p2")?;
        let p3 = fleet.run_pod("bb", 1, "p3")?;
        for p in [&p1, &p2, &p3] {
            println!(
                "{bench}: pod {} on {}/node {} eth-fleet {} netns {}",
                p.name,
                p.member,
                p.node + 1,
                p.fleet_ip,
                p.netns.display()
            );
        }
        let t = Instant::now();
        fleet
            .time_until_ping(&p3, &p1, t, Duration::from_secs(60))
            .context("P3 -> P1 across the fleet")?;
        fleet
            .time_until_ping(&p1, &p2, t, Duration::from_secs(30))
            .context("P1 -> P2 within aa")?;
        println!(
            "{bench}: first pings through after {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let me = CrossClusterPods { p1, p2, p3, fleet };
        let relay = format!("{HUB_IP}:{RELAY_PORT}");
        for m in ["aa", "bb"] {
            let endpoints = me.gateway_wg(m, "endpoints")?;
            let peers: Vec<&str> = endpoints.lines().collect();
            if peers.len() != 1 || !peers[0].contains(&relay) {
                bail!(
                    "{bench}: {m}'s gateway should have exactly one peer, the hub relay {relay}; wg show endpoints:\n{endpoints}"
                );
            }
        }
        Ok(me)
    }

    /// `wg show <member's active gateway device> <what>`.
    pub fn gateway_wg(&self, member: &str, what: &str) -> Result<String> {
        let m = self.fleet.member(member);
        let active = m
            .active_controller()
            .with_context(|| format!("{member} has no active gateway device"))?;
        Ok(m.controllers[active].wg_show(what)?)
    }

    /// `program` run in `pod`'s network namespace (`nsenter --net=<netns> -- program`).
    pub fn in_pod(&self, pod: &Pod, program: &str) -> Command {
        self.fleet.pod_command(pod, program)
    }

    /// `count` ICMP echos from `from` to `to_ip` over eth-fleet, one every `interval`, with
    /// busybox's `ping` in the pod's netns; returns each reply's RTT and the number of echos
    /// that got no reply.
    pub fn ping(
        &self,
        from: &Pod,
        to_ip: &str,
        count: usize,
        interval: Duration,
    ) -> Result<(Vec<Duration>, usize)> {
        let deadline = (interval.as_secs_f64() * count as f64).ceil() as u64 + 5;
        let out = self
            .in_pod(from, "busybox")
            .args([
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                &format!("{:.3}", interval.as_secs_f64()),
                "-W",
                "2",
                "-w",
                &deadline.to_string(),
                "-I",
                "eth-fleet",
                to_ip,
            ])
            .output()
            .context("run busybox ping in the pod's netns")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let rtts = parse_ping_rtts(&text);
        if rtts.is_empty() {
            bail!(
                "ping {} -> {to_ip}: no replies\n{text}{}",
                from.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((rtts.clone(), count.saturating_sub(rtts.len())))
    }
}

/// The RTTs of busybox/iputils `ping` reply lines (`... time=0.123 ms`).
pub fn parse_ping_rtts(text: &str) -> Vec<Duration> {
    text.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|ms| ms.parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_nanos((ms * 1e6).round() as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_rtts_are_read_from_reply_lines_only() {
        let text = "PING 100.96.1.2 (100.96.1.2): 56 data bytes\n\
                    64 bytes from 100.96.1.2: seq=0 ttl=62 time=0.412 ms\n\
                    64 bytes from 100.96.1.2: seq=1 ttl=62 time=1.003 ms\n\
                    \n--- 100.96.1.2 ping statistics ---\n\
                    3 packets transmitted, 2 packets received, 33% packet loss\n\
                    round-trip min/avg/max = 0.412/0.707/1.003 ms\n";
        let rtts = parse_ping_rtts(text);
        assert_eq!(
            rtts,
            vec![Duration::from_micros(412), Duration::from_micros(1003)]
        );
        assert!(parse_ping_rtts("ping: sendto: Network unreachable\n").is_empty());
    }
}

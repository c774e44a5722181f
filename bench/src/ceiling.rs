//! The ceiling of a userspace WireGuard gateway on this machine: the throughput a device
//! whose only CPU cost of its own were ChaCha20-Poly1305 could reach, given what everything
//! else on the path cost per GB in the same run.
//!
//! During a run of ours the throughput benchmarks read the machine's busy CPU time
//! (`/proc/stat`), the user time of the processes (or threads) running our WireGuard devices,
//! and iperf3's payload bytes. Then, per GB of payload:
//!
//! ```text
//! floor  = (busy − devices' user time) / GB          kernel work of the path, iperf3, relay
//!        + packets per GB × (seal + open per packet)  the AEAD every WireGuard device must do
//! ceiling Gbit/s = 8 × cpus / floor
//! ```
//!
//! Seal and open are measured in this process with aws-lc-rs (gotatun's backend) on packets
//! of the tunnel's MTU, best of several passes, by thread CPU time. The estimate assumes the
//! kernel's work per GB stays what it was (the same system calls and batch sizes), and it
//! counts every CPU busy all the time and nothing for copies, checksums, GSO splitting or GRO
//! that a real device also does: a generous upper bound, for telling which targets a
//! userspace data path can reach here at all (bench/README.md, issue 10).

use anyhow::{Context, Result};
use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use crate::wg_go::clock_ticks_per_second;

/// IPv4 (20) + TCP (20) + TCP timestamps (12): the headers of a full-size iperf3 segment, so
/// a packet of `mtu` bytes carries `mtu - 52` bytes of payload.
pub const TCP_IPV4_HEADERS: usize = 52;

/// Busy CPU time of the whole machine so far, summed over its CPUs (seconds): the first line
/// of `/proc/stat` (`proc(5)`), `user + nice + system + irq + softirq + steal` (guest time is
/// already inside user).
pub fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    parse_busy(&stat, clock_ticks_per_second())
}

/// `busy_cpu_seconds` of a `/proc/stat` text, `hz` ticks per second.
fn parse_busy(stat: &str, hz: f64) -> Result<f64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no `cpu` line")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("/proc/stat: malformed `cpu` line {line:?}"))?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    if ticks.len() < 8 {
        anyhow::bail!("/proc/stat: `cpu` line has {} fields, not ≥ 8", ticks.len());
    }
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
    Ok(busy as f64 / hz)
}

/// CPU seconds per packet of ChaCha20-Poly1305 as a WireGuard device does it (RFC 8439 with
/// an empty AAD and a 16-byte tag; WireGuard whitepaper §5.4.6).
#[derive(Debug, Clone, Copy)]
pub struct AeadCost {
    /// Packet size measured (bytes of plaintext).
    pub packet: usize,
    /// Seconds to seal one packet.
    pub seal: f64,
    /// Seconds to open one packet.
    pub open: f64,
}

impl AeadCost {
    /// Measures seal and open of `packet`-byte packets: 5 passes over 32 MiB each, the fastest
    /// pass kept (the machine is noisy; the ceiling should be generous). Fails only if
    /// aws-lc-rs does (a packet opened must equal the one sealed).
    pub fn measure(packet: usize) -> Result<AeadCost> {
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32])
                .map_err(|_| anyhow::anyhow!("aws-lc-rs refused a 32-byte ChaCha20 key"))?,
        );
        let count = (32 << 20) / packet.max(1);
        let plain = vec![0x5au8; packet];
        let mut sealed = Vec::with_capacity(packet + 16);
        let (mut seal, mut open) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let t = ThreadCpu::now();
            for n in 0..count as u64 {
                sealed.clear();
                sealed.extend_from_slice(&plain);
                key.seal_in_place_append_tag(nonce(n), Aad::empty(), &mut sealed)
                    .map_err(|_| anyhow::anyhow!("aws-lc-rs: seal failed"))?;
            }
            seal = seal.min(t.elapsed() / count as f64);
            let sealed_once = sealed.clone();
            let last = count as u64 - 1;
            let t = ThreadCpu::now();
            for _ in 0..count {
                sealed.clear();
                sealed.extend_from_slice(&sealed_once);
                let opened = key
                    .open_in_place(nonce(last), Aad::empty(), &mut sealed)
                    .map_err(|_| anyhow::anyhow!("aws-lc-rs: open failed"))?;
                if opened.len() != packet {
                    anyhow::bail!("aws-lc-rs: opened {} bytes, sealed {packet}", opened.len());
                }
            }
            open = open.min(t.elapsed() / count as f64);
        }
        Ok(AeadCost { packet, seal, open })
    }

    /// Seal + open CPU seconds per GB (1e9 bytes) of plaintext.
    pub fn seconds_per_gb(&self) -> (f64, f64) {
        let per_gb = 1e9 / self.packet as f64;
        (self.seal * per_gb, self.open * per_gb)
    }
}

/// WireGuard's nonce: 4 zero bytes and the 64-bit little-endian counter.
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`): what the AEAD costs, not the wall time
/// a busy machine stretches.
struct ThreadCpu(f64);

impl ThreadCpu {
    fn now() -> ThreadCpu {
        let mut ts = nix::libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux has.
        unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ThreadCpu(ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
    }

    fn elapsed(&self) -> f64 {
        ThreadCpu::now().0 - self.0
    }
}

/// What one run of ours measured, for its ceiling.
#[derive(Debug, Clone, Copy)]
pub struct RunCost {
    /// Busy CPU seconds of the whole machine during the run.
    pub busy: f64,
    /// User CPU seconds of the processes or threads running our WireGuard devices.
    pub devices_user: f64,
    /// Payload bytes iperf3 received.
    pub payload_bytes: f64,
    /// The tunnel's MTU (bytes): full-size packets carry `mtu - 52` bytes of payload.
    pub mtu: usize,
}

/// The ceiling of one run: CPU seconds per GB a device with no cost but the AEAD would leave
/// on the path, and the Gbit/s that gives with every one of `cpus` busy.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    /// CPU seconds per GB of payload.
    pub floor_cpu_s_per_gb: f64,
    /// Gbit/s.
    pub gbps: f64,
}

impl Ceiling {
    /// The ceiling of `run` on `cpus` CPUs with `aead` per packet (module docs). `None` when
    /// the run moved nothing or its numbers are not usable (no busy time left once the
    /// devices' user time is taken out).
    pub fn of(run: &RunCost, aead: &AeadCost, cpus: f64) -> Option<Ceiling> {
        let gb = run.payload_bytes / 1e9;
        let payload_per_packet = run.mtu.checked_sub(TCP_IPV4_HEADERS)? as f64;
        if gb <= 0.0 || payload_per_packet <= 0.0 || cpus <= 0.0 {
            return None;
        }
        let rest = run.busy - run.devices_user;
        if rest <= 0.0 {
            return None;
        }
        // The AEAD cost scales with the packet: aead.packet bytes measured, mtu bytes sent.
        let per_packet = (aead.seal + aead.open) * run.mtu as f64 / aead.packet as f64;
        let packets_per_gb = 1e9 / payload_per_packet;
        let floor = rest / gb + packets_per_gb * per_packet;
        Some(Ceiling {
            floor_cpu_s_per_gb: floor,
            gbps: 8.0 * cpus / floor,
        })
    }
}

/// What a target ratio means against the ceiling's ratio (both to the same baseline): a line
/// end for the benchmarks' ceiling line.
pub fn verdict(ceiling_ratio: f64, target: f64) -> String {
    if target > ceiling_ratio {
        format!(
            "the target {target:.1} is above it: no userspace device reaches it on this machine"
        )
    } else {
        format!(
            "the target {target:.1} is below it: reachable only by a device this close to the AEAD's cost alone"
        )
    }
}

/// CPUs this process may run on (`sched_getaffinity`, so `taskset` counts), at least 1.
pub fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_sums_all_but_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 2 30 500 7 1 4 3 9 0\ncpu0 50 1 15 250 3 0 2 1 0 0\nintr 1\n";
        assert_eq!(parse_busy(stat, 100.0).unwrap(), 1.4);
        assert!(parse_busy("cpu0 1 2 3\n", 100.0).is_err());
        assert!(parse_busy("cpu  1 2 3 4\n", 100.0).is_err());
        assert!(parse_busy("cpu  1 2 x 4 5 6 7 8\n", 100.0).is_err());
    }

    #[test]
    fn ceiling_takes_out_the_devices_user_time_and_adds_the_aead() {
        // 10 GB of payload in packets of 1052 bytes (1000 payload): 1e7 packets.
        let run = RunCost {
            busy: 30.0,
            devices_user: 12.0,
            payload_bytes: 10e9,
            mtu: 1052,
        };
        // 0.5 µs to seal and 0.5 µs to open a 526-byte packet: 2 µs per 1052-byte packet.
        let aead = AeadCost {
            packet: 526,
            seal: 0.5e-6,
            open: 0.5e-6,
        };
        let c = Ceiling::of(&run, &aead, 2.0).unwrap();
        // (30 − 12) / 10 = 1.8 s/GB, + 1e6 packets/GB × 2 µs = 2 s/GB: 3.8 s/GB.
        assert!((c.floor_cpu_s_per_gb - 3.8).abs() < 1e-9, "{c:?}");
        assert!((c.gbps - 16.0 / 3.8).abs() < 1e-9, "{c:?}");
        let none = RunCost {
            payload_bytes: 0.0,
            ..run
        };
        assert!(Ceiling::of(&none, &aead, 2.0).is_none());
        let all_user = RunCost {
            devices_user: 30.0,
            ..run
        };
        assert!(Ceiling::of(&all_user, &aead, 2.0).is_none());
        let tiny = RunCost { mtu: 40, ..run };
        assert!(Ceiling::of(&tiny, &aead, 2.0).is_none());
    }

    #[test]
    fn verdict_says_which_side_of_the_ceiling_the_target_is() {
        assert!(verdict(1.8, 2.0).contains("above it"));
        assert!(verdict(2.2, 2.0).contains("below it"));
    }

    #[test]
    fn aead_cost_is_positive_and_per_gb_scales_with_packets() {
        let c = AeadCost::measure(1420).unwrap();
        assert!(c.seal > 0.0 && c.open > 0.0, "{c:?}");
        let (seal, open) = c.seconds_per_gb();
        assert!((seal - c.seal * 1e9 / 1420.0).abs() < 1e-12);
        assert!((open - c.open * 1e9 / 1420.0).abs() < 1e-12);
    }
}

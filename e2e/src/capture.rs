//! `tcpdump` on an interface inside a test netns, written to a pcap and stopped by PID;
//! [`Capture::finish`] returns the decoded packets ([`Packets`]) and the raw capture bytes (to
//! prove a plaintext marker never crossed the wire).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::util::poll_until;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running capture. Dropping it without `finish` kills tcpdump and removes the file.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

/// One decoded packet: tcpdump's line (`-n -q`-free, timestamped) and its parsed parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// tcpdump's whole line.
    pub line: String,
    /// `IP`, `ARP`, `IP6`, ... (the word after the timestamp).
    pub family: String,
    /// Source address and port (`a.b.c.d` or `a.b.c.d.port`), for IP packets.
    pub src: String,
    /// Destination, as `src`.
    pub dst: String,
}

impl Packet {
    fn parse(line: &str) -> Option<Packet> {
        let mut words = line.split_whitespace();
        let ts = words.next()?;
        if !ts.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let family = words.next()?.trim_end_matches(',').to_string();
        let (mut src, mut dst) = (String::new(), String::new());
        if family == "IP" {
            src = words.next().unwrap_or_default().to_string();
            let _arrow = words.next();
            dst = words
                .next()
                .unwrap_or_default()
                .trim_end_matches(':')
                .to_string();
        }
        Some(Packet {
            line: line.to_string(),
            family,
            src,
            dst,
        })
    }

    /// The address without the port (`203.0.113.21.51820` → `203.0.113.21`).
    pub fn addr(endpoint: &str) -> &str {
        match endpoint.match_indices('.').nth(3) {
            Some((i, _)) => &endpoint[..i],
            None => endpoint,
        }
    }

    /// The port of an endpoint, if it has one.
    pub fn port(endpoint: &str) -> Option<u16> {
        endpoint
            .match_indices('.')
            .nth(3)
            .and_then(|(i, _)| endpoint[i + 1..].parse().ok())
    }

    pub fn is_udp(&self) -> bool {
        self.family == "IP" && self.line.contains(": UDP, length")
    }

    pub fn is_arp(&self) -> bool {
        self.family == "ARP"
    }

    /// Whether `ip` is the source or the destination address.
    pub fn involves(&self, ip: &str) -> bool {
        Self::addr(&self.src) == ip || Self::addr(&self.dst) == ip
    }

    /// To a multicast group (224.0.0.0/4): link-level housekeeping such as the IGMP report a
    /// link sends when it comes up, not traffic between hosts.
    pub fn is_multicast(&self) -> bool {
        Self::addr(&self.dst)
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_multicast())
    }
}

/// What a finished capture saw.
#[derive(Debug, Clone)]
pub struct Packets {
    pub packets: Vec<Packet>,
    /// tcpdump's full decoding (for failure messages).
    pub text: String,
    /// The pcap file's bytes.
    pub raw: Vec<u8>,
}

impl Packets {
    /// Whether `marker` appears anywhere in the captured bytes (payloads included).
    pub fn raw_contains(&self, marker: &[u8]) -> bool {
        !marker.is_empty() && self.raw.windows(marker.len()).any(|w| w == marker)
    }

    pub fn ip(&self) -> impl Iterator<Item = &Packet> {
        self.packets.iter().filter(|p| p.family == "IP")
    }

    /// [`Packets::ip`] without multicast housekeeping (IGMP reports of links coming up).
    pub fn unicast_ip(&self) -> impl Iterator<Item = &Packet> {
        self.ip().filter(|p| !p.is_multicast())
    }

    /// Every IPv4 UDP datagram in the capture (pcap, Ethernet link type), decoded from the
    /// raw bytes.
    pub fn udp_datagrams(&self) -> Vec<UdpDatagram> {
        parse_pcap_udp(&self.raw)
    }
}

/// One UDP datagram read from the pcap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    /// The first bytes of the payload (up to 16).
    pub head: Vec<u8>,
    pub len: usize,
}

impl UdpDatagram {
    /// Whether the payload is a WireGuard message: type 1 (initiation, 148 bytes),
    /// 2 (response, 92), 3 (cookie reply, 64) or 4 (transport data, ≥ 32, multiple of 16),
    /// followed by three zero bytes.
    pub fn is_wireguard(&self) -> bool {
        if self.head.len() < 4 || self.head[1..4] != [0, 0, 0] {
            return false;
        }
        match self.head[0] {
            1 => self.len == 148,
            2 => self.len == 92,
            3 => self.len == 64,
            4 => self.len >= 32 && (self.len - 16).is_multiple_of(16),
            _ => false,
        }
    }
}

/// UDP datagrams of a classic pcap file (microsecond or nanosecond, either byte order) with
/// Ethernet frames; anything else is skipped.
fn parse_pcap_udp(raw: &[u8]) -> Vec<UdpDatagram> {
    let mut out = Vec::new();
    if raw.len() < 24 {
        return out;
    }
    let magic = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return out,
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    if u32_at(raw, 20) != 1 {
        return out; // not Ethernet
    }
    let mut at = 24;
    while at + 16 <= raw.len() {
        let caplen = u32_at(raw, at + 8) as usize;
        let start = at + 16;
        let end = start + caplen;
        if end > raw.len() {
            break;
        }
        if let Some(d) = udp_of_frame(&raw[start..end]) {
            out.push(d);
        }
        at = end;
    }
    out
}

fn udp_of_frame(frame: &[u8]) -> Option<UdpDatagram> {
    use std::net::{Ipv4Addr, SocketAddrV4};
    let ip = frame
        .get(14..)
        .filter(|_| frame.get(12..14) == Some(&[0x08, 0x00]))?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 17 {
        return None;
    }
    let addr = |i: usize| {
        Some(Ipv4Addr::new(
            *ip.get(i)?,
            *ip.get(i + 1)?,
            *ip.get(i + 2)?,
            *ip.get(i + 3)?,
        ))
    };
    let udp = ip.get(ihl..)?;
    let port = |i: usize| Some(u16::from_be_bytes([*udp.get(i)?, *udp.get(i + 1)?]));
    let len = usize::from(port(4)?).checked_sub(8)?;
    let payload = udp.get(8..)?;
    Some(UdpDatagram {
        src: SocketAddrV4::new(addr(12)?, port(0)?),
        dst: SocketAddrV4::new(addr(16)?, port(2)?),
        head: payload[..payload.len().min(16)].to_vec(),
        len,
    })
}

impl Capture {
    /// Starts `tcpdump -i <iface>` inside `netns` (a path under /run/netns); returns once it
    /// listens. It stops by itself after `max` at the latest.
    pub fn start(netns: &Path, iface: &str, max: Duration) -> Result<Capture> {
        let file = std::env::temp_dir().join(format!(
            "fe2e-cap-{}-{}.pcap",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let log = file.with_extension("log");
        let log_file = std::fs::File::create(&log).map_err(|e| Error::io("create", &log, e))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["--", "timeout", &max.as_secs().max(1).to_string()])
            // --immediate-mode: without it packets wait in the ring for a block timeout and
            // are lost when tcpdump is stopped right after the traffic.
            .args(["tcpdump", "--immediate-mode", "-i", iface, "-n", "-U", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| Error::io("spawn tcpdump in", netns, e))?;
        let mut capture = Capture {
            child: Some(child),
            file,
        };
        let listening = poll_until("tcpdump to listen", Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("listening on"))
        });
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        if let Err(e) = listening {
            capture.stop();
            return Err(Error::Invalid(format!("{e}: {text}")));
        }
        Ok(capture)
    }

    /// Captures for `duration` and returns what it saw.
    pub fn for_duration(netns: &Path, iface: &str, duration: Duration) -> Result<Packets> {
        let c = Capture::start(netns, iface, duration + Duration::from_secs(30))?;
        std::thread::sleep(duration);
        c.finish()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `timeout` forwards SIGINT to tcpdump, which flushes and exits.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
    }

    /// Stops the capture and decodes it.
    pub fn finish(mut self) -> Result<Packets> {
        self.stop();
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .output()
            .map_err(|e| Error::io("run tcpdump -r", &self.file, e))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let raw = std::fs::read(&self.file).map_err(|e| Error::io("read", &self.file, e))?;
        Ok(Packets {
            packets: text.lines().filter_map(Packet::parse).collect(),
            text,
            raw,
        })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SIGINT, not SIGKILL: the child is `timeout`, which forwards it to tcpdump; killing
        // `timeout` would orphan tcpdump.
        self.stop();
        let _ = std::fs::remove_file(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn igmp_reports_are_multicast_housekeeping() {
        let igmp = Packet::parse(
            "08:05:41.822825 IP 0.0.0.0 > 224.0.0.22: igmp v3 report, 1 group record(s)",
        )
        .unwrap();
        assert!(igmp.is_multicast());
        let udp = Packet::parse(
            "18:30:01.123456 IP 203.0.113.21.51820 > 203.0.113.10.51820: UDP, length 148",
        )
        .unwrap();
        assert!(!udp.is_multicast());
    }

    #[test]
    fn tcpdump_lines_parse() {
        let p = Packet::parse(
            "18:30:01.123456 IP 203.0.113.21.51820 > 203.0.113.10.51820: UDP, length 148",
        )
        .unwrap();
        assert_eq!(p.family, "IP");
        assert_eq!(p.src, "203.0.113.21.51820");
        assert_eq!(p.dst, "203.0.113.10.51820");
        assert!(p.is_udp());
        assert_eq!(Packet::addr(&p.src), "203.0.113.21");
        assert_eq!(Packet::port(&p.dst), Some(51820));
        assert!(p.involves("203.0.113.10"));
        let icmp =
            Packet::parse("18:30:01.1 IP 10.0.0.1 > 10.0.0.2: ICMP echo request, id 1").unwrap();
        assert_eq!(Packet::port(&icmp.src), None);
        assert!(!icmp.is_udp());
        let arp = Packet::parse("18:30:01.2 ARP, Request who-has 203.0.113.10 tell 203.0.113.21")
            .unwrap();
        assert!(arp.is_arp());
        assert!(Packet::parse("reading from file x.pcap").is_none());
    }

    #[test]
    fn pcap_udp_datagrams_and_wireguard_messages() {
        // pcap header (LE, µs, Ethernet) + one frame: Ethernet/IPv4/UDP with a WireGuard
        // transport header (type 4) and a 32-byte payload in all.
        let mut raw = Vec::new();
        raw.extend(0xa1b2_c3d4u32.to_le_bytes());
        raw.extend([2, 0, 4, 0]);
        raw.extend([0; 8]);
        raw.extend(65535u32.to_le_bytes());
        raw.extend(1u32.to_le_bytes());
        let mut frame = vec![0u8; 12];
        frame.extend([0x08, 0x00]);
        let payload: Vec<u8> = [4, 0, 0, 0].into_iter().chain([7; 28]).collect();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend([203, 0, 113, 21, 203, 0, 113, 10]);
        let mut udp = Vec::new();
        udp.extend(51820u16.to_be_bytes());
        udp.extend(51820u16.to_be_bytes());
        udp.extend((8 + payload.len() as u16).to_be_bytes());
        udp.extend([0, 0]);
        udp.extend(&payload);
        frame.extend(ip);
        frame.extend(udp);
        raw.extend([0; 8]);
        raw.extend((frame.len() as u32).to_le_bytes());
        raw.extend((frame.len() as u32).to_le_bytes());
        raw.extend(&frame);
        let d = parse_pcap_udp(&raw);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].src.to_string(), "203.0.113.21:51820");
        assert_eq!(d[0].dst.to_string(), "203.0.113.10:51820");
        assert_eq!(d[0].len, 32);
        assert!(d[0].is_wireguard());
        let plain = UdpDatagram {
            head: b"hello world".to_vec(),
            len: 11,
            ..d[0].clone()
        };
        assert!(!plain.is_wireguard());
        assert!(parse_pcap_udp(b"garbage").is_empty());
    }
}

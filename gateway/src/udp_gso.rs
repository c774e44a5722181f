//! UDP GSO on send for the userspace device: runs of same-sized encrypted datagrams to one
//! peer leave in one `sendmsg` with `UDP_SEGMENT`, so the kernel builds, routes and forwards
//! one skb of up to 64 KiB instead of one per packet (the receiving side, gotatun's socket,
//! already takes UDP GRO). The datagrams on the wire are the same as without it.
//!
//! The kernel refuses a GSO send whose segment plus headers exceeds the route's MTU (a link
//! or a learnt path MTU smaller than the datagrams): `EMSGSIZE` since Linux 6.10, `EINVAL`
//! before; `EIO` without checksum offload on the way out; `ENOPROTOOPT` without GSO at all.
//! A plain send of the same datagram is fragmented instead (the socket clears DF). So a run
//! the kernel refuses is sent again datagram by datagram, nothing is dropped, and its
//! destination is remembered for [`GSO_RETRY_AFTER`], during which its runs go without GSO.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gotatun::packet::Packet;
use gotatun::udp::UdpSend;
use gotatun::udp::socket::UdpSocket;
use nix::libc;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg, sendmsg,
};
use tokio::io::Interest;

/// The kernel's limit on segments per GSO send (`UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Payload bytes per GSO send (an IP packet is at most 64 KiB with its headers).
const GSO_MAX_BYTES: usize = 65_000;
/// How long a destination whose route refused a GSO send gets plain sends before GSO is
/// tried again (the route's MTU may have changed; one refused try costs one skb).
pub const GSO_RETRY_AFTER: Duration = Duration::from_secs(10);

/// gotatun's UDP socket, sending batches with UDP GSO when `gso` is set.
#[derive(Clone)]
pub struct GsoUdp {
    inner: UdpSocket,
    gso: bool,
    /// Destinations whose route refused a GSO send, and until when they get plain sends.
    refused: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
}

/// Whether `e`, returned by a GSO `sendmsg`, means this run cannot be segmented on its route
/// (as opposed to an error a plain send would meet too).
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMSGSIZE | libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

impl GsoUdp {
    pub fn new(inner: UdpSocket, gso: bool) -> Self {
        GsoUdp {
            inner,
            gso,
            refused: Arc::default(),
        }
    }

    /// Whether runs to `target` are sent without GSO now, because its route refused one
    /// within the last [`GSO_RETRY_AFTER`].
    pub fn gso_refused_for(&self, target: SocketAddr) -> bool {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        match refused.get(&target) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                refused.remove(&target);
                false
            }
            None => false,
        }
    }

    fn refuse(&self, target: SocketAddr, error: &io::Error) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a peer's endpoint changes rarely; forget the oldest entries if many pile up.
        if refused.len() >= 1024 {
            let now = Instant::now();
            refused.retain(|_, until| *until > now);
        }
        if refused
            .insert(target, Instant::now() + GSO_RETRY_AFTER)
            .is_none()
        {
            tracing::debug!(%target, %error, "the route refused a UDP GSO send: plain sends to this destination for a while");
        }
    }

    async fn send_segments(&self, run: &[(Packet, SocketAddr)], segment: usize) -> io::Result<()> {
        let target = SockaddrStorage::from(run[0].1);
        let iov: Vec<IoSlice<'_>> = run.iter().map(|(p, _)| IoSlice::new(&p[..])).collect();
        let seg = segment as u16;
        let socket = self.inner.socket();
        let fd = socket.as_raw_fd();
        socket
            .async_io(Interest::WRITABLE, || {
                sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::UdpGsoSegments(&seg)],
                    MsgFlags::MSG_DONTWAIT,
                    Some(&target),
                )
                .map_err(io::Error::from)
            })
            .await
            .map(|_| ())
    }
}

/// Splits `packets` into runs for one GSO send each: same target, every datagram the size of
/// the first but the last (which may be shorter), at most [`GSO_MAX_SEGMENTS`] and 65,000
/// bytes. Returns the end index of each run.
pub fn gso_runs(packets: &[(usize, SocketAddr)]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut i = 0;
    while i < packets.len() {
        let (segment, target) = packets[i];
        let (mut j, mut total) = (i + 1, segment);
        while j < packets.len()
            && j - i < GSO_MAX_SEGMENTS
            && packets[j].1 == target
            && packets[j].0 <= segment
            && total + packets[j].0 <= GSO_MAX_BYTES
        {
            total += packets[j].0;
            j += 1;
            if packets[j - 1].0 < segment {
                break;
            }
        }
        ends.push(j);
        i = j;
    }
    ends
}

impl GsoUdp {
    /// Sends `packets` (one batch from gotatun): each run of [`gso_runs`] in one GSO send,
    /// unless it is a single datagram, its destination refused GSO lately, or the kernel
    /// refuses it now; those go by `sendmmsg`, in order with the GSO runs around them. A
    /// datagram that cannot be sent is dropped (WireGuard and the tunnelled protocols recover)
    /// and the others still go; the first error is returned.
    async fn send_batch(&self, packets: &[(Packet, SocketAddr)]) -> io::Result<()> {
        let sizes: Vec<(usize, SocketAddr)> = packets.iter().map(|(p, a)| (p.len(), *a)).collect();
        let mut first_err: Option<io::Error> = None;
        let mut keep = |r: io::Result<()>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        // Start of the datagrams waiting for a plain send (they precede the current run).
        let mut plain_from: Option<usize> = None;
        let mut start = 0;
        for end in gso_runs(&sizes) {
            let run = &packets[start..end];
            if run.len() == 1 || self.gso_refused_for(run[0].1) {
                plain_from.get_or_insert(start);
            } else {
                if let Some(from) = plain_from.take() {
                    keep(self.send_plain(&packets[from..start]).await);
                }
                match self.send_segments(run, run[0].0.len()).await {
                    Ok(()) => {}
                    Err(e) if gso_refused(&e) => {
                        self.refuse(run[0].1, &e);
                        plain_from = Some(start);
                    }
                    // A plain send would meet it too (no route, no buffer): this run is lost.
                    Err(e) => keep(Err(e)),
                }
            }
            start = end;
        }
        if let Some(from) = plain_from {
            keep(self.send_plain(&packets[from..]).await);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// One datagram per message with `sendmmsg`; a datagram the kernel refuses is skipped.
    async fn send_plain(&self, packets: &[(Packet, SocketAddr)]) -> io::Result<()> {
        let targets: Vec<Option<SockaddrStorage>> = packets
            .iter()
            .map(|(_, a)| Some(SockaddrStorage::from(*a)))
            .collect();
        let iovs: Vec<[IoSlice<'_>; 1]> = packets
            .iter()
            .map(|(p, _)| [IoSlice::new(&p[..])])
            .collect();
        let socket = self.inner.socket();
        let fd = socket.as_raw_fd();
        let (mut first_err, mut i) = (None, 0);
        while i < packets.len() {
            let sent = socket
                .async_io(Interest::WRITABLE, || {
                    let mut headers =
                        MultiHeaders::<SockaddrStorage>::preallocate(packets.len() - i, None);
                    sendmmsg(
                        fd,
                        &mut headers,
                        &iovs[i..],
                        &targets[i..],
                        [],
                        MsgFlags::MSG_DONTWAIT,
                    )
                    .map(|r| r.count())
                    .map_err(io::Error::from)
                })
                .await;
            match sent {
                Ok(n) => i += n.max(1),
                Err(e) => {
                    // sendmmsg fails only on its first message: that one is dropped.
                    first_err.get_or_insert(e);
                    i += 1;
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl UdpSend for GsoUdp {
    type SendManyBuf = <UdpSocket as UdpSend>::SendManyBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.inner.send_to(packet, destination).await
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        self.inner.max_number_of_packets_to_send()
    }

    async fn send_many_to(
        &self,
        send_buf: &mut Self::SendManyBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        if !self.gso {
            return self.inner.send_many_to(send_buf, packets).await;
        }
        let sent = self.send_batch(packets).await;
        packets.clear();
        sent
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        UdpSend::local_addr(&self.inner)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.inner.set_fwmark(mark)
    }
}

impl AsFd for GsoUdp {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_same_target_same_size_with_a_shorter_last() {
        let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let p = |n: usize, t| (n, t);
        // 3 full + 1 short to a; then b; then a again full, full.
        let v = [
            p(1400, a),
            p(1400, a),
            p(1400, a),
            p(600, a),
            p(1400, a),
            p(1400, b),
            p(1400, a),
            p(1400, a),
        ];
        assert_eq!(gso_runs(&v), vec![4, 5, 6, 8]);
        // A larger one after a smaller one starts a new run.
        assert_eq!(gso_runs(&[p(100, a), p(200, a)]), vec![1, 2]);
        // At most 64 segments.
        let many = vec![p(100, a); 130];
        assert_eq!(gso_runs(&many), vec![64, 128, 130]);
        // At most 65,000 bytes.
        let big = vec![p(1400, a); 60];
        assert_eq!(gso_runs(&big)[0], 46);
        assert!(gso_runs(&[]).is_empty());
    }
}

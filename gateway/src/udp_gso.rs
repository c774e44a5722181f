//! UDP GSO on send for the userspace device: runs of same-sized encrypted datagrams to one
//! peer leave in one `sendmsg` with `UDP_SEGMENT`, so the kernel builds, routes and forwards
//! one skb of up to 64 KiB instead of one per packet (the receiving side, gotatun's socket,
//! already takes UDP GRO). The datagrams on the wire are the same as without it.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use gotatun::packet::Packet;
use gotatun::udp::UdpSend;
use gotatun::udp::socket::UdpSocket;
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
use tokio::io::Interest;

/// The kernel's limit on segments per GSO send (`UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Payload bytes per GSO send (an IP packet is at most 64 KiB with its headers).
const GSO_MAX_BYTES: usize = 65_000;

/// gotatun's UDP socket, sending batches with UDP GSO when `gso` is set.
#[derive(Clone)]
pub struct GsoUdp {
    inner: UdpSocket,
    gso: bool,
}

impl GsoUdp {
    pub fn new(inner: UdpSocket, gso: bool) -> Self {
        GsoUdp { inner, gso }
    }

    async fn send_segments(
        &self,
        group: &[(Packet, SocketAddr)],
        segment: usize,
    ) -> io::Result<()> {
        let target = SockaddrStorage::from(group[0].1);
        let iov: Vec<IoSlice<'_>> = group.iter().map(|(p, _)| IoSlice::new(&p[..])).collect();
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
        let sizes: Vec<(usize, SocketAddr)> = packets.iter().map(|(p, a)| (p.len(), *a)).collect();
        let mut start = 0;
        for end in gso_runs(&sizes) {
            let run = &packets[start..end];
            let mut sent = if run.len() == 1 {
                Err(io::Error::from(io::ErrorKind::InvalidInput))
            } else {
                self.send_segments(run, run[0].0.len()).await
            };
            // One at a time: a single datagram, or a run the kernel refuses to segment
            // (EINVAL: the datagram plus headers exceeds the route's MTU, e.g. an underlay
            // link below 1430 bytes, where only fragmentation gets it through; EIO: no
            // checksum offload on the way out).
            if let Err(e) = &sent
                && matches!(
                    e.raw_os_error(),
                    None | Some(nix::libc::EINVAL) | Some(nix::libc::EIO)
                )
            {
                sent = Ok(());
                for (packet, target) in run {
                    if let Err(e) = self.inner.socket().send_to(&packet[..], *target).await {
                        sent = Err(e);
                        break;
                    }
                }
            }
            if let Err(e) = sent {
                // As gotatun's own send: a failed datagram is dropped (WireGuard and the
                // tunnelled protocols recover), the error ends this batch.
                packets.clear();
                return Err(e);
            }
            start = end;
        }
        packets.clear();
        Ok(())
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

//! The relay's UDP socket with batched I/O: one `recvmmsg` takes up to [`BATCH`] buffers, each
//! a datagram or — with UDP GRO on — a run of same-sized datagrams from one source that the
//! kernel coalesced; one `sendmmsg` sends every run of a batch, each message one datagram or a
//! UDP GSO run (`UDP_SEGMENT`: the kernel cuts it back into the same datagrams).
//!
//! Plain `libc` rather than `quinn-udp` (which does GRO, GSO and batched receive): quinn-udp
//! sends one `sendmsg` per transmit (no `sendmmsg`), marks every datagram don't-fragment
//! (`IP_PMTUDISC_PROBE`, for QUIC's own path MTU discovery; the relay keeps the kernel's
//! default, which fragments a datagram larger than a known path MTU, as before) and wants a
//! non-blocking socket plus a readiness wait per batch, where this socket blocks in one
//! `recvmmsg(MSG_WAITFORONE)` on its own thread.

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::libc;

use super::batch::Run;

/// Buffers per `recvmmsg`.
pub const BATCH: usize = 64;
/// One receive buffer: the largest UDP payload, so a GRO run is never truncated.
const BUFFER_BYTES: usize = 65_536;
/// Room for one control message with an `int` (GRO's segment size) or a `u16` (GSO's).
const CMSG_BYTES: usize = 32;

/// What the socket's calls did, for metrics: how well batching works under the relay's load.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub recv_calls: AtomicU64,
    pub send_calls: AtomicU64,
    /// Datagrams that arrived coalesced with others (UDP GRO).
    pub gro_datagrams: AtomicU64,
    /// Datagrams that left in a GSO send with others.
    pub gso_datagrams: AtomicU64,
}

/// One received buffer: from `src`, `len` bytes, datagrams of `stride` bytes (the last may
/// be shorter; `stride == len` without GRO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub src: SocketAddr,
    pub len: usize,
    pub stride: usize,
}

/// Receive buffers for one batch, allocated once.
pub struct RecvBuffers {
    data: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<[u64; CMSG_BYTES / 8]>,
    hdrs: Vec<libc::mmsghdr>,
    received: Vec<Received>,
}

impl Default for RecvBuffers {
    fn default() -> Self {
        RecvBuffers {
            data: vec![0; BATCH * BUFFER_BYTES],
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            names: vec![unsafe { zeroed() }; BATCH],
            iovs: vec![unsafe { zeroed() }; BATCH],
            cmsgs: vec![[0; CMSG_BYTES / 8]; BATCH],
            hdrs: vec![unsafe { zeroed() }; BATCH],
            received: Vec::with_capacity(BATCH),
        }
    }
}

impl RecvBuffers {
    /// The buffers the last [`RelaySocket::recv_batch`] filled.
    pub fn received(&self) -> &[Received] {
        &self.received
    }

    /// The bytes of the `i`-th received buffer.
    pub fn bytes(&self, i: usize) -> &[u8] {
        &self.data[i * BUFFER_BYTES..i * BUFFER_BYTES + self.received[i].len]
    }
}

/// How long a destination that refused a GSO run of some segment size gets no GSO run of
/// that size or larger (its path MTU may grow again).
const GSO_REFUSAL_MEMORY: Duration = Duration::from_secs(10);

/// Scratch space for one `sendmmsg`, reused across batches, and what the kernel refused.
#[derive(Default)]
pub struct SendScratch {
    /// Destinations whose route refused a GSO run (EINVAL: segments larger than its MTU): the
    /// smallest refused segment size and when; such runs go datagram by datagram meanwhile,
    /// without a failing call first.
    refused: HashMap<SocketAddr, (usize, Instant)>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<[u64; CMSG_BYTES / 8]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per message: its run's index and whether it carries a GSO segment size.
    messages: Vec<(usize, bool)>,
}

/// The relay's socket: blocking, with a receive timeout so its thread can stop and run timers.
pub struct RelaySocket {
    socket: UdpSocket,
    gro: bool,
    /// Cleared when the kernel refuses GSO on the way out (EIO: no checksum offload).
    gso: std::sync::atomic::AtomicBool,
    pub counters: IoCounters,
}

impl RelaySocket {
    /// Wraps a bound socket: receive timeout `wake` (the thread's stop and timer checks), a
    /// send timeout (a send never waits for ever) and UDP GRO when the kernel has it.
    pub fn new(socket: UdpSocket, wake: Duration) -> io::Result<Self> {
        socket.set_read_timeout(Some(wake))?;
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        let on: libc::c_int = 1;
        // SAFETY: a valid fd and an int option value of the right size.
        let gro = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        if !gro {
            tracing::info!(error = %io::Error::last_os_error(), "relay socket: no UDP GRO (one datagram per receive buffer)");
        }
        Ok(RelaySocket {
            socket,
            gro,
            gso: std::sync::atomic::AtomicBool::new(true),
            counters: IoCounters::default(),
        })
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Whether runs may leave as one GSO send.
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Waits (up to the receive timeout) for datagrams and takes as many as are queued, up
    /// to [`BATCH`] buffers; `Ok(0)` when the timeout passed with none.
    pub fn recv_batch(&self, bufs: &mut RecvBuffers) -> io::Result<usize> {
        bufs.received.clear();
        for i in 0..BATCH {
            bufs.iovs[i] = libc::iovec {
                iov_base: bufs.data[i * BUFFER_BYTES..].as_mut_ptr().cast(),
                iov_len: BUFFER_BYTES,
            };
        }
        for i in 0..BATCH {
            let hdr = &mut bufs.hdrs[i].msg_hdr;
            hdr.msg_name = (&mut bufs.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut bufs.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = bufs.cmsgs[i].as_mut_ptr().cast();
            hdr.msg_controllen = CMSG_BYTES as _;
            hdr.msg_flags = 0;
            bufs.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `bufs` that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                bufs.hdrs.as_mut_ptr(),
                BATCH as _,
                libc::MSG_WAITFORONE as _,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.counters.recv_calls.fetch_add(1, Ordering::Relaxed);
        for i in 0..n as usize {
            let hdr = &bufs.hdrs[i].msg_hdr;
            let len = bufs.hdrs[i].msg_len as usize;
            if hdr.msg_flags & libc::MSG_TRUNC != 0 {
                // Larger than any UDP payload: cannot happen; never forward part of one.
                continue;
            }
            let Some(src) = from_sockaddr(&bufs.names[i]) else {
                continue;
            };
            let stride = gro_segment(hdr).filter(|&s| s > 0 && s < len);
            if stride.is_some() {
                self.counters.gro_datagrams.fetch_add(
                    len.div_ceil(stride.unwrap_or(len)) as u64,
                    Ordering::Relaxed,
                );
            }
            bufs.received.push(Received {
                src,
                len,
                stride: stride.unwrap_or(len),
            });
        }
        Ok(bufs.received.len())
    }

    /// Sends `runs` (see [`super::batch::plan`]): the datagram `order[k]` of a run is
    /// `datagram(order[k])`. A run goes out as one GSO message when GSO is on and it has more
    /// than one datagram, else datagram by datagram; all messages of the batch in `sendmmsg`
    /// calls. A run the kernel refuses to segment (EINVAL: a datagram larger than the route's
    /// MTU allows, which only fragmentation gets through; EIO: no checksum offload, GSO off
    /// from then on) is sent again one datagram at a time. Other failures drop that message
    /// (WireGuard recovers, as from any loss) and are logged at debug.
    pub fn send_runs<'a>(
        &self,
        runs: &[Run],
        order: &[usize],
        datagram: impl Fn(usize) -> &'a [u8],
        scratch: &mut SendScratch,
    ) {
        let gso = self.gso();
        let now = Instant::now();
        let SendScratch {
            refused,
            iovs,
            names,
            cmsgs,
            hdrs,
            messages,
        } = scratch;
        iovs.clear();
        names.clear();
        cmsgs.clear();
        hdrs.clear();
        messages.clear();
        for &i in order {
            let d = datagram(i);
            iovs.push(libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            });
        }
        // Message layout first (iovs, names and control buffers must not move afterwards).
        if !refused.is_empty() {
            refused.retain(|_, (_, at)| now.duration_since(*at) < GSO_REFUSAL_MEMORY);
        }
        for (r, run) in runs.iter().enumerate() {
            let segmented = gso
                && run.range.len() > 1
                && refused
                    .get(&run.to)
                    .is_none_or(|(smallest, _)| run.segment < *smallest);
            if segmented {
                messages.push((r, true));
            } else {
                for _ in run.range.clone() {
                    messages.push((r, false));
                }
            }
        }
        names.reserve(runs.len());
        for run in runs {
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut name: libc::sockaddr_storage = unsafe { zeroed() };
            to_sockaddr(run.to, &mut name);
            names.push(name);
        }
        cmsgs.resize(messages.len(), [0; CMSG_BYTES / 8]);
        let mut next_in_run = vec![0usize; runs.len()];
        for (m, &(r, segmented)) in messages.iter().enumerate() {
            let run = &runs[r];
            // SAFETY: all-zero is a valid mmsghdr.
            let mut hdr: libc::mmsghdr = unsafe { zeroed() };
            hdr.msg_hdr.msg_name = (&mut names[r] as *mut libc::sockaddr_storage).cast();
            hdr.msg_hdr.msg_namelen = sockaddr_len(run.to);
            if segmented {
                hdr.msg_hdr.msg_iov = &mut iovs[run.range.start];
                hdr.msg_hdr.msg_iovlen = run.range.len() as _;
                hdr.msg_hdr.msg_control = cmsgs[m].as_mut_ptr().cast();
                // SAFETY: the control buffer holds CMSG_SPACE(2) bytes (checked at compile time).
                unsafe { put_gso_segment(&mut hdr.msg_hdr, run.segment as u16) };
            } else {
                let k = run.range.start + next_in_run[r];
                next_in_run[r] += 1;
                hdr.msg_hdr.msg_iov = &mut iovs[k];
                hdr.msg_hdr.msg_iovlen = 1;
            }
            hdrs.push(hdr);
        }
        let fd = self.socket.as_raw_fd();
        let mut m = 0;
        while m < hdrs.len() {
            // SAFETY: every header points into `scratch` or into the callers' datagrams, which
            // outlive the call.
            let sent =
                unsafe { libc::sendmmsg(fd, hdrs[m..].as_mut_ptr(), (hdrs.len() - m) as _, 0) };
            self.counters.send_calls.fetch_add(1, Ordering::Relaxed);
            if sent > 0 {
                for &(r, segmented) in &messages[m..m + sent as usize] {
                    if segmented {
                        self.counters
                            .gso_datagrams
                            .fetch_add(runs[r].range.len() as u64, Ordering::Relaxed);
                    }
                }
                m += sent as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let (r, segmented) = messages[m];
            let run = &runs[r];
            match e.raw_os_error() {
                Some(libc::EINVAL | libc::EIO | libc::EMSGSIZE) if segmented => {
                    if e.raw_os_error() == Some(libc::EIO) {
                        if self.gso.swap(false, Ordering::Relaxed) {
                            tracing::info!(error = %e, "relay socket: the kernel refuses UDP GSO here; sending datagram by datagram");
                        }
                    } else {
                        let entry = refused.entry(run.to).or_insert((run.segment, now));
                        *entry = (entry.0.min(run.segment), now);
                        tracing::debug!(error = %e, to = %run.to, segment = run.segment, "relay: a GSO run refused (segments above the path MTU); sending datagram by datagram");
                    }
                    for &i in &order[run.range.clone()] {
                        self.send_to(datagram(i), run.to);
                    }
                }
                _ => tracing::debug!(error = %e, to = %run.to, "relay forward"),
            }
            m += 1;
        }
    }

    /// Sends one datagram (the relay's own session, a run GSO cannot carry); failures are
    /// logged at debug.
    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) {
        self.counters.send_calls.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.socket.send_to(datagram, to) {
            tracing::debug!(error = %e, %to, "relay send");
        }
    }
}

const _: () = assert!(unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize <= CMSG_BYTES);
const _: () =
    assert!(unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as usize <= CMSG_BYTES);

/// Writes a `UDP_SEGMENT` control message into `hdr`'s control buffer and sets its length.
///
/// # Safety
/// `hdr.msg_control` must point to at least `CMSG_SPACE(2)` writable, aligned bytes.
unsafe fn put_gso_segment(hdr: &mut libc::msghdr, segment: u16) {
    unsafe {
        hdr.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(hdr);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
}

/// The segment size of a GRO buffer, from its `UDP_GRO` control message.
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen`; the CMSG macros stay
    // within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let size = ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(size).ok();
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

fn from_sockaddr(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match name.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a =
                unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_sockaddr(addr: SocketAddr, name: &mut libc::sockaddr_storage) {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let s =
                unsafe { &mut *(name as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            s.sin_family = libc::AF_INET as _;
            s.sin_port = a.port().to_be();
            s.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            let s =
                unsafe { &mut *(name as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            s.sin6_family = libc::AF_INET6 as _;
            s.sin6_port = a.port().to_be();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            s.sin6_scope_id = a.scope_id();
        }
    }
}

fn sockaddr_len(addr: SocketAddr) -> libc::socklen_t {
    (match addr {
        SocketAddr::V4(_) => size_of::<libc::sockaddr_in>(),
        SocketAddr::V6(_) => size_of::<libc::sockaddr_in6>(),
    }) as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_survive_the_round_trip_through_sockaddr() {
        for addr in [
            "203.0.113.21:40001",
            "[2001:db8::7]:51820",
            "[::ffff:192.0.2.1]:9",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut name: libc::sockaddr_storage = unsafe { zeroed() };
            to_sockaddr(addr, &mut name);
            assert_eq!(from_sockaddr(&name), Some(addr));
        }
    }
}

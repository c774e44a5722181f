//! The userspace device's TUN with the kernel's offloads, for gotatun's device.
//!
//! The TUN is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (checksum, TSO4/6 and, where the
//! kernel has it, USO4/6) by `tun-rs`, whose offload code is a port of wireguard-go's
//! `tun/offload_linux.go`. So, as in wireguard-go since its offload work:
//!
//! - **read** ([`OffloadRecv`]): the kernel hands over TCP/UDP *super-packets* of up to 64 KiB
//!   with one virtio-net header; they are split into MTU-sized IP packets (headers and
//!   checksums rewritten) before gotatun encrypts them one by one. One wake-up also drains
//!   what else is queued on the TUN (up to [`MAX_READS_PER_WAKE`] reads), so the encrypting
//!   task sees a batch, not a packet.
//! - **write** ([`OffloadSend`]): decrypted packets are queued to a writer task which takes
//!   whatever is queued (up to [`tun_rs::IDEAL_BATCH_SIZE`]), coalesces consecutive segments of
//!   one TCP (or UDP) flow into one super-packet (GRO) and writes each with its virtio-net
//!   header: one `write(2)` and one trip through the kernel's stack per flow and batch, not per
//!   packet.
//!
//! The peers never see any of it: every packet that is encrypted is an ordinary IP packet of
//! at most the MTU, so the device speaks plain WireGuard to any peer.
//!
//! The MTU reported to gotatun (it pads packets up to it) is the configured one: the device
//! thread leaves the TUN's netns, so it cannot poll the interface by name as gotatun's own
//! `TunDevice` tries to.

use std::io;
use std::sync::Arc;

use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::tun_async_device::TunDevice;
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// gotatun's packet buffers are this large; no segment may be larger.
const SEGMENT_BYTES: usize = 4096;
/// A super-packet and its virtio-net header.
const SUPER_PACKET_BYTES: usize = VIRTIO_NET_HDR_LEN + 65535;
/// TUN reads drained per wake-up of the reader (each may split into up to 64 KiB / MSS
/// segments): bounds the batch handed to the encrypting task.
pub const MAX_READS_PER_WAKE: usize = 8;
/// Packets queued between gotatun's writer and ours.
const WRITE_QUEUE: usize = 1024;
/// Capacity of each write buffer. tun-rs coalesces a packet into the flow's first buffer only
/// if that buffer's *capacity* already holds the result and both offsets (it never grows it), so
/// a buffer sized for one packet capped every write at 2-3 segments; sized like
/// wireguard-go's, a write carries up to 64 KiB.
const WRITE_BUFFER_BYTES: usize = 2 * VIRTIO_NET_HDR_LEN + 65535;

/// Which offloads the device uses: all of them by default; `FLEET_GATEWAY_OFFLOADS` turns
/// levers off for measurement (see gateway/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// `IFF_VNET_HDR` + TSO/USO on the TUN: super-packets split on read, GRO on write.
    pub tun: bool,
    /// Drain several TUN reads per wake-up and write in batches (without `tun`: plain packets).
    pub batch: bool,
    /// UDP GSO: runs of datagrams to one peer leave in one `sendmsg` (`src/udp_gso.rs`).
    pub gso: bool,
    /// UDP GRO on the socket (gotatun turns it on and splits what arrives coalesced): a peer's
    /// GSO run arrives as one read. Off only to measure it.
    pub gro: bool,
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads {
            tun: true,
            batch: true,
            gso: true,
            gro: true,
        }
    }
}

impl Offloads {
    /// None: gotatun's own TUN device, one packet per read and write (the device before the
    /// offload work).
    pub const NONE: Offloads = Offloads {
        tun: false,
        batch: false,
        gso: false,
        gro: false,
    };

    /// The default, or what `FLEET_GATEWAY_OFFLOADS` says: a comma-separated subset of `tun`,
    /// `batch`, `gso`, `gro`, or `all` / `none` — a switch for measuring each lever alone (bench/README.md), read by
    /// every process that creates a userspace device. Unknown words are an error.
    pub fn from_env() -> Result<Offloads, String> {
        match std::env::var("FLEET_GATEWAY_OFFLOADS") {
            Ok(v) => Offloads::parse(&v),
            Err(_) => Ok(Offloads::default()),
        }
    }

    pub fn parse(text: &str) -> Result<Offloads, String> {
        let mut o = Offloads::NONE;
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "tun" => o.tun = true,
                "batch" => o.batch = true,
                "gso" => o.gso = true,
                "gro" => o.gro = true,
                "none" => {}
                "all" => o = Offloads::default(),
                other => {
                    return Err(format!(
                        "FLEET_GATEWAY_OFFLOADS: unknown offload {other:?} (tun, batch, gso, gro, all, none)"
                    ));
                }
            }
        }
        Ok(o)
    }

    /// Whether the device needs the tun-rs TUN at all (else gotatun's `TunDevice`).
    pub fn any(self) -> bool {
        self.tun || self.batch
    }
}

/// Opens the TUN `name` in the calling thread's netns. Must be called inside a tokio runtime
/// (the writer task is spawned on it). `mtu` is what gotatun is told (see the module doc).
pub fn open(name: &str, mtu: u16, offloads: Offloads) -> io::Result<(OffloadSend, OffloadRecv)> {
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(offloads.tun)
        .build_async()?;
    let dev = Arc::new(dev);
    tracing::debug!(
        device = name,
        tcp_gso = dev.tcp_gso(),
        udp_gso = dev.udp_gso(),
        "offloaded TUN open"
    );
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let writer = tokio::spawn(write_batches(Arc::clone(&dev), rx, name.to_string()));
    let recv = OffloadRecv {
        dev,
        batch: offloads.batch,
        original: vec![0; SUPER_PACKET_BYTES],
        bufs: Vec::with_capacity(IDEAL_BATCH_SIZE),
        sizes: vec![0; IDEAL_BATCH_SIZE],
        out: Vec::with_capacity(IDEAL_BATCH_SIZE),
        mtu: MtuWatcher::new(mtu),
    };
    let send = OffloadSend {
        tx,
        _writer: Arc::new(AbortOnDrop(writer)),
    };
    Ok((send, recv))
}

/// The reading half: implements gotatun's [`IpRecv`].
pub struct OffloadRecv {
    dev: Arc<AsyncDevice>,
    batch: bool,
    /// The raw read: virtio-net header + (super-)packet.
    original: Vec<u8>,
    /// gotatun pool packets tun-rs splits the segments of a read into (so they are handed on
    /// without another copy), and the segments' lengths.
    bufs: Vec<Segment>,
    sizes: Vec<usize>,
    out: Vec<Packet<Ip>>,
    mtu: MtuWatcher,
}

/// A gotatun pool packet (its full [`SEGMENT_BYTES`]) as a buffer tun-rs writes a segment into.
struct Segment(Packet);

impl AsRef<[u8]> for Segment {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for Segment {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl OffloadRecv {
    /// Gives every segment slot a pool packet (those the last read used were handed on).
    fn refill(&mut self, pool: &mut PacketBufPool) {
        while self.bufs.len() < IDEAL_BATCH_SIZE {
            let packet = pool.get();
            debug_assert_eq!(packet.len(), SEGMENT_BYTES);
            self.bufs.push(Segment(packet));
        }
    }

    /// Hands on the `n` segments of the last read: each slot's packet is taken, cut to its
    /// segment's length, and replaced by a fresh pool packet.
    fn take(&mut self, n: usize, pool: &mut PacketBufPool) {
        for (slot, &size) in self.bufs.iter_mut().zip(&self.sizes).take(n) {
            let Segment(mut packet) = std::mem::replace(slot, Segment(pool.get()));
            if size > packet.len() {
                tracing::warn!(size, "TUN segment larger than a packet buffer: dropped");
                continue;
            }
            packet.truncate(size);
            match packet.try_into_ip() {
                Ok(p) => self.out.push(p),
                Err(e) => tracing::trace!(error = %e, "not an IP packet from the TUN: dropped"),
            }
        }
    }
}

impl IpRecv for OffloadRecv {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        self.out.clear();
        self.refill(pool);
        let n = self
            .dev
            .recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0)
            .await?;
        self.take(n, pool);
        if self.batch {
            for _ in 1..MAX_READS_PER_WAKE {
                match self.dev.try_recv_multiple(
                    &mut self.original,
                    &mut self.bufs,
                    &mut self.sizes,
                    0,
                ) {
                    Ok(n) => self.take(n, pool),
                    // WouldBlock: nothing more queued; any other error shows on the next read.
                    Err(_) => break,
                }
            }
        }
        Ok(self.out.drain(..))
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}

/// The writing half: implements gotatun's [`IpSend`] by queueing to the writer task.
#[derive(Clone)]
pub struct OffloadSend {
    tx: mpsc::Sender<Packet<Ip>>,
    _writer: Arc<AbortOnDrop>,
}

impl IpSend for OffloadSend {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.tx
            .send(packet)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the TUN writer stopped"))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Takes what is queued, coalesces it (GRO, when the TUN has `IFF_VNET_HDR`) and writes it.
async fn write_batches(dev: Arc<AsyncDevice>, mut rx: mpsc::Receiver<Packet<Ip>>, name: String) {
    let mut gro = GROTable::default();
    let mut queued: Vec<Packet<Ip>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    // Each buffer: room for the virtio-net header, then the packet; coalescing appends to the
    // first packet of a flow within the buffer's capacity, which must therefore be a
    // super-packet's (pages are touched only as far as a buffer is filled).
    let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    loop {
        queued.clear();
        if rx.recv_many(&mut queued, IDEAL_BATCH_SIZE).await == 0 {
            return;
        }
        let n = queued.len();
        while bufs.len() < n {
            bufs.push(Vec::with_capacity(WRITE_BUFFER_BYTES));
        }
        for (buf, packet) in bufs.iter_mut().zip(queued.drain(..)) {
            let bytes = packet.into_bytes();
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(&bytes);
        }
        if let Err(e) = dev
            .send_multiple(&mut gro, &mut bufs[..n], VIRTIO_NET_HDR_LEN)
            .await
        {
            if e.raw_os_error() == Some(nix::libc::EBADFD) {
                tracing::error!(device = %name, error = %e, "the TUN device is gone");
                return;
            }
            tracing::trace!(device = %name, error = %e, "TUN write failed");
        }
    }
}

/// The device's TUN, writing half: gotatun's own `TunDevice` (no offloads) or ours.
#[derive(Clone)]
pub enum TunSend {
    Plain(TunDevice),
    Offload(OffloadSend),
}

/// The device's TUN, reading half.
pub enum TunRecv {
    Plain(TunDevice),
    Offload(OffloadRecv),
}

/// Opens the TUN `name` in the calling thread's netns with `offloads` (gotatun's own TUN
/// device when there are none); inside a tokio runtime.
pub fn open_tun(name: &str, mtu: u16, offloads: Offloads) -> io::Result<(TunSend, TunRecv)> {
    if offloads.any() {
        let (send, recv) = open(name, mtu, offloads)?;
        Ok((TunSend::Offload(send), TunRecv::Offload(recv)))
    } else {
        let tun = TunDevice::from_name(name).map_err(io::Error::other)?;
        Ok((TunSend::Plain(tun.clone()), TunRecv::Plain(tun)))
    }
}

impl IpSend for TunSend {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        match self {
            TunSend::Plain(t) => t.send(packet).await,
            TunSend::Offload(t) => t.send(packet).await,
        }
    }
}

impl IpRecv for TunRecv {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        Ok(match self {
            TunRecv::Plain(t) => either::Either::Left(t.recv(pool).await?),
            TunRecv::Offload(t) => either::Either::Right(t.recv(pool).await?),
        })
    }

    fn mtu(&self) -> MtuWatcher {
        match self {
            TunRecv::Plain(t) => t.mtu(),
            TunRecv::Offload(t) => t.mtu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_parse_from_words() {
        assert_eq!(Offloads::parse("").unwrap(), Offloads::NONE);
        assert_eq!(Offloads::parse("none").unwrap(), Offloads::NONE);
        assert_eq!(Offloads::parse("all").unwrap(), Offloads::default());
        assert_eq!(
            Offloads::parse("tun").unwrap(),
            Offloads {
                tun: true,
                batch: false,
                gso: false,
                gro: false,
            }
        );
        assert_eq!(
            Offloads::parse(" batch , tun,gso,gro ").unwrap(),
            Offloads::parse("all").unwrap()
        );
        assert_eq!(
            Offloads::parse("tun,batch,gso").unwrap(),
            Offloads {
                gro: false,
                ..Offloads::default()
            }
        );
        assert!(Offloads::parse("tso").is_err());
    }
}

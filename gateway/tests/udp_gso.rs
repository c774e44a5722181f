//! UDP GSO on send (`gateway/src/udp_gso.rs`) on a route whose MTU is smaller than the
//! encrypted datagrams: the kernel refuses to segment such a run (`EMSGSIZE` on Linux ≥ 6.10,
//! `EINVAL` before), and the whole batch used to be dropped — TCP in the tunnel stalled. Now the
//! run goes datagram by datagram (fragmented, as the socket clears DF), the destination is
//! remembered, and GSO still serves routes that fit.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use fleet_gateway::PrivateKey;
use fleet_gateway::offload_tun::Offloads;
use fleet_gateway::userspace::BufferedUdp;
use gotatun::packet::{Packet, PacketBufPool};
use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};

/// The underlay's MTU: below a full-sized datagram of a device with MTU 1420 (1420 + 32 +
/// 8 + 20 = 1480 bytes), as on a WAN link or a learnt path MTU of 1400.
const UNDERLAY_MTU: &str = "1400";
/// UDP payload that does not fit a 1400-byte route (1452 + 28 = 1480).
const TOO_BIG: usize = 1452;
/// UDP payload that fits it (1352 + 28 = 1380).
const FITS: usize = 1352;
const BATCH: usize = 20;

/// A datagram that says which batch and which position it is.
fn datagram(pool: &PacketBufPool, size: usize, batch: u8, i: u8) -> Packet {
    let mut p = pool.get();
    let buf = p.buf_mut();
    buf.clear();
    buf.extend_from_slice(&[batch, i]);
    buf.resize(size, batch ^ i);
    p
}

/// Reads until `want` datagrams arrived on `sock` (GRO on: a coalesced read is split by its
/// segment size) or 10 s passed; returns them and how many reads were coalesced.
fn receive(sock: &UdpSocket, want: usize) -> (Vec<Vec<u8>>, usize) {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut got, mut coalesced) = (Vec::new(), 0);
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < want && Instant::now() < deadline {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(i32);
        let Ok(msg) = recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) else {
            continue;
        };
        let n = msg.bytes;
        let segment = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::UdpGroSegments(s) => Some(s as usize),
                _ => None,
            })
            .filter(|&s| s > 0 && s < n);
        if segment.is_some() {
            coalesced += 1;
        }
        for d in buf[..n].chunks(segment.unwrap_or(n)) {
            got.push(d.to_vec());
        }
    }
    (got, coalesced)
}

fn check_batch(got: &[Vec<u8>], size: usize, batch: u8) {
    assert_eq!(got.len(), BATCH, "batch {batch}: datagrams received");
    for (i, d) in got.iter().enumerate() {
        let mut want = vec![batch, i as u8];
        want.resize(size, batch ^ i as u8);
        assert!(*d == want, "batch {batch}: datagram {i} arrived changed");
    }
}

/// A receiving socket in `ns` on `addr`, with UDP GRO on (as gotatun's).
fn receiver(ns: &Netns, addr: &'static str) -> UdpSocket {
    let sock = ns.run_in(move || UdpSocket::bind(addr).unwrap());
    setsockopt(&sock, sockopt::UdpGroSegment, &true).unwrap();
    sock
}

#[test]
fn a_run_the_route_refuses_to_segment_is_sent_datagram_by_datagram_and_remembered() {
    require_root();
    let net = Underlay::new("g1");
    net.a.ip(&["link", "set", "ul0", "mtu", UNDERLAY_MTU]);
    let small_route = receiver(&net.b, "192.0.2.2:7101");
    let fitting = receiver(&net.b, "192.0.2.2:7102");

    let (results, refused) = net.a.run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // The device's own socket: dual-stack, DF cleared, GSO on.
            let (send, _recv) = BufferedUdp::new(Offloads::default())
                .bind(&UdpTransportFactoryParams {
                    addr: None,
                    port: 0,
                    fwmark: None,
                })
                .await
                .unwrap();
            let pool = PacketBufPool::<4096>::new(64);
            let mut buf = Default::default();
            let mut results = Vec::new();
            let to = |port: u16| -> SocketAddr { SocketAddr::from(([192, 0, 2, 2], port)) };
            for (batch, size, port) in [(1u8, TOO_BIG, 7101), (2, TOO_BIG, 7101), (3, FITS, 7102)] {
                let mut packets: Vec<(Packet, SocketAddr)> = (0..BATCH as u8)
                    .map(|i| (datagram(&pool, size, batch, i), to(port)))
                    .collect();
                results.push(
                    send.send_many_to(&mut buf, &mut packets)
                        .await
                        .map_err(|e| e.to_string()),
                );
            }
            (
                results,
                (
                    send.gso_refused_for(to(7101)),
                    send.gso_refused_for(to(7102)),
                ),
            )
        })
    });
    assert_eq!(results, vec![Ok(()), Ok(()), Ok(())], "every batch sent");
    assert_eq!(
        refused,
        (true, false),
        "the 1400-byte route is remembered as refusing GSO, the fitting one is not"
    );

    let (got, coalesced) = receive(&small_route, 2 * BATCH);
    assert_eq!(coalesced, 0, "fragmented datagrams are never coalesced");
    assert_eq!(
        got.len(),
        2 * BATCH,
        "both batches over the 1400-byte route arrived"
    );
    check_batch(&got[..BATCH], TOO_BIG, 1);
    check_batch(&got[BATCH..], TOO_BIG, 2);

    let (got, coalesced) = receive(&fitting, BATCH);
    check_batch(&got, FITS, 3);
    assert!(
        coalesced > 0,
        "datagrams that fit the route left as one GSO send (the GRO receiver read them coalesced)"
    );
}

/// Two devices over an underlay of MTU 1400 with the default offloads (UDP GSO on): bulk TCP
/// both ways arrives intact, and the underlay fragmented the datagrams.
#[tokio::test]
async fn tcp_through_a_tunnel_whose_underlay_mtu_is_below_its_datagrams() {
    require_root();
    require_unset("FLEET_GATEWAY_OFFLOADS", "checks the default");
    let net = Underlay::new("g2");
    for ns in [&net.a, &net.b] {
        ns.ip(&["link", "set", "ul0", "mtu", UNDERLAY_MTU]);
    }
    let keys = (PrivateKey::generate(), PrivateKey::generate());
    let Pair { a, b, .. } = peered_pair(&net, (&net.a, &net.b), "g", keys).await;
    assert!(
        eventually(Duration::from_secs(10), || net.a.ping("198.51.100.2")),
        "no ping through the tunnel"
    );
    bulk_both_ways((&net.a, &net.b), 8 << 20, "over a 1400-byte underlay");
    for ns in [&net.a, &net.b] {
        let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
        let ip: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Ip:")).collect();
        let created: u64 = ip[0]
            .split_whitespace()
            .zip(ip[1].split_whitespace())
            .find(|(n, _)| *n == "FragCreates")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        assert!(created > 0, "{}: no datagram was fragmented", ns.name);
    }
    a.delete().await.unwrap();
    b.delete().await.unwrap();
}

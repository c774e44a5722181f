//! How one batch of received datagrams leaves the relay, decided without I/O: a received
//! buffer that the kernel coalesced (UDP GRO: a run of same-sized datagrams from one source)
//! is cut back into its datagrams, each routed on its own; the forwarded ones are grouped by
//! destination (keeping their order per destination) and cut into runs that one `sendmsg`
//! with `UDP_SEGMENT` (UDP GSO) can carry, so the receiver sees exactly the same datagrams.

use std::net::SocketAddr;
use std::ops::Range;

/// The kernel's limit on segments per GSO send (`UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Payload bytes per GSO send (an IP packet is at most 64 KiB with its headers).
pub const GSO_MAX_BYTES: usize = 65_000;

/// The datagrams in a received buffer of `len` bytes whose segment size is `stride` (UDP GRO:
/// every datagram `stride` bytes but the last, which may be shorter; a buffer without GRO is
/// one datagram: `stride == len`).
pub fn datagrams(len: usize, stride: usize) -> impl Iterator<Item = Range<usize>> {
    let stride = if stride == 0 { len.max(1) } else { stride };
    (0..len)
        .step_by(stride)
        .map(move |start| start..(start + stride).min(len))
}

/// One send: the datagrams `order[range]` (indices into the forwarded list), all to `to`,
/// every one `segment` bytes long but the last, which may be shorter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub to: SocketAddr,
    pub segment: usize,
    pub range: Range<usize>,
}

/// The sends for `forwarded` (each datagram's length and destination, in the order received):
/// `order` lists the datagrams grouped by destination (destinations in order of first
/// appearance, datagrams in received order within each), and each [`Run`] is a slice of it
/// that fits one GSO send. A run ends where the destination changes, where a datagram is
/// longer than the run's first or the one after a shorter datagram would follow, and at
/// [`GSO_MAX_SEGMENTS`] or [`GSO_MAX_BYTES`].
pub fn plan(forwarded: &[(usize, SocketAddr)]) -> (Vec<usize>, Vec<Run>) {
    // Destinations per batch are few (one per relayed member that receives): a linear scan.
    let mut groups: Vec<(SocketAddr, Vec<usize>)> = Vec::new();
    for (i, (_, to)) in forwarded.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| g == to) {
            Some((_, members)) => members.push(i),
            None => groups.push((*to, vec![i])),
        }
    }
    let mut order = Vec::with_capacity(forwarded.len());
    let mut runs = Vec::new();
    for (to, members) in groups {
        let mut k = 0;
        while k < members.len() {
            let start = order.len();
            let segment = forwarded[members[k]].0;
            let mut total = segment;
            order.push(members[k]);
            k += 1;
            while k < members.len() && order.len() - start < GSO_MAX_SEGMENTS {
                let len = forwarded[members[k]].0;
                if len > segment || total + len > GSO_MAX_BYTES {
                    break;
                }
                total += len;
                order.push(members[k]);
                k += 1;
                if len < segment {
                    break;
                }
            }
            runs.push(Run {
                to,
                segment,
                range: start..order.len(),
            });
        }
    }
    (order, runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 21], port))
    }

    /// The runs as (destination port, the lengths of their datagrams in send order).
    fn runs_of(forwarded: &[(usize, SocketAddr)]) -> Vec<(u16, Vec<usize>)> {
        let (order, runs) = plan(forwarded);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..forwarded.len()).collect::<Vec<_>>(),
            "every datagram once"
        );
        runs.iter()
            .map(|r| {
                let lens: Vec<usize> = order[r.range.clone()]
                    .iter()
                    .map(|&i| {
                        assert_eq!(forwarded[i].1, r.to);
                        forwarded[i].0
                    })
                    .collect();
                assert_eq!(lens[0], r.segment);
                (r.to.port(), lens)
            })
            .collect()
    }

    #[test]
    fn a_gro_buffer_is_cut_into_its_datagrams() {
        assert_eq!(
            datagrams(3000, 1000).collect::<Vec<_>>(),
            [0..1000, 1000..2000, 2000..3000]
        );
        assert_eq!(
            datagrams(2500, 1000).collect::<Vec<_>>(),
            [0..1000, 1000..2000, 2000..2500]
        );
        // Without GRO the buffer is one datagram.
        assert_eq!(datagrams(148, 148).collect::<Vec<_>>(), vec![0..148]);
        assert_eq!(datagrams(148, 0).collect::<Vec<_>>(), vec![0..148]);
        assert_eq!(datagrams(0, 0).count(), 0);
    }

    #[test]
    fn same_sized_datagrams_to_one_destination_leave_in_one_run() {
        let f = vec![(1452, addr(1)); 10];
        assert_eq!(runs_of(&f), [(1, vec![1452; 10])]);
        // The last may be shorter; it ends the run.
        let mut f = vec![(1452, addr(1)); 3];
        f.push((200, addr(1)));
        f.push((1452, addr(1)));
        assert_eq!(
            runs_of(&f),
            [(1, vec![1452, 1452, 1452, 200]), (1, vec![1452])]
        );
        // A longer one cannot follow.
        let f = [(100, addr(1)), (100, addr(1)), (1452, addr(1))];
        assert_eq!(runs_of(&f), [(1, vec![100, 100]), (1, vec![1452])]);
    }

    #[test]
    fn runs_split_where_the_route_changes_and_keep_each_destinations_order() {
        // A GRO buffer from one source whose datagrams belong to two sessions (two receivers),
        // interleaved with the other direction's acknowledgements.
        let (a, b) = (addr(1), addr(2));
        let f = [
            (1452, b),
            (1452, b),
            (96, a),
            (1452, a),
            (1452, b),
            (96, a),
            (96, a),
        ];
        let (order, runs) = plan(&f);
        assert_eq!(order, [0, 1, 4, 2, 3, 5, 6]);
        assert_eq!(
            runs_of(&f),
            [
                (2, vec![1452, 1452, 1452]),
                (1, vec![96]),
                (1, vec![1452, 96]),
                (1, vec![96])
            ]
        );
        assert_eq!(runs.len(), 4);
    }

    #[test]
    fn runs_stay_within_the_kernels_gso_limits() {
        let f = vec![(100, addr(1)); GSO_MAX_SEGMENTS * 2 + 1];
        let lens: Vec<usize> = runs_of(&f).into_iter().map(|(_, l)| l.len()).collect();
        assert_eq!(lens, [GSO_MAX_SEGMENTS, GSO_MAX_SEGMENTS, 1]);
        // 1452-byte datagrams: 44 fit in 65,000 bytes.
        let f = vec![(1452, addr(1)); 50];
        let lens: Vec<usize> = runs_of(&f).into_iter().map(|(_, l)| l.len()).collect();
        assert_eq!(lens, [44, 6]);
        const { assert!(44 * 1452 <= GSO_MAX_BYTES && 45 * 1452 > GSO_MAX_BYTES) };
        assert!(plan(&[]).1.is_empty());
    }
}

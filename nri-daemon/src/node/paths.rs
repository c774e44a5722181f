//! Which path a direct peer uses: straight to the other member, or through the hub relay (its
//! `fallback`) while the direct path does not work.
//!
//! Both ends of a direct tunnel watch it (the controller gives them a 1 s keepalive each way,
//! so a working path brings received bytes every second): no byte for [`DEAD_AFTER`] and the
//! peer is re-added at the relay's address (a fresh handshake through the relay, which knows
//! no index of the direct session). The other end follows by WireGuard's roaming (it answers
//! where the handshake came from), so the side that notices need not be the side that dials:
//! a break is often one-way (a public member's router loses its port forward while its own
//! packets still reach the NAT'd member). While on the relay, the dialling end probes its
//! direct endpoint after [`FIRST_PROBE`], doubling up to [`MAX_PROBE`]: re-added there, a
//! handshake within [`PROBE_WINDOW`] makes it direct again (and moves the other end back by
//! roaming), else it returns to the relay.
//!
//! The trade-off: one keepalive a second each way per direct peer (~150 bytes/s) buys a
//! fallback within ~3-4 s; a failed probe loses up to [`PROBE_WINDOW`] of packets, which the
//! backoff bounds while the direct path stays broken. A lossless probe on the same socket (as
//! Tailscale's disco pings) needs a device hook that kernel WireGuard does not have.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use fleet_gateway::{Peer, PublicKey};

/// Silence after which a direct path counts as broken.
pub const DEAD_AFTER: Duration = Duration::from_millis(2500);
/// How long a probe of the direct path waits for a handshake.
pub const PROBE_WINDOW: Duration = Duration::from_secs(2);
/// The first probe after a fallback; each failed probe doubles the wait.
pub const FIRST_PROBE: Duration = Duration::from_secs(10);
pub const MAX_PROBE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    Direct,
    Relay,
}

impl PeerPath {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerPath::Direct => "direct",
            PeerPath::Relay => "relay",
        }
    }
}

#[derive(Debug, Clone)]
struct State {
    /// Where we dial it; `None`: it dials us.
    direct: Option<SocketAddr>,
    fallback: SocketAddr,
    /// We re-added it at the relay's address, and keep it there until the direct path works.
    forced: bool,
    path: PeerPath,
    since: SystemTime,
    last_rx: u64,
    rx_changed: Instant,
    backoff: Duration,
    next_probe: Instant,
    /// A probe of the direct path running since then, with the last handshake before it.
    probing: Option<(Instant, Option<SystemTime>)>,
}

/// The path state of every direct peer that has a fallback.
#[derive(Debug, Default)]
pub struct Paths {
    peers: HashMap<PublicKey, State>,
}

/// One direct peer with a fallback, as the desired state has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback {
    pub public_key: PublicKey,
    /// Its own endpoint, when we dial it; `None` when it dials us.
    pub direct: Option<SocketAddr>,
    pub fallback: SocketAddr,
}

impl Paths {
    /// Follows the desired peers: new ones start direct, changed ones start over, missing
    /// ones are forgotten.
    pub fn set(&mut self, wanted: &[Fallback], now: Instant, wall: SystemTime) {
        self.peers
            .retain(|k, _| wanted.iter().any(|w| w.public_key == *k));
        for w in wanted {
            let same = self
                .peers
                .get(&w.public_key)
                .is_some_and(|s| s.direct == w.direct && s.fallback == w.fallback);
            if !same {
                self.peers.insert(
                    w.public_key,
                    State {
                        direct: w.direct,
                        fallback: w.fallback,
                        forced: false,
                        path: PeerPath::Direct,
                        since: wall,
                        last_rx: 0,
                        rx_changed: now,
                        backoff: FIRST_PROBE,
                        next_probe: now + FIRST_PROBE,
                        probing: None,
                    },
                );
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// `peers` with each peer we moved to the relay sent there.
    pub fn effective(&self, peers: &[Peer]) -> Vec<Peer> {
        peers
            .iter()
            .map(|p| match self.peers.get(&p.public_key) {
                Some(s) if s.forced => Peer {
                    endpoint: Some(s.fallback),
                    ..p.clone()
                },
                _ => p.clone(),
            })
            .collect()
    }

    /// The peer's path and since when, if it is watched.
    pub fn path(&self, key: &PublicKey) -> Option<(PeerPath, SystemTime)> {
        self.peers.get(key).map(|s| (s.path, s.since))
    }

    /// Takes the peer's state on the device at `now` (where it sends: `endpoint`, which
    /// WireGuard's roaming moves to wherever the other side's packets come from); returns the
    /// endpoint to re-add the peer with (a fresh handshake there) when we move it.
    pub fn observe(
        &mut self,
        key: &PublicKey,
        endpoint: Option<SocketAddr>,
        rx_bytes: u64,
        last_handshake: Option<SystemTime>,
        now: Instant,
        wall: SystemTime,
    ) -> Option<SocketAddr> {
        let s = self.peers.get_mut(key)?;
        if rx_bytes != s.last_rx {
            s.last_rx = rx_bytes;
            s.rx_changed = now;
        }
        // Where the device sends now (the other side may have moved us by roaming).
        let seen = match endpoint {
            Some(e) if e == s.fallback => Some(PeerPath::Relay),
            Some(_) => Some(PeerPath::Direct),
            None => None,
        };
        if let Some(seen) = seen
            && seen != s.path
            && s.probing.is_none()
        {
            s.path = seen;
            s.since = wall;
            s.rx_changed = now;
            s.backoff = FIRST_PROBE;
            s.next_probe = now + FIRST_PROBE;
            if seen == PeerPath::Direct {
                s.forced = false;
            }
        }
        if let Some((started, before)) = s.probing {
            if last_handshake.is_some_and(|t| before.is_none_or(|b| t > b)) {
                s.probing = None;
                s.forced = false;
                s.path = PeerPath::Direct;
                s.since = wall;
                s.rx_changed = now;
                s.backoff = FIRST_PROBE;
                return None;
            }
            if now.duration_since(started) < PROBE_WINDOW {
                return None;
            }
            s.probing = None;
            s.forced = true;
            s.backoff = (s.backoff * 2).min(MAX_PROBE);
            s.next_probe = now + s.backoff;
            return Some(s.fallback);
        }
        match s.path {
            PeerPath::Direct => {
                if now.duration_since(s.rx_changed) < DEAD_AFTER {
                    return None;
                }
                s.forced = true;
                s.path = PeerPath::Relay;
                s.since = wall;
                s.backoff = FIRST_PROBE;
                s.next_probe = now + FIRST_PROBE;
                Some(s.fallback)
            }
            PeerPath::Relay => {
                let direct = s.direct?;
                if now < s.next_probe {
                    return None;
                }
                s.probing = Some((now, last_handshake));
                s.forced = false;
                Some(direct)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PublicKey {
        fleet_gateway::PrivateKey::generate().public_key()
    }

    fn peer(k: PublicKey, endpoint: Option<SocketAddr>) -> Peer {
        Peer {
            public_key: k,
            endpoint,
            allowed_ips: vec![],
            persistent_keepalive: Some(1),
        }
    }

    const WALL: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn the_dialling_end_falls_back_on_silence_and_probes_its_way_back() {
        let (k, t0) = (key(), Instant::now());
        let direct: SocketAddr = "203.0.113.21:51820".parse().unwrap();
        let relay: SocketAddr = "203.0.113.10:51820".parse().unwrap();
        let mut p = Paths::default();
        p.set(
            &[Fallback {
                public_key: k,
                direct: Some(direct),
                fallback: relay,
            }],
            t0,
            WALL,
        );
        let at = |s: u64| t0 + Duration::from_secs(s);
        let d = Some(direct);
        for i in 1..=5u64 {
            assert_eq!(p.observe(&k, d, i * 100, None, at(i), WALL), None);
        }
        assert_eq!(p.effective(&[peer(k, d)])[0].endpoint, d);
        // Silence: DEAD_AFTER after the last byte, the relay.
        assert_eq!(p.observe(&k, d, 500, None, at(7), WALL), None);
        let fell = at(5) + DEAD_AFTER;
        assert_eq!(p.observe(&k, d, 500, None, fell, WALL), Some(relay));
        assert_eq!(p.path(&k).unwrap().0, PeerPath::Relay);
        assert_eq!(p.effective(&[peer(k, d)])[0].endpoint, Some(relay));
        // A failed probe after FIRST_PROBE: back to the relay, the next one twice as late.
        let r = Some(relay);
        let hs = Some(WALL + Duration::from_secs(1));
        let probe = fell + FIRST_PROBE;
        assert_eq!(p.observe(&k, r, 600, hs, probe, WALL), Some(direct));
        assert_eq!(p.effective(&[peer(k, d)])[0].endpoint, d);
        assert_eq!(
            p.observe(&k, d, 600, None, probe + PROBE_WINDOW, WALL),
            Some(relay)
        );
        let again = probe + PROBE_WINDOW + FIRST_PROBE;
        assert_eq!(p.observe(&k, r, 600, hs, again, WALL), None);
        // The path works again: the next probe's handshake makes it direct.
        let probe = probe + PROBE_WINDOW + 2 * FIRST_PROBE;
        assert_eq!(p.observe(&k, r, 700, hs, probe, WALL), Some(direct));
        let later = WALL + Duration::from_secs(40);
        let t = probe + Duration::from_secs(1);
        assert_eq!(p.observe(&k, d, 800, Some(later), t, later), None);
        assert_eq!(p.path(&k), Some((PeerPath::Direct, later)));
        assert_eq!(p.effective(&[peer(k, d)])[0].endpoint, d);
    }

    #[test]
    fn the_end_that_is_dialled_falls_back_and_follows_the_other_back_by_roaming() {
        let (k, t0) = (key(), Instant::now());
        let theirs: SocketAddr = "203.0.113.22:40000".parse().unwrap();
        let relay: SocketAddr = "203.0.113.10:51820".parse().unwrap();
        let mut p = Paths::default();
        p.set(
            &[Fallback {
                public_key: k,
                direct: None,
                fallback: relay,
            }],
            t0,
            WALL,
        );
        let at = |s: u64| t0 + Duration::from_secs(s);
        let e = Some(theirs);
        assert_eq!(p.observe(&k, e, 100, None, at(1), WALL), None);
        assert_eq!(p.observe(&k, e, 100, None, at(4), WALL), Some(relay));
        assert_eq!(p.effective(&[peer(k, None)])[0].endpoint, Some(relay));
        // It never probes (it cannot dial the other end's NAT) ...
        let r = Some(relay);
        assert_eq!(p.observe(&k, r, 200, None, at(60), WALL), None);
        // ... the other end's successful probe moves it back.
        let back = WALL + Duration::from_secs(61);
        assert_eq!(p.observe(&k, e, 300, None, at(61), back), None);
        assert_eq!(p.path(&k), Some((PeerPath::Direct, back)));
        assert_eq!(p.effective(&[peer(k, None)])[0].endpoint, None);
    }
}

//! Which exporting clusters are live: their endpoints are resolved and routed to only while
//! they are. Pure: the caller feeds what it sees of each cluster and the time, measured on its
//! own monotonic clock (never another host's clock).
//!
//! A cluster is **alive now** when it is a member, the hub does not say its gateway is down,
//! and its heartbeat (the revision of its `gateway` record, republished every status interval
//! while its gateway device exists) changed within `timeout`. It **leaves at once** when it
//! stops being alive (no damping on the way out: traffic must not go to a dead cluster).
//! It **returns** when it has been alive again for a hold-down that grows with its flapping:
//! nothing after a single outage, `hold_down` × 2^(n-2) after the n-th death within
//! `flap_window` (n ≥ 2), capped at `max_hold_down`. So one outage heals at once, and a
//! flapping cluster stops churning every node's VIP table.
//!
//! A cluster seen for the first time with a heartbeat is live at once (a restarted
//! controller must not withdraw the whole fleet); one without a heartbeat yet is not.
//! The own cluster is always live (its endpoints need no tunnel).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::{ClusterId, GatewayState};
use fleet_hub_api::records::GATEWAY_RECORD;

/// The liveness rule's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    /// A heartbeat older than this is a dead cluster. Give it ≥ 2 heartbeat intervals.
    pub timeout: Duration,
    /// The hold-down after the second death within `flap_window`; doubles after each further one.
    pub hold_down: Duration,
    pub max_hold_down: Duration,
    /// Deaths older than this no longer count as flapping.
    pub flap_window: Duration,
}

impl LivenessConfig {
    /// The rule for heartbeats every `interval`: dead after three missed ones (at least 1 s).
    pub fn for_heartbeat_interval(interval: Duration) -> Self {
        LivenessConfig {
            timeout: (interval * 3).max(Duration::from_secs(1)),
            hold_down: Duration::from_secs(2),
            max_hold_down: Duration::from_secs(120),
            flap_window: Duration::from_secs(300),
        }
    }

    /// The hold-down after `deaths` deaths within the window.
    pub fn hold_for(&self, deaths: usize) -> Duration {
        if deaths <= 1 {
            return Duration::ZERO;
        }
        let doublings = u32::try_from(deaths - 2).unwrap_or(u32::MAX).min(20);
        self.hold_down
            .saturating_mul(1 << doublings)
            .min(self.max_hold_down)
    }
}

/// What the caller sees of one cluster now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The heartbeat's current mark (the `gateway` record's revision); `None` without one.
    pub heartbeat: Option<u64>,
    /// The hub says the cluster's gateway is down.
    pub gateway_down: bool,
}

#[derive(Clone, Debug)]
struct Tracked {
    mark: Option<u64>,
    beat_at: Instant,
    live: bool,
    /// Alive again since (while not yet live).
    alive_since: Option<Instant>,
    deaths: VecDeque<Instant>,
}

/// A change of a cluster's liveness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Withdrawn(ClusterId),
    Returned(ClusterId),
}

/// The liveness of every cluster seen.
#[derive(Clone, Debug)]
pub struct Liveness {
    config: LivenessConfig,
    own: ClusterId,
    clusters: BTreeMap<ClusterId, Tracked>,
}

impl Liveness {
    pub fn new(own: ClusterId, config: LivenessConfig) -> Self {
        Liveness {
            config,
            own,
            clusters: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &LivenessConfig {
        &self.config
    }

    /// Feeds the fleet as mirrored now: every member's heartbeat and gateway state. Members
    /// no longer listed are forgotten (they are not live). Returns what changed.
    pub fn observe_fleet(&mut self, fleet: &Fleet, now: Instant) -> Vec<Transition> {
        let seen: BTreeMap<ClusterId, Observation> = fleet
            .clusters
            .values()
            .map(|c| {
                let heartbeat = fleet
                    .records
                    .get(&c.id)
                    .and_then(|r| r.get(GATEWAY_RECORD))
                    .map(|r| r.revision);
                let observation = Observation {
                    heartbeat,
                    gateway_down: c.gateway == GatewayState::Down,
                };
                (c.id.clone(), observation)
            })
            .collect();
        self.observe(&seen, now)
    }

    /// Feeds one observation per member cluster (those absent are no longer members).
    pub fn observe(
        &mut self,
        members: &BTreeMap<ClusterId, Observation>,
        now: Instant,
    ) -> Vec<Transition> {
        let mut changes = Vec::new();
        let gone: Vec<ClusterId> = self
            .clusters
            .keys()
            .filter(|c| !members.contains_key(*c))
            .cloned()
            .collect();
        for c in gone {
            if self.clusters.remove(&c).is_some_and(|t| t.live) {
                changes.push(Transition::Withdrawn(c));
            }
        }
        for (cluster, o) in members {
            if *cluster == self.own {
                continue;
            }
            let t = self
                .clusters
                .entry(cluster.clone())
                .or_insert_with(|| Tracked {
                    mark: o.heartbeat,
                    beat_at: now,
                    live: o.heartbeat.is_some() && !o.gateway_down,
                    alive_since: None,
                    deaths: VecDeque::new(),
                });
            if o.heartbeat != t.mark {
                t.mark = o.heartbeat;
                t.beat_at = now;
            }
            let alive = o.heartbeat.is_some()
                && !o.gateway_down
                && now.saturating_duration_since(t.beat_at) < self.config.timeout;
            while t
                .deaths
                .front()
                .is_some_and(|d| now.saturating_duration_since(*d) > self.config.flap_window)
            {
                t.deaths.pop_front();
            }
            match (t.live, alive) {
                (true, false) => {
                    t.live = false;
                    t.alive_since = None;
                    t.deaths.push_back(now);
                    changes.push(Transition::Withdrawn(cluster.clone()));
                }
                (false, true) => {
                    let since = *t.alive_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= self.config.hold_for(t.deaths.len())
                    {
                        t.live = true;
                        t.alive_since = None;
                        changes.push(Transition::Returned(cluster.clone()));
                    }
                }
                (false, false) => t.alive_since = None,
                (true, true) => {}
            }
        }
        changes
    }

    /// The live clusters, the own one included.
    pub fn live(&self) -> BTreeSet<ClusterId> {
        self.clusters
            .iter()
            .filter(|(_, t)| t.live)
            .map(|(c, _)| c.clone())
            .chain(std::iter::once(self.own.clone()))
            .collect()
    }

    /// The next instant at which a cluster's liveness can change with no new input (a
    /// heartbeat timing out, a hold-down ending): observe again then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clusters
            .values()
            .filter_map(|t| {
                if t.live {
                    t.mark.map(|_| t.beat_at + self.config.timeout)
                } else {
                    t.alive_since
                        .map(|s| s + self.config.hold_for(t.deaths.len()))
                }
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).unwrap()
    }

    fn config() -> LivenessConfig {
        LivenessConfig {
            timeout: Duration::from_secs(3),
            hold_down: Duration::from_secs(2),
            max_hold_down: Duration::from_secs(16),
            flap_window: Duration::from_secs(60),
        }
    }

    fn beat(mark: u64) -> BTreeMap<ClusterId, Observation> {
        BTreeMap::from([(
            id("bb"),
            Observation {
                heartbeat: Some(mark),
                gateway_down: false,
            },
        )])
    }

    #[test]
    fn a_silent_cluster_is_withdrawn_after_the_timeout_and_returns_at_once() {
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), config());
        assert!(l.observe(&beat(1), t0).is_empty());
        assert_eq!(l.live(), BTreeSet::from([id("aa"), id("bb")]));
        assert_eq!(l.next_deadline(), Some(t0 + Duration::from_secs(3)));
        // Heartbeats keep it live.
        l.observe(&beat(2), t0 + Duration::from_secs(2));
        assert!(
            l.observe(&beat(2), t0 + Duration::from_millis(4900))
                .is_empty()
        );
        // Silent for the timeout: withdrawn.
        assert_eq!(
            l.observe(&beat(2), t0 + Duration::from_secs(5)),
            vec![Transition::Withdrawn(id("bb"))]
        );
        assert_eq!(l.live(), BTreeSet::from([id("aa")]));
        // The first outage has no hold-down: the next heartbeat brings it back.
        assert_eq!(
            l.observe(&beat(3), t0 + Duration::from_secs(9)),
            vec![Transition::Returned(id("bb"))]
        );
    }

    #[test]
    fn a_flapping_cluster_waits_longer_each_time() {
        let cfg = config();
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), cfg);
        let mut now = t0;
        let mut mark = 0;
        let mut beat_now = |l: &mut Liveness, now: Instant, down: bool| {
            mark += 1;
            let o = Observation {
                heartbeat: Some(mark),
                gateway_down: down,
            };
            l.observe(&BTreeMap::from([(id("bb"), o)]), now)
        };
        beat_now(&mut l, now, false);
        for (death, hold) in [(1, 0), (2, 2), (3, 4), (4, 8), (5, 16), (6, 16)] {
            now += Duration::from_millis(100);
            assert_eq!(
                beat_now(&mut l, now, true),
                vec![Transition::Withdrawn(id("bb"))],
                "death {death}"
            );
            now += Duration::from_millis(100);
            let back = beat_now(&mut l, now, false);
            if hold == 0 {
                assert_eq!(back, vec![Transition::Returned(id("bb"))]);
                continue;
            }
            assert!(back.is_empty(), "death {death}: back before its hold-down");
            assert_eq!(
                l.next_deadline(),
                Some(now + Duration::from_secs(hold)),
                "death {death}"
            );
            now += Duration::from_secs(hold) - Duration::from_millis(1);
            assert!(beat_now(&mut l, now, false).is_empty());
            now += Duration::from_millis(1);
            assert_eq!(
                beat_now(&mut l, now, false),
                vec![Transition::Returned(id("bb"))]
            );
        }
        // After a quiet window the history is forgotten.
        now += cfg.flap_window + Duration::from_secs(1);
        beat_now(&mut l, now, false);
        beat_now(&mut l, now, true);
        assert_eq!(
            beat_now(&mut l, now + Duration::from_millis(1), false),
            vec![Transition::Returned(id("bb"))]
        );
    }

    #[test]
    fn a_hold_down_restarts_when_the_cluster_dies_again_during_it() {
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), config());
        let o = |mark, down| {
            BTreeMap::from([(
                id("bb"),
                Observation {
                    heartbeat: Some(mark),
                    gateway_down: down,
                },
            )])
        };
        l.observe(&o(1, false), t0);
        l.observe(&o(2, true), t0);
        l.observe(&o(3, false), t0);
        l.observe(&o(4, true), t0); // second death: 2 s hold-down
        l.observe(&o(5, false), t0 + Duration::from_secs(1));
        l.observe(&o(6, true), t0 + Duration::from_millis(1500)); // down during it: not a new death
        assert!(
            l.observe(&o(7, false), t0 + Duration::from_secs(2))
                .is_empty()
        );
        assert!(
            l.observe(&o(8, false), t0 + Duration::from_secs(3))
                .is_empty()
        );
        assert_eq!(
            l.observe(&o(9, false), t0 + Duration::from_secs(4)),
            vec![Transition::Returned(id("bb"))]
        );
    }

    #[test]
    fn members_without_a_heartbeat_or_gone_are_not_live_and_the_own_cluster_always_is() {
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), config());
        let members = BTreeMap::from([
            (
                id("aa"),
                Observation {
                    heartbeat: None,
                    gateway_down: true,
                },
            ),
            (
                id("cc"),
                Observation {
                    heartbeat: None,
                    gateway_down: false,
                },
            ),
        ]);
        assert!(l.observe(&members, t0).is_empty());
        assert_eq!(l.live(), BTreeSet::from([id("aa")]));
        l.observe(&beat(1), t0);
        assert!(l.live().contains(&id("bb")));
        // bb removed from the fleet: withdrawn at once.
        assert_eq!(
            l.observe(&BTreeMap::new(), t0),
            vec![Transition::Withdrawn(id("bb"))]
        );
        assert_eq!(l.live(), BTreeSet::from([id("aa")]));
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn hold_downs_double_and_cap() {
        let c = config();
        assert_eq!(c.hold_for(0), Duration::ZERO);
        assert_eq!(c.hold_for(1), Duration::ZERO);
        assert_eq!(c.hold_for(2), Duration::from_secs(2));
        assert_eq!(c.hold_for(3), Duration::from_secs(4));
        assert_eq!(c.hold_for(1000), Duration::from_secs(16));
        let d = LivenessConfig::for_heartbeat_interval(Duration::from_millis(100));
        assert_eq!(d.timeout, Duration::from_secs(1));
    }
}

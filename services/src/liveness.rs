//! Which exporting clusters are live: their endpoints are resolved and routed to only while
//! they are. Pure: the caller feeds what it sees of each cluster and the time, measured on its
//! own monotonic clock (never another host's clock).
//!
//! A cluster is **alive now** when it is a member, the hub says its controller lease is held
//! ([`ClusterRecord::controller_live`](fleet_hub_api::model::ClusterRecord), written by the
//! hub only when it changes: a lease that lapsed for its TTL, a grant after that) and does not
//! say its gateway is down (the controller reports that when it can no longer read its gateway
//! device). Both signals travel only on change, so following N clusters costs nothing per
//! interval — a heartbeat record per cluster fanned out to every member cost O(N²) events per
//! interval (issue 12, item 13). It **leaves at once** when it stops being alive (no damping
//! on the way out: traffic must not go to a dead cluster). It **returns** when it has been
//! alive again for a hold-down that grows with its flapping: nothing after a single outage,
//! `hold_down` × 2^(n-2) after the n-th death within `flap_window` (n ≥ 2), capped at
//! `max_hold_down`. So one outage heals at once, and a flapping cluster stops churning every
//! node's VIP table.
//!
//! A cluster seen for the first time alive is live at once (a restarted controller must not
//! withdraw the whole fleet). The own cluster is always live (its endpoints need no tunnel).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use fleet_hub_api::mirror::Fleet;
use fleet_hub_api::model::{ClusterId, GatewayState};

/// The liveness rule's damping parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    /// The hold-down after the second death within `flap_window`; doubles after each further one.
    pub hold_down: Duration,
    pub max_hold_down: Duration,
    /// Deaths older than this no longer count as flapping.
    pub flap_window: Duration,
}

impl Default for LivenessConfig {
    /// 2 s doubling to at most 2 min, deaths counted over 5 min.
    fn default() -> Self {
        LivenessConfig {
            hold_down: Duration::from_secs(2),
            max_hold_down: Duration::from_secs(120),
            flap_window: Duration::from_secs(300),
        }
    }
}

impl LivenessConfig {
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
    /// The hub says the cluster's controller lease is held.
    pub controller_live: bool,
    /// The hub says the cluster's gateway is down.
    pub gateway_down: bool,
}

impl Observation {
    fn alive(&self) -> bool {
        self.controller_live && !self.gateway_down
    }
}

#[derive(Clone, Debug)]
struct Tracked {
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

    /// Feeds the fleet as mirrored now: every member's lease and gateway state. Members no
    /// longer listed are forgotten (they are not live). Returns what changed.
    pub fn observe_fleet(&mut self, fleet: &Fleet, now: Instant) -> Vec<Transition> {
        let seen: BTreeMap<ClusterId, Observation> = fleet
            .clusters
            .values()
            .map(|c| {
                let observation = Observation {
                    controller_live: c.controller_live,
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
                    live: o.alive(),
                    alive_since: None,
                    deaths: VecDeque::new(),
                });
            let alive = o.alive();
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
    /// hold-down ending): observe again then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clusters
            .values()
            .filter(|t| !t.live)
            .filter_map(|t| {
                t.alive_since
                    .map(|s| s + self.config.hold_for(t.deaths.len()))
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
            hold_down: Duration::from_secs(2),
            max_hold_down: Duration::from_secs(16),
            flap_window: Duration::from_secs(60),
        }
    }

    fn bb(controller_live: bool, gateway_down: bool) -> BTreeMap<ClusterId, Observation> {
        BTreeMap::from([(
            id("bb"),
            Observation {
                controller_live,
                gateway_down,
            },
        )])
    }

    #[test]
    fn a_lapsed_lease_withdraws_at_once_and_a_single_outage_returns_at_once() {
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), config());
        assert!(l.observe(&bb(true, false), t0).is_empty());
        assert_eq!(l.live(), BTreeSet::from([id("aa"), id("bb")]));
        // Nothing times out by itself: only the hub's word changes liveness.
        assert_eq!(l.next_deadline(), None);
        assert!(
            l.observe(&bb(true, false), t0 + Duration::from_secs(3600))
                .is_empty()
        );
        assert_eq!(
            l.observe(&bb(false, false), t0 + Duration::from_secs(3601)),
            vec![Transition::Withdrawn(id("bb"))]
        );
        assert_eq!(l.live(), BTreeSet::from([id("aa")]));
        assert_eq!(
            l.observe(&bb(true, false), t0 + Duration::from_secs(3605)),
            vec![Transition::Returned(id("bb"))]
        );
        // A gateway reported down withdraws as well.
        assert_eq!(
            l.observe(&bb(true, true), t0 + Duration::from_secs(3606)),
            vec![Transition::Withdrawn(id("bb"))]
        );
    }

    #[test]
    fn a_flapping_cluster_waits_longer_each_time() {
        let cfg = config();
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), cfg);
        let mut now = t0;
        let see = |l: &mut Liveness, now: Instant, down: bool| l.observe(&bb(true, down), now);
        see(&mut l, now, false);
        for (death, hold) in [(1, 0), (2, 2), (3, 4), (4, 8), (5, 16), (6, 16)] {
            now += Duration::from_millis(100);
            assert_eq!(
                see(&mut l, now, true),
                vec![Transition::Withdrawn(id("bb"))],
                "death {death}"
            );
            now += Duration::from_millis(100);
            let back = see(&mut l, now, false);
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
            assert!(see(&mut l, now, false).is_empty());
            now += Duration::from_millis(1);
            assert_eq!(
                see(&mut l, now, false),
                vec![Transition::Returned(id("bb"))]
            );
        }
        // After a quiet window the history is forgotten.
        now += cfg.flap_window + Duration::from_secs(1);
        see(&mut l, now, false);
        see(&mut l, now, true);
        assert_eq!(
            see(&mut l, now + Duration::from_millis(1), false),
            vec![Transition::Returned(id("bb"))]
        );
    }

    #[test]
    fn a_hold_down_restarts_when_the_cluster_dies_again_during_it() {
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), config());
        l.observe(&bb(true, false), t0);
        l.observe(&bb(false, false), t0);
        l.observe(&bb(true, false), t0);
        l.observe(&bb(false, false), t0); // second death: 2 s hold-down
        l.observe(&bb(true, false), t0 + Duration::from_secs(1));
        l.observe(&bb(false, false), t0 + Duration::from_millis(1500)); // not a new death
        assert!(
            l.observe(&bb(true, false), t0 + Duration::from_secs(2))
                .is_empty()
        );
        assert!(
            l.observe(&bb(true, false), t0 + Duration::from_secs(3))
                .is_empty()
        );
        assert_eq!(
            l.observe(&bb(true, false), t0 + Duration::from_secs(4)),
            vec![Transition::Returned(id("bb"))]
        );
    }

    #[test]
    fn members_not_live_or_gone_are_not_live_and_the_own_cluster_always_is() {
        let t0 = Instant::now();
        let mut l = Liveness::new(id("aa"), config());
        let members = BTreeMap::from([
            (
                id("aa"),
                Observation {
                    controller_live: false,
                    gateway_down: true,
                },
            ),
            (
                id("cc"),
                Observation {
                    controller_live: false,
                    gateway_down: false,
                },
            ),
        ]);
        assert!(l.observe(&members, t0).is_empty());
        assert_eq!(l.live(), BTreeSet::from([id("aa")]));
        l.observe(&bb(true, false), t0);
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
        assert_eq!(
            LivenessConfig::default().hold_for(100),
            Duration::from_secs(120)
        );
    }
}

//! ClusterSetIP VIPs in the CNF netns: the node's whole VIP table as one nftables program in
//! one table we own (`ip fleetboard-vip`), replaced in one transaction (`nft -j -f -`) per
//! change. Built with the `nftables` crate (the JSON API over `nft -j`, as netavark does).
//!
//! ```text
//!  pod ──▶ fleet0 (CNF netns) ──▶ prerouting, nat, dstnat:  chain dnat
//!            ip daddr . meta l4proto . th dport vmap { <vip> . tcp . 80 : goto svc-<vip>-tcp-80, ... }
//!              svc-<vip>-tcp-80:  [affinity] ip saddr @aff-<backend> goto ep-<backend>   (per backend)
//!                                 numgen random mod N vmap { 0 : goto ep-<b0>, 1 : goto ep-<b1>, ... }
//!              ep-<backend>:      [affinity] update @aff-<backend> { ip saddr }
//!                                 meta l4proto tcp dnat to <backend ip>:<port>
//!        ──▶ prerouting, filter, dstnat+10:  chain refuse
//!            ip daddr <VIP range> (not DNATed: no backend, port not listed, unknown VIP)
//!              → tcp reset / icmp port-unreachable; never forwarded
//!        ──▶ postrouting, nat, srcnat:  chain hairpin
//!            ct original ip daddr <VIP range>, ip saddr <node subnet>, ip daddr <node subnet>
//!              → masquerade (the reply would otherwise be bridged past the un-DNAT)
//! ```
//!
//! - **One transaction per change**, all of it or nothing. The first one (at start, after a
//!   failure) is a full resync: `add table; flush table` (every rule goes, set elements stay),
//!   delete the chains and sets no longer wanted (listed by name from the kernel), add the
//!   rest. After that [`VipProgrammer`] knows what the netns holds and sends only what differs:
//!   the chains whose rules changed are flushed and refilled, stale chains and sets are flushed
//!   then deleted, new ones added (one backend more on a 1,000-VIP table: a few dozen
//!   commands). Conntrack is never flushed: established connections keep their backend
//!   whatever changes (a removed backend's connections too).
//! - The netns routes VIP traffic: `br_netfilter` and ICMP redirects are off there (see
//!   `route_vip_traffic`).
//! - **Affinity** (`sessionAffinity: ClientIP`) as kube-proxy's nftables mode does it: one
//!   dynamic set per backend with the timeout; a client in a backend's set goes to that
//!   backend, and each new connection refreshes its entry. The set's name carries the timeout,
//!   so a changed timeout starts a fresh set; unchanged sets keep their clients across changes.
//! - The table is ours alone: anything in it we did not ask for is removed on the next change;
//!   no other table is ever touched.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use fleet_proto::node::{VipPort, VipProtocol, VipService};
use ipnetwork::Ipv4Network;
use nftables::batch::Batch;
use nftables::expr::{
    CT, CTDir, CTFamily, Expression, Meta, MetaKey, NamedExpression, NgMode, Numgen, Payload,
    PayloadField, Prefix, SetItem, Verdict,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Set, SetFlag};
use nftables::stmt::{JumpTarget, Match, NAT, Operator, Reject, RejectType, SetOp, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use crate::config::NodePlan;
use crate::netns::{self, NetnsError};

/// The nftables table (family `ip`) that holds every VIP rule of the node.
pub const TABLE: &str = "fleetboard-vip";
/// Most backends one VIP port may have.
pub const MAX_BACKENDS_PER_PORT: usize = 1024;
/// Longest ClientIP affinity timeout (Kubernetes' limit: one day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

const CHAIN_DNAT: &str = "dnat";
const CHAIN_REFUSE: &str = "refuse";
const CHAIN_HAIRPIN: &str = "hairpin";
/// nftables' named priorities: `dstnat` (-100) and `srcnat` (100).
const PRIO_DSTNAT: i32 = -100;
const PRIO_SRCNAT: i32 = 100;
/// After the DNAT: whatever is still addressed to the VIP range was not translated.
const PRIO_REFUSE: i32 = PRIO_DSTNAT + 10;
/// Longest rule comment we write (the kernel allows 128 bytes of user data).
const MAX_COMMENT: usize = 100;

/// A VIP table that cannot be programmed as given; says what and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidVipTable(pub String);

/// Programming the table failed.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("nft in {netns}: {reason}")]
    Nft { netns: PathBuf, reason: String },
}

fn proto_name(p: VipProtocol) -> &'static str {
    match p {
        VipProtocol::Tcp => "tcp",
        VipProtocol::Udp => "udp",
        VipProtocol::Sctp => "sctp",
    }
}

/// The table in a canonical order (services by VIP, ports by protocol and port, backends by
/// address), so the same table sent in another order is the same table.
pub fn normalize(services: &[VipService]) -> Vec<VipService> {
    let mut out = services.to_vec();
    for s in &mut out {
        for p in &mut s.ports {
            p.backends.sort();
        }
        s.ports.sort_by_key(|p| (p.protocol, p.port));
    }
    out.sort_by_key(|s| s.vip);
    out
}

/// Checks a whole table against the node's plan; the first problem found is the error.
pub fn validate(plan: &NodePlan, services: &[VipService]) -> Result<(), InvalidVipTable> {
    let bad = |m: String| Err(InvalidVipTable(m));
    let mut vips: HashMap<Ipv4Addr, &str> = HashMap::new();
    for s in services {
        let name = s.name.as_str();
        if name.is_empty() {
            return bad(format!(
                "the service with VIP {} has no name; name it <namespace>/<name>",
                s.vip
            ));
        }
        if !plan.vip_range.contains(s.vip) {
            return bad(format!(
                "service {name}: VIP {} is outside the node's VIP range {}; allocate it from that range",
                s.vip, plan.vip_range
            ));
        }
        if let Some(other) = vips.insert(s.vip, name) {
            return bad(format!(
                "VIP {} is given to two services ({other} and {name}); give each VIP to one service",
                s.vip
            ));
        }
        if let Some(t) = s.affinity_timeout_seconds
            && !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t)
        {
            return bad(format!(
                "service {name}: affinity timeout {t}s is outside 1..={MAX_AFFINITY_TIMEOUT_SECONDS} seconds"
            ));
        }
        let mut ports = HashSet::new();
        for p in &s.ports {
            let proto = proto_name(p.protocol);
            if p.port == 0 {
                return bad(format!(
                    "service {name}: port 0 ({proto}) is not a port; use 1-65535"
                ));
            }
            if !ports.insert((p.protocol, p.port)) {
                return bad(format!(
                    "service {name}: {proto}/{} is listed twice; list each protocol and port once",
                    p.port
                ));
            }
            if p.backends.len() > MAX_BACKENDS_PER_PORT {
                return bad(format!(
                    "service {name}: {proto}/{} has {} backends; at most {MAX_BACKENDS_PER_PORT} are supported",
                    p.port,
                    p.backends.len()
                ));
            }
            let mut seen = HashSet::new();
            for b in &p.backends {
                if !plan.fleet_cidr.contains(*b.ip()) {
                    return bad(format!(
                        "service {name}: backend {b} of {proto}/{} is outside the fleet CIDR {}; backends are fleet addresses",
                        p.port, plan.fleet_cidr
                    ));
                }
                if b.port() == 0 {
                    return bad(format!(
                        "service {name}: backend {b} of {proto}/{} has port 0; use 1-65535",
                        p.port
                    ));
                }
                if !seen.insert(*b) {
                    return bad(format!(
                        "service {name}: backend {b} of {proto}/{} is listed twice",
                        p.port
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What our table holds now (besides rules): found by listing it, so a change also removes
/// what an earlier program (or an earlier daemon) left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

impl Existing {
    /// Reads `nft -j` listing output (a ruleset, its chains or its sets): the chains and sets
    /// of [`TABLE`].
    pub fn parse(json: &str) -> Result<Existing, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("nft listing is not JSON: {e}"))?;
        let mut out = Existing::default();
        let objects = v
            .get("nftables")
            .and_then(|o| o.as_array())
            .ok_or("nft listing has no \"nftables\" array")?;
        for o in objects {
            for (kind, into) in [("chain", &mut out.chains), ("set", &mut out.sets)] {
                if let Some(obj) = o.get(kind)
                    && obj.get("table").and_then(|t| t.as_str()) == Some(TABLE)
                    && let Some(name) = obj.get("name").and_then(|n| n.as_str())
                {
                    into.insert(name.to_owned());
                }
            }
            // A map (we make none) would block nothing, but it is not ours to keep.
            if let Some(obj) = o.get("map")
                && obj.get("table").and_then(|t| t.as_str()) == Some(TABLE)
                && let Some(name) = obj.get("name").and_then(|n| n.as_str())
            {
                out.sets.insert(name.to_owned());
            }
        }
        Ok(out)
    }
}

fn svc_chain(vip: Ipv4Addr, p: &VipPort) -> String {
    format!("svc-{vip}-{}-{}", proto_name(p.protocol), p.port)
}

fn ep_chain(vip: Ipv4Addr, p: &VipPort, b: SocketAddrV4) -> String {
    format!(
        "ep-{vip}-{}-{}-{}-{}",
        proto_name(p.protocol),
        p.port,
        b.ip(),
        b.port()
    )
}

fn aff_set(vip: Ipv4Addr, p: &VipPort, b: SocketAddrV4, timeout: u32) -> String {
    format!(
        "aff-{vip}-{}-{}-{}-{}-{timeout}s",
        proto_name(p.protocol),
        p.port,
        b.ip(),
        b.port()
    )
}

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn prefix(net: Ipv4Network) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(net.network().to_string())),
        len: net.prefix().into(),
    }))
}

fn range(net: Ipv4Network) -> Expression<'static> {
    Expression::Range(Box::new(nftables::expr::Range {
        range: [s(net.network().to_string()), s(net.broadcast().to_string())],
    }))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn goto(target: &str) -> Statement<'static> {
    Statement::Goto(JumpTarget {
        target: target.to_owned().into(),
    })
}

fn goto_verdict(target: &str) -> Expression<'static> {
    Expression::Verdict(Verdict::Goto(JumpTarget {
        target: target.to_owned().into(),
    }))
}

fn chain(name: &str) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.to_owned().into(),
        ..Chain::default()
    }
}

fn base_chain(name: &str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..chain(name)
    }
}

fn set(name: &str, timeout: u32) -> Set<'static> {
    Set {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.to_owned().into(),
        // `dynamic` is added by nft for a set a rule updates; nft 1.0.6's JSON parser does
        // not know the flag by name.
        flags: Some([SetFlag::Timeout].into_iter().collect()),
        timeout: Some(timeout),
        ..Set::default()
    }
}

fn rule(
    chain: &str,
    expr: Vec<Statement<'static>>,
    comment: Option<String>,
) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.to_owned().into(),
        expr: expr.into(),
        comment: comment.map(Into::into),
        ..Rule::default()
    })
}

fn comment(text: String) -> Option<String> {
    let mut end = text.len().min(MAX_COMMENT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(text[..end].to_owned())
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(nftables::schema::Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    })
}

/// The program for one VIP table: every chain of [`TABLE`] with its rules, and every set.
/// Two programs compare chain by chain, so a change is a transaction of what differs.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    chains: BTreeMap<String, (Chain<'static>, Vec<NfListObject<'static>>)>,
    sets: BTreeMap<String, Set<'static>>,
}

impl Program {
    /// The program for `services` (already validated and normalized) on a node with `plan`.
    pub fn new(plan: &NodePlan, services: &[VipService]) -> Program {
        let mut p = Program {
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
        };
        for c in [
            base_chain(
                CHAIN_DNAT,
                NfChainType::NAT,
                NfHook::Prerouting,
                PRIO_DSTNAT,
            ),
            base_chain(
                CHAIN_REFUSE,
                NfChainType::Filter,
                NfHook::Prerouting,
                PRIO_REFUSE,
            ),
            base_chain(
                CHAIN_HAIRPIN,
                NfChainType::NAT,
                NfHook::Postrouting,
                PRIO_SRCNAT,
            ),
        ] {
            p.chains.insert(c.name.to_string(), (c, Vec::new()));
        }
        let mut dispatch: Vec<SetItem<'static>> = Vec::new();

        for svc in services {
            for port in &svc.ports {
                if port.backends.is_empty() {
                    // No entry: the refuse chain answers it.
                    continue;
                }
                let proto = proto_name(port.protocol);
                let svc_name = svc_chain(svc.vip, port);
                p.add_chain(&svc_name);
                dispatch.push(SetItem::Mapping(
                    Expression::Named(NamedExpression::Concat(vec![
                        s(svc.vip.to_string()),
                        s(proto),
                        Expression::Number(port.port.into()),
                    ])),
                    goto_verdict(&svc_name),
                ));
                let mut pick = Vec::with_capacity(port.backends.len());
                for (i, b) in port.backends.iter().enumerate() {
                    let ep = ep_chain(svc.vip, port, *b);
                    p.add_chain(&ep);
                    let mut ep_rule = Vec::new();
                    if let Some(t) = svc.affinity_timeout_seconds {
                        let aff = aff_set(svc.vip, port, *b, t);
                        p.sets.insert(aff.clone(), set(&aff, t));
                        p.add_rule(
                            &svc_name,
                            vec![eq(payload("ip", "saddr"), s(format!("@{aff}"))), goto(&ep)],
                            None,
                        );
                        ep_rule.push(Statement::Set(nftables::stmt::Set {
                            op: SetOp::Update,
                            elem: payload("ip", "saddr"),
                            set: format!("@{aff}").into(),
                        }));
                    }
                    ep_rule.push(eq(meta(MetaKey::L4proto), s(proto)));
                    ep_rule.push(Statement::DNAT(Some(NAT {
                        addr: Some(s(b.ip().to_string())),
                        family: Some(nftables::stmt::NATFamily::IP),
                        port: Some(Expression::Number(b.port().into())),
                        flags: None,
                    })));
                    p.add_rule(&ep, ep_rule, None);
                    pick.push(SetItem::Mapping(
                        Expression::Number(i as u32),
                        goto_verdict(&ep),
                    ));
                }
                p.add_rule(
                    &svc_name,
                    vec![Statement::VerdictMap(nftables::stmt::VerdictMap {
                        key: Expression::Named(NamedExpression::Numgen(Numgen {
                            mode: NgMode::Random,
                            ng_mod: port.backends.len() as u32,
                            offset: None,
                        })),
                        data: Expression::Named(NamedExpression::Set(pick)),
                    })],
                    comment(format!("{} {proto}/{}", svc.name, port.port)),
                );
            }
        }

        // The base chains' rules: dispatch, refuse, hairpin.
        if !dispatch.is_empty() {
            p.add_rule(
                CHAIN_DNAT,
                vec![Statement::VerdictMap(nftables::stmt::VerdictMap {
                    key: Expression::Named(NamedExpression::Concat(vec![
                        payload("ip", "daddr"),
                        meta(MetaKey::L4proto),
                        payload("th", "dport"),
                    ])),
                    data: Expression::Named(NamedExpression::Set(dispatch)),
                })],
                None,
            );
        }
        let to_vips = || eq(payload("ip", "daddr"), prefix(plan.vip_range));
        p.add_rule(
            CHAIN_REFUSE,
            vec![
                to_vips(),
                eq(meta(MetaKey::L4proto), s("tcp")),
                Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
            ],
            comment("VIP range, not DNATed: no backend, port not listed or no such VIP".into()),
        );
        p.add_rule(
            CHAIN_REFUSE,
            vec![
                to_vips(),
                Statement::Reject(Some(Reject::new(
                    Some(RejectType::ICMP),
                    Some(RejectCode::PortUnreach),
                ))),
            ],
            None,
        );
        p.add_rule(
            CHAIN_HAIRPIN,
            vec![
                eq(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "daddr".into(),
                        family: Some(CTFamily::IP),
                        dir: Some(CTDir::Original),
                    })),
                    // A range, not a prefix: nft 1.0.6's JSON parser byte-swaps a prefix here.
                    range(plan.vip_range),
                ),
                eq(payload("ip", "saddr"), prefix(plan.node_subnet)),
                eq(payload("ip", "daddr"), prefix(plan.node_subnet)),
                Statement::Masquerade(None),
            ],
            comment("a VIP from this node's bridge to a backend on it".into()),
        );
        p
    }

    fn add_chain(&mut self, name: &str) {
        self.chains
            .entry(name.to_owned())
            .or_insert_with(|| (chain(name), Vec::new()));
    }

    fn add_rule(&mut self, chain: &str, expr: Vec<Statement<'static>>, comment: Option<String>) {
        let r = rule(chain, expr, comment);
        self.chains
            .get_mut(chain)
            .expect("chains are added before their rules")
            .1
            .push(r);
    }

    /// The transaction that makes [`TABLE`] exactly this program whatever it holds now
    /// (`existing`, listed from the kernel): `add table; flush table` (every rule goes, set
    /// elements stay), delete the chains and sets no longer wanted, add everything else.
    pub fn full(&self, existing: &Existing) -> Nftables<'static> {
        let mut batch = Batch::new();
        batch.add(table());
        batch.add_cmd(NfCmd::Flush(FlushObject::Table(nftables::schema::Table {
            family: NfFamily::IP,
            name: TABLE.into(),
            handle: None,
        })));
        for stale in existing
            .chains
            .iter()
            .filter(|c| !self.chains.contains_key(*c))
        {
            batch.delete(NfListObject::Chain(chain(stale)));
        }
        for stale in existing.sets.iter().filter(|s| !self.sets.contains_key(*s)) {
            batch.delete(NfListObject::Set(Box::new(set_ref(stale))));
        }
        for (c, _) in self.chains.values() {
            batch.add(NfListObject::Chain(c.clone()));
        }
        // A set that exists stays as it is, with its clients: re-adding it would fail (the
        // kernel reports the `dynamic` flag nft added, which the JSON parser cannot name).
        for (name, st) in &self.sets {
            if !existing.sets.contains(name) {
                batch.add(NfListObject::Set(Box::new(st.clone())));
            }
        }
        for (_, rules) in self.chains.values() {
            for r in rules {
                batch.add(r.clone());
            }
        }
        batch.to_nftables()
    }

    /// The transaction from `old` (what the kernel holds) to this program: only the chains
    /// whose rules differ are flushed and refilled, stale chains and sets go, new ones come;
    /// `None` when nothing differs.
    pub fn delta(&self, old: &Program) -> Option<Nftables<'static>> {
        let changed: Vec<&String> = self
            .chains
            .iter()
            .filter(|(name, (_, rules))| old.chains.get(*name).is_some_and(|(_, o)| o != rules))
            .map(|(name, _)| name)
            .collect();
        let added: Vec<&String> = self
            .chains
            .keys()
            .filter(|name| !old.chains.contains_key(*name))
            .collect();
        let stale: Vec<&String> = old
            .chains
            .keys()
            .filter(|name| !self.chains.contains_key(*name))
            .collect();
        let stale_sets: Vec<&String> = old
            .sets
            .keys()
            .filter(|name| !self.sets.contains_key(*name))
            .collect();
        let new_sets: Vec<&Set<'static>> = self
            .sets
            .iter()
            .filter(|(name, _)| !old.sets.contains_key(*name))
            .map(|(_, st)| st)
            .collect();
        if changed.is_empty() && added.is_empty() && stale.is_empty() && stale_sets.is_empty() {
            return None;
        }
        let mut batch = Batch::new();
        // Flushing first drops every reference a stale chain or set may still have.
        for name in changed.iter().chain(&stale) {
            batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(name))));
        }
        for name in &stale {
            batch.delete(NfListObject::Chain(chain(name)));
        }
        for name in &stale_sets {
            batch.delete(NfListObject::Set(Box::new(set_ref(name))));
        }
        for name in &added {
            batch.add(NfListObject::Chain(self.chains[*name].0.clone()));
        }
        for st in new_sets {
            batch.add(NfListObject::Set(Box::new(st.clone())));
        }
        for name in added.iter().chain(&changed) {
            for r in &self.chains[*name].1 {
                batch.add(r.clone());
            }
        }
        Some(batch.to_nftables())
    }
}

fn set_ref(name: &str) -> Set<'static> {
    Set {
        flags: None,
        ..set(name, 1)
    }
}

fn nft_failure(netns: &Path) -> impl Fn(nftables::helper::NftablesError) -> VipError + '_ {
    move |e| {
        let reason = match e {
            nftables::helper::NftablesError::NftFailed {
                hint,
                stderr,
                stdout,
                ..
            } => format!("{hint}: {}{}", stderr.trim(), stdout.trim()),
            other => other.to_string(),
        };
        VipError::Nft {
            netns: netns.to_owned(),
            reason,
        }
    }
}

/// Lists what [`TABLE`] holds in the netns this thread is in: its chains and its sets, without
/// rules or set elements (listing the rules of a large table costs seconds).
fn existing_here(netns: &Path) -> Result<Existing, VipError> {
    let mut existing = Existing::default();
    for what in [["list", "chains", "ip"], ["list", "sets", "ip"]] {
        let json = nftables::helper::get_current_ruleset_raw(
            nftables::helper::DEFAULT_NFT,
            ["-t"].iter().chain(&what),
        )
        .map_err(nft_failure(netns))?;
        let found = Existing::parse(&json).map_err(|reason| VipError::Nft {
            netns: netns.to_owned(),
            reason,
        })?;
        existing.chains.extend(found.chains);
        existing.sets.extend(found.sets);
    }
    Ok(existing)
}

/// Where the bridge hands bridged IPv4 to the IP hooks (`br_netfilter`); per netns.
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
/// Per-interface IPv4 settings of the netns (`all`, `default` and each device).
const IPV4_CONF: &str = "/proc/sys/net/ipv4/conf";

/// The CNF netns must route VIP traffic, not bridge it, and must not answer hairpinned VIP
/// traffic with ICMP redirects; run inside the netns:
/// - `br_netfilter` off: with it on, a pod's packet to a VIP whose backend sits on the same
///   bridge is DNATed inside the bridge and switched at L2, never back out of the port it came
///   in on (a pod reaching itself) and around our masquerade. Absent (no `br_netfilter` in the
///   kernel) is the same thing.
/// - `send_redirects` off everywhere: a DNATed packet leaves by the bridge it came in on, so
///   the kernel would send the client a redirect towards the backend; and each redirect
///   resets the client's ICMP rate-limit bucket, which swallowed the port-unreachable errors
///   that refuse UDP to a VIP without backends.
fn route_vip_traffic(netns: &Path) -> Result<(), VipError> {
    let fail = |what: &str, e: std::io::Error| VipError::Nft {
        netns: netns.to_owned(),
        reason: format!("cannot set {what} to 0: {e}"),
    };
    match std::fs::write(BRIDGE_NF_CALL_IPTABLES, "0") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(fail(BRIDGE_NF_CALL_IPTABLES, e));
        }
        _ => {}
    }
    let confs = std::fs::read_dir(IPV4_CONF).map_err(|e| fail(IPV4_CONF, e))?;
    for conf in confs.flatten() {
        let path = conf.path().join("send_redirects");
        match std::fs::write(&path, "0") {
            // A device that went away meanwhile.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(fail(&path.display().to_string(), e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Programs [`TABLE`] in a netns and remembers what it holds: a change is one transaction of
/// what differs from the last program; a full resync (listing the table first) when it knows
/// nothing — at start, after a failure, for another netns — or when the difference does not
/// apply (someone else changed the table).
#[derive(Debug, Default)]
pub struct VipProgrammer {
    last: Option<(PathBuf, Program)>,
}

impl VipProgrammer {
    /// Makes [`TABLE`] in `netns` exactly the program for `services` (validated, normalized)
    /// in one `nft` transaction run inside the netns; none when nothing differs.
    pub async fn apply(
        &mut self,
        netns: &Path,
        plan: &NodePlan,
        services: &[VipService],
    ) -> Result<(), VipError> {
        let new = Program::new(plan, services);
        let last = self
            .last
            .take()
            .filter(|(ns, _)| ns == netns)
            .map(|(_, p)| p);
        let path = netns.to_owned();
        let applied = netns::run_in(netns, move || {
            route_vip_traffic(&path)?;
            let started = std::time::Instant::now();
            let full = |new: &Program| -> Result<(), VipError> {
                let batch = new.full(&existing_here(&path)?);
                nftables::helper::apply_ruleset(&batch).map_err(nft_failure(&path))
            };
            match &last {
                None => full(&new)?,
                Some(old) => {
                    if let Some(batch) = new.delta(old)
                        && let Err(e) =
                            nftables::helper::apply_ruleset(&batch).map_err(nft_failure(&path))
                    {
                        // The table is not what we left (someone changed it): resync in full.
                        tracing::warn!(error = %e, "VIP table not as programmed; resyncing it whole");
                        full(&new)?;
                    }
                }
            }
            tracing::debug!(
                full = last.is_none(),
                elapsed = ?started.elapsed(),
                "VIP table in line"
            );
            Ok::<_, VipError>(new)
        })
        .await??;
        self.last = Some((netns.to_owned(), applied));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_FLEET_CIDR, DEFAULT_VIP_RANGE};

    fn plan() -> NodePlan {
        NodePlan::new(
            DEFAULT_FLEET_CIDR.parse().unwrap(),
            DEFAULT_VIP_RANGE.parse().unwrap(),
            "100.96.3.0/24".parse().unwrap(),
        )
        .unwrap()
    }

    fn port(protocol: VipProtocol, port: u16, backends: &[&str]) -> VipPort {
        VipPort {
            protocol,
            port,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
        }
    }

    fn svc(name: &str, vip: &str, ports: Vec<VipPort>, affinity: Option<u32>) -> VipService {
        VipService {
            name: name.into(),
            vip: vip.parse().unwrap(),
            ports,
            affinity_timeout_seconds: affinity,
        }
    }

    fn web() -> VipService {
        svc(
            "shop/web",
            "100.112.0.10",
            vec![port(
                VipProtocol::Tcp,
                80,
                &["100.96.3.7:8080", "100.96.4.2:8080"],
            )],
            None,
        )
    }

    fn refused(services: Vec<VipService>) -> String {
        validate(&plan(), &services).unwrap_err().0
    }

    #[test]
    fn a_valid_table_passes() {
        let mut dns = svc(
            "kube-system/dns",
            "100.112.0.53",
            vec![
                port(VipProtocol::Udp, 53, &["100.96.3.9:53"]),
                port(VipProtocol::Tcp, 53, &["100.96.3.9:53"]),
                port(VipProtocol::Sctp, 5000, &[]),
            ],
            Some(10_800),
        );
        dns.ports.push(port(VipProtocol::Tcp, 9153, &[]));
        validate(&plan(), &[web(), dns]).unwrap();
        validate(&plan(), &[]).unwrap();
    }

    #[test]
    fn every_bad_table_is_refused_with_what_to_fix() {
        let mut outside = web();
        outside.vip = "100.113.0.1".parse().unwrap();
        assert!(refused(vec![outside]).contains("outside the node's VIP range 100.112.0.0/16"));

        let mut twin = web();
        twin.name = "shop/other".into();
        let e = refused(vec![web(), twin]);
        assert!(e.contains("100.112.0.10 is given to two services"), "{e}");

        let mut dup = web();
        dup.ports.push(port(VipProtocol::Tcp, 80, &[]));
        assert!(refused(vec![dup]).contains("tcp/80 is listed twice"));
        // The same port number over another protocol is another port.
        let mut udp = web();
        udp.ports.push(port(VipProtocol::Udp, 80, &[]));
        validate(&plan(), &[udp]).unwrap();

        let mut zero = web();
        zero.ports[0].port = 0;
        assert!(refused(vec![zero]).contains("port 0"));

        let mut foreign = web();
        foreign.ports[0]
            .backends
            .push("10.0.0.1:80".parse().unwrap());
        assert!(refused(vec![foreign]).contains("outside the fleet CIDR 100.96.0.0/12"));

        let mut zero_backend = web();
        zero_backend.ports[0].backends[0] = "100.96.3.7:0".parse().unwrap();
        assert!(refused(vec![zero_backend]).contains("has port 0"));

        let mut twice = web();
        twice.ports[0]
            .backends
            .push("100.96.3.7:8080".parse().unwrap());
        assert!(refused(vec![twice]).contains("listed twice"));

        let mut many = web();
        many.ports[0].backends = (0..=MAX_BACKENDS_PER_PORT as u32)
            .map(|i| SocketAddrV4::new(Ipv4Addr::from(0x6460_0000 + i), 80))
            .collect();
        assert!(refused(vec![many]).contains("at most 1024"));

        for t in [0, MAX_AFFINITY_TIMEOUT_SECONDS + 1] {
            let mut aff = web();
            aff.affinity_timeout_seconds = Some(t);
            assert!(refused(vec![aff]).contains("affinity timeout"));
        }
        let mut unnamed = web();
        unnamed.name.clear();
        assert!(refused(vec![unnamed]).contains("has no name"));
    }

    #[test]
    fn normalize_makes_order_irrelevant() {
        let a = svc(
            "a/a",
            "100.112.0.20",
            vec![
                port(VipProtocol::Udp, 53, &["100.96.3.9:53", "100.96.3.8:53"]),
                port(VipProtocol::Tcp, 53, &[]),
            ],
            None,
        );
        let one = normalize(&[a.clone(), web()]);
        let mut b = a;
        b.ports.reverse();
        b.ports[1].backends.reverse();
        assert_eq!(normalize(&[web(), b]), one);
        assert_eq!(one[0].vip.to_string(), "100.112.0.10");
        assert_eq!(one[1].ports[0].protocol, VipProtocol::Tcp);
        assert_eq!(one[1].ports[1].backends[0].to_string(), "100.96.3.8:53");
    }

    fn json(services: &[VipService], existing: &Existing) -> String {
        serde_json::to_string(&Program::new(&plan(), services).full(existing)).unwrap()
    }

    #[test]
    fn the_program_is_one_batch_that_flushes_our_table_and_removes_what_is_stale() {
        let mut aff = web();
        aff.affinity_timeout_seconds = Some(30);
        let existing = Existing {
            chains: [
                "dnat",
                "svc-100.112.0.9-tcp-80",
                "ep-100.112.0.9-tcp-80-100.96.3.5-80",
            ]
            .map(String::from)
            .into(),
            sets: ["aff-100.112.0.10-tcp-80-100.96.3.7-8080-10s"]
                .map(String::from)
                .into(),
        };
        let p = json(&[aff], &existing);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        let cmds = v["nftables"].as_array().unwrap();
        // add table, flush table, then the deletions, then everything else.
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert_eq!(cmds[1]["flush"]["table"]["name"], TABLE);
        let deleted: Vec<String> = cmds
            .iter()
            .filter_map(|c| c.get("delete"))
            .map(|d| d.to_string())
            .collect();
        assert_eq!(deleted.len(), 3, "{deleted:?}");
        assert!(deleted.iter().any(|d| d.contains("svc-100.112.0.9-tcp-80")));
        assert!(deleted.iter().any(|d| d.contains("-10s")));
        assert!(!deleted.iter().any(|d| d.contains("\"dnat\"")));
        // Nothing touches another table, and conntrack is never flushed.
        assert!(!p.contains("\"ruleset\""));
        for c in cmds {
            let obj = c.as_object().unwrap().values().next().unwrap();
            let (kind, inner) = obj.as_object().unwrap().iter().next().unwrap();
            let table = if kind == "table" {
                &inner["name"]
            } else {
                &inner["table"]
            };
            assert_eq!(table, TABLE, "{c}");
        }
        // Affinity: a set per backend, named with its timeout, checked before the random pick.
        assert!(p.contains("aff-100.112.0.10-tcp-80-100.96.3.7-8080-30s"));
        assert!(p.contains("\"numgen\":{\"mode\":\"random\",\"mod\":2"));
        assert!(p.contains("\"op\":\"update\""));
        // A set that exists is kept (with its clients), not added again.
        let again = Existing {
            chains: BTreeSet::new(),
            sets: ["aff-100.112.0.10-tcp-80-100.96.3.7-8080-30s"]
                .map(String::from)
                .into(),
        };
        let mut aff = web();
        aff.affinity_timeout_seconds = Some(30);
        let p = json(&[aff], &again);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        let added_sets: Vec<_> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("set"))
            .collect();
        assert_eq!(added_sets.len(), 1, "{added_sets:?}");
        assert!(!p.contains("\"delete\""), "{p}");
    }

    #[test]
    fn a_port_without_backends_gets_no_dispatch_entry() {
        let mut none = web();
        none.ports[0].backends.clear();
        let p = json(&[none], &Existing::default());
        assert!(!p.contains("svc-100.112.0.10"), "{p}");
        assert!(!p.contains("\"vmap\""), "{p}");
        // But the refusal of the whole VIP range is always there.
        assert!(p.contains("tcp reset"), "{p}");
        assert!(p.contains("port-unreachable"), "{p}");
    }

    fn commands(n: &Nftables<'_>) -> Vec<String> {
        let v = serde_json::to_value(n).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    #[test]
    fn a_change_touches_only_what_differs() {
        let other = svc(
            "shop/other",
            "100.112.0.11",
            vec![port(VipProtocol::Tcp, 443, &["100.96.5.5:8443"])],
            Some(60),
        );
        let old = Program::new(&plan(), &[web(), other.clone()]);
        assert!(
            Program::new(&plan(), &[web(), other.clone()])
                .delta(&old)
                .is_none()
        );

        // One backend more on web: its service chain is refilled, one endpoint chain added;
        // the dispatch, other's chains and sets are not touched.
        let mut more = web();
        more.ports[0]
            .backends
            .push("100.96.6.6:8080".parse().unwrap());
        let cmds = commands(
            &Program::new(&plan(), &[more, other.clone()])
                .delta(&old)
                .unwrap(),
        );
        let flushed: Vec<_> = cmds.iter().filter(|c| c.contains("\"flush\"")).collect();
        assert_eq!(flushed.len(), 1, "{cmds:#?}");
        assert!(flushed[0].contains("svc-100.112.0.10-tcp-80"));
        assert!(
            !cmds
                .iter()
                .any(|c| c.contains("100.112.0.11") || c.contains("\"delete\""))
        );
        assert!(
            cmds.iter()
                .any(|c| c.contains("\"add\"")
                    && c.contains("ep-100.112.0.10-tcp-80-100.96.6.6-8080"))
        );

        // Other removed: its chains are flushed then deleted, its set deleted, the dispatch
        // refilled; web's chains untouched.
        let cmds = commands(&Program::new(&plan(), &[web()]).delta(&old).unwrap());
        let first_delete = cmds.iter().position(|c| c.contains("\"delete\"")).unwrap();
        let last_flush = cmds.iter().rposition(|c| c.contains("\"flush\"")).unwrap();
        assert!(last_flush < first_delete, "{cmds:#?}");
        assert_eq!(
            cmds.iter().filter(|c| c.contains("\"delete\"")).count(),
            3,
            "{cmds:#?}"
        );
        assert!(
            cmds.iter()
                .any(|c| c.contains("\"delete\"") && c.contains("aff-100.112.0.11"))
        );
        assert!(
            cmds.iter()
                .any(|c| c.contains("\"flush\"") && c.contains("\"dnat\""))
        );
        assert!(
            !cmds.iter().any(|c| c.contains("100.112.0.10-tcp-80-")),
            "{cmds:#?}"
        );

        // A new plan refills only the base chains.
        let moved = NodePlan::new(
            DEFAULT_FLEET_CIDR.parse().unwrap(),
            DEFAULT_VIP_RANGE.parse().unwrap(),
            "100.96.9.0/24".parse().unwrap(),
        )
        .unwrap();
        let cmds = commands(&Program::new(&moved, &[web(), other]).delta(&old).unwrap());
        assert!(
            cmds.iter().all(|c| !c.contains("svc-")
                || c.contains("\"dnat\"")
                || c.contains("\"hairpin\"")),
            "{cmds:#?}"
        );
        assert!(cmds.iter().any(|c| c.contains("100.96.9.0")), "{cmds:#?}");
    }

    #[test]
    fn existing_objects_are_read_from_our_table_only() {
        let listing = r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"ip","name":"fleetboard-vip","handle":1}},
            {"chain":{"family":"ip","table":"fleetboard-vip","name":"dnat","handle":1}},
            {"chain":{"family":"ip","table":"other","name":"keep","handle":2}},
            {"set":{"family":"ip","table":"fleetboard-vip","name":"aff-x","type":"ipv4_addr","handle":3}},
            {"rule":{"family":"ip","table":"fleetboard-vip","chain":"dnat","handle":4,"expr":[]}}]}"#;
        let e = Existing::parse(listing).unwrap();
        assert_eq!(e.chains, ["dnat".to_string()].into());
        assert_eq!(e.sets, ["aff-x".to_string()].into());
        assert!(Existing::parse("nope").is_err());
    }
}

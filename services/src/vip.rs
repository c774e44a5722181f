//! ClusterSetIP VIPs: one address of the cluster's VIP range per imported ClusterSetIP service
//! (headless imports get none). VIPs have local meaning only; each cluster allocates its own.
//!
//! Pure: the previous table is an input, the new one the output. Rules:
//! - **stable**: a service keeps the VIP it had while it stays imported and the address stays
//!   in the range;
//! - **deterministic**: a new service's VIP is the first free address at or after a hash of
//!   its name (FNV-1a, stable across builds), so it does not depend on the order of arrival,
//!   and clusters with the same range and no collisions agree on it;
//! - **released** when the service is no longer imported as ClusterSetIP (the address is free
//!   for the next allocation; the hash start makes its immediate reuse unlikely);
//! - **exhaustion** is a typed error that still carries every allocation that fit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::aggregate::ServiceImport;
use crate::export::{ServiceKey, ServiceType};

/// Service → VIP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipTable(pub BTreeMap<ServiceKey, Ipv4Addr>);

impl VipTable {
    pub fn get(&self, service: &ServiceKey) -> Option<Ipv4Addr> {
        self.0.get(service).copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &Ipv4Addr)> {
        self.0.iter()
    }
}

impl FromIterator<(ServiceKey, Ipv4Addr)> for VipTable {
    fn from_iter<I: IntoIterator<Item = (ServiceKey, Ipv4Addr)>>(iter: I) -> Self {
        VipTable(iter.into_iter().collect())
    }
}

/// The VIP range has no free address for some services.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the VIP range {range} has no free address for {} ClusterSetIP service(s) (first: {}): \
     widen the cluster's VIP range or unexport services",
    unallocated.len(),
    unallocated.first().map(ToString::to_string).unwrap_or_default()
)]
pub struct VipExhausted {
    pub range: Ipv4Network,
    /// The services left without a VIP, in name order.
    pub unallocated: Vec<ServiceKey>,
    /// Every allocation that fit: use it while the range is full.
    pub partial: VipTable,
}

/// The usable addresses of `range`: all of a /31 or /32, else all but the network and
/// broadcast addresses. As (first, count).
fn usable(range: Ipv4Network) -> (u32, u64) {
    let first = u32::from(range.network());
    let size = 1u64 << (32 - u32::from(range.prefix()));
    if range.prefix() >= 31 {
        (first, size)
    } else {
        (first + 1, size - 2)
    }
}

/// FNV-1a of `<namespace>/<name>`.
fn name_hash(service: &ServiceKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in service
        .namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(service.name.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The VIP table for `imports` in `range`, keeping `previous` allocations where possible.
pub fn allocate_vips(
    range: Ipv4Network,
    previous: &VipTable,
    imports: &BTreeMap<ServiceKey, ServiceImport>,
) -> Result<VipTable, VipExhausted> {
    allocate_vips_reserving(range, previous, imports, &BTreeSet::new())
}

/// [`allocate_vips`], never handing out the `reserved` addresses (e.g. the cluster's DNS VIP).
pub fn allocate_vips_reserving(
    range: Ipv4Network,
    previous: &VipTable,
    imports: &BTreeMap<ServiceKey, ServiceImport>,
    reserved: &BTreeSet<Ipv4Addr>,
) -> Result<VipTable, VipExhausted> {
    let (first, count) = usable(range);
    let is_usable = |ip: Ipv4Addr| {
        let offset = u64::from(u32::from(ip).wrapping_sub(first));
        range.contains(ip) && u32::from(ip) >= first && offset < count
    };
    let wanted: Vec<&ServiceKey> = imports
        .values()
        .filter(|i| i.service_type == ServiceType::ClusterSetIP)
        .map(|i| &i.service)
        .collect();

    let mut table = BTreeMap::new();
    let mut taken: BTreeSet<Ipv4Addr> = reserved
        .iter()
        .copied()
        .filter(|ip| is_usable(*ip))
        .collect();
    // Kept first, in name order: of two services that claim one address (a corrupt table)
    // the first keeps it.
    for service in &wanted {
        if let Some(ip) = previous.get(service)
            && is_usable(ip)
            && taken.insert(ip)
        {
            table.insert((*service).clone(), ip);
        }
    }
    let mut unallocated = Vec::new();
    for service in wanted {
        if table.contains_key(service) {
            continue;
        }
        if taken.len() as u64 >= count {
            unallocated.push(service.clone());
            continue;
        }
        // A free address exists, so this probe ends within `taken.len() + 1` steps.
        let mut offset = name_hash(service) % count;
        let ip = loop {
            let ip = Ipv4Addr::from(first + offset as u32);
            if !taken.contains(&ip) {
                break ip;
            }
            offset = (offset + 1) % count;
        };
        taken.insert(ip);
        table.insert(service.clone(), ip);
    }
    if unallocated.is_empty() {
        Ok(VipTable(table))
    } else {
        Err(VipExhausted {
            range,
            unallocated,
            partial: VipTable(table),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::export::{InternalTrafficPolicy, SessionAffinity};

    fn import(name: &str, service_type: ServiceType) -> (ServiceKey, ServiceImport) {
        let service = ServiceKey::new("ns", name);
        (
            service.clone(),
            ServiceImport {
                service,
                service_type,
                ports: vec![],
                session_affinity: SessionAffinity::None,
                internal_traffic_policy: InternalTrafficPolicy::Cluster,
                traffic_distribution: None,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                clusters: BTreeMap::new(),
            },
        )
    }

    fn imports(names: &[&str]) -> BTreeMap<ServiceKey, ServiceImport> {
        names
            .iter()
            .map(|n| import(n, ServiceType::ClusterSetIP))
            .collect()
    }

    fn range() -> Ipv4Network {
        "100.112.0.0/16".parse().unwrap()
    }

    #[test]
    fn every_clusterset_ip_service_gets_a_usable_vip_and_headless_none() {
        let mut all = imports(&["a", "b", "c"]);
        all.extend([import("h", ServiceType::Headless)]);
        let t = allocate_vips(range(), &VipTable::default(), &all).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(&ServiceKey::new("ns", "h")), None);
        let ips: BTreeSet<Ipv4Addr> = t.iter().map(|(_, ip)| *ip).collect();
        assert_eq!(ips.len(), 3, "distinct");
        for ip in ips {
            assert!(range().contains(ip));
            assert_ne!(ip, range().network());
            assert_ne!(ip, range().broadcast());
        }
        // Deterministic: the same input, the same table, also from another previous table
        // that holds nothing of these services.
        let other: VipTable = [(
            ServiceKey::new("ns", "gone"),
            "100.112.9.9".parse().unwrap(),
        )]
        .into_iter()
        .collect();
        assert_eq!(allocate_vips(range(), &other, &all).unwrap(), t);
    }

    #[test]
    fn allocations_are_stable_and_released_with_their_service() {
        let first = allocate_vips(range(), &VipTable::default(), &imports(&["a", "b"])).unwrap();
        // An allocation someone else made (another order, a previous hash) is kept as it is.
        let mut previous = first.clone();
        previous
            .0
            .insert(ServiceKey::new("ns", "c"), "100.112.0.1".parse().unwrap());
        let second = allocate_vips(range(), &previous, &imports(&["a", "b", "c"])).unwrap();
        assert_eq!(
            second.get(&ServiceKey::new("ns", "a")),
            first.get(&ServiceKey::new("ns", "a"))
        );
        assert_eq!(
            second.get(&ServiceKey::new("ns", "b")),
            first.get(&ServiceKey::new("ns", "b"))
        );
        assert_eq!(
            second.get(&ServiceKey::new("ns", "c")),
            Some("100.112.0.1".parse().unwrap())
        );
        // "b" is no longer imported: released; the others keep theirs.
        let third = allocate_vips(range(), &second, &imports(&["a", "c"])).unwrap();
        assert_eq!(third.get(&ServiceKey::new("ns", "b")), None);
        assert_eq!(
            third.get(&ServiceKey::new("ns", "a")),
            first.get(&ServiceKey::new("ns", "a"))
        );
        assert_eq!(third.len(), 2);
        // A service that turns headless loses its VIP.
        let mut headless = imports(&["a"]);
        headless.extend([import("c", ServiceType::Headless)]);
        let fourth = allocate_vips(range(), &third, &headless).unwrap();
        assert_eq!(fourth.len(), 1);
    }

    #[test]
    fn previous_allocations_outside_the_range_or_doubled_are_redone() {
        let a = ServiceKey::new("ns", "a");
        let b = ServiceKey::new("ns", "b");
        let c = ServiceKey::new("ns", "c");
        let previous: VipTable = [
            (a.clone(), "100.112.0.7".parse().unwrap()),
            (b.clone(), "100.112.0.7".parse().unwrap()),
            (c.clone(), "10.0.0.1".parse().unwrap()),
        ]
        .into_iter()
        .collect();
        let t = allocate_vips(range(), &previous, &imports(&["a", "b", "c"])).unwrap();
        assert_eq!(t.get(&a), Some("100.112.0.7".parse().unwrap()));
        assert_ne!(t.get(&b), t.get(&a));
        assert!(range().contains(t.get(&c).unwrap()));
        // The network address of the range is never kept either.
        let previous: VipTable = [(a.clone(), "100.112.0.0".parse().unwrap())]
            .into_iter()
            .collect();
        let t = allocate_vips(range(), &previous, &imports(&["a"])).unwrap();
        assert_ne!(t.get(&a), Some("100.112.0.0".parse().unwrap()));
    }

    #[test]
    fn exhaustion_is_a_typed_error_that_keeps_what_fit() {
        // A /30 has two usable addresses.
        let small: Ipv4Network = "100.112.0.0/30".parse().unwrap();
        let two = allocate_vips(small, &VipTable::default(), &imports(&["a", "b"])).unwrap();
        let ips: BTreeSet<Ipv4Addr> = two.iter().map(|(_, ip)| *ip).collect();
        assert_eq!(
            ips,
            BTreeSet::from([
                "100.112.0.1".parse().unwrap(),
                "100.112.0.2".parse().unwrap()
            ])
        );
        let err = allocate_vips(small, &two, &imports(&["a", "b", "c", "d"])).unwrap_err();
        // The existing ones are kept; the newcomers are reported, in name order.
        assert_eq!(err.partial, two);
        assert_eq!(
            err.unallocated,
            vec![ServiceKey::new("ns", "c"), ServiceKey::new("ns", "d")]
        );
        let msg = err.to_string();
        assert!(
            msg.contains("100.112.0.0/30") && msg.contains("2 ClusterSetIP"),
            "{msg}"
        );
        assert!(msg.contains("widen"), "{msg}");
        // A /32 is one usable address.
        let one: Ipv4Network = "100.112.0.5/32".parse().unwrap();
        let t = allocate_vips(one, &VipTable::default(), &imports(&["a"])).unwrap();
        assert_eq!(
            t.get(&ServiceKey::new("ns", "a")),
            Some("100.112.0.5".parse().unwrap())
        );
    }
}

//! The checks of the node doctor runs on: its fleet-nri's plan, its MTUs.

use fleet_hub_api::model::FleetView;
use ipnetwork::Ipv4Network;

use super::{CheckOutcome, CredentialKind, LocalNode, MtuFacts, finding};

/// This node's `fleet-nri` answers and has a plan from the controller, inside the fleet's CIDR
/// and — with a member's credential — inside that cluster's block.
pub fn check_local_node(
    node: Result<&LocalNode, &String>,
    view: Option<&FleetView>,
    credential: &CredentialKind,
) -> CheckOutcome {
    let node = match node {
        Ok(n) => n,
        Err(why) => return CheckOutcome::skipped("this-node", why.clone()),
    };
    let subject = format!("this node ({})", node.socket);
    let status = match &node.status {
        Ok(s) => s,
        Err(e) => {
            return CheckOutcome::new(
                "this-node",
                "",
                vec![finding(
                    subject,
                    format!("its fleet-nri does not answer: {e}"),
                    format!(
                        "start fleet-nri on this node (its config's \"socket\" is {}); its log \
                         says why it stopped",
                        node.socket
                    ),
                )],
            );
        }
    };
    let fix_plan = match credential {
        CredentialKind::Member(c) => format!(
            "check that cluster {c}'s active controller lists this node in its --nodes file with \
             this socket, and its log (\"cannot read its state\", \"set_plan ... refused\")"
        ),
        CredentialKind::Admin => "check that the cluster's active controller lists this node \
             in its --nodes file with this socket, and its log"
            .to_string(),
    };
    if !status.ready || status.node_subnet.is_empty() {
        return CheckOutcome::new(
            "this-node",
            "",
            vec![finding(
                subject,
                "it has no plan: the cluster's controller has not handed it a subnet, so pods \
                 here get no fleet address (CNI ADD answers \"try again later\")",
                fix_plan,
            )],
        );
    }
    let mut findings = Vec::new();
    let subnet: Option<Ipv4Network> = status.node_subnet.parse().ok();
    if let (Some(view), Some(subnet)) = (view, subnet) {
        if status.fleet_cidr != view.fleet_cidr.to_string() {
            findings.push(finding(
                subject.clone(),
                format!(
                    "its plan's fleet CIDR {} is not the hub's {}",
                    status.fleet_cidr, view.fleet_cidr
                ),
                fix_plan.clone(),
            ));
        }
        if let CredentialKind::Member(c) = credential
            && let Some(own) = view.clusters.iter().find(|k| k.id.as_str() == c.as_str())
            && !own.block.contains(subnet.network())
        {
            findings.push(finding(
                subject.clone(),
                format!(
                    "its subnet {subnet} is outside cluster {c}'s block {}",
                    own.block
                ),
                fix_plan,
            ));
        }
    }
    CheckOutcome::new(
        "this-node",
        format!("fleet-nri has its plan: subnet {}", status.node_subnet),
        findings,
    )
}

/// Outer headers one fleet hop adds, in bytes.
///
/// VXLAN (between the nodes of a cluster) over IPv4: outer IPv4 20 + UDP 8 + VXLAN 8 + the
/// inner Ethernet header 14 = **50**; over IPv6 the outer header is 40, so **70**.
/// WireGuard (between clusters) over IPv4: IPv4 20 + UDP 8 + WireGuard data header 16 +
/// Poly1305 tag 16 = **60**; over IPv6 **80**.
/// So on a node whose underlay device has MTU `U`, the fleet path needs
/// - pods (`fleet0`, `local.mtu`) and the overlay device (`fleetvx`): `mtu + 50 ≤ U`
///   (1370 + 50 = 1420 ≤ 1500 by default);
/// - the WireGuard device: `mtu + 60 ≤ U` (1420 + 60 = 1480 ≤ 1500);
/// - a pod's packet enters the tunnel whole: pod MTU ≤ WireGuard MTU (1370 ≤ 1420).
pub fn overheads(ipv6: bool) -> (u32, u32) {
    if ipv6 { (70, 80) } else { (50, 60) }
}

/// The MTUs on a node fit its underlay (arithmetic in [`overheads`]).
pub fn check_mtu(mtu: Result<&MtuFacts, &String>) -> CheckOutcome {
    let m = match mtu {
        Ok(m) => m,
        Err(why) => return CheckOutcome::skipped("mtu", why.clone()),
    };
    let (vxlan, wireguard) = overheads(m.underlay_ipv6);
    let u = m.underlay_mtu;
    let mut findings = Vec::new();
    let lower = |device: &str, max: u32, need: u32| {
        format!(
            "lower {device}'s MTU to at most {max}{} or raise {}'s to at least {need}",
            if device == "fleet0" {
                " (fleet-nri's local.mtu; pods get it at their next start)"
            } else {
                ""
            },
            m.underlay_device,
        )
    };
    for (device, have) in [("fleet0", m.bridge_mtu), ("fleetvx", m.overlay_mtu)] {
        if let Some(have) = have
            && have + vxlan > u
        {
            findings.push(finding(
                format!("{} {device}", m.cnf_netns),
                format!(
                    "MTU {have} + VXLAN {vxlan} = {} exceeds the underlay {}'s MTU {u}: larger \
                     packets between nodes are dropped",
                    have + vxlan,
                    m.underlay_device
                ),
                lower(device, u.saturating_sub(vxlan), have + vxlan),
            ));
        }
    }
    if let Some((device, have)) = &m.wireguard {
        if have + wireguard > u {
            findings.push(finding(
                format!("{} {device}", m.cnf_netns),
                format!(
                    "MTU {have} + WireGuard {wireguard} = {} exceeds the underlay {}'s MTU {u}: \
                     larger packets between clusters are dropped",
                    have + wireguard,
                    m.underlay_device
                ),
                lower(device, u.saturating_sub(wireguard), have + wireguard),
            ));
        }
        if let Some(pod) = m.bridge_mtu
            && pod > *have
        {
            findings.push(finding(
                format!("{} fleet0", m.cnf_netns),
                format!("pods' MTU {pod} exceeds the WireGuard device {device}'s {have}"),
                format!("lower fleet-nri's local.mtu to at most {have}"),
            ));
        }
    }
    CheckOutcome::new(
        "mtu",
        format!("fleet devices fit {}'s MTU {u}", m.underlay_device),
        findings,
    )
}

//! What `fleet-controller run` is told (the binary parses its flags into [`RunConfig`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleet_hub_api::model::ClusterId;
use fleet_hub_api::wire::{CaHash, JoinString};
use fleet_proto::node::WireguardBackend;
use ipnetwork::Ipv4Network;

/// MTU of the gateway's WireGuard interface: 1500 minus the IPv6 + UDP + WireGuard overhead.
pub const GATEWAY_MTU: u32 = 1420;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub cluster: ClusterId,
    /// The hub's addresses (`host:port`), tried in turn.
    pub hubs: Vec<String>,
    /// The cluster's credential (0600), shared by its controller replicas.
    pub credential_file: PathBuf,
    /// Used only when the credential file does not exist yet.
    pub join: Option<JoinString>,
    /// The hub CA's SHA-256; from the join string when not given.
    pub ca: Option<CaHash>,
    /// Node-local state: the WireGuard key.
    pub data_dir: PathBuf,
    pub nodes_file: PathBuf,
    pub gateway_node: String,
    /// A public endpoint: other clusters tunnel to us directly.
    pub endpoint: Option<SocketAddr>,
    pub listen_port: u16,
    pub wg_name: String,
    /// `None`: kernel where available, else userspace.
    pub wg_backend: Option<WireguardBackend>,
    pub holder: String,
    pub lease_ttl: Duration,
    /// Where the leadership lease lives.
    pub leader_election: LeaderElection,
    pub keepalive: u16,
    pub node_prefix: u8,
    pub status_interval: Duration,
    pub vip_range: Ipv4Network,
    /// The cluster's `fleet-dns` servers, reached by pods through the DNS VIP (the VIP
    /// range's first usable address); empty: no DNS VIP.
    pub dns_backends: Vec<DnsBackend>,
    /// How often the nodes' pods are read for export endpoints.
    pub endpoint_poll_interval: Duration,
    /// The hold-down after a cluster's second death within the flap window (doubling after
    /// each further one); zero turns damping off.
    pub liveness_hold_down: Duration,
    /// The member cluster's Kubernetes API (`--kubernetes`): ServiceExports as a source of
    /// exports, their status, the Nodes. `None`: no Kubernetes (nodes.json and `fleetctl
    /// export` only).
    pub kubernetes: Option<KubeApi>,
    /// The controller's client certificate for node daemons reached over TCP (`ca.crt`,
    /// `tls.crt`, `tls.key`; `fleet_core::node_tls`); needed by `tcp://` nodes.
    pub node_api_tls: Option<PathBuf>,
    /// The cluster's nodes from the Kubernetes API's Node objects instead of `nodes_file`,
    /// each `fleet-nri` reached at `tcp://<InternalIP>:<this port>`.
    pub nodes_from_api: Option<u16>,
    /// The credential in this Secret (`<namespace>, <name>`) instead of the credential file:
    /// read at start, written at the first join (needs `kubernetes`).
    pub credential_secret: Option<(String, String)>,
}

/// How the controller reaches its cluster's Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeApi {
    /// `None`: the in-cluster configuration (the pod's service account).
    pub kubeconfig: Option<PathBuf>,
}

/// `--kubernetes auto|on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubernetesMode {
    On,
    Off,
    /// On when running in a pod (`KUBERNETES_SERVICE_HOST` set).
    Auto,
}

#[derive(Debug, thiserror::Error)]
#[error("--kubernetes {0:?}: expected auto, on or off")]
pub struct KubernetesModeError(String);

impl std::str::FromStr for KubernetesMode {
    type Err = KubernetesModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            other => Err(KubernetesModeError(other.to_string())),
        }
    }
}

impl KubernetesMode {
    /// Resolves `auto` by whether the controller runs in a pod (`in_cluster`).
    pub fn resolve(self, in_cluster: bool, kubeconfig: Option<PathBuf>) -> Option<KubeApi> {
        match (self, in_cluster) {
            (Self::Off, _) | (Self::Auto, false) => None,
            (Self::On, _) | (Self::Auto, true) => Some(KubeApi { kubeconfig }),
        }
    }
}

/// Default namespace and name of the Kubernetes Lease (`--lease-namespace`, `--lease-name`).
pub const DEFAULT_LEASE_NAMESPACE: &str = "fleetboard-system";
pub const DEFAULT_LEASE_NAME: &str = "fleet-controller";

/// Where the replicas' leadership lease lives (`--leader-election`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderElection {
    /// The hub's cluster lease (a lock in the hub's store).
    Hub,
    /// A `coordination.k8s.io/v1` Lease `<namespace>/<name>`, through the in-cluster
    /// configuration (or `kubeconfig` when given).
    Kubernetes {
        namespace: String,
        name: String,
        kubeconfig: Option<PathBuf>,
    },
}

/// `--leader-election hub|kubernetes|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderElectionMode {
    Hub,
    Kubernetes,
    /// Kubernetes when running in a pod (`KUBERNETES_SERVICE_HOST` set), else the hub.
    Auto,
}

#[derive(Debug, thiserror::Error)]
#[error("--leader-election {0:?}: expected hub, kubernetes or auto")]
pub struct LeaderElectionModeError(String);

impl std::str::FromStr for LeaderElectionMode {
    type Err = LeaderElectionModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hub" => Ok(Self::Hub),
            "kubernetes" => Ok(Self::Kubernetes),
            "auto" => Ok(Self::Auto),
            other => Err(LeaderElectionModeError(other.to_string())),
        }
    }
}

impl LeaderElectionMode {
    /// Resolves `auto` by whether `KUBERNETES_SERVICE_HOST` is set (`in_cluster`).
    pub fn resolve(
        self,
        in_cluster: bool,
        namespace: String,
        name: String,
        kubeconfig: Option<PathBuf>,
    ) -> LeaderElection {
        match (self, in_cluster) {
            (Self::Hub, _) | (Self::Auto, false) => LeaderElection::Hub,
            (Self::Kubernetes, _) | (Self::Auto, true) => LeaderElection::Kubernetes {
                namespace,
                name,
                kubeconfig,
            },
        }
    }
}

/// A DNS-1123 label (namespace names): 1–63 of `[a-z0-9-]`, alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (object names): dot-separated labels, at most 253 bytes.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--nodes-from-kubernetes needs --kubernetes on and --node-api-tls")]
    NodesFromApi,
    #[error("--nodes-from-kubernetes: the node API port must not be 0")]
    NodeApiPort,
    #[error("--credential-secret needs --kubernetes on")]
    CredentialSecretNeedsApi,
    #[error("--credential-secret {0:?}: expected [<namespace>/]<name> (DNS names)")]
    CredentialSecret(String),
    #[error(
        "--vip-range {0} is too small: it needs the DNS VIP and at least one service VIP (use /30 or wider)"
    )]
    VipRangeTooSmall(Ipv4Network),
    #[error(
        "--dns-backend {0}: give the ip:port where a fleet-dns server listens (not 0.0.0.0, not port 0, not inside the VIP range)"
    )]
    DnsBackend(std::net::SocketAddrV4),
    #[error("--wg-name {0:?}: an interface name is 1 to 15 bytes without '/', ':' or spaces")]
    WgName(String),
    #[error("--lease-ttl {0:?} is too short: use at least 500ms (it is renewed every ttl/3)")]
    LeaseTtl(Duration),
    #[error("--lease-namespace {0:?}: a namespace is a DNS label (lower-case a-z, 0-9, '-')")]
    LeaseNamespace(String),
    #[error("--lease-name {0:?}: a Lease name is a DNS subdomain (lower-case a-z, 0-9, '-', '.')")]
    LeaseName(String),
    #[error("--listen-port 0: choose a fixed port, peers dial it")]
    ListenPort,
    #[error("--node-prefix /{0}: a node subnet must be /30 or larger")]
    NodePrefix(u8),
    #[error("--vip-range {vip} overlaps the fleet CIDR default {fleet}; pick a range outside it")]
    VipRange {
        vip: Ipv4Network,
        fleet: Ipv4Network,
    },
}

impl RunConfig {
    /// Checks what can be checked before contacting anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.wg_name;
        if n.is_empty()
            || n.len() > 15
            || n.bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(ConfigError::WgName(n.clone()));
        }
        if self.lease_ttl < Duration::from_millis(500) {
            return Err(ConfigError::LeaseTtl(self.lease_ttl));
        }
        if let LeaderElection::Kubernetes {
            namespace, name, ..
        } = &self.leader_election
        {
            if !is_dns_label(namespace) {
                return Err(ConfigError::LeaseNamespace(namespace.clone()));
            }
            if !is_dns_subdomain(name) {
                return Err(ConfigError::LeaseName(name.clone()));
            }
        }
        if let Some(port) = self.nodes_from_api {
            if self.kubernetes.is_none() || self.node_api_tls.is_none() {
                return Err(ConfigError::NodesFromApi);
            }
            if port == 0 {
                return Err(ConfigError::NodeApiPort);
            }
        }
        if let Some((ns, name)) = &self.credential_secret {
            if self.kubernetes.is_none() {
                return Err(ConfigError::CredentialSecretNeedsApi);
            }
            if !is_dns_label(ns) || !is_dns_subdomain(name) {
                return Err(ConfigError::CredentialSecret(format!("{ns}/{name}")));
            }
        }
        if self.listen_port == 0 {
            return Err(ConfigError::ListenPort);
        }
        if self.node_prefix > 30 {
            return Err(ConfigError::NodePrefix(self.node_prefix));
        }
        let fleet: Ipv4Network = fleet_core::config::DEFAULT_FLEET_CIDR
            .parse()
            .expect("the default fleet CIDR parses");
        let vip = self.vip_range;
        if vip.contains(fleet.network()) || fleet.contains(vip.network()) {
            return Err(ConfigError::VipRange { vip, fleet });
        }
        if vip.prefix() > 30 {
            return Err(ConfigError::VipRangeTooSmall(vip));
        }
        for b in &self.dns_backends {
            if let DnsBackend::Address(a) = b
                && (a.port() == 0 || a.ip().is_unspecified() || vip.contains(*a.ip()))
            {
                return Err(ConfigError::DnsBackend(*a));
            }
        }
        Ok(())
    }
}

/// Where a `fleet-dns` server listens (`--dns-backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsBackend {
    /// `ip:port`, e.g. a fleet-dns pod's fleet address.
    Address(std::net::SocketAddrV4),
    /// `<node>:<port>`: on that node's fleet gateway address (the first host of its subnet, in
    /// its CNF netns), e.g. a fleet-dns that binds inside the node's CNF netns.
    Node { node: String, port: u16 },
}

#[derive(Debug, thiserror::Error)]
#[error(
    "--dns-backend {0:?}: expected ip:port (a fleet-dns address) or <node>:<port> (fleet-dns on that node's fleet gateway address)"
)]
pub struct DnsBackendError(String);

impl std::str::FromStr for DnsBackend {
    type Err = DnsBackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<std::net::SocketAddrV4>() {
            return Ok(DnsBackend::Address(a));
        }
        let bad = || DnsBackendError(s.to_string());
        let (node, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        if node.is_empty()
            || node.contains(['/', ' '])
            || node.parse::<std::net::Ipv4Addr>().is_ok()
        {
            return Err(bad());
        }
        Ok(DnsBackend::Node {
            node: node.to_string(),
            port,
        })
    }
}

/// The longest duration a flag accepts: longer is a typo (and would overflow timers).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Why [`parse_duration`] refused a text (the text is in the error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: use a whole number with ms, s or m (e.g. 500ms, 3s, 1m)")]
    Malformed(String),
    #[error("duration {0:?} must be positive (e.g. 500ms, 3s, 1m)")]
    NotPositive(String),
    #[error("duration {0:?} is too long: at most 24h (1440m)")]
    TooLong(String),
}

/// Parses `500ms`, `3s`, `1m` (a bare number is seconds) into a duration from 1 ms to
/// [`MAX_DURATION`].
///
/// Errors: [`DurationError::Malformed`] (not a whole number with a unit),
/// [`DurationError::NotPositive`] (zero), [`DurationError::TooLong`] (over [`MAX_DURATION`]).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let (number, scale_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else {
        (t, 1000)
    };
    let n: u64 = match number.parse() {
        Ok(n) => n,
        // All digits but past u64: a number, just far too long.
        Err(_) if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(DurationError::TooLong(text.to_string()));
        }
        Err(_) => return Err(DurationError::Malformed(text.to_string())),
    };
    if n == 0 {
        return Err(DurationError::NotPositive(text.to_string()));
    }
    n.checked_mul(scale_ms)
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| DurationError::TooLong(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_before_anything_runs() {
        let ok = RunConfig {
            cluster: ClusterId::new("aa").unwrap(),
            hubs: vec!["127.0.0.1:7443".into()],
            credential_file: "/tmp/c".into(),
            join: None,
            ca: None,
            data_dir: "/tmp/d".into(),
            nodes_file: "/tmp/n".into(),
            gateway_node: "n1".into(),
            endpoint: None,
            listen_port: 51820,
            wg_name: "fleet-wg".into(),
            wg_backend: None,
            holder: "h".into(),
            lease_ttl: Duration::from_secs(3),
            leader_election: LeaderElection::Kubernetes {
                namespace: DEFAULT_LEASE_NAMESPACE.into(),
                name: DEFAULT_LEASE_NAME.into(),
                kubeconfig: None,
            },
            keepalive: 25,
            node_prefix: 24,
            status_interval: Duration::from_secs(5),
            vip_range: fleet_core::config::DEFAULT_VIP_RANGE.parse().unwrap(),
            dns_backends: Vec::new(),
            endpoint_poll_interval: Duration::from_secs(1),
            liveness_hold_down: Duration::from_secs(2),
            kubernetes: None,
            node_api_tls: None,
            nodes_from_api: None,
            credential_secret: None,
        };
        ok.validate().unwrap();
        let api = Some(KubeApi { kubeconfig: None });
        RunConfig {
            kubernetes: api.clone(),
            node_api_tls: Some("/tls".into()),
            nodes_from_api: Some(9650),
            credential_secret: Some(("fleetboard-system".into(), "fleet-credential".into())),
            ..ok.clone()
        }
        .validate()
        .unwrap();
        for (bad, expected) in [
            (
                RunConfig {
                    nodes_from_api: Some(9650),
                    node_api_tls: Some("/tls".into()),
                    ..ok.clone()
                },
                "needs --kubernetes on",
            ),
            (
                RunConfig {
                    nodes_from_api: Some(9650),
                    kubernetes: api.clone(),
                    ..ok.clone()
                },
                "--node-api-tls",
            ),
            (
                RunConfig {
                    credential_secret: Some(("ns".into(), "c".into())),
                    ..ok.clone()
                },
                "--credential-secret needs",
            ),
            (
                RunConfig {
                    credential_secret: Some(("Bad_NS".into(), "c".into())),
                    kubernetes: api.clone(),
                    ..ok.clone()
                },
                "Bad_NS/c",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
        let bad = [
            RunConfig {
                wg_name: "a-very-long-name-x".into(),
                ..ok.clone()
            },
            RunConfig {
                wg_name: "a/b".into(),
                ..ok.clone()
            },
            RunConfig {
                lease_ttl: Duration::from_millis(100),
                ..ok.clone()
            },
            RunConfig {
                listen_port: 0,
                ..ok.clone()
            },
            RunConfig {
                leader_election: LeaderElection::Kubernetes {
                    namespace: "Fleet_System".into(),
                    name: DEFAULT_LEASE_NAME.into(),
                    kubeconfig: None,
                },
                ..ok.clone()
            },
            RunConfig {
                leader_election: LeaderElection::Kubernetes {
                    namespace: DEFAULT_LEASE_NAMESPACE.into(),
                    name: "-bad..name".into(),
                    kubeconfig: None,
                },
                ..ok.clone()
            },
            RunConfig {
                node_prefix: 31,
                ..ok.clone()
            },
            RunConfig {
                vip_range: "100.97.0.0/16".parse().unwrap(),
                ..ok.clone()
            },
        ];
        for b in bad {
            assert!(b.validate().is_err(), "{b:?}");
        }
    }

    #[test]
    fn kubernetes_modes() {
        use std::str::FromStr;
        let kc = Some(PathBuf::from("/k"));
        assert_eq!(
            KubernetesMode::from_str("auto")
                .unwrap()
                .resolve(false, kc.clone()),
            None
        );
        assert_eq!(
            KubernetesMode::Auto.resolve(true, None),
            Some(KubeApi { kubeconfig: None })
        );
        assert_eq!(
            KubernetesMode::On.resolve(false, kc.clone()),
            Some(KubeApi { kubeconfig: kc })
        );
        assert_eq!(KubernetesMode::Off.resolve(true, None), None);
        assert!(KubernetesMode::from_str("yes").is_err());
    }

    #[test]
    fn leader_election_modes() {
        let k = |m: LeaderElectionMode, in_cluster| {
            m.resolve(in_cluster, "ns".into(), "l".into(), None)
        };
        let kube = LeaderElection::Kubernetes {
            namespace: "ns".into(),
            name: "l".into(),
            kubeconfig: None,
        };
        assert_eq!(k(LeaderElectionMode::Auto, false), LeaderElection::Hub);
        assert_eq!(k(LeaderElectionMode::Auto, true), kube);
        assert_eq!(k(LeaderElectionMode::Hub, true), LeaderElection::Hub);
        assert_eq!(k(LeaderElectionMode::Kubernetes, false), kube);
        assert_eq!(
            "auto".parse::<LeaderElectionMode>().unwrap(),
            LeaderElectionMode::Auto
        );
        assert!("etcd".parse::<LeaderElectionMode>().is_err());
        assert!(is_dns_subdomain("fleet-controller.aa"));
        assert!(!is_dns_subdomain("Fleet"));
        assert!(!is_dns_label("a.b"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1440m").unwrap(), MAX_DURATION);
        for bad in ["", "s", "-1s", "3h", "x", "1.5s"] {
            assert_eq!(
                parse_duration(bad),
                Err(DurationError::Malformed(bad.into())),
                "{bad:?}"
            );
        }
        for zero in ["0s", "0", "0ms", "0m"] {
            assert_eq!(
                parse_duration(zero),
                Err(DurationError::NotPositive(zero.into()))
            );
        }
        for long in [
            "1441m",
            "86401s",
            "18446744073709551615m",
            "99999999999999999999999",
        ] {
            assert_eq!(
                parse_duration(long),
                Err(DurationError::TooLong(long.into()))
            );
        }
    }

    #[test]
    fn duration_errors_say_what_is_wrong() {
        let e = parse_duration("0s").unwrap_err().to_string();
        assert!(e.contains("must be positive"), "{e}");
        assert!(!e.contains("use a whole number"), "{e}");
        let e = parse_duration("3x").unwrap_err().to_string();
        assert!(e.contains("\"3x\"") && e.contains("ms, s or m"), "{e}");
        let e = parse_duration("9999m").unwrap_err().to_string();
        assert!(e.contains("too long") && e.contains("24h"), "{e}");
    }

    #[test]
    fn dns_backends_are_addresses_or_node_ports() {
        assert_eq!(
            "100.96.0.7:53".parse::<DnsBackend>().unwrap(),
            DnsBackend::Address("100.96.0.7:53".parse().unwrap())
        );
        assert_eq!(
            "aa-1:5353".parse::<DnsBackend>().unwrap(),
            DnsBackend::Node {
                node: "aa-1".into(),
                port: 5353
            }
        );
        for bad in [
            "",
            "aa-1",
            "aa-1:0",
            ":53",
            "a b:53",
            "1.2.3.4:x",
            "aa-1:70000",
        ] {
            assert!(bad.parse::<DnsBackend>().is_err(), "{bad:?} accepted");
        }
    }
}

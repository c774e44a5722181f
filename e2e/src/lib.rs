//! Test harness for fleetboard's end-to-end tests against the real runtime.
//!
//! What it owns:
//! - [`netns`]: uniquely named network namespaces that delete themselves ([`TestNetns`]);
//! - [`containerd`]: a private containerd per call (own root, state, sockets, NRI socket, CNI
//!   dirs, runc root, cgroup parent), normally run inside a [`TestNetns`] ([`Containerd`]);
//! - [`images`]: the static `pause` sandbox image and a busybox workload image, built locally
//!   as docker-archive tarballs and imported with `ctr`;
//! - [`cri`]: a small CRI client, async ([`cri::CriClient`]) and blocking ([`Cri`]);
//! - [`cni`]: bridge + host-local conflists with optional chained plugins ([`BridgeNetwork`]);
//! - [`bins`]: locating the workspace's built binaries ([`workspace_bin`]);
//! - [`fleet`]: the sandbox fleet of issue 3 (internet, NATed members, hub, controllers);
//!   [`cluster_node`]: one node (containerd + fleet-nri in its netns); [`capture`]: tcpdump;
//!   [`process`]: long-running fleet programs in a netns, stopped by PID;
//! - [`reap`]: teardown by PID/socket/path, and reaping what killed test processes left
//!   (run once per process at the first `Containerd::start`).
//!
//! **Run containerd inside a [`TestNetns`]** (`ContainerdOpts::new(..).netns(&ns)`): the CNI
//! bridge plugin creates its bridge in whatever netns containerd runs in, so a containerd in
//! the host netns would put a bridge and veths on the machine.
//!
//! Everything needs root; [`require_root`] fails a test loudly when it is not root.
//!
//! ```no_run
//! use std::time::Duration;
//! use fleet_e2e::{BridgeNetwork, Containerd, ContainerdOpts, PodSpec, require_root};
//!
//! require_root("my_test");
//! // Own netns, own dirs, pause + busybox imported, NRI socket at `nri_socket()`.
//! let node = Containerd::start(ContainerdOpts::new("node-a")).unwrap();
//! BridgeNetwork::new("podnet", "fe2e-br0", "10.244.1.0/24").write_to(&node).unwrap();
//! let cri = node.cri().unwrap(); // blocking client; `node.cri_async().await` in async tests
//! cri.wait_network_ready(Duration::from_secs(10)).unwrap();
//! let (sandbox, container) = cri.run_busybox_pod(&PodSpec::new("web")).unwrap();
//! let out = cri.exec_sync(&container, &["ip", "-4", "addr", "show", "eth0"], Duration::from_secs(10)).unwrap();
//! assert!(out.stdout.contains("10.244.1."));
//! # let _ = sandbox;
//! ```
//!
//! Workload image notes: containers run unprivileged but keep containerd's default
//! capabilities (incl. NET_RAW) and `enable_unprivileged_icmp` is on, so `ping` works. Do not
//! use `wget -T` (Debian's busybox-static 1.35 wget segfaults on it): `timeout 5 wget ...`.

pub mod bins;
pub mod capture;
pub mod cluster_node;
pub mod cni;
pub mod containerd;
pub mod cri;
mod error;
pub mod fleet;
pub mod fleet_nri;
pub mod images;
pub mod mounts;
pub mod netns;
pub mod process;
pub mod reap;
mod util;

pub use bins::workspace_bin;
pub use capture::{Capture, Packet, Packets, UdpDatagram};
pub use cluster_node::ClusterNode;
pub use cni::BridgeNetwork;
pub use containerd::{Containerd, ContainerdOpts, NetnsChoice};
pub use cri::{
    ContainerMount, ContainerSpec, ContainerState, Cri, CriClient, CriConfig, ExecOutput, PodSpec,
    Propagation,
};
pub use error::{Error, Result};
pub use fleet::{FleetController, FleetHub, MemberOpts, Pod, SandboxFleet};
pub use fleet_nri::{FleetNri, FleetNriOpts};
pub use images::{BUSYBOX_IMAGE, PAUSE_IMAGE};
pub use netns::{TestNetns, ip_in};
pub use process::ManagedProcess;
pub use util::{poll_until, process_alive, require_root, run_command};

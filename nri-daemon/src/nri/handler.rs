//! What the NRI transport hands to the rest of the daemon. The transport (`nri::plugin`) speaks
//! ttrpc to the runtime and turns its messages into these calls; the node logic implements
//! [`NriHandler`] and never sees protobuf.

use std::collections::BTreeMap;

/// A pod sandbox as NRI reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSandboxInfo {
    /// Sandbox id; for containerd this is also CNI_CONTAINERID.
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Path of the pod's network namespace; `None` for host-network pods.
    pub netns: Option<String>,
}

/// A container as NRI reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub pod_sandbox_id: String,
    pub name: String,
}

/// Changes to a container being created (NRI `ContainerAdjustment`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerAdjust {
    /// Environment variables to add (or override), in order.
    pub env: Vec<(String, String)>,
    /// Annotations to add (or override).
    pub annotations: BTreeMap<String, String>,
}

/// The node logic's side of NRI. Calls may arrive concurrently; each must answer well within
/// the runtime's request timeout (2 s by default), so long work is spawned, not awaited.
#[async_trait::async_trait]
pub trait NriHandler: Send + Sync + 'static {
    /// The runtime's full state, sent once after every (re)registration. Split synchronization
    /// is reassembled by the transport: this is called once with everything.
    async fn synchronize(&self, pods: Vec<PodSandboxInfo>, containers: Vec<ContainerInfo>);
    /// RunPodSandbox: the pod's network (and so the CNI chain) is already set up.
    async fn pod_started(&self, pod: PodSandboxInfo);
    /// StopPodSandbox.
    async fn pod_stopped(&self, pod: PodSandboxInfo);
    /// RemovePodSandbox.
    async fn pod_removed(&self, pod: PodSandboxInfo);
    /// CreateContainer: returns what to inject into the container.
    async fn create_container(
        &self,
        pod: PodSandboxInfo,
        container: ContainerInfo,
    ) -> ContainerAdjust;
}

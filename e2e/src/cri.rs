//! A small CRI client (runtime.v1 over the instance's unix socket, `k8s-cri` + tonic).
//!
//! Two faces:
//! - [`CriClient`]: async, for `#[tokio::test]`s and daemons; connect inside your runtime.
//! - [`Cri`]: blocking, owns a current-thread tokio runtime; for plain `#[test]`s. Do not use
//!   (or drop) it inside an async context: tokio forbids nested runtimes there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{Error, Result};
use crate::images::BUSYBOX_IMAGE;

pub use k8s_cri::v1::PodSandbox;

/// Pod identity, as a kubelet would pass it (also what CNI sees in `K8S_POD_*`).
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// The pod's resolv.conf (CRI `dns_config`): name servers and search domains; `None`:
    /// the runtime's default.
    pub dns: Option<(Vec<String>, Vec<String>)>,
    /// `hostNetwork: true`: the sandbox shares the netns the runtime runs in (no CNI ADD).
    pub host_network: bool,
    /// A privileged sandbox (what a kubelet asks for when one of the pod's containers is
    /// privileged; containerd refuses a privileged container in an unprivileged sandbox).
    pub privileged: bool,
}

impl PodSpec {
    /// Pod `name` in namespace `default` with uid `uid-<name>`.
    pub fn new(name: &str) -> Self {
        PodSpec {
            name: name.to_string(),
            namespace: "default".to_string(),
            uid: format!("uid-{name}"),
            ..Default::default()
        }
    }
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_string();
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_string(), v.to_string());
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }
    /// resolv.conf with these name servers and search domains.
    pub fn dns(mut self, servers: &[&str], searches: &[&str]) -> Self {
        self.dns = Some((
            servers.iter().map(ToString::to_string).collect(),
            searches.iter().map(ToString::to_string).collect(),
        ));
        self
    }
    /// `hostNetwork: true`, as a DaemonSet pod of a node agent runs.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
    /// A privileged sandbox, for pods with a privileged container.
    pub fn privileged(mut self) -> Self {
        self.privileged = true;
        self
    }
}

/// Mount propagation of a [`ContainerMount`], as a pod spec's `mountPropagation` says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    /// `None` (rprivate).
    #[default]
    Private,
    /// `HostToContainer` (rslave): mounts made on the host later appear inside.
    HostToContainer,
    /// `Bidirectional` (rshared): mounts made inside also appear on the host.
    Bidirectional,
}

/// A hostPath volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub readonly: bool,
    pub propagation: Propagation,
}

/// One container of a pod. Runs unprivileged (`privileged = false`) unless [`Self::privileged`].
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Arguments after the image's entrypoint (a pod spec's `args`), when `command` is empty.
    pub args: Vec<String>,
    pub mounts: Vec<ContainerMount>,
    pub privileged: bool,
    /// Capabilities added to the runtime's default set (`securityContext.capabilities.add`).
    pub add_capabilities: Vec<String>,
    /// Capabilities dropped from it (`securityContext.capabilities.drop`; `ALL` for all).
    pub drop_capabilities: Vec<String>,
}

impl ContainerSpec {
    /// A busybox container running `sleep 3600`.
    pub fn busybox(name: &str) -> Self {
        ContainerSpec {
            name: name.to_string(),
            image: BUSYBOX_IMAGE.to_string(),
            command: vec!["sleep".into(), "3600".into()],
            ..Default::default()
        }
    }

    /// A container of `image` running its entrypoint with `args`.
    pub fn image(name: &str, image: &str, args: &[&str]) -> Self {
        ContainerSpec {
            name: name.to_string(),
            image: image.to_string(),
            args: args.iter().map(ToString::to_string).collect(),
            ..Default::default()
        }
    }
    /// Replaces the image's entrypoint (a pod spec's `command`).
    pub fn command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(ToString::to_string).collect();
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
    /// Mounts `host_path` at `container_path` (a hostPath volume).
    pub fn mount(
        mut self,
        host_path: impl Into<PathBuf>,
        container_path: impl Into<PathBuf>,
        propagation: Propagation,
    ) -> Self {
        self.mounts.push(ContainerMount {
            host_path: host_path.into(),
            container_path: container_path.into(),
            readonly: false,
            propagation,
        });
        self
    }
    /// `securityContext.privileged: true` (the pod must be [`PodSpec::privileged`] too).
    pub fn privileged(mut self) -> Self {
        self.privileged = true;
        self
    }
    /// Adds a capability, e.g. `NET_ADMIN` (without the `CAP_` prefix, as a pod spec says).
    pub fn add_capability(mut self, cap: &str) -> Self {
        self.add_capabilities.push(cap.to_string());
        self
    }
    /// Drops a capability (`ALL`: every one the runtime would give).
    pub fn drop_capability(mut self, cap: &str) -> Self {
        self.drop_capabilities.push(cap.to_string());
        self
    }
}

/// A container's state as CRI reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    /// Exited with this code.
    Exited(i32),
    Unknown,
}

/// Result of `exec_sync`. A non-zero exit code is not an error; check `exit_code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// Where to connect and what every pod gets.
#[derive(Debug, Clone)]
pub struct CriConfig {
    pub socket: PathBuf,
    /// cgroupfs parent for pods (per instance, so instances never share cgroups).
    pub cgroup_parent: Option<String>,
    /// Pod log directory (container logs are `<dir>/<pod>_<uid>/<container>.log`).
    pub log_dir: Option<PathBuf>,
}

impl CriConfig {
    pub fn socket(socket: impl Into<PathBuf>) -> Self {
        CriConfig {
            socket: socket.into(),
            cgroup_parent: None,
            log_dir: None,
        }
    }
}

/// Async CRI client. Cheap to clone; methods take `&self`.
#[derive(Debug, Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    config: CriConfig,
}

fn cri_err(op: &'static str, target: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
    let target = target.into();
    move |status| Error::Cri {
        op,
        target,
        status: Box::new(status),
    }
}

impl CriClient {
    pub async fn connect(config: CriConfig) -> Result<Self> {
        let path = config.socket.clone();
        // The URI is ignored: every connection goes to the unix socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| Error::CriConnect {
                path: config.socket.clone(),
                source,
            })?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            config,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// `runtime_name runtime_version` (e.g. `containerd 1.7.24~ds1`).
    pub async fn version(&self) -> Result<String> {
        let v = self
            .runtime
            .clone()
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(cri_err("Version", self.config.socket.display().to_string()))?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// Whether the runtime reports `NetworkReady` (a CNI config has been loaded).
    pub async fn network_ready(&self) -> Result<bool> {
        let status = self
            .runtime
            .clone()
            .status(api::StatusRequest { verbose: false })
            .await
            .map_err(cri_err("Status", self.config.socket.display().to_string()))?
            .into_inner();
        Ok(status
            .status
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "NetworkReady" && c.status)
            })
            .unwrap_or(false))
    }

    /// Polls `NetworkReady` until true (after writing a conflist), failing after `timeout`.
    pub async fn wait_network_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.network_ready().await.unwrap_or(false) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "CRI NetworkReady (CNI config loaded)".into(),
                    timeout,
                    detail: format!(" on {}", self.config.socket.display()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Image references known to the runtime.
    pub async fn list_images(&self) -> Result<Vec<String>> {
        let images = self
            .images
            .clone()
            .list_images(api::ListImagesRequest { filter: None })
            .await
            .map_err(cri_err(
                "ListImages",
                self.config.socket.display().to_string(),
            ))?
            .into_inner();
        Ok(images
            .images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .collect())
    }

    pub fn sandbox_config(&self, pod: &PodSpec) -> api::PodSandboxConfig {
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // As a kubelet does: a host-network pod shares the node's UTS namespace, where
            // runc cannot set a hostname.
            hostname: if pod.host_network {
                String::new()
            } else {
                pod.name.clone()
            },
            log_directory: self
                .config
                .log_dir
                .as_ref()
                .map(|d| {
                    d.join(format!("{}_{}", pod.name, pod.uid))
                        .display()
                        .to_string()
                })
                .unwrap_or_default(),
            labels: pod.labels.clone(),
            annotations: pod.annotations.clone(),
            dns_config: pod.dns.as_ref().map(|(servers, searches)| api::DnsConfig {
                servers: servers.clone(),
                searches: searches.clone(),
                options: Vec::new(),
            }),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.config.cgroup_parent.clone().unwrap_or_default(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: if pod.host_network {
                            api::NamespaceMode::Node as i32
                        } else {
                            api::NamespaceMode::Pod as i32
                        },
                        ..Default::default()
                    }),
                    privileged: pod.privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox (runs CNI ADD); returns the sandbox id.
    pub async fn run_pod(&self, pod: &PodSpec) -> Result<String> {
        let config = self.sandbox_config(pod);
        Ok(self
            .runtime
            .clone()
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(cri_err(
                "RunPodSandbox",
                format!("pod {}/{}", pod.namespace, pod.name),
            ))?
            .into_inner()
            .pod_sandbox_id)
    }

    pub async fn create_container(
        &self,
        sandbox_id: &str,
        pod: &PodSpec,
        container: &ContainerSpec,
    ) -> Result<String> {
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: container.name.clone(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: container.image.clone(),
                ..Default::default()
            }),
            command: container.command.clone(),
            args: container.args.clone(),
            mounts: container
                .mounts
                .iter()
                .map(|m| api::Mount {
                    container_path: m.container_path.display().to_string(),
                    host_path: m.host_path.display().to_string(),
                    readonly: m.readonly,
                    propagation: match m.propagation {
                        Propagation::Private => api::MountPropagation::PropagationPrivate,
                        Propagation::HostToContainer => {
                            api::MountPropagation::PropagationHostToContainer
                        }
                        Propagation::Bidirectional => {
                            api::MountPropagation::PropagationBidirectional
                        }
                    } as i32,
                    ..Default::default()
                })
                .collect(),
            envs: container
                .env
                .iter()
                .map(|(k, v)| api::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            log_path: if self.config.log_dir.is_some() {
                format!("{}.log", container.name)
            } else {
                String::new()
            },
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    privileged: container.privileged,
                    capabilities: (!container.add_capabilities.is_empty()
                        || !container.drop_capabilities.is_empty())
                    .then(|| api::Capability {
                        add_capabilities: container.add_capabilities.clone(),
                        drop_capabilities: container.drop_capabilities.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(self
            .runtime
            .clone()
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(config),
                sandbox_config: Some(self.sandbox_config(pod)),
            })
            .await
            .map_err(cri_err(
                "CreateContainer",
                format!(
                    "container {} ({}) in sandbox {sandbox_id}",
                    container.name, container.image
                ),
            ))?
            .into_inner()
            .container_id)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<()> {
        self.runtime
            .clone()
            .start_container(api::StartContainerRequest {
                container_id: container_id.to_string(),
            })
            .await
            .map_err(cri_err(
                "StartContainer",
                format!("container {container_id}"),
            ))?;
        Ok(())
    }

    /// Runs `cmd` in the container and waits up to `timeout` for it.
    pub async fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let mut request = tonic::Request::new(api::ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.as_secs().max(1) as i64,
        });
        request.set_timeout(timeout + Duration::from_secs(5));
        let out = self
            .runtime
            .clone()
            .exec_sync(request)
            .await
            .map_err(cri_err(
                "ExecSync",
                format!("{cmd:?} in container {container_id}"),
            ))?
            .into_inner();
        Ok(ExecOutput {
            exit_code: out.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The container's state and, once it has exited, its exit code.
    pub async fn container_state(&self, container_id: &str) -> Result<ContainerState> {
        let status = self
            .runtime
            .clone()
            .container_status(api::ContainerStatusRequest {
                container_id: container_id.to_string(),
                verbose: false,
            })
            .await
            .map_err(cri_err(
                "ContainerStatus",
                format!("container {container_id}"),
            ))?
            .into_inner()
            .status
            .ok_or_else(|| {
                Error::Invalid(format!("container {container_id}: status has no `status`"))
            })?;
        Ok(
            match api::ContainerState::try_from(status.state)
                .unwrap_or(api::ContainerState::ContainerUnknown)
            {
                api::ContainerState::ContainerCreated => ContainerState::Created,
                api::ContainerState::ContainerRunning => ContainerState::Running,
                api::ContainerState::ContainerExited => ContainerState::Exited(status.exit_code),
                api::ContainerState::ContainerUnknown => ContainerState::Unknown,
            },
        )
    }

    /// StopPodSandbox (stops containers, runs CNI DEL).
    pub async fn stop_pod(&self, sandbox_id: &str) -> Result<()> {
        self.runtime
            .clone()
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: sandbox_id.to_string(),
            })
            .await
            .map_err(cri_err("StopPodSandbox", format!("sandbox {sandbox_id}")))?;
        Ok(())
    }

    pub async fn remove_pod(&self, sandbox_id: &str) -> Result<()> {
        self.runtime
            .clone()
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: sandbox_id.to_string(),
            })
            .await
            .map_err(cri_err("RemovePodSandbox", format!("sandbox {sandbox_id}")))?;
        Ok(())
    }

    pub async fn list_pods(&self) -> Result<Vec<PodSandbox>> {
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(cri_err(
                "ListPodSandbox",
                self.config.socket.display().to_string(),
            ))?
            .into_inner()
            .items)
    }

    /// Verbose PodSandboxStatus; `info["info"]` holds containerd's JSON sandbox info.
    pub async fn pod_status(&self, sandbox_id: &str) -> Result<api::PodSandboxStatusResponse> {
        Ok(self
            .runtime
            .clone()
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                verbose: true,
            })
            .await
            .map_err(cri_err("PodSandboxStatus", format!("sandbox {sandbox_id}")))?
            .into_inner())
    }

    /// The pod's primary IP as reported by CNI.
    pub async fn pod_ip(&self, sandbox_id: &str) -> Result<String> {
        let status = self.pod_status(sandbox_id).await?;
        status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| Error::Invalid(format!("sandbox {sandbox_id} has no IP in its status")))
    }

    /// The bind-mounted network namespace path of the sandbox (under containerd's state dir).
    pub async fn pod_netns_path(&self, sandbox_id: &str) -> Result<PathBuf> {
        let status = self.pod_status(sandbox_id).await?;
        let info = status.info.get("info").ok_or_else(|| {
            Error::Invalid(format!(
                "sandbox {sandbox_id}: verbose status has no `info` entry"
            ))
        })?;
        netns_path_from_info(info).ok_or_else(|| {
            Error::Invalid(format!(
                "sandbox {sandbox_id}: no network namespace path in {info}"
            ))
        })
    }

    /// Runs pod `pod` with one busybox container (`sleep 3600`) named `main`, started.
    /// Returns `(sandbox_id, container_id)`.
    pub async fn run_busybox_pod(&self, pod: &PodSpec) -> Result<(String, String)> {
        let sandbox = self.run_pod(pod).await?;
        let container = self
            .create_container(&sandbox, pod, &ContainerSpec::busybox("main"))
            .await?;
        self.start_container(&container).await?;
        Ok((sandbox, container))
    }
}

/// containerd 1.7 puts `netNamespacePath` in the sandbox info; the runtime spec's network
/// namespace is the fallback.
fn netns_path_from_info(info: &str) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(info).ok()?;
    if let Some(p) = v
        .get("netNamespacePath")
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
    {
        return Some(PathBuf::from(p));
    }
    v.pointer("/runtimeSpec/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .map(PathBuf::from)
}

/// Blocking CRI client: a [`CriClient`] plus its own current-thread runtime.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: CriClient,
}

impl std::fmt::Debug for Cri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cri")
            .field("socket", &self.client.config.socket)
            .finish()
    }
}

impl Cri {
    pub fn connect(config: CriConfig) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                Error::io(
                    "building tokio runtime for CRI client of",
                    &config.socket,
                    e,
                )
            })?;
        let client = rt.block_on(CriClient::connect(config))?;
        Ok(Cri { rt, client })
    }

    /// The async client inside (usable only on this `Cri`'s runtime via [`Cri::block_on`]).
    pub fn client(&self) -> &CriClient {
        &self.client
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn version(&self) -> Result<String> {
        self.rt.block_on(self.client.version())
    }
    pub fn network_ready(&self) -> Result<bool> {
        self.rt.block_on(self.client.network_ready())
    }
    /// Polls `NetworkReady` until true (after writing a conflist), failing after `timeout`.
    pub fn wait_network_ready(&self, timeout: Duration) -> Result<()> {
        self.rt.block_on(self.client.wait_network_ready(timeout))
    }
    pub fn list_images(&self) -> Result<Vec<String>> {
        self.rt.block_on(self.client.list_images())
    }
    pub fn run_pod(&self, pod: &PodSpec) -> Result<String> {
        self.rt.block_on(self.client.run_pod(pod))
    }
    pub fn create_container(
        &self,
        sandbox_id: &str,
        pod: &PodSpec,
        container: &ContainerSpec,
    ) -> Result<String> {
        self.rt
            .block_on(self.client.create_container(sandbox_id, pod, container))
    }
    pub fn start_container(&self, container_id: &str) -> Result<()> {
        self.rt.block_on(self.client.start_container(container_id))
    }
    pub fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        self.rt
            .block_on(self.client.exec_sync(container_id, cmd, timeout))
    }
    pub fn container_state(&self, container_id: &str) -> Result<ContainerState> {
        self.rt.block_on(self.client.container_state(container_id))
    }
    pub fn stop_pod(&self, sandbox_id: &str) -> Result<()> {
        self.rt.block_on(self.client.stop_pod(sandbox_id))
    }
    pub fn remove_pod(&self, sandbox_id: &str) -> Result<()> {
        self.rt.block_on(self.client.remove_pod(sandbox_id))
    }
    pub fn list_pods(&self) -> Result<Vec<PodSandbox>> {
        self.rt.block_on(self.client.list_pods())
    }
    pub fn pod_status(&self, sandbox_id: &str) -> Result<api::PodSandboxStatusResponse> {
        self.rt.block_on(self.client.pod_status(sandbox_id))
    }
    pub fn pod_ip(&self, sandbox_id: &str) -> Result<String> {
        self.rt.block_on(self.client.pod_ip(sandbox_id))
    }
    pub fn pod_netns_path(&self, sandbox_id: &str) -> Result<PathBuf> {
        self.rt.block_on(self.client.pod_netns_path(sandbox_id))
    }
    pub fn run_busybox_pod(&self, pod: &PodSpec) -> Result<(String, String)> {
        self.rt.block_on(self.client.run_busybox_pod(pod))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_path_prefers_net_namespace_path() {
        let info = r#"{"netNamespacePath":"/s/netns/cni-1","runtimeSpec":{"linux":{"namespaces":[{"type":"network","path":"/other"}]}}}"#;
        assert_eq!(
            netns_path_from_info(info),
            Some(PathBuf::from("/s/netns/cni-1"))
        );
    }

    #[test]
    fn netns_path_falls_back_to_runtime_spec() {
        let info = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/run/netns/x"}]}}}"#;
        assert_eq!(
            netns_path_from_info(info),
            Some(PathBuf::from("/run/netns/x"))
        );
    }

    #[test]
    fn sandbox_config_carries_identity_and_cgroup_parent() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A client that never connects: building the config needs no socket.
        let channel = rt.block_on(async { Endpoint::from_static("http://[::]:1").connect_lazy() });
        let client = CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            config: CriConfig {
                socket: "/x.sock".into(),
                cgroup_parent: Some("/fleet-e2e-x".into()),
                log_dir: None,
            },
        };
        let c = client.sandbox_config(&PodSpec::new("web").namespace("shop").label("app", "web"));
        let m = c.metadata.unwrap();
        assert_eq!(
            (m.name.as_str(), m.namespace.as_str(), m.uid.as_str()),
            ("web", "shop", "uid-web")
        );
        assert_eq!(c.labels["app"], "web");
        assert_eq!(c.linux.unwrap().cgroup_parent, "/fleet-e2e-x");
    }

    #[test]
    fn a_host_network_pod_shares_the_node_netns_and_has_no_hostname() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt.block_on(async { Endpoint::from_static("http://[::]:1").connect_lazy() });
        let client = CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            config: CriConfig::socket("/x.sock"),
        };
        let ordinary = client.sandbox_config(&PodSpec::new("web"));
        let security = ordinary.linux.unwrap().security_context.unwrap();
        assert_eq!(
            security.namespace_options.unwrap().network,
            api::NamespaceMode::Pod as i32
        );
        assert!(!security.privileged);
        assert_eq!(ordinary.hostname, "web");

        let daemon = client.sandbox_config(&PodSpec::new("fleet-nri").host_network().privileged());
        // runc cannot set a hostname in the node's UTS namespace (a kubelet leaves it empty).
        assert_eq!(daemon.hostname, "");
        let security = daemon.linux.unwrap().security_context.unwrap();
        assert_eq!(
            security.namespace_options.unwrap().network,
            api::NamespaceMode::Node as i32
        );
        assert!(security.privileged);
    }
}

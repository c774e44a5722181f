//! The NRI `Plugin` ttrpc service: what the runtime calls on us. Turns each request into an
//! [`NriHandler`] call and answers within the runtime's request timeout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_proto::nri::api::{self, Event};
use fleet_proto::nri::api_ttrpc;
use ttrpc::r#async::TtrpcContext;

use super::NriStatus;
use super::convert::{adjustment, container_info, pod_info};
use super::handler::NriHandler;

/// How long a request waits for the handler. The runtime's default request timeout is 2 s;
/// past this we answer anyway (events) or fail the request (container creation).
const HANDLER_TIMEOUT: Duration = Duration::from_millis(1500);

/// The events we subscribe to in `Configure`.
pub const SUBSCRIBED_EVENTS: [Event; 4] = [
    Event::RUN_POD_SANDBOX,
    Event::STOP_POD_SANDBOX,
    Event::REMOVE_POD_SANDBOX,
    Event::CREATE_CONTAINER,
];

/// NRI's event mask: bit `event - 1` for every subscribed event.
pub fn event_mask(events: &[Event]) -> i32 {
    events.iter().fold(0, |mask, e| mask | 1 << (*e as i32 - 1))
}

/// Reassembles split synchronization: a runtime with many pods sends several
/// `SynchronizeRequest`s, all but the last with `more = true`.
#[derive(Debug, Default)]
pub struct SyncAssembler {
    pods: Vec<api::PodSandbox>,
    containers: Vec<api::Container>,
}

impl SyncAssembler {
    /// Adds one part; returns everything collected once the last part arrived.
    pub fn push(
        &mut self,
        req: api::SynchronizeRequest,
    ) -> Option<(Vec<api::PodSandbox>, Vec<api::Container>)> {
        self.pods.extend(req.pods);
        self.containers.extend(req.containers);
        if req.more {
            None
        } else {
            Some((
                std::mem::take(&mut self.pods),
                std::mem::take(&mut self.containers),
            ))
        }
    }
}

/// One connection's Plugin service. A new one per connection, so no partial synchronization
/// survives a reconnect.
pub struct PluginService {
    handler: Arc<dyn NriHandler>,
    status: NriStatus,
    sync: Mutex<SyncAssembler>,
}

impl PluginService {
    pub fn new(handler: Arc<dyn NriHandler>, status: NriStatus) -> Self {
        Self {
            handler,
            status,
            sync: Mutex::new(SyncAssembler::default()),
        }
    }

    /// Runs a handler call as its own task so that a slow handler is not cancelled by our
    /// reply deadline; `None` if it did not finish in time or panicked.
    async fn call<T, F>(&self, what: &'static str, id: &str, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let task = tokio::spawn(work);
        match tokio::time::timeout(HANDLER_TIMEOUT, task).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::error!(event = what, id, error = %e, "NRI handler failed");
                None
            }
            Err(_) => {
                tracing::warn!(
                    event = what,
                    id,
                    timeout_ms = HANDLER_TIMEOUT.as_millis() as u64,
                    "NRI handler is slow; answering the runtime without waiting"
                );
                None
            }
        }
    }

    async fn pod_event(&self, event: Event, pod: &api::PodSandbox) {
        let pod = pod_info(pod);
        let id = pod.id.clone();
        let handler = self.handler.clone();
        tracing::debug!(event = ?event, pod_id = %id, pod = %pod.name, netns = ?pod.netns, "NRI pod event");
        match event {
            Event::RUN_POD_SANDBOX => {
                self.call("RunPodSandbox", &id, async move {
                    handler.pod_started(pod).await
                })
                .await;
            }
            Event::STOP_POD_SANDBOX => {
                self.call("StopPodSandbox", &id, async move {
                    handler.pod_stopped(pod).await
                })
                .await;
            }
            Event::REMOVE_POD_SANDBOX => {
                self.call("RemovePodSandbox", &id, async move {
                    handler.pod_removed(pod).await
                })
                .await;
            }
            _ => {}
        }
    }
}

#[async_trait::async_trait]
impl api_ttrpc::Plugin for PluginService {
    async fn configure(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConfigureRequest,
    ) -> ttrpc::Result<api::ConfigureResponse> {
        tracing::info!(
            runtime = %req.runtime_name,
            runtime_version = %req.runtime_version,
            registration_timeout_ms = req.registration_timeout,
            request_timeout_ms = req.request_timeout,
            "NRI runtime configured the plugin"
        );
        Ok(api::ConfigureResponse {
            events: event_mask(&SUBSCRIBED_EVENTS),
            ..Default::default()
        })
    }

    async fn synchronize(
        &self,
        _ctx: &TtrpcContext,
        req: api::SynchronizeRequest,
    ) -> ttrpc::Result<api::SynchronizeResponse> {
        let more = req.more;
        tracing::debug!(
            pods = req.pods.len(),
            containers = req.containers.len(),
            more,
            "NRI synchronize part"
        );
        let complete = self.sync.lock().expect("sync assembler lock").push(req);
        if let Some((pods, containers)) = complete {
            let pods: Vec<_> = pods.iter().map(pod_info).collect();
            let containers: Vec<_> = containers.iter().map(container_info).collect();
            tracing::info!(
                pods = pods.len(),
                containers = containers.len(),
                "NRI synchronized"
            );
            let handler = self.handler.clone();
            self.call("Synchronize", "", async move {
                handler.synchronize(pods, containers).await
            })
            .await;
        }
        // Echoing `more` tells a newer runtime we understand split synchronization.
        Ok(api::SynchronizeResponse {
            more,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::Empty) -> ttrpc::Result<api::Empty> {
        tracing::info!("NRI runtime is shutting down");
        self.status.set_unregistered();
        Ok(api::Empty::default())
    }

    async fn run_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::RunPodSandboxRequest,
    ) -> ttrpc::Result<api::RunPodSandboxResponse> {
        self.pod_event(Event::RUN_POD_SANDBOX, req.pod.get_or_default())
            .await;
        Ok(Default::default())
    }

    async fn stop_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::StopPodSandboxRequest,
    ) -> ttrpc::Result<api::StopPodSandboxResponse> {
        self.pod_event(Event::STOP_POD_SANDBOX, req.pod.get_or_default())
            .await;
        Ok(Default::default())
    }

    async fn remove_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::RemovePodSandboxRequest,
    ) -> ttrpc::Result<api::RemovePodSandboxResponse> {
        self.pod_event(Event::REMOVE_POD_SANDBOX, req.pod.get_or_default())
            .await;
        Ok(Default::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateContainerRequest,
    ) -> ttrpc::Result<api::CreateContainerResponse> {
        let pod = pod_info(req.pod.get_or_default());
        let container = container_info(req.container.get_or_default());
        let id = container.id.clone();
        tracing::debug!(container_id = %id, pod_id = %pod.id, container = %container.name, "NRI create container");
        let handler = self.handler.clone();
        let adjust = self
            .call("CreateContainer", &id, async move {
                handler.create_container(pod, container).await
            })
            .await
            .ok_or_else(|| {
                ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::DEADLINE_EXCEEDED,
                    format!("fleet-nri could not compute the adjustment of container {id} in time"),
                ))
            })?;
        Ok(api::CreateContainerResponse {
            adjust: protobuf::MessageField::some(adjustment(adjust)),
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateContainerRequest,
    ) -> ttrpc::Result<api::UpdateContainerResponse> {
        Ok(Default::default())
    }

    async fn stop_container(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StopContainerRequest,
    ) -> ttrpc::Result<api::StopContainerResponse> {
        Ok(Default::default())
    }

    async fn state_change(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateChangeEvent,
    ) -> ttrpc::Result<api::Empty> {
        // NRI v0.6 (containerd 1.7) relays pod events only through StateChange.
        match req.event.enum_value() {
            Ok(
                event @ (Event::RUN_POD_SANDBOX
                | Event::STOP_POD_SANDBOX
                | Event::REMOVE_POD_SANDBOX),
            ) => self.pod_event(event, req.pod.get_or_default()).await,
            other => tracing::debug!(event = ?other, "NRI state change ignored"),
        }
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nri::handler::{ContainerAdjust, ContainerInfo, PodSandboxInfo};
    use api_ttrpc::Plugin as _;

    fn pod(id: &str) -> api::PodSandbox {
        api::PodSandbox {
            id: id.into(),
            ..Default::default()
        }
    }

    fn part(pods: &[&str], more: bool) -> api::SynchronizeRequest {
        api::SynchronizeRequest {
            pods: pods.iter().map(|p| pod(p)).collect(),
            containers: pods
                .iter()
                .map(|p| api::Container {
                    id: format!("{p}-c"),
                    pod_sandbox_id: p.to_string(),
                    ..Default::default()
                })
                .collect(),
            more,
            ..Default::default()
        }
    }

    #[test]
    fn event_mask_matches_nri_bit_layout() {
        // RUN=1 -> bit 0, STOP=2 -> bit 1, REMOVE=3 -> bit 2, CREATE_CONTAINER=4 -> bit 3.
        assert_eq!(event_mask(&SUBSCRIBED_EVENTS), 0b1111);
        assert_eq!(event_mask(&[Event::STOP_CONTAINER]), 1 << 9);
    }

    #[test]
    fn split_synchronization_is_reassembled() {
        let mut s = SyncAssembler::default();
        assert!(s.push(part(&["a", "b"], true)).is_none());
        assert!(s.push(part(&["c"], true)).is_none());
        let (pods, containers) = s.push(part(&["d"], false)).expect("last part completes");
        let ids: Vec<_> = pods.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(containers.len(), 4);
        // The assembler starts over for the next synchronization.
        let (pods, _) = s.push(part(&["e"], false)).unwrap();
        assert_eq!(pods.len(), 1);
    }

    #[derive(Default)]
    struct Recorder {
        syncs: Mutex<Vec<(Vec<PodSandboxInfo>, Vec<ContainerInfo>)>>,
        events: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl NriHandler for Recorder {
        async fn synchronize(&self, pods: Vec<PodSandboxInfo>, containers: Vec<ContainerInfo>) {
            self.syncs.lock().unwrap().push((pods, containers));
        }
        async fn pod_started(&self, pod: PodSandboxInfo) {
            self.events
                .lock()
                .unwrap()
                .push(format!("started {}", pod.id));
        }
        async fn pod_stopped(&self, pod: PodSandboxInfo) {
            self.events
                .lock()
                .unwrap()
                .push(format!("stopped {}", pod.id));
        }
        async fn pod_removed(&self, pod: PodSandboxInfo) {
            self.events
                .lock()
                .unwrap()
                .push(format!("removed {}", pod.id));
        }
        async fn create_container(&self, pod: PodSandboxInfo, c: ContainerInfo) -> ContainerAdjust {
            ContainerAdjust {
                env: vec![("POD".into(), pod.id), ("NAME".into(), c.name)],
                ..Default::default()
            }
        }
    }

    /// The ttrpc service methods reach the handler without a socket; the wire path is covered
    /// by tests/nri_transport.rs against containerd.
    fn ctx() -> TtrpcContext {
        TtrpcContext {
            mh: Default::default(),
            metadata: Default::default(),
            timeout_nano: 0,
            connection_data: Default::default(),
        }
    }

    #[tokio::test]
    async fn service_reassembles_sync_and_echoes_more() {
        let rec = Arc::new(Recorder::default());
        let svc = PluginService::new(rec.clone(), NriStatus::default());
        let r = svc.synchronize(&ctx(), part(&["a"], true)).await.unwrap();
        assert!(r.more);
        assert!(
            rec.syncs.lock().unwrap().is_empty(),
            "handler called before the last part"
        );
        let r = svc.synchronize(&ctx(), part(&["b"], false)).await.unwrap();
        assert!(!r.more);
        let syncs = rec.syncs.lock().unwrap();
        assert_eq!(syncs.len(), 1);
        let ids: Vec<_> = syncs[0].0.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(syncs[0].1[1].pod_sandbox_id, "b");
    }

    #[tokio::test]
    async fn state_change_and_dedicated_rpcs_reach_the_handler() {
        let rec = Arc::new(Recorder::default());
        let svc = PluginService::new(rec.clone(), NriStatus::default());
        for (event, id) in [
            (Event::RUN_POD_SANDBOX, "p1"),
            (Event::STOP_POD_SANDBOX, "p1"),
            (Event::REMOVE_POD_SANDBOX, "p1"),
            (Event::START_CONTAINER, "ignored"),
        ] {
            let req = api::StateChangeEvent {
                event: event.into(),
                pod: protobuf::MessageField::some(pod(id)),
                ..Default::default()
            };
            svc.state_change(&ctx(), req).await.unwrap();
        }
        let req = api::RunPodSandboxRequest {
            pod: protobuf::MessageField::some(pod("p2")),
            ..Default::default()
        };
        svc.run_pod_sandbox(&ctx(), req).await.unwrap();
        assert_eq!(
            *rec.events.lock().unwrap(),
            ["started p1", "stopped p1", "removed p1", "started p2"]
        );
        // An event number from a newer NRI than ours is ignored, not an error.
        let req = api::StateChangeEvent {
            event: protobuf::EnumOrUnknown::from_i32(14),
            ..Default::default()
        };
        svc.state_change(&ctx(), req).await.unwrap();
    }

    #[tokio::test]
    async fn create_container_returns_the_handler_adjustment() {
        let svc = PluginService::new(Arc::new(Recorder::default()), NriStatus::default());
        let req = api::CreateContainerRequest {
            pod: protobuf::MessageField::some(pod("p1")),
            container: protobuf::MessageField::some(api::Container {
                id: "c1".into(),
                name: "app".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = svc.create_container(&ctx(), req).await.unwrap();
        let env: Vec<_> = resp
            .adjust
            .env
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        assert_eq!(env, ["POD=p1", "NAME=app"]);
    }

    #[tokio::test]
    async fn configure_subscribes_to_pod_events_and_container_creation() {
        let svc = PluginService::new(Arc::new(Recorder::default()), NriStatus::default());
        let resp = svc.configure(&ctx(), Default::default()).await.unwrap();
        assert_eq!(resp.events, 0b1111);
    }
}

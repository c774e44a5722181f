//! One connection to the runtime: mux, serve the Plugin service, register, then wait until
//! the runtime goes away or we are told to stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fleet_proto::nri::{api, api_ttrpc};
use futures::StreamExt as _;
use tokio::net::UnixStream;
use tokio::sync::watch;
use ttrpc::r#async::transport::{Listener, Socket};
use ttrpc::r#async::{Client, Server};

use super::plugin::PluginService;
use super::{NriConfig, NriHandler, NriStatus, mux};

/// Upper bound for connecting to the socket (a wedged runtime must not hang us).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound for the RegisterPlugin call. containerd answers it at once; Configure and
/// Synchronize follow as calls on our side.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns `Ok` when the runtime closed the connection cleanly or on shutdown, an error when
/// connecting, registering or the connection failed.
pub async fn serve(
    cfg: &NriConfig,
    handler: Arc<dyn NriHandler>,
    status: &NriStatus,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&cfg.socket))
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out after {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to NRI socket {}", cfg.socket.display()))?;
    tracing::debug!(socket = %cfg.socket.display(), "NRI socket connected");

    let mut mux = mux::spawn(stream);
    let plugin_conn = mux
        .plugin
        .take()
        .expect("fresh mux has the plugin connection");
    let runtime_conn = mux
        .runtime
        .take()
        .expect("fresh mux has the runtime connection");

    // Serve connection 1 before registering: the runtime calls Configure right after.
    // The listener yields the one connection, then stays open (an ended listener would make
    // ttrpc's accept loop exit); dropping the server closes it.
    let listener = Listener::new(
        futures::stream::once(async move { Ok(plugin_conn) }).chain(futures::stream::pending()),
    );
    let service = Arc::new(PluginService::new(handler, status.clone()));
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(api_ttrpc::create_plugin(service));
    server
        .start()
        .await
        .context("starting the NRI plugin service")?;

    let runtime = api_ttrpc::RuntimeClient::new(Client::new(Socket::new(runtime_conn)));
    let req = api::RegisterPluginRequest {
        plugin_name: cfg.plugin_name.clone(),
        plugin_idx: cfg.plugin_idx.clone(),
        ..Default::default()
    };
    let ctx = ttrpc::context::with_timeout(REGISTER_TIMEOUT.as_nanos() as i64);
    tokio::select! {
        r = runtime.register_plugin(ctx, &req) => {
            r.map_err(|e| anyhow::anyhow!("RegisterPlugin {} (index {}) failed: {e}", cfg.plugin_name, cfg.plugin_idx))?;
        }
        r = mux.closed() => {
            r.context("NRI connection failed before registration")?;
            anyhow::bail!("runtime closed the NRI connection before registration");
        }
        _ = shutdown.changed() => return Ok(()),
    }
    status.set_registered();
    tracing::info!(
        plugin = %cfg.plugin_name,
        idx = %cfg.plugin_idx,
        registrations = status.registrations(),
        "NRI plugin registered"
    );

    let ended = tokio::select! {
        r = mux.closed() => r,
        _ = shutdown.changed() => Ok(()),
    };
    status.set_unregistered();
    // Dropping the mux closes the socket; the ttrpc server and client end on end-of-stream.
    drop(mux);
    drop(runtime);
    drop(server);
    match ended {
        Ok(()) => {
            tracing::info!("NRI connection closed");
            Ok(())
        }
        Err(e) => Err(e).context("NRI connection failed"),
    }
}

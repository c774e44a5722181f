//! The node API server: one JSON request line in, one JSON reply line out, per connection.
//! The protocol is `fleet_proto::node`; `docs/node-api.md` documents it. One implementation,
//! two listeners: the root-only unix socket (fleet-cni, a controller on this node) and,
//! with `--node-api-listen`, TCP with mutual TLS (`fleet_core::node_tls`) for a controller on
//! another node.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleet_proto::node::{NodeError, NodeRequest, code};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

use crate::metrics::{OpLabels, RequestLabels, ok_or_error};
use crate::node::{Node, reply_line};

/// A request larger than this is refused: no legitimate one comes near it.
const MAX_REQUEST: u64 = 1 << 20;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket (replacing a stale one from an earlier run), root-only from its first
/// instant whatever the umask: bound in a private staging directory, 0600, then renamed into
/// place (see `fleet_core::private_socket`).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("another fleet-nri already serves {}", path.display());
    }
    let listener = fleet_core::private_socket::bind_private(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

pub async fn serve(
    listener: UnixListener,
    node: Arc<Node>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &node).await {
                            tracing::debug!(error = %e, "node API connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Serves the node API on `listener` to clients that complete the mutual-TLS handshake
/// (`tls`: `fleet_core::node_tls::server_config`); a client without a certificate the node-API
/// CA signed for `clientAuth` never gets to send a request.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    node: Arc<Node>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let node = node.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let stream = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, error = %e, "node API: TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::warn!(%peer, "node API: no TLS handshake within the read timeout");
                                return;
                            }
                        };
                        if let Err(e) = handle(stream, &node).await {
                            tracing::debug!(%peer, error = %e, "node API connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node API (TCP) accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S, node: &Node) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Err(_) => error_line(
            code::DECODE_FAILURE,
            "no request within the read timeout",
            "",
        ),
        Ok(Err(e)) => error_line(code::IO_FAILURE, "cannot read the request", &e.to_string()),
        Ok(Ok(_)) if !line.ends_with('\n') => error_line(
            code::DECODE_FAILURE,
            "request is not one newline-terminated JSON line (or exceeds 1 MiB)",
            "",
        ),
        Ok(Ok(_)) => match serde_json::from_str::<NodeRequest>(&line) {
            Err(e) => error_line(
                code::DECODE_FAILURE,
                "cannot decode the node API request",
                &e.to_string(),
            ),
            Ok(req) => {
                let op = op_name(&req);
                let started = std::time::Instant::now();
                let reply = node.dispatch(req).await;
                let m = node.metrics();
                m.request_duration
                    .get_or_create(&OpLabels { op })
                    .observe(started.elapsed().as_secs_f64());
                m.requests
                    .get_or_create(&RequestLabels {
                        op,
                        result: ok_or_error(!reply.starts_with("{\"error\"")),
                    })
                    .inc();
                reply
            }
        },
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

/// The op's name on the wire, for the metrics' `op` label.
fn op_name(req: &NodeRequest) -> &'static str {
    match req {
        NodeRequest::Attach(_) => "attach",
        NodeRequest::Detach(_) => "detach",
        NodeRequest::Check(_) => "check",
        NodeRequest::Gc(_) => "gc",
        NodeRequest::Status => "status",
        NodeRequest::ListAttachments => "list_attachments",
        NodeRequest::SetPlan(_) => "set_plan",
        NodeRequest::GetPlan => "get_plan",
        NodeRequest::SetPeers(_) => "set_peers",
        NodeRequest::ListPeers => "list_peers",
        NodeRequest::SetGateway(_) => "set_gateway",
        NodeRequest::GatewayStatus => "gateway_status",
        NodeRequest::GatewayKey => "gateway_key",
        NodeRequest::ClearGateway => "clear_gateway",
        NodeRequest::SetServices(_) => "set_services",
        NodeRequest::ListServices => "list_services",
    }
}

fn error_line(code: u32, msg: &str, details: &str) -> String {
    reply_line::<(), _>(Err(NodeError::new(code, msg, details)))
}

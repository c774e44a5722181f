//! The node API server: one JSON request line in, one JSON reply line out, per connection.
//! The protocol is `fleet_proto::node`; `docs/node-api.md` documents it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleet_proto::node::{NodeError, NodeRequest, code};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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

async fn handle(stream: UnixStream, node: &Node) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
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
            Ok(req) => node.dispatch(req).await,
        },
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

fn error_line(code: u32, msg: &str, details: &str) -> String {
    reply_line::<(), _>(Err(NodeError::new(code, msg, details)))
}

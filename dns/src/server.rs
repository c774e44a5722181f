//! The thin server: a UDP loop and a TCP listener that hand every message to the
//! [`handler`](crate::handler) with the table current at that moment. The table arrives over a
//! `watch` channel (a whole new `Arc<DnsTable>` per change); the loops stop when the stop
//! signal turns `true` or its sender goes away.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::handler::{self, DEFAULT_UDP_PAYLOAD};
use crate::metrics::DnsMetrics;
use crate::table::DnsTable;

/// Limits of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The largest UDP reply, and the EDNS payload size we advertise.
    pub max_udp_payload: u16,
    /// A TCP connection idle this long (or a reply that cannot be written in it) is closed.
    pub tcp_idle_timeout: Duration,
    /// TCP connections served at once; more are closed on accept.
    pub max_tcp_connections: usize,
    /// Where every answered query is counted (`/metrics`).
    pub metrics: DnsMetrics,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_udp_payload: DEFAULT_UDP_PAYLOAD,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 128,
            metrics: DnsMetrics::default(),
        }
    }
}

/// Serves DNS on `udp` and `tcp` until `stop` turns true (or its sender is dropped).
///
/// Errors: only if accepting on the TCP listener fails for good; single bad packets, peers
/// and connections are logged and skipped.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    tables: watch::Receiver<Arc<DnsTable>>,
    config: ServerConfig,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let udp = serve_udp(udp, tables.clone(), config.clone(), stop.clone());
    let tcp = serve_tcp(tcp, tables, config, stop);
    let (udp, tcp) = tokio::join!(udp, tcp);
    udp.and(tcp)
}

/// The UDP loop: one datagram in, at most one out.
pub async fn serve_udp(
    socket: UdpSocket,
    mut tables: watch::Receiver<Arc<DnsTable>>,
    config: ServerConfig,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 65535];
    let mut reply = Vec::with_capacity(usize::from(config.max_udp_payload));
    let max_udp = usize::from(config.max_udp_payload);
    let mut table = tables.borrow_and_update().clone();
    loop {
        let (len, peer) = tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                // e.g. ICMP errors surfacing on the socket: the next datagram is fine.
                Err(error) => {
                    tracing::debug!(%error, "DNS UDP receive failed");
                    continue;
                }
            },
        };
        let started = Instant::now();
        // A new table is picked up at the next datagram (checking is one atomic load).
        if tables.has_changed().unwrap_or(false) {
            table = tables.borrow_and_update().clone();
        }
        let answered = handler::answer_into(&table, &buf[..len], Some(max_udp), &mut reply);
        config.metrics.query(
            &buf[..len],
            answered.then_some(reply.as_slice()),
            started.elapsed(),
        );
        if answered && let Err(error) = socket.send_to(&reply, peer).await {
            tracing::debug!(%error, %peer, "DNS UDP reply not sent");
        }
    }
}

/// The TCP listener: each connection carries 2-byte length-prefixed messages (RFC 7766).
pub async fn serve_tcp(
    listener: TcpListener,
    tables: watch::Receiver<Arc<DnsTable>>,
    config: ServerConfig,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_tcp_connections));
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: keep serving what is open.
                Err(error) => {
                    tracing::warn!(%error, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, limit = config.max_tcp_connections, "DNS TCP connection refused: too many open");
            continue;
        };
        let tables = tables.clone();
        let timeout = config.tcp_idle_timeout;
        let metrics = config.metrics.clone();
        connections.spawn(async move {
            if let Err(error) = serve_connection(stream, peer, tables, timeout, metrics).await {
                tracing::debug!(%error, %peer, "DNS TCP connection closed");
            }
            drop(slot);
        });
    }
    connections.shutdown().await;
    Ok(())
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    tables: watch::Receiver<Arc<DnsTable>>,
    timeout: Duration,
    metrics: DnsMetrics,
) -> io::Result<()> {
    let mut buf = vec![0u8; handler::MAX_TCP_MESSAGE];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(timeout, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(result) => result?,
        };
        let len = usize::from(u16::from_be_bytes(len));
        let message = &mut buf[..len];
        tokio::time::timeout(timeout, stream.read_exact(message))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "message body not received in time")
            })??;
        let started = Instant::now();
        let table = tables.borrow().clone();
        let reply = handler::answer_tcp(&table, message);
        metrics.query(message, reply.as_deref(), started.elapsed());
        let Some(reply) = reply else {
            tracing::debug!(%peer, "DNS TCP message without a reply; closing");
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        tokio::time::timeout(timeout, stream.write_all(&framed))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply not written in time"))??;
    }
}

/// Resolves once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // Only the outcome matters; the borrow guard must not live across an await.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

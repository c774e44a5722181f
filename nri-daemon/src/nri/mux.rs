//! The NRI connection multiplexer: one unix stream to the runtime ("trunk") carries several
//! logical byte streams. Each frame is an 8-byte big-endian header (connection id, payload
//! length) followed by the payload. Connection 1 carries the Plugin service (we serve ttrpc),
//! connection 2 the Runtime service (we are the ttrpc client).
//!
//! [`spawn`] hands each logical connection to ttrpc as one end of a `tokio::io::duplex` pipe.
//! Frame boundaries carry no meaning for ttrpc, but the Go runtime delivers each frame as one
//! `Read`, so frames we write stay within [`MAX_WRITE_PAYLOAD`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Length of a frame header: connection id (u32 BE) and payload length (u32 BE).
pub const HEADER_LEN: usize = 8;
/// Largest payload we put in one frame; the Go reader side reads into 4 KiB buffers.
pub const MAX_WRITE_PAYLOAD: usize = 4096;
/// Largest payload we accept: a ttrpc header (10 bytes) plus ttrpc's maximum message (4 MiB),
/// the same bound the Go multiplexer enforces on its writes. Anything larger is garbage.
pub const MAX_READ_PAYLOAD: usize = 10 + (4 << 20);
/// Connection carrying the Plugin service (the runtime calls us).
pub const PLUGIN_CONN: u32 = 1;
/// Connection carrying the Runtime service (we call the runtime).
pub const RUNTIME_CONN: u32 = 2;

/// Buffer of each in-process pipe between the mux and ttrpc.
const PIPE_BUFFER: usize = 256 * 1024;

/// Why the multiplexed connection ended.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("NRI connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "NRI peer sent a frame for connection {conn} with a {len}-byte payload (limit {MAX_READ_PAYLOAD}); treating the stream as garbage"
    )]
    Oversized { conn: u32, len: usize },
    #[error("NRI peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("the local ttrpc side of NRI connection {conn} closed (protocol error on it)")]
    LocalClosed { conn: u32 },
}

/// Appends `data` to `out` as frames for `conn`, none with more than [`MAX_WRITE_PAYLOAD`]
/// bytes of payload. Empty data produces no frame.
pub fn encode_frames(conn: u32, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_WRITE_PAYLOAD) {
        out.extend_from_slice(&conn.to_be_bytes());
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(u32, Vec<u8>)>, MuxError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(MuxError::Truncated)
            };
        }
        got += n;
    }
    let conn = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    if len > MAX_READ_PAYLOAD {
        return Err(MuxError::Oversized { conn, len });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            MuxError::Truncated
        } else {
            MuxError::Io(e)
        }
    })?;
    Ok(Some((conn, payload)))
}

/// A running multiplexer. Dropping it stops the mux task and closes the trunk, which ends
/// both logical connections (ttrpc sees end of stream).
pub struct Mux {
    /// Connection 1 (Plugin service): give to the ttrpc server.
    pub plugin: Option<DuplexStream>,
    /// Connection 2 (Runtime service): give to the ttrpc client.
    pub runtime: Option<DuplexStream>,
    task: JoinHandle<Result<(), MuxError>>,
}

impl Mux {
    /// Resolves when the trunk ends: `Ok` on a clean end of stream from the runtime, an error
    /// on I/O failure or garbage. Cancel-safe.
    pub fn closed(&mut self) -> impl Future<Output = Result<(), MuxError>> + '_ {
        Closed(&mut self.task)
    }
}

struct Closed<'a>(&'a mut JoinHandle<Result<(), MuxError>>);

impl Future for Closed<'_> {
    type Output = Result<(), MuxError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut *self.0).poll(cx).map(|joined| match joined {
            Ok(result) => result,
            Err(e) => Err(MuxError::Io(std::io::Error::other(format!(
                "NRI mux task ended abnormally: {e}"
            )))),
        })
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts multiplexing `trunk` into the Plugin and Runtime connections.
pub fn spawn<S>(trunk: S) -> Mux
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (plugin_user, plugin_mux) = tokio::io::duplex(PIPE_BUFFER);
    let (runtime_user, runtime_mux) = tokio::io::duplex(PIPE_BUFFER);
    let task = tokio::spawn(run_mux(trunk, plugin_mux, runtime_mux));
    Mux {
        plugin: Some(plugin_user),
        runtime: Some(runtime_user),
        task,
    }
}

async fn run_mux<S>(trunk: S, plugin: DuplexStream, runtime: DuplexStream) -> Result<(), MuxError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut trunk_rd, trunk_wr) = tokio::io::split(trunk);
    let trunk_wr = Arc::new(Mutex::new(trunk_wr));
    let (plugin_rd, mut plugin_wr) = tokio::io::split(plugin);
    let (runtime_rd, mut runtime_wr) = tokio::io::split(runtime);

    let demux = async {
        while let Some((conn, payload)) = read_frame(&mut trunk_rd).await? {
            let pipe = match conn {
                PLUGIN_CONN => &mut plugin_wr,
                RUNTIME_CONN => &mut runtime_wr,
                _ => {
                    // The Go mux drops frames for connections nobody opened; so do we.
                    tracing::debug!(
                        conn,
                        len = payload.len(),
                        "NRI frame for unknown connection dropped"
                    );
                    continue;
                }
            };
            if pipe.write_all(&payload).await.is_err() {
                return Err(MuxError::LocalClosed { conn });
            }
        }
        tracing::debug!("NRI runtime closed the connection");
        Ok::<(), MuxError>(())
    };

    tokio::select! {
        r = demux => r,
        r = pump(PLUGIN_CONN, plugin_rd, trunk_wr.clone()) => r,
        r = pump(RUNTIME_CONN, runtime_rd, trunk_wr.clone()) => r,
    }
}

/// Copies what ttrpc writes on one logical connection into frames on the trunk. Returns on a
/// trunk write error, or when ttrpc closes its end: ttrpc only does that after a protocol
/// error, and a session with one dead connection must be replaced, not kept.
async fn pump<R, W>(conn: u32, mut from: R, trunk: Arc<Mutex<WriteHalf<W>>>) -> Result<(), MuxError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite,
{
    let mut buf = vec![0u8; MAX_WRITE_PAYLOAD];
    let mut frame = Vec::with_capacity(HEADER_LEN + MAX_WRITE_PAYLOAD);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return Err(MuxError::LocalClosed { conn }),
            Ok(n) => n,
        };
        frame.clear();
        encode_frames(conn, &buf[..n], &mut frame);
        let mut w = trunk.lock().await;
        w.write_all(&frame).await?;
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(5);

    fn frame(conn: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = conn.to_be_bytes().to_vec();
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    async fn read_n(r: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(WAIT, r.read_exact(&mut buf))
            .await
            .expect("pipe read timed out")
            .expect("pipe read");
        buf
    }

    #[test]
    fn large_writes_are_split_into_4k_frames() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode_frames(RUNTIME_CONN, &data, &mut out);
        let mut rest = &out[..];
        let mut payloads = Vec::new();
        while !rest.is_empty() {
            assert_eq!(&rest[0..4], &RUNTIME_CONN.to_be_bytes());
            let len = u32::from_be_bytes(rest[4..8].try_into().unwrap()) as usize;
            assert!(len <= MAX_WRITE_PAYLOAD);
            payloads.push(rest[8..8 + len].to_vec());
            rest = &rest[8 + len..];
        }
        assert_eq!(
            payloads.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![4096, 4096, 1808]
        );
        assert_eq!(payloads.concat(), data);
    }

    #[test]
    fn empty_write_produces_no_frame() {
        let mut out = Vec::new();
        encode_frames(PLUGIN_CONN, &[], &mut out);
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn read_frame_rejects_oversized_and_truncated_frames() {
        let mut garbage = &[0xffu8, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff][..];
        assert!(matches!(
            read_frame(&mut garbage).await,
            Err(MuxError::Oversized { conn: u32::MAX, .. })
        ));
        let mut short_header = &[0u8, 0, 0, 1, 0][..];
        assert!(matches!(
            read_frame(&mut short_header).await,
            Err(MuxError::Truncated)
        ));
        let f = frame(1, b"hello");
        let mut short_payload = &f[..f.len() - 1];
        assert!(matches!(
            read_frame(&mut short_payload).await,
            Err(MuxError::Truncated)
        ));
        let mut empty = &[][..];
        assert!(read_frame(&mut empty).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn interleaved_frames_reach_their_connections_and_unknown_ids_are_dropped() {
        let (mut runtime_side, trunk) = tokio::io::duplex(1 << 20);
        let mut mux = spawn(trunk);
        let mut plugin = mux.plugin.take().unwrap();
        let mut runtime = mux.runtime.take().unwrap();

        let mut wire = Vec::new();
        wire.extend(frame(PLUGIN_CONN, b"p1-"));
        wire.extend(frame(RUNTIME_CONN, b"r1-"));
        wire.extend(frame(7, b"nobody listens here"));
        wire.extend(frame(0, b"reserved"));
        wire.extend(frame(PLUGIN_CONN, b"p2"));
        wire.extend(frame(RUNTIME_CONN, b"r2"));
        wire.extend(frame(PLUGIN_CONN, b""));
        runtime_side.write_all(&wire).await.unwrap();

        assert_eq!(read_n(&mut plugin, 5).await, b"p1-p2");
        assert_eq!(read_n(&mut runtime, 5).await, b"r1-r2");

        // And the other direction: a large write on conn 2 comes out as ≤4 KiB frames.
        let big = vec![0x5au8; 9000];
        runtime.write_all(&big).await.unwrap();
        let mut got = Vec::new();
        while got.len() < big.len() {
            let (conn, payload) = tokio::time::timeout(WAIT, read_frame(&mut runtime_side))
                .await
                .expect("frame timed out")
                .unwrap()
                .expect("frame");
            assert_eq!(conn, RUNTIME_CONN);
            assert!(payload.len() <= MAX_WRITE_PAYLOAD);
            got.extend(payload);
        }
        assert_eq!(got, big);
        plugin.write_all(b"pong").await.unwrap();
        let (conn, payload) = tokio::time::timeout(WAIT, read_frame(&mut runtime_side))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((conn, payload.as_slice()), (PLUGIN_CONN, &b"pong"[..]));
    }

    #[tokio::test]
    async fn eof_from_runtime_ends_the_mux_and_both_connections() {
        let (runtime_side, trunk) = tokio::io::duplex(4096);
        let mut mux = spawn(trunk);
        let mut plugin = mux.plugin.take().unwrap();
        drop(runtime_side);
        tokio::time::timeout(WAIT, mux.closed())
            .await
            .expect("mux did not notice EOF")
            .expect("clean EOF");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(WAIT, plugin.read(&mut buf))
            .await
            .expect("plugin pipe did not end")
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn closing_a_local_connection_ends_the_mux() {
        let (_runtime_side, trunk) = tokio::io::duplex(4096);
        let mut mux = spawn(trunk);
        drop(mux.runtime.take());
        let r = tokio::time::timeout(WAIT, mux.closed())
            .await
            .expect("mux hung");
        assert!(
            matches!(r, Err(MuxError::LocalClosed { conn: RUNTIME_CONN })),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn garbage_from_runtime_ends_the_mux_with_an_error() {
        let (mut runtime_side, trunk) = tokio::io::duplex(4096);
        let mut mux = spawn(trunk);
        runtime_side
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let r = tokio::time::timeout(WAIT, mux.closed())
            .await
            .expect("mux hung");
        assert!(matches!(r, Err(MuxError::Oversized { .. })), "{r:?}");
    }
}

//! The service-discovery benchmarks' sandbox (`sd-convergence`, `sd-withdrawal`): fleet-e2e's
//! sandbox fleet with controllers and a `fleet-dns` per member, a client pod in `bb`, and a
//! probe that runs inside the client's network namespace (a thread that entered it with
//! `setns`), so a measurement costs a DNS query over UDP and a TCP connection — no process
//! spawn — and its granularity is the probe interval (10 ms).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleet_e2e::fleet::DNS_VIP;
use fleet_e2e::{Pod, SandboxFleet};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use nix::sched::{CloneFlags, setns};

/// What a name resolves to, as the pod's resolver would see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    Addresses(Vec<Ipv4Addr>),
    NxDomain,
    /// Another rcode, an empty answer, or no reply in time.
    Other(String),
}

/// Runs `f` on a thread inside the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    std::thread::spawn(move || -> Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns into the pod's netns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

/// One A query to the DNS VIP (from inside a pod's netns), 300 ms timeout.
pub fn resolve(name: &str) -> Resolved {
    let attempt = || -> Result<Resolved> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
        let id: u16 = rand_id();
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name)?, RecordType::A));
        socket.send_to(&m.to_vec()?, (Ipv4Addr::from_str(DNS_VIP)?, 53))?;
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf)?;
        let reply = Message::from_vec(&buf[..n])?;
        if reply.id != id {
            return Ok(Resolved::Other("reply to another query".into()));
        }
        Ok(match reply.metadata.response_code {
            ResponseCode::NXDomain => Resolved::NxDomain,
            ResponseCode::NoError => {
                let ips: Vec<Ipv4Addr> = reply
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    Resolved::Other("NOERROR, no address".into())
                } else {
                    Resolved::Addresses(ips)
                }
            }
            other => Resolved::Other(other.to_string()),
        })
    };
    attempt().unwrap_or_else(|e| Resolved::Other(e.to_string()))
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t ^ (t >> 16)) as u16
}

/// One HTTP/1.0 GET of `http://<ip>/` (from inside a pod's netns): the trimmed body, or why
/// not. Connect and read time out after 300 ms.
pub fn http_get(ip: Ipv4Addr) -> Result<String, String> {
    let addr = SocketAddr::from((ip, 80));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("no HTTP reply")?;
    Ok(body.trim().to_string())
}

/// Polls `check` every 10 ms inside `netns` until it returns `Some`, for at most `timeout`;
/// returns the time from `since` to that moment (`None` on timeout).
pub fn time_until<T: Send + 'static>(
    netns: &Path,
    since: Instant,
    timeout: Duration,
    check: impl Fn() -> Option<T> + Send + 'static,
) -> Result<Option<(Duration, T)>> {
    in_netns(netns, move || {
        loop {
            if let Some(v) = check() {
                return Some((since.elapsed(), v));
            }
            if since.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// The sandbox fleet with controllers (plus `controller_args`) and fleet-dns in both members,
/// and a client pod in bb.
pub struct SdFleet {
    pub client: Pod,
    pub fleet: SandboxFleet,
}

impl SdFleet {
    pub fn start(bench: &str, controller_args: &[&str]) -> Result<SdFleet> {
        let t0 = Instant::now();
        let mut fleet = SandboxFleet::standard().context("start the sandbox fleet")?;
        fleet.controller_extra_args = controller_args.iter().map(ToString::to_string).collect();
        fleet
            .start_controllers(false)
            .context("start the controllers")?;
        fleet.start_dns("aa")?;
        fleet.start_dns("bb")?;
        let client = fleet.run_pod("bb", 1, "client")?;
        println!(
            "{bench}: sandbox fleet up (hub cc + relay, aa and bb with 2 nodes each, controllers {controller_args:?}, fleet-dns) in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        Ok(SdFleet { client, fleet })
    }

    pub fn client_netns(&self) -> PathBuf {
        self.client.netns.clone()
    }

    /// A pod of `member` labelled `app=<app>` serving its name over HTTP on port 80.
    pub fn web_pod(&self, member: &str, node: usize, name: &str, app: &str) -> Result<Pod> {
        Ok(self.fleet.run_http_pod(member, node, name, app, name)?)
    }

    /// `fleetctl <args>` as `member`; fails with its output.
    pub fn fleetctl(&self, member: &str, args: &[&str]) -> Result<()> {
        let out = self.fleet.fleetctl(member, args)?;
        if !out.status.success() {
            bail!(
                "fleetctl {args:?} as {member}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

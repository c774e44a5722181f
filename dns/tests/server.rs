//! The server on 127.0.0.1 (ephemeral ports), queried over UDP and TCP with hickory-proto and
//! with `dig`: answers, TC over UDP then the full answer over TCP, table swaps, bad packets,
//! connection limits and idle timeouts, and the stop signal.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::{VIP, fleet, query, table};
use fleet_dns::{DnsConfig, DnsTable, ServerConfig, serve};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);
const WEB: &str = "web.shop.svc.clusterset.local.";
const BIG: &str = "big.shop.svc.clusterset.local.";

struct Server {
    udp: SocketAddr,
    tcp: SocketAddr,
    tables: watch::Sender<Arc<DnsTable>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(config: ServerConfig) -> Server {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(udp, tcp, config)
}

/// UDP and TCP on one port, as DNS clients expect when they retry a truncated answer over TCP.
async fn start_same_port() -> Server {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            return start_on(udp, tcp, ServerConfig::default());
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1 in 50 tries");
}

fn start_on(udp: UdpSocket, tcp: TcpListener, config: ServerConfig) -> Server {
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let (tables, tables_rx) = watch::channel(Arc::new(table()));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(serve(udp, tcp, tables_rx, config, stop_rx));
    Server {
        udp: udp_addr,
        tcp: tcp_addr,
        tables,
        stop,
        task,
    }
}

impl Server {
    async fn shutdown(self) {
        self.stop.send(true).unwrap();
        timeout(WAIT, self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

async fn udp_exchange(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (len, _) = timeout(Duration::from_millis(500), socket.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..len].to_vec())
}

async fn udp_ask(server: SocketAddr, packet: &[u8]) -> Message {
    Message::from_vec(&udp_exchange(server, packet).await.expect("a UDP reply")).unwrap()
}

async fn tcp_send(stream: &mut TcpStream, packet: &[u8]) -> Message {
    stream
        .write_all(&(packet.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(packet).await.unwrap();
    let mut len = [0u8; 2];
    timeout(WAIT, stream.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    timeout(WAIT, stream.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    Message::from_vec(&reply).unwrap()
}

fn a_records(message: &Message) -> BTreeSet<Ipv4Addr> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Waits until the peer closes `stream` (EOF or reset), failing after `WAIT`.
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1];
    let read = timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("connection closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn answers_over_udp_and_tcp_and_tc_then_tcp() {
    let server = start(ServerConfig::default()).await;
    let reply = udp_ask(server.udp, &query(WEB, RecordType::A, Some(1232))).await;
    assert_eq!(a_records(&reply), BTreeSet::from([VIP]));
    assert!(reply.authoritative);

    // Without EDNS, 60 A records do not fit in 512 bytes: TC, no answers...
    let reply = udp_ask(server.udp, &query(BIG, RecordType::A, None)).await;
    assert!(reply.truncation);
    assert!(reply.answers.is_empty());
    // ...and the same question over TCP gets all of them, twice on one connection.
    let mut stream = TcpStream::connect(server.tcp).await.unwrap();
    for _ in 0..2 {
        let reply = tcp_send(&mut stream, &query(BIG, RecordType::A, None)).await;
        assert!(!reply.truncation);
        assert_eq!(reply.answers.len(), 60);
    }
    let reply = tcp_send(&mut stream, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(reply.response_code, ResponseCode::Refused);
    drop(stream);
    server.shutdown().await;
}

#[tokio::test]
async fn keeps_serving_after_bad_packets() {
    let server = start(ServerConfig::default()).await;
    // Garbage without a header: no reply. Garbage with one: FORMERR.
    assert_eq!(udp_exchange(server.udp, &[1, 2, 3]).await, None);
    let reply = udp_exchange(
        server.udp,
        &[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c],
    )
    .await
    .unwrap();
    assert_eq!(
        Message::from_vec(&reply).unwrap().response_code,
        ResponseCode::FormErr
    );
    // TCP: a message that gets no reply (a response) closes that connection only.
    let mut stream = TcpStream::connect(server.tcp).await.unwrap();
    let mut response = query(WEB, RecordType::A, None);
    response[2] |= 0x80;
    stream
        .write_all(&(response.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&response).await.unwrap();
    assert_closed(&mut stream).await;

    let reply = udp_ask(server.udp, &query(WEB, RecordType::A, None)).await;
    assert_eq!(a_records(&reply), BTreeSet::from([VIP]));
    let mut stream = TcpStream::connect(server.tcp).await.unwrap();
    assert_eq!(
        a_records(&tcp_send(&mut stream, &query(WEB, RecordType::A, None)).await),
        BTreeSet::from([VIP])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_swapped_table_answers_the_next_query() {
    let server = start(ServerConfig::default()).await;
    let (imports, _) = fleet();
    let new_vip = Ipv4Addr::new(100, 112, 9, 9);
    let vips = [(fleet_services::ServiceKey::new("shop", "web"), new_vip)]
        .into_iter()
        .collect();
    let new = DnsTable::build(&DnsConfig::default(), &imports, &vips).unwrap();
    server.tables.send(Arc::new(new)).unwrap();
    let reply = udp_ask(server.udp, &query(WEB, RecordType::A, None)).await;
    assert_eq!(a_records(&reply), BTreeSet::from([new_vip]));

    server
        .tables
        .send(Arc::new(DnsTable::empty(&DnsConfig::default()).unwrap()))
        .unwrap();
    let reply = udp_ask(server.udp, &query(WEB, RecordType::A, None)).await;
    assert_eq!(reply.response_code, ResponseCode::NXDomain);
    server.shutdown().await;
}

#[tokio::test]
async fn tcp_connections_are_bounded_and_time_out() {
    let server = start(ServerConfig {
        max_tcp_connections: 1,
        tcp_idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut first = TcpStream::connect(server.tcp).await.unwrap();
    tcp_send(&mut first, &query(WEB, RecordType::A, None)).await;
    // The one slot is taken: a second connection is closed at once.
    let mut second = TcpStream::connect(server.tcp).await.unwrap();
    assert_closed(&mut second).await;
    // The first is closed once idle, which frees the slot.
    assert_closed(&mut first).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut third = TcpStream::connect(server.tcp).await.unwrap();
        let mut len = [0u8; 2];
        let packet = query(WEB, RecordType::A, None);
        let sent = third
            .write_all(&[&(packet.len() as u16).to_be_bytes()[..], &packet].concat())
            .await;
        if sent.is_ok()
            && timeout(WAIT, third.read_exact(&mut len))
                .await
                .is_ok_and(|r| r.is_ok())
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::task::yield_now().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn stop_ends_the_server_with_connections_open() {
    let server = start(ServerConfig::default()).await;
    let mut open = TcpStream::connect(server.tcp).await.unwrap();
    tcp_send(&mut open, &query(WEB, RecordType::A, None)).await;
    let udp = server.udp;
    server.shutdown().await;
    assert_closed(&mut open).await;
    assert_eq!(
        udp_exchange(udp, &query(WEB, RecordType::A, None)).await,
        None
    );
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let output = std::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig is needed for this test: apt-get install -y dnsutils");
    assert!(output.status.success(), "dig {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_the_same_answers() {
    let server = start_same_port().await;
    let (udp, tcp) = (server.udp, server.tcp);
    let results = tokio::task::spawn_blocking(move || {
        (
            dig(udp, &[WEB, "A", "+short"]),
            dig(tcp, &["+tcp", WEB, "A", "+short"]),
            dig(udp, &["+noedns", "+ignore", BIG, "A"]),
            // dig retries the truncated UDP answer over TCP on its own.
            dig(udp, &["+noedns", BIG, "A"]),
            dig(
                udp,
                &["_pg._tcp.db.shop.svc.clusterset.local.", "SRV", "+short"],
            ),
            dig(udp, &["dns-version.clusterset.local.", "TXT", "+short"]),
            dig(udp, &["east.db.shop.svc.clusterset.local.", "A"]),
            dig(udp, &["example.com.", "A"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(results.0.trim(), VIP.to_string());
    assert_eq!(results.1.trim(), VIP.to_string());
    assert!(
        results.2.contains("flags: qr aa tc rd;") && results.2.contains("ANSWER: 0,"),
        "{}",
        results.2
    );
    assert!(
        results.3.contains("Truncated, retrying in TCP mode"),
        "{}",
        results.3
    );
    assert!(results.3.contains("ANSWER: 60,"), "{}", results.3);
    assert_eq!(
        results.4.lines().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "0 100 5432 db-0.east.db.shop.svc.clusterset.local.",
            "0 100 5432 db-1.east.db.shop.svc.clusterset.local.",
        ])
    );
    assert_eq!(results.5.trim(), "\"1.0.0\"");
    assert!(
        results.6.contains("status: NOERROR") && results.6.contains("ANSWER: 0, AUTHORITY: 1"),
        "{}",
        results.6
    );
    assert!(results.7.contains("status: REFUSED"), "{}", results.7);
    server.shutdown().await;
}

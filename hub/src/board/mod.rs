//! The fleet board: a read-only web page the hub serves on its own TLS listener (`GET
//! /board`), drawing the fleet — clusters and their nodes, the relay, tunnels with handshake
//! age and throughput, services and where they are exported from — and kept current by
//! Server-Sent Events (`GET /board/events`) rendered from the hub's own watch of its registry
//! (one [`FleetMirror`] per replica, started by the first viewer).
//!
//! # Who may look, and how a browser shows it
//!
//! Only the admin. A browser cannot present the admin bearer credential, and the credential
//! must never travel in a URL (URLs land in shell history, proxy and browser logs). So the
//! admin *mints a login link* with its credential (`POST /v1/board/login`, what
//! `fleet-hub board-url` calls): `https://<hub>/board/login?token=<random>`, usable **once**,
//! within [`LOGIN_TTL`]. Opening it swaps the token for a session cookie
//! (`HttpOnly; Secure; SameSite=Strict; Path=/board`, [`SESSION_TTL`]): scripts cannot read it,
//! it is sent only over TLS and never with a request another site starts. The login answer
//! is a page that moves on to `/board` by itself (not a redirect: a `SameSite=Strict` cookie
//! set during a redirect chain started by another site would not be sent on its last hop).
//! The hub keeps only SHA-256s of tokens and sessions, in memory: a session belongs to the
//! replica that issued it and ends with its process.
//!
//! Every board response forbids inline scripts, framing and referrers (CSP, `no-referrer`),
//! and every text that comes from a record is escaped by [`render`]: a hostile cluster,
//! node or label name is shown, never run.

pub mod render;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use fleet_hub_api::client::HubError;
use fleet_hub_api::mirror::{FleetMirror, FleetSource, MirrorReader, WatcherConfig};
use fleet_hub_api::model::{FleetView, RegistryEvent, Revision, hex};

use crate::registry::{Registry, RegistryError};
use crate::store::StoreError;

/// The API server's response body type.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// How long a minted login link works (once).
pub const LOGIN_TTL: Duration = Duration::from_secs(60);
/// How long a board session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "fleet_board";
/// The path of the login link (the token goes in its `token` query parameter).
pub const LOGIN_PATH: &str = "/board/login";
/// The board re-renders at least this often (handshake ages move on).
const REFRESH: Duration = Duration::from_secs(2);

const SCRIPT: &str = include_str!("board.js");
const STYLE: &str = include_str!("board.css");

/// The board of one replica: its login tokens, sessions and mirror.
pub struct Board {
    registry: Registry,
    mirror: OnceLock<FleetMirror>,
    /// SHA-256 of a login token → when it stops working.
    logins: Mutex<HashMap<String, Instant>>,
    /// SHA-256 of a session cookie → when it ends.
    sessions: Mutex<HashMap<String, Instant>>,
}

fn sha256_hex(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn random_secret() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex(&bytes))
}

impl Board {
    pub fn new(registry: Registry) -> Self {
        Board {
            registry,
            mirror: OnceLock::new(),
            logins: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// A one-time login token for the board, valid for [`LOGIN_TTL`] (the admin's call).
    pub fn mint_login(&self) -> Result<String, std::io::Error> {
        let token = random_secret()?;
        let now = Instant::now();
        let mut logins = self.logins.lock().unwrap();
        logins.retain(|_, until| *until > now);
        logins.insert(sha256_hex(&token), now + LOGIN_TTL);
        Ok(token)
    }

    /// Swaps a login token for a new session (the token is gone either way).
    fn redeem(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let until = self.logins.lock().unwrap().remove(&sha256_hex(token))?;
        if until <= now {
            return None;
        }
        let session = random_secret().ok()?;
        let mut sessions = self.sessions.lock().unwrap();
        sessions.retain(|_, until| *until > now);
        sessions.insert(sha256_hex(&session), now + SESSION_TTL);
        Some(session)
    }

    fn session_valid(&self, session: &str) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .get(&sha256_hex(session))
            .is_some_and(|until| *until > Instant::now())
    }

    fn reader(&self) -> MirrorReader {
        self.mirror
            .get_or_init(|| {
                FleetMirror::spawn(
                    Arc::new(RegistrySource(self.registry.clone())),
                    WatcherConfig::default(),
                )
            })
            .reader()
    }

    /// Answers a `GET /board…` request.
    pub async fn serve(
        self: &Arc<Self>,
        req: &Request<hyper::body::Incoming>,
        shutdown: watch::Receiver<bool>,
    ) -> Response<Body> {
        let path = req.uri().path();
        match path {
            "/board/board.js" => return asset("text/javascript; charset=utf-8", SCRIPT),
            "/board/board.css" => return asset("text/css; charset=utf-8", STYLE),
            LOGIN_PATH => return self.login(req),
            "/board" | "/board/" | "/board/events" => {}
            _ => return page(StatusCode::NOT_FOUND, "Not found", "<p>No such page.</p>"),
        }
        let Some(session) = cookie(req, COOKIE).filter(|s| self.session_valid(s)) else {
            return page(
                StatusCode::UNAUTHORIZED,
                "Not signed in",
                "<p>Not signed in, or the session ended. Mint a login link with the admin \
                 credential: <code>fleet-hub --data-dir DIR --hub HOST:PORT board-url</code>, \
                 and open it.</p>",
            );
        };
        let mut reader = self.reader();
        if path == "/board/events" {
            return self.events(reader, session.to_string(), shutdown);
        }
        let content = match tokio::time::timeout(Duration::from_secs(5), reader.ready()).await {
            Ok(Ok(fleet)) => render::render(&fleet, unix_now(), &mut render::Throughput::default()),
            _ => "<p>Reading the fleet…</p>".to_string(),
        };
        let body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fleetboard</title>\
             <meta name=\"viewport\" content=\"width=device-width\">\
             <link rel=\"stylesheet\" href=\"/board/board.css\"><script src=\"/board/board.js\" defer></script></head>\
             <body><header><h1>fleetboard</h1><span id=\"status\">connecting…</span></header>\
             <main id=\"board\">{content}</main></body></html>"
        );
        html_response(StatusCode::OK, body)
    }

    fn login(&self, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let token = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="));
        let Some(session) = token.and_then(|t| self.redeem(t)) else {
            return page(
                StatusCode::UNAUTHORIZED,
                "Link used or expired",
                "<p>This login link was already used, has expired, or was minted by another \
                 hub replica. Mint a new one: <code>fleet-hub --data-dir DIR --hub HOST:PORT \
                 board-url</code>.</p>",
            );
        };
        tracing::info!("board session opened");
        let mut response = page(
            StatusCode::OK,
            "Signed in",
            "<p>Signed in. <a href=\"/board\">Open the board</a>.</p>",
        );
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::SET_COOKIE,
            format!(
                "{COOKIE}={session}; Path=/board; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
                SESSION_TTL.as_secs()
            )
            .parse()
            .expect("cookie header"),
        );
        // Moves on by itself, as a navigation of this origin (see the module doc).
        headers.insert(
            hyper::header::REFRESH,
            "0; url=/board".parse().expect("refresh header"),
        );
        response
    }

    /// `text/event-stream`: the rendered board as a `board` event whenever the fleet changes
    /// (and every [`REFRESH`] if the ages moved), until the session ends or the hub stops.
    fn events(
        self: &Arc<Self>,
        mut reader: MirrorReader,
        session: String,
        mut shutdown: watch::Receiver<bool>,
    ) -> Response<Body> {
        let board = self.clone();
        let stream = async_stream::stream! {
            let mut throughput = render::Throughput::default();
            let mut last = String::new();
            let mut tick = tokio::time::interval(REFRESH);
            let mut since_sent = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    changed = reader.changed() => if changed.is_err() { break },
                    _ = tick.tick() => {}
                }
                if !board.session_valid(&session) {
                    break;
                }
                let state = reader.mark_seen();
                let Some(fleet) = state.fleet else { continue };
                let mut html = String::new();
                if let Some(error) = &state.error {
                    // The last fleet stays on screen, marked as possibly stale.
                    html.push_str(&format!(
                        "<p class=\"stale\">This hub replica cannot read its store ({}); the board may be out of date.</p>",
                        render::esc(&error.to_string())
                    ));
                }
                html.push_str(&render::render(&fleet, unix_now(), &mut throughput));
                if html != last {
                    let mut event = String::from("event: board\n");
                    for line in html.lines() {
                        event.push_str("data: ");
                        event.push_str(line);
                        event.push('\n');
                    }
                    event.push('\n');
                    last = html;
                    since_sent = Instant::now();
                    yield Ok::<_, std::io::Error>(Frame::data(Bytes::from(event)));
                } else if since_sent.elapsed() >= Duration::from_secs(15) {
                    since_sent = Instant::now();
                    yield Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n")));
                }
            }
        };
        let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            "text/event-stream".parse().unwrap(),
        );
        protect(headers);
        response
    }
}

fn unix_now() -> u64 {
    fleet_hub_api::records::unix_secs(std::time::SystemTime::now())
}

/// The value of cookie `name`, if the request carries it.
fn cookie<'a>(req: &'a Request<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Headers every board response carries: no inline script, no framing, no referrer, no cache.
fn protect(headers: &mut hyper::HeaderMap) {
    headers.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            .parse()
            .unwrap(),
    );
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().unwrap(),
    );
    headers.insert(
        hyper::header::REFERRER_POLICY,
        "no-referrer".parse().unwrap(),
    );
    headers.insert(hyper::header::CACHE_CONTROL, "no-store".parse().unwrap());
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, content_type.parse().unwrap());
    protect(headers);
    response
}

fn html_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        "text/html; charset=utf-8".parse().unwrap(),
    );
    protect(headers);
    response
}

/// A small static page (`title` and `content` are ours, never a record's).
fn page(status: StatusCode, title: &str, content: &str) -> Response<Body> {
    html_response(
        status,
        format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fleetboard: {title}</title>\
             <link rel=\"stylesheet\" href=\"/board/board.css\"></head><body><h1>{title}</h1>{content}</body></html>"
        ),
    )
}

/// The board's fleet source: the registry itself (the replica's own store), as the mirror
/// wants it.
struct RegistrySource(Registry);

fn hub_error(call: &'static str, after: Revision, e: RegistryError) -> HubError {
    match e {
        RegistryError::Store(StoreError::Compacted { .. }) => HubError::Relist { after },
        e => HubError::Api {
            call,
            code: crate::api::error_code(&e),
            message: e.to_string(),
        },
    }
}

impl FleetSource for RegistrySource {
    fn list(&self) -> BoxFuture<'_, Result<FleetView, HubError>> {
        async move { self.0.view().await.map_err(|e| hub_error("list", 0, e)) }.boxed()
    }

    fn watch(&self, after: Revision) -> BoxStream<'static, Result<RegistryEvent, HubError>> {
        let registry = self.0.clone();
        async_stream::stream! {
            let events = match registry.watch(after).await {
                Ok(events) => events,
                Err(e) => {
                    yield Err(hub_error("watch", after, e));
                    return;
                }
            };
            let mut events = Box::pin(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => yield Ok(event),
                    Err(e) => {
                        yield Err(hub_error("watch", after, e));
                        return;
                    }
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{FleetLayout, SystemClock};
    use crate::store::EmbeddedStore;

    async fn board() -> (Board, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
        let registry = Registry::open(store, FleetLayout::default(), Arc::new(SystemClock))
            .await
            .unwrap();
        (Board::new(registry), dir)
    }

    #[tokio::test]
    async fn a_login_token_works_once_and_only_in_time() {
        let (board, _dir) = board().await;
        let token = board.mint_login().unwrap();
        assert_eq!(token.len(), 64);
        assert!(board.redeem("not-a-token").is_none());
        let session = board.redeem(&token).expect("first use");
        assert!(board.session_valid(&session));
        assert!(board.redeem(&token).is_none(), "a second use");
        assert!(
            !board.session_valid(&token),
            "a login token is not a session"
        );
        // Only hashes are kept.
        assert!(!board.sessions.lock().unwrap().contains_key(&session));
        // An expired token is refused (and gone).
        let late = board.mint_login().unwrap();
        board
            .logins
            .lock()
            .unwrap()
            .insert(sha256_hex(&late), Instant::now() - Duration::from_secs(1));
        assert!(board.redeem(&late).is_none());
        assert!(board.logins.lock().unwrap().is_empty());
    }
}

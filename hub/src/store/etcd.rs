//! The etcd store: for several hub replicas sharing one state.
//!
//! Every key lives under a namespace prefix (default `/fleetboard/`), so the hub can share an
//! etcd with others. Revisions are etcd's own (mod revisions), so they are global to the etcd
//! cluster: monotonic, but not contiguous for our keys. Watch resume maps to etcd's
//! `start_revision`; a compacted start is etcd's `compact_revision` answer, reported as
//! [`StoreError::Compacted`]. A watch stream that loses its connection re-creates itself
//! from the last revision it delivered, so a short etcd outage costs no changes.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, Identity, KvClient, TlsOptions, TxnOp, WatchClient, WatchOptions,
};

use super::{
    Change, Condition, KeyValue, Listing, Op, Revision, Store, StoreError, Txn, TxnOutcome,
    WatchStream,
};

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `https://10.0.0.5:2379` (or `http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Prepended to every key; ends in `/`.
    pub namespace: String,
    /// Deadline of every unary request.
    pub request_timeout: Duration,
    /// How long a watch keeps trying to re-establish itself before it reports the failure.
    pub watch_retry_for: Duration,
    /// A watch that received nothing this long asks etcd for a progress notification; one
    /// unanswered within `request_timeout` means the stream is dead: it is re-created.
    pub watch_progress_interval: Duration,
    /// The CA that signed etcd's server certificate (PEM file); needed for `https://`.
    pub ca_cert: Option<PathBuf>,
    /// This client's certificate and key (PEM files), for etcd's `--client-cert-auth`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// etcd user and password (etcd's `auth enable`); the password is never logged.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Allow plain `http://` to an etcd that is not on this host's loopback.
    pub allow_insecure: bool,
    /// Largest response accepted; a listing page that would exceed it is fetched in smaller
    /// pages, so a listing's size never fails it.
    pub max_message: usize,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("allow_insecure", &self.allow_insecure)
            .finish_non_exhaustive()
    }
}

impl EtcdOptions {
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: "/fleetboard/".into(),
            request_timeout: Duration::from_secs(5),
            watch_retry_for: Duration::from_secs(30),
            watch_progress_interval: Duration::from_secs(10),
            ca_cert: None,
            client_cert: None,
            client_key: None,
            user: None,
            password: None,
            allow_insecure: false,
            max_message: MAX_MESSAGE,
        }
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Refuses settings that cannot work or would expose the store: mixed or unknown
    /// schemes, `https://` without a CA, TLS files with `http://`, half a client identity, a
    /// user without a password, and plain `http://` to an etcd off this host's loopback
    /// (the store holds the fleet's CA key and credentials) unless `allow_insecure`.
    pub fn check(&self) -> Result<(), StoreError> {
        let bad = |reason: String| Err(StoreError::Config(reason));
        if self.endpoints.is_empty() {
            return bad("no etcd endpoint given".into());
        }
        let mut tls = None;
        for endpoint in &self.endpoints {
            let (secure, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
                (true, rest)
            } else if let Some(rest) = endpoint.strip_prefix("http://") {
                (false, rest)
            } else if endpoint.contains("://") {
                return bad(format!("etcd endpoint {endpoint}: use http:// or https://"));
            } else {
                (false, endpoint.as_str())
            };
            if *tls.get_or_insert(secure) != secure {
                return bad("etcd endpoints mix http:// and https://: use one scheme".into());
            }
            let host = rest.split('/').next().unwrap_or_default();
            let host = match host.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            };
            if !secure && !self.allow_insecure && !is_loopback(host) {
                return bad(format!(
                    "refusing plain http:// to etcd at {endpoint}, which is not on this host's \
                     loopback: the hub's store holds the fleet's CA key and credentials. Use \
                     https:// with --etcd-cacert (and --etcd-cert/--etcd-key or --etcd-user), or \
                     pass --etcd-allow-insecure on a network you trust"
                ));
            }
        }
        let secure = tls == Some(true);
        if secure && self.ca_cert.is_none() {
            return bad(
                "https:// etcd endpoints need --etcd-cacert (the CA of etcd's server certificate)"
                    .into(),
            );
        }
        if !secure
            && (self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some())
        {
            return bad("--etcd-cacert/--etcd-cert/--etcd-key are for https:// endpoints; the etcd endpoints are http://".into());
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return bad("give both --etcd-cert and --etcd-key, or neither".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return bad(
                "--etcd-user needs a password (--etcd-password-file), and a password a user".into(),
            );
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        self.check()?;
        let mut options = ConnectOptions::new().with_connect_timeout(self.request_timeout);
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            // etcd's auth tokens expire; the client fetches a new one instead of failing.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(ca) = &self.ca_cert {
            let read = |path: &PathBuf| {
                std::fs::read(path)
                    .map_err(|e| StoreError::Config(format!("reading {}: {e}", path.display())))
            };
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The etcd-backed [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    kv_api: KvClient,
    watch_api: WatchClient,
    options: EtcdOptions,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.options.namespace)
            .finish()
    }
}

/// Largest response accepted (gRPC's default is 4 MiB; a watch catching up on many
/// revisions can send more in one message).
const MAX_MESSAGE: usize = 64 << 20;

/// gRPC's status code `INVALID_ARGUMENT`.
const GRPC_INVALID_ARGUMENT: i32 = 3;

/// Keys per page of a listing.
const LIST_PAGE: i64 = 500;

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

fn rev_i64(rev: Revision) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

fn rev_u64(rev: i64) -> Revision {
    rev.max(0) as Revision
}

impl EtcdStore {
    /// Connects and checks that etcd answers within the request timeout.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        let endpoints = options.endpoints.join(",");
        let connect = Client::connect(&options.endpoints, Some(options.connect_options()?));
        let client = match tokio::time::timeout(options.request_timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(source)) => {
                return Err(StoreError::Etcd {
                    endpoints,
                    operation: "connect",
                    source,
                });
            }
            Err(_) => {
                return Err(StoreError::Timeout {
                    endpoints,
                    operation: "connect",
                    timeout_ms: options.request_timeout.as_millis(),
                });
            }
        };
        let store = EtcdStore {
            kv_api: client
                .kv_client()
                .max_decoding_message_size(options.max_message),
            watch_api: client
                .watch_client()
                .max_decoding_message_size(options.max_message),
            options,
            endpoints,
        };
        let revision = store.revision().await?;
        tracing::info!(endpoints = %store.endpoints, namespace = %store.options.namespace, revision, "connected to etcd");
        Ok(store)
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.options.namespace)
    }

    fn strip(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(self.options.namespace.as_str())
            .unwrap_or(&key)
            .to_string()
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        KeyValue {
            key: self.strip(kv.key()),
            value: kv.value().to_vec(),
            create_revision: rev_u64(kv.create_revision()),
            mod_revision: rev_u64(kv.mod_revision()),
        }
    }

    async fn call<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.options.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            // etcd answers InvalidArgument for a request it will never accept (too many
            // operations, too large, ...): permanent, unlike an outage.
            Ok(Err(etcd_client::Error::GRpcStatus(status)))
                if status.code() as i32 == GRPC_INVALID_ARGUMENT =>
            {
                Err(StoreError::Refused {
                    endpoints: self.endpoints.clone(),
                    operation,
                    reason: status.message().to_string(),
                })
            }
            Ok(Err(source)) => Err(StoreError::Etcd {
                endpoints: self.endpoints.clone(),
                operation,
                source,
            }),
            Err(_) => Err(StoreError::Timeout {
                endpoints: self.endpoints.clone(),
                operation,
                timeout_ms: self.options.request_timeout.as_millis(),
            }),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut client = self.kv_api.clone();
        let resp = self
            .call("get", client.get(self.full_key(key), None))
            .await?;
        Ok(resp.kvs().first().map(|kv| self.kv(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        // Paged (a large fleet's listing exceeds gRPC's message limit), every page read at the
        // first page's revision so the listing is one consistent snapshot.
        let full_prefix = self.full_key(prefix).into_bytes();
        let range_end = prefix_range_end(&full_prefix);
        let mut attempts = 0;
        'listing: loop {
            attempts += 1;
            let mut items = Vec::new();
            let mut revision = 0i64;
            let mut from = full_prefix.clone();
            let mut page = LIST_PAGE;
            loop {
                let mut options = GetOptions::new()
                    .with_range(range_end.clone())
                    .with_limit(page);
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let mut client = self.kv_api.clone();
                let resp = match self
                    .call("list", client.get(from.clone(), Some(options)))
                    .await
                {
                    Ok(resp) => resp,
                    // The snapshot revision was compacted between pages: start over.
                    Err(StoreError::Etcd { source, .. })
                        if revision > 0
                            && attempts < 3
                            && source.to_string().contains("compacted") =>
                    {
                        continue 'listing;
                    }
                    // Large values: the page exceeded the message limit. Smaller pages (one
                    // record always fits: a request is at most etcd's 1.5 MiB).
                    Err(StoreError::Etcd { ref source, .. })
                        if page > 1 && source.to_string().contains("message length too large") =>
                    {
                        page = (page / 2).max(1);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if revision == 0 {
                    revision = resp.header().map_or(0, |h| h.revision());
                }
                items.extend(resp.kvs().iter().map(|kv| self.kv(kv)));
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            items.sort_by(|a, b| a.key.cmp(&b.key));
            return Ok(Listing {
                items,
                revision: rev_u64(revision),
            });
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.check_keys()?;
        let compares: Vec<Compare> = txn
            .conditions
            .iter()
            .map(|c| match c {
                Condition::Absent(key) => {
                    Compare::create_revision(self.full_key(key), CompareOp::Equal, 0)
                }
                Condition::Exists(key) => {
                    Compare::create_revision(self.full_key(key), CompareOp::Greater, 0)
                }
                Condition::ModRevision(key, rev) => {
                    Compare::mod_revision(self.full_key(key), CompareOp::Equal, rev_i64(*rev))
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.full_key(key), value.clone(), None),
                Op::Delete { key } => TxnOp::delete(self.full_key(key), None),
                // One range delete, whatever the number of keys under the prefix.
                Op::DeletePrefix { prefix } => TxnOp::delete(
                    self.full_key(prefix),
                    Some(DeleteOptions::new().with_prefix()),
                ),
            })
            .collect();
        let mut client = self.kv_api.clone();
        let resp = self
            .call(
                "txn",
                client.txn(etcd_client::Txn::new().when(compares).and_then(ops)),
            )
            .await?;
        if !resp.succeeded() {
            return Ok(TxnOutcome::ConditionFailed);
        }
        Ok(TxnOutcome::Committed {
            revision: rev_u64(resp.header().map_or(0, |h| h.revision())),
        })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        let store = self.clone();
        let prefix = prefix.to_string();
        let full_prefix = self.full_key(&prefix);
        Ok(Box::pin(async_stream::stream! {
            let mut last = after;
            let mut retry_since: Option<tokio::time::Instant> = None;
            let mut backoff = Duration::from_millis(100);
            loop {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev_i64(last.saturating_add(1)));
                let mut client = store.watch_api.clone();
                let opened = store.call("watch", client.watch(full_prefix.clone(), Some(options))).await;
                let failure = match opened {
                    Err(e) => e,
                    Ok(mut stream) => {
                        // A watch waits for changes as long as its consumer keeps it, but a
                        // quiet one asks etcd for progress: a stream that cannot answer that
                        // (etcd gone silent, connection half-open) is broken.
                        let mut progress_asked: Option<tokio::time::Instant> = None;
                        loop {
                            let wait = match progress_asked {
                                Some(at) => (at + store.options.request_timeout).saturating_duration_since(tokio::time::Instant::now()),
                                None => store.options.watch_progress_interval,
                            };
                            let message = match tokio::time::timeout(wait, stream.message()).await {
                                Ok(message) => message,
                                Err(_) if progress_asked.is_some() => break StoreError::Timeout {
                                    endpoints: store.endpoints.clone(),
                                    operation: "watch progress",
                                    timeout_ms: store.options.request_timeout.as_millis(),
                                },
                                Err(_) => {
                                    if let Err(source) = stream.request_progress().await {
                                        break StoreError::Etcd { endpoints: store.endpoints.clone(), operation: "watch progress", source };
                                    }
                                    progress_asked = Some(tokio::time::Instant::now());
                                    continue;
                                }
                            };
                            progress_asked = None;
                            match message {
                                Ok(Some(resp)) => {
                                    if resp.compact_revision() > 0 {
                                        yield Err(StoreError::Compacted {
                                            after: last,
                                            compacted: rev_u64(resp.compact_revision()),
                                        });
                                        return;
                                    }
                                    if resp.canceled() {
                                        yield Err(StoreError::WatchCancelled {
                                            prefix: prefix.clone(),
                                            reason: resp.cancel_reason().to_string(),
                                        });
                                        return;
                                    }
                                    retry_since = None;
                                    backoff = Duration::from_millis(100);
                                    for event in resp.events() {
                                        let Some(kv) = event.kv() else { continue };
                                        let revision = rev_u64(kv.mod_revision());
                                        if revision <= last && revision != 0 {
                                            // Already delivered before a reconnect.
                                            continue;
                                        }
                                        let change = match event.event_type() {
                                            EventType::Put => Change::Put(store.kv(kv)),
                                            EventType::Delete => Change::Delete {
                                                key: store.strip(kv.key()),
                                                revision,
                                            },
                                        };
                                        yield Ok(change);
                                    }
                                    // Events of one revision come in one response: advance after it.
                                    if let Some(rev) = resp.events().iter().filter_map(|e| e.kv()).map(|kv| rev_u64(kv.mod_revision())).max() {
                                        last = last.max(rev);
                                    }
                                }
                                Ok(None) => {
                                    break StoreError::WatchCancelled {
                                        prefix: prefix.clone(),
                                        reason: "etcd closed the watch stream".into(),
                                    };
                                }
                                Err(source) => {
                                    break StoreError::Etcd {
                                        endpoints: store.endpoints.clone(),
                                        operation: "watch",
                                        source,
                                    };
                                }
                            }
                        }
                    }
                };
                let since = *retry_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= store.options.watch_retry_for {
                    yield Err(failure);
                    return;
                }
                tracing::warn!(prefix, last, error = %failure, "etcd watch interrupted; resuming from the last delivered revision");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut client = self.kv_api.clone();
        self.call(
            "compact",
            client.compact(
                rev_i64(revision),
                Some(CompactionOptions::new().with_physical()),
            ),
        )
        .await?;
        Ok(())
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let mut client = self.kv_api.clone();
        let resp = self
            .call(
                "revision",
                client.get(
                    self.options.namespace.clone(),
                    Some(GetOptions::new().with_count_only()),
                ),
            )
            .await?;
        Ok(rev_u64(resp.header().map_or(0, |h| h.revision())))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_range_end;

    #[test]
    fn prefix_range_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_range_end(b"/fleetboard/"), b"/fleetboard0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
    }
}

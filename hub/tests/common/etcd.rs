//! A real etcd (Debian's `/usr/bin/etcd`) for tests: a temp data dir, client and peer URLs on
//! 127.0.0.1 with free ports, stopped by PID and its dir removed on drop (also on panic).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_hub::store::{EtcdOptions, EtcdStore};

const ETCD: &str = "/usr/bin/etcd";

pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    extra_args: Vec<String>,
    /// `http` or `https`.
    scheme: &'static str,
    /// How this harness connects (readiness, `store`): TLS files and credentials.
    client: EtcdOptions,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

impl EtcdServer {
    /// Starts etcd and waits (bounded) until it serves requests.
    pub async fn start() -> EtcdServer {
        Self::start_with(&[]).await
    }

    /// [`EtcdServer::start`] with extra etcd flags (e.g. `--max-txn-ops=16`).
    pub async fn start_with(extra_args: &[&str]) -> EtcdServer {
        Self::start_secured(extra_args, "http", EtcdOptions::new(Vec::<String>::new())).await
    }

    /// etcd serving clients over `scheme` with `extra_args` (TLS files, ...); the harness
    /// connects with `client`'s TLS files and credentials.
    pub async fn start_secured(
        extra_args: &[&str],
        scheme: &'static str,
        client: EtcdOptions,
    ) -> EtcdServer {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: run scripts/install-deps.sh (Debian's etcd-server) — the etcd \
             store tests need a real etcd"
        );
        let mut server = EtcdServer {
            child: None,
            dir: tempfile::Builder::new()
                .prefix("fleet-hub-etcd-")
                .tempdir()
                .expect("temp dir"),
            client_port: free_port(),
            peer_port: free_port(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            scheme,
            client,
        };
        server.spawn().await;
        server
    }

    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    /// The harness's connection settings for this etcd.
    pub fn options(&self) -> EtcdOptions {
        let mut options = self.client.clone();
        options.endpoints = vec![self.endpoint()];
        options
    }

    /// Replaces the harness's connection settings (e.g. once auth is enabled).
    pub fn set_client(&mut self, client: EtcdOptions) {
        self.client = client;
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let mut command = Command::new(ETCD);
        // If the test process dies without running Drop (SIGKILL), etcd goes with it.
        // SAFETY: only an async-signal-safe prctl between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .arg("--name=fleet-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=fleet-test={peer}"))
            .arg("--log-level=warn")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "etcd exited with {status} during startup; log:\n{}",
                    self.log()
                );
            }
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), EtcdStore::connect(self.options()))
                    .await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not serve on {} within 30 s; log:\n{}",
                self.endpoint(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Stops etcd by its PID (SIGTERM, then SIGKILL after 10 s) and reaps it.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, Duration::from_secs(10));
        }
    }

    /// Kills etcd by its PID with SIGKILL (a crash), keeping its data dir.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data dir and ports.
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// A store on this etcd, in its own namespace.
    pub async fn store(&self, namespace: &str) -> EtcdStore {
        EtcdStore::connect(self.options().namespace(namespace))
            .await
            .expect("connect to the test etcd")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

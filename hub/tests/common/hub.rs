//! A real `fleet-hub serve` process for tests: its own data dir, a free port on 127.0.0.1,
//! stopped by PID (SIGTERM, or SIGKILL for a crash) and its dir removed on drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_hub::api::{CaHash, Credential};
use fleet_hub_api::client::{ClientOptions, HubClient};

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// Client options for tests: short timeouts and backoff so fail-overs are quick.
pub fn quick_options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(2),
        call_timeout: Duration::from_secs(10),
        watch_idle_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..ClientOptions::default()
    }
}

pub struct HubProcess {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl HubProcess {
    /// Starts `fleet-hub serve` with `extra` store/layout flags (before `serve`).
    pub async fn start(extra: &[&str]) -> HubProcess {
        Self::start_in(
            tempfile::Builder::new()
                .prefix("fleet-hub-api-")
                .tempdir()
                .unwrap(),
            extra,
        )
        .await
    }

    /// Starts it on an existing data dir (e.g. one holding another replica's CA).
    pub async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> HubProcess {
        Self::start_in_with_env(dir, extra, &[]).await
    }

    /// Starts it with extra environment variables (e.g. libfaketime's, to skew its clock).
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> HubProcess {
        Self::start_in_with_env(
            tempfile::Builder::new()
                .prefix("fleet-hub-api-")
                .tempdir()
                .unwrap(),
            extra,
            env,
        )
        .await
    }

    pub async fn start_in_with_env(
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> HubProcess {
        let mut hub = HubProcess {
            child: None,
            dir,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        hub.spawn().await;
        hub
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    pub fn ca_hash(&self) -> CaHash {
        CaHash::of_pem(&std::fs::read_to_string(self.data_dir().join("ca.pem")).unwrap()).unwrap()
    }

    pub fn admin_credential(&self) -> Credential {
        Credential::parse(
            &std::fs::read_to_string(self.data_dir().join("admin.credential")).unwrap(),
        )
        .expect("admin credential")
    }

    pub fn admin(&self) -> HubClient {
        HubClient::new([self.endpoint()], self.ca_hash(), quick_options())
            .unwrap()
            .with_credential(self.admin_credential())
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hub.log"))
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleet-hub"));
        // SAFETY: only an async-signal-safe prctl between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.extra)
            .arg("serve")
            .arg("--listen")
            .arg(self.endpoint())
            .env("FLEET_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start fleet-hub serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "fleet-hub exited with {status} during startup; log:\n{}",
                    self.log()
                );
            }
            if self.data_dir().join("admin.credential").exists()
                && self.admin().list_tokens().await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fleet-hub did not serve within 30 s; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (graceful), then SIGKILL after 10 s; reaps it.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, Duration::from_secs(10));
        }
    }

    /// SIGKILL (a crash) by PID; keeps the data dir.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.spawn().await;
    }
}

/// Copies a hub's CA and admin credential into `to` (how replicas share one identity).
pub fn copy_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["ca.pem", "ca.key", "admin.credential"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A real headless Chromium (Debian's `chromium`, installed by `scripts/install-deps.sh`)
//! driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
//! separated by NUL on fds 3 and 4), so a test needs no WebSocket client and no port. It
//! runs with a fresh profile in a temp dir and is stopped by its PID on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Option<Child>,
    to: File,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    pub dir: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless with one blank page attached. `extra` flags are added (e.g.
    /// `--ignore-certificate-errors` for a hub whose CA the browser does not know).
    pub fn launch(extra: &[&str]) -> Browser {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: run scripts/install-deps.sh (Debian's chromium package)"
        );
        let dir = tempfile::Builder::new()
            .prefix("fleet-board-chromium-")
            .tempdir()
            .unwrap();
        let (to_child_read, to_child_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (from_child_read, from_child_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (child_in, child_out) = (to_child_read.as_raw_fd(), from_child_write.as_raw_fd());
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .args(extra)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                File::create(dir.path().join("chromium.log")).unwrap(),
            ));
        // SAFETY: only async-signal-safe calls (fcntl, dup2, prctl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                use nix::libc;
                // Move both ends out of the way first, so placing one on 3 or 4 cannot
                // overwrite the other.
                let a = libc::fcntl(child_in, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().expect("start chromium");
        drop((to_child_read, from_child_write));
        let (tx, rx) = mpsc::channel();
        let reader: OwnedFd = from_child_read;
        std::thread::spawn(move || {
            let mut reader = BufReader::new(File::from(reader));
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(value) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(value).is_err()
                {
                    return;
                }
            }
        });
        let mut browser = Browser {
            child: Some(child),
            to: File::from(to_child_write),
            from: rx,
            next_id: 0,
            session: None,
            dir,
        };
        let targets = browser.call("Target.getTargets", json!({}));
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .map(|t| t["targetId"].as_str().unwrap().to_string());
        let target = match page {
            Some(id) => id,
            None => browser.call("Target.createTarget", json!({"url": "about:blank"}))["targetId"]
                .as_str()
                .unwrap()
                .to_string(),
        };
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        browser.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        browser
    }

    /// One DevTools command (on the page once attached); its result. Panics on an error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self.from.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "chromium did not answer {method} within 30 s; its log:\n{}",
                    self.log()
                )
            });
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    panic!("chromium refused {method}: {error}");
                }
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page; its value (JSON).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Polls `condition` (a JS expression) until it is true, for up to `within`.
    pub fn wait_for(&mut self, condition: &str, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        loop {
            if self.eval(&format!("!!({condition})")) == json!(true) {
                return;
            }
            if Instant::now() >= deadline {
                let html = self.eval("document.documentElement.outerHTML");
                panic!("{what}: not seen within {within:?}; the page:\n{html}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the whole page.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, Duration::from_secs(5));
        }
    }
}

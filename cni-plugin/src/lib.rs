//! fleet-cni: the chained CNI plugin that gives every pod `eth-fleet`.
//!
//! It is a thin client: it validates what the runtime sends, asks the node daemon `fleet-nri`
//! (which owns IPAM and does all netlink work) over the node API socket, and appends the answer
//! to the primary plugin's result. Blocking std I/O only: it lives a few milliseconds.

pub mod cli;
pub mod cni_result;
pub mod config;
pub mod conflist;
pub mod env;
pub mod error;
pub mod verbs;

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fleet_proto::node::NodeClient;

use crate::config::{error_version, log_file_of, parse_config};
use crate::env::CniEnv;
use crate::error::{CniError, code};

/// One CNI invocation from the process environment and stdin; prints the result or the CNI
/// error JSON on stdout and returns the exit status.
pub fn plugin_main() -> ExitCode {
    let started = Instant::now();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let env = CniEnv::from_lookup(|k| std::env::var_os(k));
    let outcome = match (read, &env) {
        (Err(e), _) => Err(CniError::new(
            code::IO_FAILURE,
            "cannot read the network configuration from stdin",
            format!("{e}; the runtime must pipe the config to the plugin"),
        )),
        (Ok(_), Err(e)) => Err(e.clone()),
        (Ok(_), Ok(env)) => verbs::run(env, &stdin, |conf| {
            NodeClient::new(&conf.socket, conf.timeout)
        })
        .and_then(|out| deliver(out, &stdin)),
    };
    let status = match &outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = e.to_json(error_version(&stdin)).to_string();
            line.push('\n');
            // Nothing sensible is left to do if stdout is gone; the exit status still says failure.
            let _ = std::io::stdout().lock().write_all(line.as_bytes());
            ExitCode::FAILURE
        }
    };
    if let Some(path) = log_file_of(&stdin) {
        debug_log(&path, env.as_ref().ok(), &outcome, started);
    }
    status
}

/// Prints a verb's output; an ADD result that cannot be delivered is rolled back so the
/// daemon does not keep an attachment the runtime never heard of.
fn deliver(out: verbs::Output, stdin: &[u8]) -> Result<(), CniError> {
    let Some(value) = out.stdout else {
        return Ok(());
    };
    let mut line = value.to_string();
    line.push('\n');
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        if let (Some(req), Ok(conf)) = (out.rollback, parse_config(stdin)) {
            let _ = NodeClient::new(&conf.socket, conf.timeout).detach(req);
        }
        return Err(CniError::new(
            code::IO_FAILURE,
            "cannot write the CNI result to stdout",
            format!("{e}; the attachment was released, the runtime may retry"),
        ));
    }
    Ok(())
}

/// One line per invocation, appended to the configured `logFile`. Failures to log are ignored:
/// logging must never fail a pod.
fn debug_log(path: &Path, env: Option<&CniEnv>, outcome: &Result<(), CniError>, started: Instant) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let who = env.map_or_else(
        || "env=invalid".to_string(),
        |e| {
            format!(
                "{} container={} ifname={} netns={} args={}",
                e.command.as_str(),
                e.container_id.as_deref().unwrap_or("-"),
                e.ifname.as_deref().unwrap_or("-"),
                e.netns.as_deref().unwrap_or("-"),
                e.args.as_deref().unwrap_or("-")
            )
        },
    );
    let result = match outcome {
        Ok(()) => "ok".to_string(),
        Err(e) => format!(
            "error code={} msg={:?} details={:?}",
            e.code, e.msg, e.details
        ),
    };
    let line = format!(
        "{}.{:03} fleet-cni {who} -> {result} in {}us\n",
        now.as_secs(),
        now.subsec_millis(),
        started.elapsed().as_micros()
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

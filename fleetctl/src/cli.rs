//! The command line's small rules, pure so they are tested: the hub address's default port,
//! the token lifetime's bounds, and which failures are a closed pipe rather than an error.

use std::time::Duration;

pub use fleet_hub_api::address::{DEFAULT_HUB_PORT, hub_address};

/// The longest join token lifetime `fleetctl token create --ttl` accepts: a join string is a
/// secret that admits a cluster; one that outlives a year is better made again.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 86_400);

/// `--ttl`: a positive lifetime with s, m, h or d, at most [`MAX_TOKEN_TTL`].
pub fn token_ttl(text: &str) -> Result<Duration, String> {
    let lifetime = fleet_hub_api::model::parse_lifetime(text).ok_or_else(|| {
        format!("--ttl {text:?}: expected a positive number with s, m, h or d (e.g. 24h)")
    })?;
    if lifetime > MAX_TOKEN_TTL {
        return Err(format!(
            "--ttl {text:?}: at most 365d (a join token admits a cluster: make a new one when \
             it is needed)"
        ));
    }
    Ok(lifetime)
}

/// The failure is stdout closed by its reader (`fleetctl services | head`): like other Unix
/// tools, fleetctl then stops quietly with status 0.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

/// Unix seconds as RFC 3339 UTC (`2026-12-07T08:06:36Z`).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_ttl_is_positive_and_at_most_a_year() {
        assert_eq!(token_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(token_ttl("365d"), Ok(MAX_TOKEN_TTL));
        assert!(token_ttl("366d").unwrap_err().contains("at most 365d"));
        assert!(token_ttl("99999999d").unwrap_err().contains("at most 365d"));
        assert!(token_ttl("0h").unwrap_err().contains("expected a positive"));
        assert!(token_ttl("1y").unwrap_err().contains("expected a positive"));
    }

    #[test]
    fn only_a_closed_stdout_is_a_broken_pipe() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(is_broken_pipe(&anyhow::Error::from(pipe())));
        assert!(is_broken_pipe(
            &anyhow::Error::from(pipe()).context("printing the table")
        ));
        assert!(is_broken_pipe(&anyhow::Error::from(serde_json::Error::io(
            pipe()
        ))));
        assert!(!is_broken_pipe(&anyhow::anyhow!("the hub refused")));
        assert!(!is_broken_pipe(&anyhow::Error::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_601_600 + 29_196), "2026-12-07T08:06:36Z");
    }
}

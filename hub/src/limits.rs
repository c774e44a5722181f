//! Process limits the hub needs at scale.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit and returns the
/// new soft limit.
///
/// Every member holds one TLS connection for its calls, one for its lease and one per open
/// watch, so a hub serving N members needs about 3·N descriptors plus its store's: 3,000 at
/// 1,000 clusters, 30,000 at 10,000 — past the usual soft limit of 1,024, below the usual hard
/// limit (systemd's default is 524,288). Raising soft to hard is what systemd recommends for
/// services that need many descriptors, and needs no privilege.
///
/// # Errors
/// The `getrlimit`/`setrlimit` error; the caller logs it and goes on with the old limit.
pub fn raise_nofile_limit() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Descriptors kept back from the connection budget: the store, the relay's process pipes,
/// logs, metrics and the listeners.
pub const RESERVED_DESCRIPTORS: u64 = 1024;

/// How many API connections the hub accepts at once with `nofile` open files allowed: all of
/// them but [`RESERVED_DESCRIPTORS`], at least 256. With the usual hard limit of 524,288 that
/// is ~170,000 members' worth; a fixed cap would refuse members at 10,000 clusters (30,000
/// connections), and an uncapped accept loop would fail with `EMFILE` instead of refusing.
pub fn connection_budget(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_DESCRIPTORS).max(256)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_budget_leaves_room_for_the_rest() {
        assert_eq!(connection_budget(1024), 256);
        assert_eq!(connection_budget(65_536), 64_512);
        assert_eq!(connection_budget(524_288), 523_264);
        assert_eq!(connection_budget(0), 256);
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(raise_nofile_limit().unwrap(), hard);
        let (soft, hard_after) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((soft, hard_after), (hard, hard));
    }
}

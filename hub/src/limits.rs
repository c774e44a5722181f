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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(raise_nofile_limit().unwrap(), hard);
        let (soft, hard_after) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((soft, hard_after), (hard, hard));
    }
}

//! A hub's API address as operators type it (`--hub` of `fleetctl` and `fleet-hub`): checked
//! before anything dials it, so a typo is an error naming the value, not an unreachable hub.

/// The hub API's port when `--hub` names none (`fleet-hub serve --listen`'s default).
pub const DEFAULT_HUB_PORT: u16 = 7443;

/// `--hub`: one hub address, checked before anything dials it, as `host:port`.
///
/// `host` → `host:7443`; `host:port` and `[v6]:port` kept; `[v6]` and a bare IPv6 address get
/// brackets and the port. The port is 1–65535; the host a DNS name or an IP address. An
/// `https://` prefix (and a trailing `/`) is stripped, as the hub speaks only HTTPS; any other
/// scheme, a path, or a user is refused: give `host:port`, not a URL.
pub fn hub_address(text: &str) -> Result<String, String> {
    let bad = |why: &str| format!("hub address {text:?}: {why}");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad(
            "empty; give host[:port], e.g. hub.example:7443 (comma-separated for several)",
        ));
    }
    if let Some(scheme_end) = rest.find("://") {
        if !rest[..scheme_end].eq_ignore_ascii_case("https") {
            return Err(bad(
                "give host:port, not a URL (the hub speaks only HTTPS, e.g. hub.example:7443)",
            ));
        }
        rest = &rest[scheme_end + 3..];
        rest = rest.strip_suffix('/').unwrap_or(rest);
    }
    if rest.contains(['/', '@', '?', '#']) {
        return Err(bad("give host:port, not a URL (no user, path or query)"));
    }
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address in brackets needs its closing `]`"))?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad(&format!("{ip:?} in brackets is not an IPv6 address")))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| bad("after `]` comes `:port` or nothing"))?,
            ),
        };
        (format!("[{ip}]"), port)
    } else {
        match rest.matches(':').count() {
            0 => (rest.to_string(), None),
            1 => {
                let (host, port) = rest.split_once(':').expect("one colon");
                (host.to_string(), Some(port))
            }
            // More than one colon without brackets: an IPv6 address, no port.
            _ => {
                let ip = rest.parse::<std::net::Ipv6Addr>().map_err(|_| {
                    bad("not host:port (an IPv6 address with a port goes in brackets: [v6]:port)")
                })?;
                (format!("[{ip}]"), None)
            }
        }
    };
    if host.is_empty() {
        return Err(bad("no host; give host[:port], e.g. hub.example:7443"));
    }
    if !host.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(bad(&format!(
            "{host:?} is not a host name or an IP address"
        )));
    }
    let port = match port {
        None => DEFAULT_HUB_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(bad(&format!("port {p:?} is not a number from 1 to 65535")));
            }
        },
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_address_without_a_port_gets_7443() {
        let ok = |text: &str| hub_address(text).unwrap();
        assert_eq!(ok("hub.example"), "hub.example:7443");
        assert_eq!(ok("10.0.0.1"), "10.0.0.1:7443");
        assert_eq!(ok("10.0.0.1:8443"), "10.0.0.1:8443");
        assert_eq!(ok(" hub.example:1 "), "hub.example:1");
        assert_eq!(ok("hub.example:65535"), "hub.example:65535");
        assert_eq!(ok("[2001:db8::1]:8443"), "[2001:db8::1]:8443");
        assert_eq!(ok("[2001:db8::1]"), "[2001:db8::1]:7443");
        assert_eq!(ok("2001:db8::1"), "[2001:db8::1]:7443");
        assert_eq!(ok("::1"), "[::1]:7443");
    }

    #[test]
    fn an_https_prefix_is_stripped_and_other_urls_refused() {
        let ok = |text: &str| hub_address(text).unwrap();
        assert_eq!(ok("https://127.0.0.1:7443"), "127.0.0.1:7443");
        assert_eq!(ok("HTTPS://hub.example/"), "hub.example:7443");
        assert_eq!(ok("https://[::1]:8443"), "[::1]:8443");
        for url in [
            "http://127.0.0.1:7443",
            "grpc://hub.example",
            "https://hub.example:7443/api",
            "https://admin@hub.example",
            "hub.example/x",
        ] {
            let err = hub_address(url).unwrap_err();
            assert!(err.contains(&format!("{url:?}")), "{err}");
            assert!(err.contains("not a URL"), "{url}: {err}");
        }
    }

    #[test]
    fn a_bad_hub_address_is_refused_naming_it() {
        for (text, why) in [
            ("", "empty"),
            ("  ", "empty"),
            ("127.0.0.1:99999", "not a number from 1 to 65535"),
            ("127.0.0.1:0", "not a number from 1 to 65535"),
            ("127.0.0.1:", "not a number from 1 to 65535"),
            ("127.0.0.1:x", "not a number from 1 to 65535"),
            (":7443", "no host"),
            ("https://", "no host"),
            ("[2001:db8::1", "closing `]`"),
            ("[not-v6]:7443", "not an IPv6 address"),
            ("[::1]7443", "after `]`"),
            ("[::1]:70000", "not a number from 1 to 65535"),
            ("a:b:c", "in brackets"),
            ("hub example", "not a host name"),
        ] {
            let err = hub_address(text).unwrap_err();
            assert!(err.contains(&format!("{text:?}")), "{text:?}: {err}");
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }
}

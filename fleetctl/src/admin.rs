//! `fleetctl token create|list|revoke` and `fleetctl clusters` / `cluster remove`: the hub
//! operator's calls through the hub API with its admin credential (`admin.credential` in the
//! hub's data dir). Pure rendering; the binary does the calls.

use std::io::Write;

use fleet_hub_api::model::{FleetView, TokenInfo};
use serde::Serialize;

/// A token as listed (never its secret).
#[derive(Debug, Serialize)]
pub struct TokenView {
    pub id: String,
    pub description: String,
    /// Unix seconds.
    pub created_at: u64,
    pub expires_at: u64,
    /// `expires_at` as RFC 3339 UTC, for people reading the JSON.
    pub expires_at_utc: String,
    pub revoked_at: Option<u64>,
    /// `valid`, `expired` or `revoked`, at `now`.
    pub state: String,
}

pub fn token_view(t: &TokenInfo, now: u64) -> TokenView {
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at <= now {
        "expired"
    } else {
        "valid"
    };
    TokenView {
        id: t.id.clone(),
        description: t.description.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        expires_at_utc: crate::cli::rfc3339(t.expires_at),
        revoked_at: t.revoked_at,
        state: state.into(),
    }
}

fn until(then: u64, now: u64) -> String {
    if then <= now {
        return format!("{}s ago", now - then);
    }
    let s = then - now;
    match s {
        0..=5_399 => format!("in {}m", s.div_ceil(60)),
        5_400..=172_799 => format!("in {}h", s / 3600),
        _ => format!("in {}d", s / 86_400),
    }
}

pub fn render_tokens(tokens: &[TokenView], now: u64, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<14} {:<8} {:<14} DESCRIPTION",
        "TOKEN", "STATE", "EXPIRES"
    )?;
    if tokens.is_empty() {
        writeln!(out, "(no tokens)")?;
    }
    for t in tokens {
        writeln!(
            out,
            "{:<14} {:<8} {:<14} {}",
            t.id,
            t.state,
            until(t.expires_at, now),
            t.description
        )?;
    }
    Ok(())
}

/// A member as listed by `fleetctl clusters`.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub id: String,
    pub block: String,
    pub endpoint: Option<String>,
    pub gateway: String,
    /// Unix seconds of the first join.
    pub joined_at: u64,
    /// The join token it joined with (id only).
    pub token_id: String,
    /// Records it publishes (nodes, gateway, exports, imports...).
    pub records: usize,
}

pub fn cluster_views(view: &FleetView) -> Vec<ClusterView> {
    let mut out: Vec<ClusterView> = view
        .clusters
        .iter()
        .map(|c| ClusterView {
            id: c.id.to_string(),
            block: c.block.to_string(),
            endpoint: c.endpoint.map(|e| e.to_string()),
            gateway: format!("{:?}", c.gateway).to_lowercase(),
            joined_at: c.joined_at,
            token_id: c.token_id.clone(),
            records: view.records.iter().filter(|r| r.owner == c.id).count(),
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

pub fn render_clusters(
    clusters: &[ClusterView],
    now: u64,
    out: &mut impl Write,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<16} {:<18} {:<22} {:<8} {:>7} {:<14} JOINED",
        "CLUSTER", "BLOCK", "ENDPOINT", "GATEWAY", "RECORDS", "TOKEN"
    )?;
    if clusters.is_empty() {
        writeln!(out, "(no members)")?;
    }
    for c in clusters {
        writeln!(
            out,
            "{:<16} {:<18} {:<22} {:<8} {:>7} {:<14} {}",
            c.id,
            c.block,
            c.endpoint.as_deref().unwrap_or("-"),
            c.gateway,
            c.records,
            c.token_id,
            until(c.joined_at, now)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_show_their_state_and_never_a_secret() {
        let now = 1_000_000;
        let t = |revoked, expires| TokenInfo {
            id: "abc123".into(),
            description: "aa".into(),
            created_at: now - 10,
            expires_at: expires,
            revoked_at: revoked,
        };
        assert_eq!(token_view(&t(None, now + 3600), now).state, "valid");
        assert_eq!(token_view(&t(None, now), now).state, "expired");
        assert_eq!(token_view(&t(Some(now - 1), now + 9), now).state, "revoked");
        let mut out = Vec::new();
        render_tokens(&[token_view(&t(None, now + 86_400), now)], now, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("abc123") && text.contains("valid") && text.contains("in 24h"),
            "{text}"
        );
        assert_eq!(until(now + 90, now), "in 2m");
        assert_eq!(until(now + 3 * 86_400, now), "in 3d");
        assert_eq!(until(now - 5, now), "5s ago");
    }
}

//! Join tokens: `<id>.<secret>`, the id public (listed, revoked by), the secret stored only as
//! its SHA-256. A token's text is never logged: its `Debug` shows the id only.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::RegistryError;

const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

/// A join token as handed to an operator once, and presented by a joining cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

impl JoinToken {
    pub(super) fn generate() -> Result<Self, RegistryError> {
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::fill(&mut id)
            .and_then(|()| getrandom::fill(&mut secret))
            .map_err(|e| RegistryError::Random(e.to_string()))?;
        Ok(JoinToken {
            id: hex(&id),
            secret: hex(&secret),
        })
    }

    /// Parses `<12 hex>.<64 hex>`; the error never repeats the input.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let (id, secret) = text
            .trim()
            .split_once('.')
            .ok_or(RegistryError::TokenMalformed)?;
        let is_hex = |s: &str, n: usize| {
            s.len() == n * 2
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, ID_BYTES) || !is_hex(secret, SECRET_BYTES) {
            return Err(RegistryError::TokenMalformed);
        }
        Ok(JoinToken {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// The public half: lists and revocations name a token by it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The full token text, to hand to an operator exactly once. Never log it.
    pub fn expose_secret(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    pub(super) fn secret_hash(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Compares without an early exit, so timing does not reveal how much of a hash matched.
pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The stored form of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TokenRecord {
    pub id: String,
    pub secret_sha256: String,
    pub description: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub revoked_at: Option<u64>,
}

impl TokenRecord {
    pub fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            description: self.description.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
        }
    }
}

/// A token as listed: everything but the secret (and its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub description: String,
    /// Unix seconds.
    pub created_at: u64,
    pub expires_at: u64,
    pub revoked_at: Option<u64>,
}

/// Where the registry reads the time (token expiry, join times).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Test double: a clock that only moves when a test advances it.
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<SystemTime>);

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        ManualClock(std::sync::Mutex::new(start))
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

pub(super) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_redact() {
        let token = JoinToken::generate().unwrap();
        let text = token.expose_secret();
        assert_eq!(JoinToken::parse(&text).unwrap(), token);
        let debug = format!("{token:?}");
        assert!(debug.contains(token.id()));
        assert!(!debug.contains(&token.secret), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn malformed_tokens_are_refused_without_echo() {
        for bad in ["", "abc", "abc.def", "0123456789ab.xyz", &"a".repeat(77)] {
            let err = JoinToken::parse(bad).unwrap_err();
            assert!(matches!(err, RegistryError::TokenMalformed));
        }
        let secret = "f".repeat(63);
        let err = JoinToken::parse(&format!("0123456789ab.{secret}")).unwrap_err();
        assert!(!err.to_string().contains(&secret));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }
}

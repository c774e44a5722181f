//! The WireGuard public key as every fleetboard wire carries it: the node API (the gateway's
//! peers), the hub API (a cluster's and a relay's key) and the records members publish. One
//! type for all of them; the private key and the devices live in `fleet-gateway`.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// Length of a Curve25519 key (RFC 7748), public or private.
pub const KEY_LEN: usize = 32;

/// A text that is not a WireGuard key. The message names the input (public keys are not
/// secret) and says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid WireGuard public key {0:?}: expected {KEY_LEN} bytes in base64 (as `wg pubkey` prints)"
)]
pub struct InvalidPublicKey(pub String);

/// A WireGuard public key: 32 bytes, shown and serialised as base64 like `wg` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for PublicKey {
    type Err = InvalidPublicKey;
    fn from_str(s: &str) -> Result<Self, InvalidPublicKey> {
        STANDARD
            .decode(s.trim())
            .ok()
            .and_then(|v| <[u8; KEY_LEN]>::try_from(v).ok())
            .map(Self)
            .ok_or_else(|| InvalidPublicKey(s.to_string()))
    }
}

impl TryFrom<String> for PublicKey {
    type Error = InvalidPublicKey;
    fn try_from(s: String) -> Result<Self, InvalidPublicKey> {
        s.parse()
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_base64()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_json_shape() {
        let k = PublicKey::from_bytes([7; KEY_LEN]);
        assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), k);
    }

    #[test]
    fn garbage_and_wrong_lengths_name_the_input() {
        for bad in ["not-a-key", "", "AAAA", &STANDARD.encode([1u8; 31])] {
            let err = bad.parse::<PublicKey>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(serde_json::from_str::<PublicKey>("\"nope\"").is_err());
    }
}

//! WireGuard keys: generated locally (x25519), the private key stored 0600 and never printed.
//! The public key is `fleet_proto::wireguard::PublicKey`, the type every wire carries.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::StaticSecret;

pub use fleet_proto::wireguard::{KEY_LEN, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not a base64 WireGuard key of {KEY_LEN} bytes")]
    Parse { what: String },
    #[error("cannot read the private key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the private key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "private key file {path} has mode {mode:o}, readable by others; \
         run `chmod 600 {path}` or remove it to generate a new key"
    )]
    Permissions { path: PathBuf, mode: u32 },
}

/// A WireGuard private key. `Debug` and `Display` never show it; [`PrivateKey::to_base64`] is
/// the one explicit way out (for the UAPI and netlink, never for logs).
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A fresh key from the OS random source.
    pub fn generate() -> Self {
        Self(StaticSecret::random().to_bytes())
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(x25519_dalek::PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode(s.trim(), "the private key").map(Self)
    }

    /// Reads a key written by [`PrivateKey::save`] (or `wg genkey`), refusing a file that
    /// others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read)?;
        decode(text.trim(), &format!("the content of {}", path.display())).map(Self)
    }

    /// Writes the key to `path`, created with mode 0600 (never wider at any moment): a
    /// temporary file in the same directory, synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let write = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            fs::create_dir_all(dir).map_err(write)?;
        }
        let file_name = path.file_name().ok_or_else(|| {
            write(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file path",
            ))
        })?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{}\n", self.to_base64()).as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(write)
    }

    /// Loads the key at `path`, or generates and saves one if there is none: a node keeps its
    /// key across restarts.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        match Self::load(path) {
            Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                key.save(path)?;
                Ok(key)
            }
            other => other,
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        // Best effort: do not leave the key in freed memory.
        self.0.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&self.0);
    }
}

fn decode(s: &str, what: &str) -> Result<[u8; KEY_LEN], KeyError> {
    STANDARD
        .decode(s)
        .ok()
        .and_then(|v| <[u8; KEY_LEN]>::try_from(v).ok())
        .ok_or_else(|| KeyError::Parse { what: what.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_private_key() {
        let key = PrivateKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_base64()), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn public_key_matches_the_rfc7748_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let hex = |s: &str| -> [u8; 32] {
            (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect::<Vec<_>>()
                .try_into()
                .unwrap()
        };
        let private = PrivateKey::from_bytes(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            private.public_key().as_bytes(),
            &hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
    }

    #[test]
    fn saved_key_is_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/wg.key");
        let key = PrivateKey::load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(PrivateKey::load_or_generate(&path).unwrap(), key);
        assert_eq!(
            PrivateKey::load(&path).unwrap().public_key(),
            key.public_key()
        );
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg.key");
        PrivateKey::generate().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = PrivateKey::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_a_parse_error_naming_the_input() {
        let err = "not-a-key".parse::<PublicKey>().unwrap_err();
        assert!(err.to_string().contains("not-a-key"), "{err}");
        let k = PrivateKey::generate().public_key();
        assert_eq!(k.to_base64().parse::<PublicKey>().unwrap(), k);
    }
}

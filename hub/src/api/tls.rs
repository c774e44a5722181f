//! The hub's TLS identity and the members' trust in it.
//!
//! Server side ([`HubIdentity`]): on first start the hub generates a self-signed CA (ECDSA
//! P-256) into its data dir (`ca.pem`, `ca.key` 0600) and an admin credential
//! (`admin.credential`, 0600). On every start it issues itself a fresh server certificate
//! signed by that CA for the name [`HUB_SERVER_NAME`], and serves the chain `[server, CA]`.
//! Replicas on one etcd share one CA through the store ([`share_identity`], `meta/identity`):
//! the first to start publishes its own, the others adopt it into their data dirs. Admin
//! credentials never enter the store in clear: each replica keeps its own in its data dir and
//! registers its SHA-256 under `meta/admins/<sha256>`; every replica accepts every registered
//! one.
//!
//! Client side ([`CaHash`], [`pinned_client_config`]): the members' contract, in
//! `fleet_hub_api::tls` (re-exported here).

use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use fleet_hub_api::tls::first_cert_der;
pub use fleet_hub_api::tls::{CaHash, HUB_SERVER_NAME, PinError, pinned_client_config, provider};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const ADMIN_CREDENTIAL: &str = "admin.credential";
const CA_COMMON_NAME: &str = "fleetboard hub CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("hub TLS file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "hub TLS material in {path} is unusable ({reason}); restore it or move the data dir's ca.* aside to make a new CA (members must then get new join strings)"
    )]
    Bad { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("sharing the hub identity through the store failed: {0}")]
    Store(String),
    #[error(
        "the hub data dir {dir} holds CA {local}, but the fleet's replicas share CA {shared} \
         through the store; members pin that one: move this data dir's ca.pem and ca.key \
         aside to adopt the shared identity"
    )]
    Mismatch {
        dir: PathBuf,
        local: CaHash,
        shared: CaHash,
    },
}

/// The hub's CA, its server certificate for this start, and the admin credential's hash.
pub struct HubIdentity {
    pub ca_hash: CaHash,
    pub server_config: Arc<rustls::ServerConfig>,
    /// SHA-256 (hex) of the admin credential's secret.
    pub admin_secret_sha256: String,
    /// Where the admin credential lives (for operators; its text is never logged).
    pub admin_credential_path: PathBuf,
}

impl fmt::Debug for HubIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubIdentity")
            .field("ca_hash", &self.ca_hash)
            .finish_non_exhaustive()
    }
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Ten years: the CA is the fleet's identity; rotating it means new join strings.
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    Ok(params)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` with mode 0600 (atomically: temp file + rename).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A fresh random secret, 32 bytes as hex.
pub(crate) fn random_secret() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(fleet_hub_api::model::hex(&bytes))
}

/// Where replicas on one store keep the fleet's TLS identity.
pub const SHARED_IDENTITY_KEY: &str = "meta/identity";

/// Where replicas register the SHA-256 of their admin credentials (`meta/admins/<sha256>`):
/// any registered admin credential is accepted by every replica; deleting the key revokes it.
pub const ADMIN_HASHES: &str = "meta/admins/";

/// The hub's CA as kept in the store (replicas on etcd share it; the store is then as secret
/// as `ca.key`: reach etcd over TLS with credentials, see `EtcdOptions`).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SharedIdentity {
    pub ca_pem: String,
    pub ca_key_pem: String,
    /// `a.<secret>` as an older hub stored it, in clear: adopted and moved to
    /// [`ADMIN_HASHES`] by the first replica that reads it, then removed from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_credential: Option<String>,
}

impl fmt::Debug for SharedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedIdentity").finish_non_exhaustive()
    }
}

/// The admin credential secret's SHA-256 (hex), as `meta/admins/` and the server keep it.
pub fn admin_hash(credential_text: &str) -> Option<String> {
    match super::Credential::parse(credential_text.trim()) {
        Some(super::Credential::Admin(secret)) => {
            Some(crate::registry::sha256_hex(secret.as_bytes()))
        }
        _ => None,
    }
}

impl SharedIdentity {
    fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        Ok(SharedIdentity {
            ca_pem: cert.pem(),
            ca_key_pem: key.serialize_pem(),
            admin_credential: None,
        })
    }

    /// The CA in `data_dir`, if both files are there.
    fn read_local(data_dir: &Path) -> Result<Option<Self>, TlsError> {
        Ok(
            match (
                read_optional(data_dir, CA_CERT)?,
                read_optional(data_dir, CA_KEY)?,
            ) {
                (Some(ca_pem), Some(ca_key_pem)) => Some(SharedIdentity {
                    ca_pem,
                    ca_key_pem,
                    admin_credential: None,
                }),
                _ => None,
            },
        )
    }

    fn write_local(&self, data_dir: &Path) -> Result<(), TlsError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(io_err(data_dir))?;
        write_private(&data_dir.join(CA_KEY), self.ca_key_pem.as_bytes())?;
        write_private(&data_dir.join(CA_CERT), self.ca_pem.as_bytes())
    }

    pub fn ca_hash(&self) -> Result<CaHash, TlsError> {
        Ok(CaHash::of_pem(&self.ca_pem)?)
    }
}

fn read_optional(data_dir: &Path, name: &str) -> Result<Option<String>, TlsError> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io { path, source }),
    }
}

/// Makes `data_dir` hold the fleet's one CA, kept in `store` (for replicas on etcd): the first
/// replica to start publishes its CA (its existing files, or new ones), every other replica
/// writes the published one into its data dir. A data dir with a *different* CA is refused
/// (its members' join strings pin the other CA). The replica's admin credential (its own,
/// generated if absent) is registered by hash only; a clear-text one an older hub left in the
/// store is adopted (written here if this data dir has none), registered by hash and removed.
pub async fn share_identity(
    data_dir: &Path,
    store: &dyn crate::store::Store,
) -> Result<CaHash, TlsError> {
    let store_err = |e: crate::store::StoreError| TlsError::Store(e.to_string());
    let mut hash = None;
    for _ in 0..8 {
        let local = SharedIdentity::read_local(data_dir)?;
        match store.get(SHARED_IDENTITY_KEY).await.map_err(store_err)? {
            Some(kv) => {
                let shared: SharedIdentity =
                    serde_json::from_slice(&kv.value).map_err(|e| TlsError::Bad {
                        path: PathBuf::from(SHARED_IDENTITY_KEY),
                        reason: e.to_string(),
                    })?;
                let shared_hash = shared.ca_hash()?;
                match local {
                    Some(local) if local.ca_hash()? == shared_hash => {}
                    Some(local) => {
                        return Err(TlsError::Mismatch {
                            dir: data_dir.to_path_buf(),
                            local: local.ca_hash()?,
                            shared: shared_hash,
                        });
                    }
                    None => {
                        shared.write_local(data_dir)?;
                        tracing::info!(dir = %data_dir.display(), ca_sha256 = %shared_hash, "adopted the fleet's CA from the store");
                    }
                }
                if let Some(legacy) = &shared.admin_credential {
                    // An older hub's clear-text admin credential: keep it working (by hash)
                    // and take it out of the store.
                    if read_optional(data_dir, ADMIN_CREDENTIAL)?.is_none() {
                        write_private(
                            &data_dir.join(ADMIN_CREDENTIAL),
                            format!("{legacy}\n").as_bytes(),
                        )?;
                    }
                    if let Some(h) = admin_hash(legacy) {
                        store
                            .put(&format!("{ADMIN_HASHES}{h}"), Vec::new())
                            .await
                            .map_err(store_err)?;
                    }
                    let cleaned = SharedIdentity {
                        admin_credential: None,
                        ..shared.clone()
                    };
                    let value = serde_json::to_vec(&cleaned).expect("serialises");
                    if store
                        .compare_and_swap(SHARED_IDENTITY_KEY, kv.mod_revision, value)
                        .await
                        .map_err(store_err)?
                        .is_none()
                    {
                        continue;
                    }
                    tracing::info!("moved the admin credential in the store to a hash");
                }
                hash = Some(shared_hash);
                break;
            }
            None => {
                let (identity, fresh) = match local {
                    Some(local) => (local, false),
                    None => (SharedIdentity::generate()?, true),
                };
                let value = serde_json::to_vec(&identity).expect("serialises");
                if store
                    .create(SHARED_IDENTITY_KEY, value)
                    .await
                    .map_err(store_err)?
                    .is_some()
                {
                    if fresh {
                        identity.write_local(data_dir)?;
                    }
                    let h = identity.ca_hash()?;
                    tracing::info!(ca_sha256 = %h, generated = fresh, "published the hub CA for the other replicas");
                    hash = Some(h);
                    break;
                }
                // Another replica published first: adopt its CA on the next round.
            }
        }
    }
    let hash = hash.ok_or_else(|| {
        TlsError::Store("the shared identity kept changing under us; retry".into())
    })?;
    // This replica's admin credential (generated on first start), registered by hash.
    let admin_path = data_dir.join(ADMIN_CREDENTIAL);
    let text = match read_optional(data_dir, ADMIN_CREDENTIAL)? {
        Some(text) => text,
        None => {
            let secret = random_secret().map_err(io_err(&admin_path))?;
            let text = format!("{}\n", super::Credential::Admin(secret).expose());
            write_private(&admin_path, text.as_bytes())?;
            text
        }
    };
    let admin = admin_hash(&text).ok_or_else(|| TlsError::Bad {
        path: admin_path.clone(),
        reason: "not an admin credential".into(),
    })?;
    store
        .put(&format!("{ADMIN_HASHES}{admin}"), Vec::new())
        .await
        .map_err(store_err)?;
    Ok(hash)
}

impl HubIdentity {
    /// Loads the CA and admin credential from `data_dir`, generating them on first start, and
    /// issues this start's server certificate.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, TlsError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(io_err(data_dir))?;
        let cert_path = data_dir.join(CA_CERT);
        let key_path = data_dir.join(CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            write_private(&cert_path, cert.pem().as_bytes())?;
            tracing::info!(dir = %data_dir.display(), "generated the hub CA");
        }
        let ca_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let ca_key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let ca_der = first_cert_der(&ca_pem).map_err(|reason| TlsError::Bad {
            path: cert_path.clone(),
            reason,
        })?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Bad {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;

        let admin_path = data_dir.join(ADMIN_CREDENTIAL);
        if !admin_path.exists() {
            let secret = random_secret().map_err(io_err(&admin_path))?;
            write_private(
                &admin_path,
                format!("{}\n", super::Credential::Admin(secret).expose()).as_bytes(),
            )?;
        }
        let admin_text = std::fs::read_to_string(&admin_path).map_err(io_err(&admin_path))?;
        let admin_secret_sha256 = match super::Credential::parse(admin_text.trim()) {
            Some(super::Credential::Admin(secret)) => {
                crate::registry::sha256_hex(secret.as_bytes())
            }
            _ => {
                return Err(TlsError::Bad {
                    path: admin_path,
                    reason: "not an admin credential".into(),
                });
            }
        };

        // This start's server certificate, signed by the CA.
        let issuer = Issuer::new(ca_params()?, &ca_key);
        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![HUB_SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, HUB_SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let server_cert = params.signed_by(&server_key, &issuer)?;
        let chain = vec![
            server_cert.der().clone(),
            CertificateDer::from(ca_der.clone()),
        ];
        let key =
            PrivateKeyDer::try_from(server_key.serialize_der()).map_err(|e| TlsError::Bad {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HubIdentity {
            ca_hash: CaHash::of_der(&ca_der),
            server_config: Arc::new(config),
            admin_secret_sha256,
            admin_credential_path: admin_path,
        })
    }
}

//! Mutual TLS for the node API over the network (`fleet-nri --node-api-listen`).
//!
//! Trust comes from one **node-API CA per cluster**, made once by the operator
//! (`fleet-controller node-api-certs`) and never stored in the cluster: it signs
//!
//! - the node daemons' certificate (extended key usage `serverAuth` only, DNS name
//!   [`NODE_API_SERVER_NAME`]), shared by every `fleet-nri` of the cluster (one Secret mounted
//!   by the DaemonSet), and
//! - the controller's certificate (`clientAuth` only).
//!
//! A daemon accepts only clients whose certificate chains to the CA **and** carries
//! `clientAuth`; the controller accepts only a server whose certificate chains to the CA, names
//! [`NODE_API_SERVER_NAME`] and carries `serverAuth` (webpki checks both). So the key a node
//! holds cannot drive another node's daemon, and a certificate of any other CA (the hub's, the
//! cluster's own) is refused both ways. The controller dials the node's InternalIP but checks
//! the fixed name: the certificate does not depend on the nodes' addresses, so nodes come and
//! go without issuing anything.
//!
//! Each side reads a directory with `ca.crt`, `tls.crt`, `tls.key` (PEM) — the keys of a
//! `kubernetes.io/tls` Secret with its CA, so a Secret volume is the directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The name every node daemon's certificate carries and the controller checks.
pub const NODE_API_SERVER_NAME: &str = "fleet-nri.fleetboard.internal";
/// Files of a TLS directory.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The scheme of a node API address on the network in nodes.json (`tcp://10.0.0.5:9650`).
pub const TCP_SCHEME: &str = "tcp://";

#[derive(Debug, thiserror::Error)]
pub enum NodeTlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, NodeTlsError> {
    std::fs::read(path).map_err(|source| NodeTlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NodeTlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| NodeTlsError::Bad {
            path: path.to_owned(),
            reason: format!("bad PEM: {e:?}"),
        })?;
    if certs.is_empty() {
        return Err(NodeTlsError::Bad {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, NodeTlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| NodeTlsError::Bad {
        path: path.to_owned(),
        reason: format!("no private key: {e:?}"),
    })
}

fn roots(dir: &Path) -> Result<Arc<rustls::RootCertStore>, NodeTlsError> {
    let path = dir.join(CA_FILE);
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&path)? {
        roots.add(c).map_err(|e| NodeTlsError::Bad {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The node daemon's side: its certificate, and only clients the CA signed for `clientAuth`.
pub fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, NodeTlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
            .build()
            .map_err(|e| NodeTlsError::Bad {
                path: dir.join(CA_FILE),
                reason: e.to_string(),
            })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&dir.join(CERT_FILE))?, key(&dir.join(KEY_FILE))?)?;
    Ok(Arc::new(config))
}

/// The controller's side: its certificate, and only a server the CA signed for `serverAuth`
/// under [`NODE_API_SERVER_NAME`].
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, NodeTlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(certs(&dir.join(CERT_FILE))?, key(&dir.join(KEY_FILE))?)?;
    Ok(Arc::new(config))
}

/// The server name the controller checks.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(NODE_API_SERVER_NAME).expect("a valid DNS name")
}

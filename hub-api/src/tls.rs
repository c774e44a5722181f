//! The members' trust in the hub: like kubeadm's discovery token CA hash, a member knows only
//! the SHA-256 of the hub CA's certificate ([`CaHash`], carried in the join string). It accepts
//! a server only if the chain it presents contains a certificate with exactly that hash, and
//! the server certificate verifies (signature, validity, name [`HUB_SERVER_NAME`]) against that
//! certificate as the sole root ([`pinned_client_config`]). The hub's own identity (CA
//! generation, server certificates) is server code in `fleet-hub`.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::model::hex;

/// The name in the hub's server certificate; clients verify against it whatever address they
/// dialled (the pinned CA is what identifies the hub).
pub const HUB_SERVER_NAME: &str = "fleet-hub";

/// A CA pin or PEM that cannot be used, or a client TLS configuration that failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("invalid CA hash {0:?}: expected 64 hex digits (the CA certificate's SHA-256)")]
    BadCaHash(String),
    #[error("no usable certificate in the PEM text: {0}")]
    BadPem(String),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// The SHA-256 of the hub CA's certificate (DER): what a member pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaHash(pub [u8; 32]);

impl CaHash {
    pub fn of_der(der: &[u8]) -> Self {
        CaHash(Sha256::digest(der).into())
    }

    /// The hash of the first certificate in a PEM file's text.
    pub fn of_pem(pem: &str) -> Result<Self, PinError> {
        let der = first_cert_der(pem).map_err(PinError::BadPem)?;
        Ok(CaHash::of_der(&der))
    }
}

impl std::str::FromStr for CaHash {
    type Err = PinError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        let bad = || PinError::BadCaHash(s.to_string());
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(CaHash(out))
    }
}

impl fmt::Display for CaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for CaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaHash(sha256:{self})")
    }
}

/// The first certificate of a PEM text, in DER.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "no CERTIFICATE block".to_string())?
        .map(|c| c.to_vec())
        .map_err(|e| format!("bad PEM: {e:?}"))
}

/// The crypto provider used on both ends (aws-lc-rs, as the rest of the workspace).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client TLS config that trusts only a hub whose CA has `pin` as its SHA-256.
pub fn pinned_client_config(pin: CaHash) -> Result<Arc<rustls::ClientConfig>, PinError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts a chain only if it carries the pinned CA and the server certificate verifies
/// against that CA (webpki: signature, validity, name).
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaHash,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| CaHash::of_der(c.as_ref()) == self.pin)
        else {
            return Err(rustls::Error::General(format!(
                "the hub's CA does not match the pinned hash sha256:{} (wrong hub, or a \
                 join string for another hub)",
                self.pin
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

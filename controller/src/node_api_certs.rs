//! `fleet-controller node-api-certs`: the node-API CA of a cluster and the two certificates it
//! signs (trust model: `fleet_core::node_tls`). Run once by the operator, outside the cluster;
//! the CA key is written beside the others so more certificates can be issued later, and is
//! never put into the cluster.
//!
//! Layout of `--out`: `ca.crt`, `ca.key`; `node/{ca.crt,tls.crt,tls.key}` (every `fleet-nri`:
//! `serverAuth`, DNS name `fleet-nri.fleetboard.internal`); `controller/{ca.crt,tls.crt,
//! tls.key}` (the controller: `clientAuth`). `node/` and `controller/` are what the two Secrets
//! hold (`kubectl create secret generic … --from-file=<dir>`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use fleet_core::node_tls::{CA_FILE, CERT_FILE, KEY_FILE, NODE_API_SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CA's common name.
pub const CA_COMMON_NAME: &str = "fleetboard node API CA";
/// The controller certificate's common name.
pub const CONTROLLER_COMMON_NAME: &str = "fleet-controller";

/// PEM texts of one cluster's node-API CA and its two certificates.
pub struct NodeApiCerts {
    pub ca_cert: String,
    pub ca_key: String,
    pub node_cert: String,
    pub node_key: String,
    pub controller_cert: String,
    pub controller_key: String,
}

impl std::fmt::Debug for NodeApiCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeApiCerts { .. }")
    }
}

/// The current year (UTC), for validity that starts before now whatever the clock skew.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // 365.2425 days a year; off by at most a day around New Year, which the start on
    // 1 January of the (possibly previous) year absorbs.
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

/// A new CA and the node and controller certificates, valid from 1 January of this year for
/// `years` years (at least 1).
pub fn generate(years: u16) -> Result<NodeApiCerts, rcgen::Error> {
    let from = this_year();
    let to = from + i32::from(years.max(1));
    let validity = |p: &mut CertificateParams| {
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let leaf = |names: Vec<String>,
                cn: &str,
                eku: ExtendedKeyUsagePurpose|
     -> Result<(String, String), rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p);
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (node_cert, node_key) = leaf(
        vec![NODE_API_SERVER_NAME.to_string()],
        NODE_API_SERVER_NAME,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (controller_cert, controller_key) = leaf(
        Vec::new(),
        CONTROLLER_COMMON_NAME,
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(NodeApiCerts {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        node_cert,
        node_key,
        controller_cert,
        controller_key,
    })
}

fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    f.write_all(contents.as_bytes())
}

/// Writes the layout above into `dir` (created 0700); refuses to replace existing files.
pub fn write(dir: &Path, certs: &NodeApiCerts) -> std::io::Result<()> {
    let mkdir = |d: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
    };
    mkdir(dir)?;
    write_file(&dir.join(CA_FILE), &certs.ca_cert, 0o644)?;
    write_file(&dir.join("ca.key"), &certs.ca_key, 0o600)?;
    for (sub, cert, key) in [
        ("node", &certs.node_cert, &certs.node_key),
        ("controller", &certs.controller_cert, &certs.controller_key),
    ] {
        let d = dir.join(sub);
        mkdir(&d)?;
        write_file(&d.join(CA_FILE), &certs.ca_cert, 0o644)?;
        write_file(&d.join(CERT_FILE), cert, 0o644)?;
        write_file(&d.join(KEY_FILE), key, 0o600)?;
    }
    Ok(())
}

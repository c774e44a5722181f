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

/// The longest validity `generate` accepts, in years (`--years` is 1 to this).
pub const MAX_YEARS: u16 = 100;

/// How far before now the certificates' validity starts: absorbs a node clock that runs up to
/// an hour behind the machine that made them.
pub const BACKDATE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Why [`generate`] made nothing.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("a validity of {0} years: use 1 to {MAX_YEARS}")]
    Years(u16),
    #[error("the system clock is before 1970: set the clock and run again")]
    Clock,
    #[error(transparent)]
    Rcgen(#[from] rcgen::Error),
}

/// Sets a certificate's validity to `[now - BACKDATE, now + years calendar years]` (UTC; from
/// a 29 February it ends on 28 February). Errors: [`CertsError::Years`] outside
/// `1..=MAX_YEARS`, [`CertsError::Clock`].
fn validity(
    years: u16,
    now: std::time::SystemTime,
) -> Result<impl Fn(&mut CertificateParams), CertsError> {
    if !(1..=MAX_YEARS).contains(&years) {
        return Err(CertsError::Years(years));
    }
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| CertsError::Clock)?;
    // Whole seconds: X.509 times have no fractions.
    let now =
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(since_epoch.as_secs());
    let year = now.year() + i32::from(years);
    let not_after = now
        .replace_year(year)
        .or_else(|_| now.replace_day(28).and_then(|d| d.replace_year(year)))
        .map_err(|_| CertsError::Years(years))?;
    let not_before = now - BACKDATE;
    Ok(move |p: &mut CertificateParams| {
        p.not_before = not_before;
        p.not_after = not_after;
    })
}

/// A new CA and the node and controller certificates, valid from [`BACKDATE`] before now until
/// `years` (1 to [`MAX_YEARS`]) calendar years after now.
///
/// Errors: [`CertsError::Years`] for `years` out of range, [`CertsError::Clock`] for a clock
/// before 1970, [`CertsError::Rcgen`] if key generation or signing fails.
pub fn generate(years: u16) -> Result<NodeApiCerts, CertsError> {
    let validity = validity(years, std::time::SystemTime::now())?;
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
     -> Result<(String, String), CertsError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// (notBefore, notAfter) of a PEM certificate, unix seconds.
    fn validity_of(pem: &str) -> (i64, i64) {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let v = cert.validity();
        (v.not_before.timestamp(), v.not_after.timestamp())
    }

    #[test]
    fn certificates_are_valid_from_now_for_the_years_asked() {
        const DAY: i64 = 86_400;
        for years in [1u16, 5, MAX_YEARS] {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let certs = generate(years).unwrap();
            // `years` calendar years hold within a day of 365.2425 days each.
            let end = now + (f64::from(years) * 365.2425 * DAY as f64) as i64;
            for pem in [&certs.ca_cert, &certs.node_cert, &certs.controller_cert] {
                let (not_before, not_after) = validity_of(pem);
                assert!(
                    not_before <= now,
                    "{years}y: notBefore {not_before} > now {now}"
                );
                assert!(
                    now - not_before <= BACKDATE.as_secs() as i64 + 60,
                    "{years}y: notBefore {not_before} backdated more than BACKDATE"
                );
                assert!(
                    (not_after - end).abs() <= DAY,
                    "{years}y: notAfter {not_after}, now {now}"
                );
            }
        }
    }

    #[test]
    fn out_of_range_years_are_refused_with_the_range() {
        for years in [0, MAX_YEARS + 1, u16::MAX] {
            let e = generate(years).unwrap_err().to_string();
            assert!(e.contains(&format!("{years} years")), "{e}");
            assert!(e.contains(&format!("1 to {MAX_YEARS}")), "{e}");
        }
    }

    #[test]
    fn a_29_february_ends_on_28_february() {
        // 2024-02-29T12:00:00Z
        let leap_day = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_709_208_000);
        let set = validity(1, leap_day).unwrap();
        let mut p = CertificateParams::default();
        set(&mut p);
        assert_eq!(
            (
                p.not_after.year(),
                u8::from(p.not_after.month()),
                p.not_after.day()
            ),
            (2025, 2, 28)
        );
        assert_eq!(p.not_before.hour(), 11);
    }
}

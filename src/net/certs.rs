//! `multipos certs`: a private CA and per-host certificates for `cluster.tls`, made with rcgen.
//! Each certificate serves both ways (server and client auth): every worker is both.
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::io::atomic;
use crate::{Error, Result};

/// File names of the CA inside the output directory.
pub const CA_CERT: &str = "ca.pem";
pub(crate) const CA_KEY: &str = "ca-key.pem";

/// What `issue` wrote.
#[derive(Debug)]
pub struct Issued {
    /// True when the CA was made now (false: an existing one in the directory signed).
    pub new_ca: bool,
    /// (certificate, key) per host, in the order asked.
    pub hosts: Vec<(PathBuf, PathBuf)>,
}

/// Makes (or re-uses) the CA in `dir` and issues one certificate per entry of `hosts`. An entry is
/// a comma-separated list of names (DNS names or IP addresses) for one host; its files are named
/// after the first name. Existing host files are never overwritten.
pub fn issue(dir: &Path, hosts: &[String], days: u32) -> Result<Issued> {
    if hosts.is_empty() {
        return Err(Error::Usage("name at least one --host".into()));
    }
    if days == 0 {
        return Err(Error::Usage("--days must be at least 1".into()));
    }
    let planned = hosts
        .iter()
        .map(|h| host_files(dir, h))
        .collect::<Result<Vec<_>>>()?;
    for (names, cert, key) in &planned {
        host_params(names)?;
        for path in [cert, key] {
            if path.exists() {
                return Err(Error::Usage(format!(
                    "{} exists (a certificate for {}); remove it first to issue a new one",
                    path.display(),
                    names[0]
                )));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let (issuer, new_ca) = ca(dir, days)?;
    let mut written = Vec::new();
    for (names, cert_path, key_path) in planned {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let mut params = host_params(&names)?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        validity(&mut params, days);
        let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
        atomic::write_private_file(&key_path, key.serialize_pem().as_bytes())?;
        atomic::write_file(&cert_path, cert.pem().as_bytes())?;
        written.push((cert_path, key_path));
    }
    Ok(Issued {
        new_ca,
        hosts: written,
    })
}

/// The names of one `--host` entry and the files they go to.
fn host_files(dir: &Path, entry: &str) -> Result<(Vec<String>, PathBuf, PathBuf)> {
    let names: Vec<String> = entry.split(',').map(|s| s.trim().to_string()).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(Error::Usage(format!("--host {entry:?}: an empty name")));
    }
    let stem: String = names[0]
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok((
        names,
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    ))
}

/// A host certificate's names, refused unless each is a DNS name or an IP address.
fn host_params(names: &[String]) -> Result<CertificateParams> {
    let bad = |why: String| Error::Usage(format!("--host {:?}: {why}", names.join(",")));
    let dns_label =
        |l: &str| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if let Some(name) = names
        .iter()
        .find(|n| n.parse::<std::net::IpAddr>().is_err() && !n.split('.').all(dns_label))
    {
        return Err(bad(format!("{name:?} is not a DNS name or an IP address")));
    }
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| bad(e.to_string()))?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    Ok(params)
}

/// The CA of `dir`: read when both of its files exist, made when neither does.
fn ca(dir: &Path, days: u32) -> Result<(Issuer<'static, KeyPair>, bool)> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let key = std::fs::read_to_string(&key_path).map_err(Error::io("read", &key_path))?;
            let key = KeyPair::from_pem(&key).map_err(|e| Error::Invalid {
                path: key_path.clone(),
                reason: format!("not a PEM private key: {e}"),
            })?;
            let cert =
                std::fs::read_to_string(&cert_path).map_err(Error::io("read", &cert_path))?;
            let issuer = Issuer::from_ca_cert_pem(&cert, key).map_err(|e| Error::Invalid {
                path: cert_path.clone(),
                reason: format!("not a PEM CA certificate: {e}"),
            })?;
            Ok((issuer, false))
        }
        (false, false) => {
            let key = KeyPair::generate().map_err(rcgen_error)?;
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, "multipos cluster CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut params, days);
            let cert = params.self_signed(&key).map_err(rcgen_error)?;
            atomic::write_private_file(&key_path, key.serialize_pem().as_bytes())?;
            atomic::write_file(&cert_path, cert.pem().as_bytes())?;
            Ok((Issuer::new(params, key), true))
        }
        _ => Err(Error::Usage(format!(
            "{} holds only one of {CA_CERT} and {CA_KEY}; a CA needs both",
            dir.display()
        ))),
    }
}

/// Valid from an hour ago (clock skew between hosts) for `days` days.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::Usage(format!("making a certificate: {e}"))
}

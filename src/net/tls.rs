//! TLS for every gRPC connection of a cluster: coordinator and peer ring (docs/design.md, "Trust on
//! the wire"). Every process holds a certificate signed by the run's CA; clients check the server's
//! certificate against that CA and the address they dial, and servers ask for the client's.
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{Error, Result};

/// A TLS handshake that has not finished by then is dropped (a silent peer holds no socket).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `cluster.tls`: the PEM files of this host (paths on the host that reads them).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA certificate that signed every certificate of the run.
    pub ca: PathBuf,
    /// This host's certificate (its names must include the address others dial).
    pub cert: PathBuf,
    /// This host's private key.
    pub key: PathBuf,
    /// The coordinator asks clients for a certificate signed by `ca` (mutual TLS). The peer ring
    /// always does: every worker holds a certificate.
    #[serde(default = "yes")]
    pub client_auth: bool,
}

fn yes() -> bool {
    true
}

/// Loaded and checked TLS material, ready for servers and clients.
#[derive(Clone)]
pub struct Tls {
    ca: Certificate,
    identity: Identity,
    client_auth: bool,
    /// The common name of this host's certificate: a worker's name, which its ids carry.
    name: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(<certificates>)")
    }
}

impl Tls {
    /// Reads the three files and checks that each holds what its key says.
    pub fn load(cfg: &TlsConfig) -> Result<Self> {
        let ca = read_certificates(&cfg.ca, "cluster.tls.ca")?;
        let cert = read_certificates(&cfg.cert, "cluster.tls.cert")?;
        let key = std::fs::read(&cfg.key).map_err(Error::io("read cluster.tls.key", &cfg.key))?;
        if PrivateKeyDer::from_pem_slice(&key).is_err() {
            return Err(Error::Invalid {
                path: cfg.key.clone(),
                reason: "cluster.tls.key: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".into(),
            });
        }
        let name = CertificateDer::pem_slice_iter(&cert)
            .next()
            .and_then(|c| common_name(c.ok()?.as_ref()))
            .ok_or_else(|| Error::Invalid {
                path: cfg.cert.clone(),
                reason: "cluster.tls.cert: the certificate has no common name (issue it with \
                         `multipos certs`)"
                    .into(),
            })?;
        Ok(Self {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
            client_auth: cfg.client_auth,
            name,
        })
    }

    /// The common name of this host's certificate: the worker name it proves to the coordinator.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The coordinator's server side: its certificate, and clients' certificates asked for when
    /// `client_auth` is on.
    pub(crate) fn coordinator_server(&self) -> ServerTlsConfig {
        let server = self.server();
        if self.client_auth {
            server.client_ca_root(self.ca.clone())
        } else {
            server
        }
    }

    /// A peer server: every client is a worker and must show a certificate of the run's CA.
    pub(crate) fn peer_server(&self) -> ServerTlsConfig {
        self.server().client_ca_root(self.ca.clone())
    }

    fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// A client: trusts only the run's CA and shows this host's certificate.
    pub(crate) fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// Reads a PEM file that must hold at least one certificate.
fn read_certificates(path: &Path, key: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(Error::io("read", path))?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| Error::Invalid {
            path: path.to_path_buf(),
            reason: format!("{key}: bad PEM certificate: {e}"),
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            reason: format!("{key}: no PEM certificate in it"),
        });
    }
    Ok(pem)
}

/// The common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_string())
}

/// The common name of the client certificate a caller showed over mutual TLS (verified against
/// the run's CA by the handshake), if it showed one.
pub(crate) fn peer_name<T>(request: &tonic::Request<T>) -> Option<String> {
    common_name(request.peer_certs()?.first()?.as_ref())
}

/// The URL scheme a client dials with.
pub(crate) fn scheme(tls: Option<&Tls>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

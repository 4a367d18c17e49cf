//! TLS for the admin server (SPEC §13): the billing hook and operators
//! reach a node across hosts with a bearer token, which must not cross the
//! network in clear text. rustls with ring, the certificate chain and key
//! from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let shown = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| shown(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| shown(cert, &e))?;
    if certs.is_empty() {
        return Err(shown(cert, &"no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| shown(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("admin.tls_cert_file and admin.tls_key_file: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

//! TLS for `https://` client URLs, with etcd's flags: `--cert-file` and `--key-file` (PEM) are
//! the server's certificate chain and key; `--trusted-ca-file` (PEM) holds the CAs that client
//! certificates must chain to; `--client-cert-auth` (or a trusted CA file alone, as in etcd 3.4)
//! makes a verified client certificate a condition of the handshake.
//!
//! Served with rustls (ring provider) over glommio's `TcpStream`; ALPN offers `h2` and
//! `http/1.1`, and the protocol is still chosen by the connection preface, as on plain ports.
//! With `--client-cert-auth`, the Common Name of a verified client certificate names the user of
//! a call that carries no token (see `auth::identify`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::error::Error;

/// The client TLS flags, as etcd names them.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// `--cert-file`: the server's certificate (chain), PEM.
    pub cert_file: Option<PathBuf>,
    /// `--key-file`: its private key, PEM.
    pub key_file: Option<PathBuf>,
    /// `--trusted-ca-file`: CAs client certificates are verified against, PEM.
    pub trusted_ca_file: Option<PathBuf>,
    /// `--client-cert-auth`.
    pub client_cert_auth: bool,
}

impl TlsFiles {
    /// Whether clients must present a certificate the trusted CAs signed: etcd 3.4 requires one
    /// with `--client-cert-auth` and also whenever `--trusted-ca-file` is given.
    pub fn requires_client_cert(&self) -> bool {
        self.client_cert_auth || self.trusted_ca_file.is_some()
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    // Read the file first, so a missing or unreadable file is reported as such.
    let pem = std::fs::read(path)
        .map_err(|e| invalid(format!("cannot read {flag} {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad PEM in {flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "no certificate in {flag} {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = std::fs::read(path)
        .map_err(|e| invalid(format!("cannot read --key-file {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(format!(
            "no private key in --key-file {}: {e}",
            path.display()
        ))
    })
}

/// The rustls configuration for the client listeners, built (and every file read) at start.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, Error> {
    let (Some(cert_file), Some(key_file)) = (&files.cert_file, &files.key_file) else {
        return Err(invalid(
            "TLS key/cert (--cert-file, --key-file) must be provided for client URLs with the \
             HTTPS scheme"
                .into(),
        ));
    };
    let certs = read_certs("--cert-file", cert_file)?;
    let key = read_key(key_file)?;
    // ring rather than aws-lc-rs: a small, quick C build. Its provider is deprecated only for
    // lacking post-quantum key exchange, which etcd 3.4's clients do not offer either.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS: {e}")))?;
    let builder = if files.requires_client_cert() {
        let Some(ca_file) = &files.trusted_ca_file else {
            return Err(invalid(
                "--client-cert-auth needs --trusted-ca-file (the CAs client certificates are \
                 verified against)"
                    .into(),
            ));
        };
        let mut roots = RootCertStore::empty();
        for ca in read_certs("--trusted-ca-file", ca_file)? {
            roots.add(ca).map_err(|e| {
                invalid(format!(
                    "bad CA certificate in --trusted-ca-file {}: {e}",
                    ca_file.display()
                ))
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| invalid(format!("--trusted-ca-file {}: {e}", ca_file.display())))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(format!(
            "--cert-file {} and --key-file {} do not make a usable key pair: {e}",
            cert_file.display(),
            key_file.display()
        ))
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The Common Name of the (verified) certificate the client presented, if any.
pub fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    (!cn.is_empty()).then(|| cn.to_string())
}

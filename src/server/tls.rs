//! TLS for `https://` client URLs, with etcd's flags: `--cert-file` and `--key-file` (PEM) are
//! the server's certificate chain and key; `--trusted-ca-file` (PEM) holds the CAs that client
//! certificates must chain to; `--client-cert-auth` (or a trusted CA file alone, as in etcd 3.4)
//! makes a verified client certificate a condition of the handshake. `--auto-tls` serves a
//! self-signed certificate made at start when no files are given (`crate::tls::self_cert`).
//!
//! Served with rustls (ring provider) over glommio's `TcpStream`; ALPN offers `h2` and
//! `http/1.1`, and the protocol is still chosen by the connection preface, as on plain ports.
//! With `--client-cert-auth`, the Common Name of a verified client certificate names the user of
//! a call that carries no token (see `auth::identify`). Reading the files and building the
//! configuration is shared with the peer transport (`crate::tls`).

use std::sync::Arc;

use crate::error::Error;
pub use crate::tls::TlsFiles;

/// The rustls configuration for the client listeners, built (and every file read) at start.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut cfg = crate::tls::server_config(files)?;
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

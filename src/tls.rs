//! TLS material shared by the client listeners (`server::tls`) and the peer transport
//! (`peer::transport`): reading etcd's PEM flags, building rustls configurations for either side,
//! and the self-signed certificates of `--auto-tls` / `--peer-auto-tls`.
//!
//! Both sides use rustls with the ring provider. The rules follow etcd 3.4's: a trusted CA file
//! or `--[peer-]client-cert-auth` makes a verified certificate from the other side a condition of
//! the handshake; a dialing member always verifies the member it reached against the peer CAs,
//! the URL's host (a DNS name, or an IP address matched against IP SANs) naming it, unless its
//! own certificate is self-signed (auto TLS), in which case it verifies nothing, as etcd does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::Error;

/// Which of etcd's two flag families a [`TlsFiles`] came from: it names the flags in errors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Side {
    /// `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`.
    #[default]
    Client,
    /// `--peer-cert-file`, `--peer-key-file`, `--peer-trusted-ca-file`,
    /// `--peer-client-cert-auth`.
    Peer,
}

impl Side {
    /// The flag `name` (as the client side spells it) of this side.
    pub fn flag(self, name: &str) -> String {
        match self {
            Side::Client => format!("--{name}"),
            Side::Peer => format!("--peer-{name}"),
        }
    }

    fn urls(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Peer => "peer",
        }
    }
}

/// One side's TLS flags, as etcd names them.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub side: Side,
    /// `--[peer-]cert-file`: this server's certificate (chain), PEM.
    pub cert_file: Option<PathBuf>,
    /// `--[peer-]key-file`: its private key, PEM.
    pub key_file: Option<PathBuf>,
    /// `--[peer-]trusted-ca-file`: CAs the other side's certificates are verified against, PEM.
    pub trusted_ca_file: Option<PathBuf>,
    /// `--[peer-]client-cert-auth`.
    pub client_cert_auth: bool,
    /// The certificate was made by auto TLS: a dialer using it verifies nothing.
    pub self_signed: bool,
}

impl TlsFiles {
    /// Whether the other side must present a certificate the trusted CAs signed: etcd 3.4
    /// requires one with `--client-cert-auth` and also whenever a trusted CA file is given.
    pub fn requires_client_cert(&self) -> bool {
        self.client_cert_auth || self.trusted_ca_file.is_some()
    }

    /// No certificate or key given (etcd's `TLSInfo.Empty`): auto TLS may make them.
    pub fn is_empty(&self) -> bool {
        self.cert_file.is_none() && self.key_file.is_none()
    }

    fn flag(&self, name: &str) -> String {
        self.side.flag(name)
    }

    fn cert_and_key(&self) -> Result<(&Path, &Path), Error> {
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Ok((c, k)),
            _ => Err(invalid(format!(
                "TLS key/cert ({}, {}) must be provided for {} URLs with the HTTPS scheme",
                self.flag("cert-file"),
                self.flag("key-file"),
                self.side.urls()
            ))),
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// The crypto provider every configuration uses. ring rather than aws-lc-rs: a small, quick C
/// build. Its provider is deprecated only for lacking post-quantum key exchange, which etcd
/// 3.4 does not offer either.
pub fn provider() -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
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

fn read_key(flag: &str, path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = std::fs::read(path)
        .map_err(|e| invalid(format!("cannot read {flag} {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(format!("no private key in {flag} {}: {e}", path.display())))
}

fn roots(flag: &str, path: &Path) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(flag, path)? {
        roots.add(ca).map_err(|e| {
            invalid(format!(
                "bad CA certificate in {flag} {}: {e}",
                path.display()
            ))
        })?;
    }
    Ok(Arc::new(roots))
}

/// This side's certificate chain and key, read from the files.
fn identity(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let (cert_file, key_file) = files.cert_and_key()?;
    let certs = read_certs(&files.flag("cert-file"), cert_file)?;
    let key = read_key(&files.flag("key-file"), key_file)?;
    Ok((certs, key))
}

fn pair_error(files: &TlsFiles, e: rustls::Error) -> Error {
    let (c, k) = (
        files.cert_file.as_deref().unwrap_or(Path::new("")),
        files.key_file.as_deref().unwrap_or(Path::new("")),
    );
    invalid(format!(
        "{} {} and {} {} do not make a usable key pair: {e}",
        files.flag("cert-file"),
        c.display(),
        files.flag("key-file"),
        k.display()
    ))
}

/// The configuration that accepts connections (client listeners or the peer listener), built
/// (and every file read) at start. No ALPN: the caller sets what its protocol needs.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, Error> {
    let (certs, key) = identity(files)?;
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS: {e}")))?;
    let builder = if files.requires_client_cert() {
        let Some(ca_file) = &files.trusted_ca_file else {
            return Err(invalid(format!(
                "{} needs {} (the CAs the other side's certificates are verified against)",
                files.flag("client-cert-auth"),
                files.flag("trusted-ca-file")
            )));
        };
        let flag = files.flag("trusted-ca-file");
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(&flag, ca_file)?, provider)
                .build()
                .map_err(|e| invalid(format!("{flag} {}: {e}", ca_file.display())))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| pair_error(files, e))
}

/// The configuration a member dials its peers with: it presents its own certificate, and
/// verifies the peer's against `--peer-trusted-ca-file`, or not at all if its own certificate
/// is self-signed (auto TLS).
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, Error> {
    let (certs, key) = identity(files)?;
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS: {e}")))?;
    let builder = if files.self_signed {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
    } else {
        let Some(ca_file) = &files.trusted_ca_file else {
            return Err(invalid(format!(
                "{} is needed to verify the certificates of {} URLs with the HTTPS scheme \
                 (or use {})",
                files.flag("trusted-ca-file"),
                files.side.urls(),
                files.flag("auto-tls")
            )));
        };
        builder.with_root_certificates(roots(&files.flag("trusted-ca-file"), ca_file)?)
    };
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| pair_error(files, e))
}

/// What a gRPC client (the load generator, the gRPC proxy) dials `https://` endpoints with,
/// from etcdctl's flags: `--cacert` verifies the server (without it nothing is trusted; etcd
/// would use the system's CAs), or `--insecure-skip-tls-verify` verifies nothing but the
/// handshake's signatures; `--cert` and `--key` are presented if given. ALPN offers `h2`.
pub fn dial_config(
    cacert: Option<&Path>,
    cert_key: Option<(&Path, &Path)>,
    skip_verify: bool,
) -> Result<rustls::ClientConfig, Error> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS: {e}")))?;
    let builder = match (skip_verify, cacert) {
        (true, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider))),
        (false, Some(ca)) => builder.with_root_certificates(roots("--cacert", ca)?),
        (false, None) => builder.with_root_certificates(RootCertStore::empty()),
    };
    let mut cfg = match cert_key {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs("--cert", cert)?, read_key("--key", key)?)
            .map_err(|e| invalid(format!("--cert and --key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The name a dialer checks the certificate of `host:port` against: its host, an IP address
/// or a DNS name.
pub fn server_name(authority: &str) -> Result<ServerName<'static>, String> {
    let host = match authority.rsplit_once(':') {
        Some((h, _)) => h,
        None => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

/// Auto TLS's verifier: any certificate is taken (it is self-signed), but the handshake's
/// signatures are still checked, so the session is bound to the key the peer showed.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The peer transport's TLS from the peer flags: a listener that speaks TLS when this member's
/// (first) listen URL is `https://`, and a dialer for `https://` peers. With `auto` (`--peer-auto-tls`)
/// and no certificate or key given, a self-signed certificate is made in `fixtures` for the
/// hosts of `listen_urls`, as etcd does; given files win over auto TLS. Without any `https://`
/// URL the flags are not used.
pub fn peer_tls(
    mut files: TlsFiles,
    auto: bool,
    fixtures: &Path,
    listen_urls: &[String],
    other_urls: &[String],
) -> Result<crate::peer::PeerTls, Error> {
    use crate::cluster::is_tls_url;
    files.side = Side::Peer;
    let listen_tls = listen_urls.first().is_some_and(|u| is_tls_url(u));
    if !listen_tls && !other_urls.iter().any(|u| is_tls_url(u)) {
        return Ok(crate::peer::PeerTls::default());
    }
    if auto && files.is_empty() {
        let (cert, key) = self_cert(fixtures, &url_hosts(listen_urls))?;
        tracing::info!(cert = %cert.display(), key = %key.display(), "peer auto TLS: self-signed certificate");
        files.cert_file = Some(cert);
        files.key_file = Some(key);
        files.self_signed = true;
    } else if auto {
        tracing::warn!(
            "ignoring --peer-auto-tls since --peer-cert-file and --peer-key-file are given"
        );
    }
    let accept = if listen_tls {
        Some(Arc::new(server_config(&files)?))
    } else {
        None
    };
    files.cert_and_key()?;
    Ok(crate::peer::PeerTls {
        accept,
        dial: Some(Arc::new(client_config(&files)?)),
    })
}

/// `--auto-tls` for the client listeners: with no `--cert-file`/`--key-file`, a self-signed
/// certificate made in `fixtures` for the hosts of every listen client URL; clients then skip
/// verification (`etcdctl --insecure-skip-tls-verify`).
pub fn client_auto_tls(
    files: &mut TlsFiles,
    fixtures: &Path,
    listen_urls: &[String],
) -> Result<(), Error> {
    if !files.is_empty() {
        tracing::warn!("ignoring --auto-tls since --cert-file and --key-file are given");
        return Ok(());
    }
    let (cert, key) = self_cert(fixtures, &url_hosts(listen_urls))?;
    tracing::info!(cert = %cert.display(), key = %key.display(), "client auto TLS: self-signed certificate");
    files.cert_file = Some(cert);
    files.key_file = Some(key);
    files.self_signed = true;
    Ok(())
}

/// How long an auto-TLS certificate is valid, as etcd's: a year.
const SELF_CERT_VALIDITY: time::Duration = time::Duration::days(365);

/// `--auto-tls` / `--peer-auto-tls`: the certificate and key in `dir` (`cert.pem`, `key.pem`),
/// made there first if either is missing, as etcd does (so a restart keeps its certificate).
/// The certificate is self-signed, valid for a year from now, for server use, with the `hosts`
/// (the listed URLs' hosts) as its subject alternative names: IP addresses as IP SANs, others as
/// DNS names. The key is ECDSA P-384 (etcd's is P-521, which ring cannot sign with).
pub fn self_cert(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), Error> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let fail = |what: &str, e: String| invalid(format!("auto TLS: {what}: {e}"));
    let (cert_pem, key_pem) =
        make_self_cert(hosts).map_err(|e| fail("cannot make a certificate", e))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e))?;
    }
    write_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// The PEMs of a self-signed certificate for `hosts` and its key (pure but for randomness and
/// the clock).
fn make_self_cert(hosts: &[String]) -> Result<(String, String), String> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType, SerialNumber,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| e.to_string())?;
    let mut p = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "spindle");
    p.distinguished_name = name;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now;
    p.not_after = now + SELF_CERT_VALIDITY;
    // A random positive 128-bit serial number.
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(|e| e.to_string())?;
    serial[0] &= 0x7f;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for h in hosts {
        let h = h.trim_start_matches('[').trim_end_matches(']');
        match h.parse::<std::net::IpAddr>() {
            Ok(ip) if !ips.contains(&SanType::IpAddress(ip)) => ips.push(SanType::IpAddress(ip)),
            Ok(_) => {}
            Err(_) => {
                let san = SanType::DnsName(h.try_into().map_err(|e| format!("{h:?}: {e}"))?);
                if !dns.contains(&san) {
                    dns.push(san);
                }
            }
        }
    }
    // DNS names first, then addresses, as etcd's certificates list them.
    p.subject_alt_names = dns.into_iter().chain(ips).collect();
    let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The hosts of `urls` (`scheme://host:port`), for a self-signed certificate's names.
pub fn url_hosts(urls: &[String]) -> Vec<String> {
    urls.iter()
        .filter_map(|u| {
            let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
            let auth = rest.split('/').next()?;
            let host = match auth.rsplit_once(':') {
                Some((h, _)) => h,
                None => auth,
            };
            (!host.is_empty()).then(|| host.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_cert_is_made_once_with_the_hosts_as_names_and_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("fixtures/peer");
        let hosts = url_hosts(&[
            "https://127.0.0.1:2380".to_string(),
            "https://localhost:2381".to_string(),
            "https://127.0.0.1:2382".to_string(),
        ]);
        assert_eq!(hosts, ["127.0.0.1", "localhost", "127.0.0.1"]);
        let (c, k) = self_cert(&d, &hosts).unwrap();
        let pem = std::fs::read(&c).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let sans = x.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = sans.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["DNSName(localhost)", "IPAddress(7f:00:00:01)"]);
        let validity = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(validity, 365 * 86400);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A restart keeps the certificate it made.
        self_cert(&d, &hosts).unwrap();
        assert_eq!(std::fs::read(&c).unwrap(), pem);
        // And it makes working configurations for both ends.
        let files = TlsFiles {
            side: Side::Peer,
            cert_file: Some(c),
            key_file: Some(k),
            self_signed: true,
            ..TlsFiles::default()
        };
        server_config(&files).unwrap();
        client_config(&files).unwrap();
    }

    #[test]
    fn errors_name_the_side_s_flags() {
        let files = TlsFiles {
            side: Side::Peer,
            ..TlsFiles::default()
        };
        let e = server_config(&files).unwrap_err().to_string();
        assert!(
            e.contains("--peer-cert-file, --peer-key-file") && e.contains("peer URLs"),
            "{e}"
        );
        assert_eq!(
            server_name("127.0.0.1:2380").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("[::1]:2380").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
    }
}

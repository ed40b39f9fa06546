//! TLS on client URLs, end to end with etcdctl: `https://` listeners (`--cert-file`,
//! `--key-file`), client certificates (`--trusted-ca-file`, `--client-cert-auth`), an `http://`
//! and an `https://` listener side by side, clean refusals of plain HTTP on a TLS port and of
//! TLS on a plain port, a certificate's Common Name as the user with auth enabled, and a refusal
//! to start with a missing certificate file. The certificates are made here with rcgen: a CA, a
//! server certificate for 127.0.0.1 and localhost, client certificates with CN `root` and
//! `alice`, and a client certificate from another CA. The CN-as-user flow is also run against
//! etcd 3.4 with the same flags, and the outcomes compared.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::etcdctl::{self, Ctl};
use common::pki::{Pki, Usage};
use common::process::{free_ports, Kill};
use common::server::{spawn_logged, Kind, SPINDLE};

/// A CA (`ca.pem`), a server certificate for 127.0.0.1/localhost (`server`), client
/// certificates with CN `root` (`root`) and `alice` (`alice`) and one without a CN (`nocn`), and a client certificate with CN
/// `root` from a CA the server does not trust (`stranger`).
fn make_pki() -> Pki {
    let pki = Pki::new();
    let issuer = pki.ca("spindle test CA", Some("ca.pem"));
    pki.leaf(
        "server",
        "spindle server",
        &["127.0.0.1", "localhost"],
        // Client use too: etcd's JSON gateway dials its own gRPC port with this certificate.
        &[Usage::ServerAuth, Usage::ClientAuth],
        &issuer,
    );
    for (name, cn) in [("root", "root"), ("alice", "alice"), ("nocn", "")] {
        pki.leaf(name, cn, &[], &[Usage::ClientAuth], &issuer);
    }
    let other = pki.ca("another CA", None);
    pki.leaf("stranger", "root", &[], &[Usage::ClientAuth], &other);
    pki
}

/// A server this test started with its own client URLs, killed when dropped (its log shown if
/// the test is failing).
struct Tls {
    kind: Kind,
    _proc: Kill,
    dir: tempfile::TempDir,
    /// https:// port.
    port: u16,
    /// http:// port, when asked for.
    plain: Option<u16>,
}

impl Tls {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {:?} log ---\n{}", self.kind, self.log());
        }
    }
}

/// Starts `kind` with an https:// client URL (and an http:// one too when `with_plain`), the
/// server certificate of `pki` and `extra` flags, and waits until it serves TLS clients.
fn start(kind: Kind, pki: &Pki, with_plain: bool, extra: &[&str]) -> Tls {
    let ports = free_ports(3);
    let dir = tempfile::tempdir().unwrap();
    let mut urls = format!("https://127.0.0.1:{}", ports[0]);
    if with_plain {
        urls.push_str(&format!(",http://127.0.0.1:{}", ports[1]));
    }
    let (cert, key) = pki.cert("server");
    let data = dir.path().join("data");
    let mut args: Vec<String> = match kind {
        Kind::Spindle => vec!["serve".into(), "--cores".into(), "2".into()],
        Kind::Etcd => {
            let peer = format!("http://127.0.0.1:{}", ports[2]);
            vec![
                "--name".into(),
                "default".into(),
                "--listen-peer-urls".into(),
                peer.clone(),
                "--initial-advertise-peer-urls".into(),
                peer.clone(),
                "--initial-cluster".into(),
                format!("default={peer}"),
            ]
        }
    };
    args.extend(
        [
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &urls,
            "--advertise-client-urls",
            &urls,
            "--cert-file",
            &cert,
            "--key-file",
            &key,
        ]
        .map(str::to_string),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    let child = spawn_logged(kind, &args, &dir.path().join("server.log"));
    let mut s = Tls {
        kind,
        _proc: Kill::new(child),
        dir,
        port: ports[0],
        plain: with_plain.then_some(ports[1]),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (root, root_key) = pki.cert("root");
    loop {
        let ready = match kind {
            Kind::Spindle => s.log().contains("ready to serve client requests"),
            // Health with a client certificate works whatever the flags.
            Kind::Etcd => {
                ctl(
                    &s,
                    pki,
                    &[
                        "--cert",
                        &root,
                        "--key",
                        &root_key,
                        "--command-timeout=2s",
                        "endpoint",
                        "health",
                    ],
                )
                .ok
            }
        };
        if ready {
            break;
        }
        if let Ok(Some(st)) = s._proc.child().try_wait() {
            panic!("{kind:?} exited ({st}):\n{}", s.log());
        }
        assert!(
            Instant::now() < deadline,
            "{kind:?} not ready:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

/// etcdctl over TLS to `s`, trusting the test CA, with `args`.
fn ctl(s: &Tls, pki: &Pki, args: &[&str]) -> Ctl {
    let ca = pki.path("ca.pem");
    let mut all = vec!["--cacert", &ca];
    all.extend_from_slice(args);
    etcdctl::run(&s.url(), &all)
}

/// etcdctl over TLS with the client certificate `name`.
fn ctl_as(s: &Tls, pki: &Pki, name: &str, args: &[&str]) -> Ctl {
    let (cert, key) = pki.cert(name);
    let mut all = vec!["--cert", &cert, "--key", &key];
    all.extend_from_slice(args);
    ctl(s, pki, &all)
}

fn assert_ok(c: &Ctl, what: &str) {
    assert!(c.ok, "{what} failed: {}{}", c.stdout, c.stderr);
}

/// A JSON POST over TLS (no ALPN: HTTP/1.1) to `s`, trusting the test CA, with the client
/// certificate `cert` and the auth token `token` when given. Returns the status line and the
/// body. It sends an `Accept` header: without one, etcd 3.4's gateway runs a token-less call as
/// the Common Name of the server's own certificate (spindle does not; see the design doc §9b).
fn https_post(
    s: &Tls,
    pki: &Pki,
    cert: Option<&str>,
    token: Option<&str>,
    path: &str,
    body: &str,
) -> (String, String) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some(name) => {
            let (c, k) = pki.cert(name);
            let chain = CertificateDer::pem_file_iter(c)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(k).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let auth = token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Accept: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    // JSON bodies in one key order (etcd's and spindle's differ, which no client sees).
    let body = match serde_json::from_str::<serde_json::Value>(body.trim()) {
        Ok(v) => v.to_string(),
        Err(_) => body.trim().to_string(),
    };
    (status, body)
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sends a plain HTTP/1.1 request to `port` and returns what came back before the connection
/// closed (or the read timed out).
fn plain_http(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn https_and_http_listeners_serve_side_by_side_and_refuse_the_wrong_protocol() {
    let pki = make_pki();
    let s = start(Kind::Spindle, &pki, true, &[]);
    assert_ok(&ctl(&s, &pki, &["put", "k", "over-tls"]), "put over TLS");
    let got = ctl(&s, &pki, &["get", "k", "--print-value-only"]);
    assert_ok(&got, "get over TLS");
    assert_eq!(got.stdout.trim(), "over-tls");

    // The plain listener serves the same store.
    let plain = format!("127.0.0.1:{}", s.plain.unwrap());
    let got = etcdctl::run(&plain, &["get", "k", "--print-value-only"]);
    assert_ok(&got, "get over the http listener");
    assert_eq!(got.stdout.trim(), "over-tls");
    assert_ok(
        &etcdctl::run(&plain, &["put", "k2", "plain"]),
        "put over the http listener",
    );

    // Plain HTTP and plain gRPC to the TLS port: refused, the connection closes.
    let answer = plain_http(s.port);
    assert!(!answer.contains("200 OK"), "{answer}");
    let refused = etcdctl::run(
        &format!("http://127.0.0.1:{}", s.port),
        &["--dial-timeout=1s", "--command-timeout=2s", "get", "k"],
    );
    assert!(!refused.ok, "plain gRPC to a TLS port succeeded");
    // TLS to the plain port: refused too.
    let ca = pki.path("ca.pem");
    let refused = etcdctl::run(
        &format!("https://{plain}"),
        &[
            "--cacert",
            &ca,
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "get",
            "k",
        ],
    );
    assert!(!refused.ok, "TLS to a plain port succeeded");
    assert!(s.log().contains("TLS handshake refused"), "{}", s.log());

    // And the next TLS client (and HTTP/1.1 over TLS, through the gateway) is served.
    let got = ctl(&s, &pki, &["get", "k2", "--print-value-only"]);
    assert_ok(&got, "get over TLS after the refusals");
    assert_eq!(got.stdout.trim(), "plain");
    assert!(plain_http(s.plain.unwrap()).contains("200 OK"));

    // A client that does not trust the server's CA refuses it.
    let untrusting = etcdctl::run(
        &s.url(),
        &["--dial-timeout=1s", "--command-timeout=2s", "get", "k"],
    );
    assert!(!untrusting.ok);
}

#[test]
fn client_cert_auth_requires_a_certificate_from_the_trusted_ca() {
    let pki = make_pki();
    let ca = pki.path("ca.pem");
    let s = start(
        Kind::Spindle,
        &pki,
        false,
        &["--client-cert-auth", "--trusted-ca-file", &ca],
    );
    let short = ["--dial-timeout=1s", "--command-timeout=2s"];
    let mut put = short.to_vec();
    put.extend(["put", "k", "v"]);
    let none = ctl(&s, &pki, &put);
    assert!(!none.ok, "a client without a certificate was served");
    let stranger = ctl_as(&s, &pki, "stranger", &put);
    assert!(
        !stranger.ok,
        "a certificate from an untrusted CA was accepted"
    );
    assert_ok(&ctl_as(&s, &pki, "alice", &put), "put with a client cert");
    let got = ctl_as(&s, &pki, "root", &["get", "k", "--print-value-only"]);
    assert_ok(&got, "get with a client cert");
    assert_eq!(got.stdout.trim(), "v");
}

/// The CN-as-user session: create root, enable auth over the `root` certificate, then write as
/// `root` (by certificate), as `alice` (by certificate: no such user), and as `alice` with
/// root's password (the token wins). Returns each step's success and the error lines.
fn cn_session(kind: Kind, pki: &Pki) -> Vec<(bool, String)> {
    let ca = pki.path("ca.pem");
    let s = start(
        kind,
        pki,
        false,
        &["--client-cert-auth", "--trusted-ca-file", &ca],
    );
    let steps: &[(&str, &[&str])] = &[
        ("root", &["user", "add", "root:rootpw"]),
        ("root", &["user", "grant-role", "root", "root"]),
        ("root", &["auth", "enable"]),
        ("root", &["put", "by-cert", "root"]),
        ("root", &["get", "by-cert", "--print-value-only"]),
        ("alice", &["put", "by-cert", "alice"]),
        (
            "alice",
            &["--user", "root:rootpw", "put", "by-password", "x"],
        ),
        ("root", &["user", "add", "alice:alicepw"]),
        ("alice", &["put", "by-cert", "alice"]),
        ("root", &["role", "add", "writer"]),
        (
            "root",
            &["role", "grant-permission", "writer", "readwrite", "by-cert"],
        ),
        ("root", &["user", "grant-role", "alice", "writer"]),
        ("alice", &["put", "by-cert", "alice"]),
        ("alice", &["get", "by-cert", "--print-value-only"]),
        ("alice", &["user", "list"]),
    ];
    let mut out: Vec<(bool, String)> = steps
        .iter()
        .map(|(cert, args)| {
            let c = ctl_as(&s, pki, cert, args);
            let errors = c
                .stderr
                .lines()
                .filter(|l| l.starts_with("Error"))
                .collect::<Vec<_>>()
                .join("\n");
            (c.ok, format!("{}{}", c.stdout.trim(), errors))
        })
        .collect();
    // The JSON gateway refuses a certificate with a name; without one, a token is needed.
    let range = r#"{"key":"YnktY2VydA=="}"#;
    let (status, body) = https_post(&s, pki, Some("root"), None, "/v3/kv/range", range);
    out.push((status.contains("200"), format!("{status} {body}")));
    let (status, body) = https_post(&s, pki, Some("nocn"), None, "/v3/kv/range", range);
    out.push((status.contains("200"), format!("{status} {body}")));
    let (status, body) = https_post(
        &s,
        pki,
        Some("nocn"),
        None,
        "/v3/auth/authenticate",
        r#"{"name":"root","password":"rootpw"}"#,
    );
    let token = serde_json::from_str::<serde_json::Value>(&body)
        .unwrap_or_else(|e| panic!("{e}: {status} {body}"))["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {status} {body}"))
        .to_string();
    let (status, body) = https_post(&s, pki, Some("nocn"), Some(&token), "/v3/kv/range", range);
    let kvs = serde_json::from_str::<serde_json::Value>(&body)
        .unwrap_or_else(|e| panic!("{e}: {status} {body}"))["kvs"]
        .clone();
    out.push((status.contains("200"), format!("{status} {kvs}")));
    out
}

#[test]
fn client_certificate_common_name_is_the_user() {
    let pki = make_pki();
    let got = cn_session(Kind::Spindle, &pki);
    let oks: Vec<bool> = got.iter().map(|(ok, _)| *ok).collect();
    assert_eq!(
        oks,
        [
            true, true, true, true, true, false, true, true, false, true, true, true, true, true,
            false, false, false, true
        ],
        "{got:#?}"
    );
    assert_eq!(got[4].1, "root");
    assert_eq!(got[13].1, "alice");
    let etcd = cn_session(Kind::Etcd, &pki);
    assert_eq!(got, etcd, "spindle (left) and etcd 3.4 (right) differ");
}

/// As in etcd 3.4, a trusted CA file alone (no `--client-cert-auth`) makes the handshake ask for,
/// and require, a client certificate.
#[test]
fn a_trusted_ca_file_alone_requires_client_certificates_as_in_etcd() {
    let pki = make_pki();
    let ca = pki.path("ca.pem");
    let outcomes = |kind| {
        let s = start(kind, &pki, false, &["--trusted-ca-file", &ca]);
        let put = ["--dial-timeout=1s", "--command-timeout=2s", "put", "k", "v"];
        let (status, _) = https_post(&s, &pki, Some("alice"), None, "/v3/kv/range", "{}");
        (
            [
                ctl(&s, &pki, &put).ok,
                ctl_as(&s, &pki, "stranger", &put).ok,
                ctl_as(&s, &pki, "alice", &put).ok,
            ],
            status,
        )
    };
    let spindle = outcomes(Kind::Spindle);
    assert_eq!(spindle.0, [false, false, true]);
    assert_eq!(
        spindle,
        outcomes(Kind::Etcd),
        "spindle (left) and etcd (right)"
    );
}

#[test]
fn a_missing_certificate_file_stops_the_start() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let url = format!("https://127.0.0.1:{port}");
    let data = dir.path().join("data");
    let missing: PathBuf = dir.path().join("no-such-cert.pem");
    let (_, key) = pki.cert("server");
    let run = |extra: &[&str]| {
        let out = Command::new(SPINDLE)
            .args(["serve", "--cores", "1", "--listen-client-urls", &url])
            .arg("--data-dir")
            .arg(&data)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--cert-file", missing.to_str().unwrap(), "--key-file", &key]);
    assert!(
        err.contains("--cert-file") && err.contains("no-such-cert.pem"),
        "{err}"
    );
    let err = run(&[]);
    assert!(err.contains("--cert-file, --key-file"), "{err}");
}

//! TLS between cluster members, end to end with `spindle serve` processes and etcdctl:
//! `https://` peer URLs with mutual TLS (`--peer-cert-file`, `--peer-key-file`,
//! `--peer-trusted-ca-file`, `--peer-client-cert-auth`) serving writes through every member and a
//! killed member catching up; a member added with an `https://` peer URL whose process presents a
//! certificate from another CA, refused at the handshake (both logs say so) while the cluster
//! keeps serving, and plain TCP on a TLS peer port refused, then the member joining with a good
//! certificate; and `--auto-tls` + `--peer-auto-tls`
//! clusters of spindle and of etcd 3.4 driven by the same etcdctl commands
//! (`--insecure-skip-tls-verify`), their outputs and self-signed certificates compared.
//!
//! The certificates are made here with rcgen. Needs `etcd` and `etcdctl` 3.4 on PATH.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::etcdctl::{self, Ctl};
use common::pki::{Pki, Usage};
use common::process::{free_ports, Kill};
use common::server::{spawn_logged, Kind, Ports, Server};
use common::wait_for;

const TOKEN: &str = "peer-tls-test";

/// `ca.pem`, member certificates `m0`..`m3` it signed, and `stranger`, signed by another CA.
fn make_pki() -> Pki {
    let pki = Pki::new();
    let issuer = pki.ca("spindle peer CA", Some("ca.pem"));
    // Member certificates for 127.0.0.1, for server and client use (a member accepts and dials).
    let member = |name: &str, issuer| {
        let usages = [Usage::ServerAuth, Usage::ClientAuth];
        pki.leaf(name, name, &["127.0.0.1"], &usages, issuer);
    };
    for i in 0..4 {
        member(&format!("m{i}"), &issuer);
    }
    member("stranger", &pki.ca("another CA", None));
    pki
}

fn https_peer(p: &Ports) -> String {
    format!("https://127.0.0.1:{}", p.peer)
}

/// A member's flags for an mTLS cluster: `https://` peer URL and certificate `cert`.
fn mtls_member(
    pki: &Pki,
    name: &str,
    cert: &str,
    p: &Ports,
    initial: &str,
    state: &str,
) -> Vec<String> {
    let url = https_peer(p);
    let mut args = common::cluster::spindle_member(name, initial, state, TOKEN, &url, &url);
    args.extend([
        "--peer-cert-file".to_string(),
        pki.path(&format!("{cert}.pem")),
        "--peer-key-file".to_string(),
        pki.path(&format!("{cert}-key.pem")),
        "--peer-trusted-ca-file".to_string(),
        pki.path("ca.pem"),
        "--peer-client-cert-auth".to_string(),
    ]);
    args
}

/// Three members `m0..m2` over mTLS peer URLs, each with its own certificate, ready.
fn mtls_cluster(pki: &Pki, ports: &[Ports]) -> Vec<Server> {
    let urls: Vec<String> = ports.iter().map(https_peer).collect();
    let initial = common::cluster::initial_cluster("m", &urls);
    let mut servers: Vec<Server> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = format!("m{i}");
            Server::spawn_on(
                Kind::Spindle,
                *p,
                &mtls_member(pki, &name, &name, p, &initial, "new"),
            )
        })
        .collect();
    for s in &mut servers {
        s.wait_ready();
    }
    servers
}

/// Runs etcdctl `args` against `endpoint` until it succeeds (a cluster settling, a member
/// catching up), for at most `secs`.
fn until_ok(endpoint: &str, args: &[&str], secs: u64) -> Ctl {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = etcdctl::run(endpoint, args);
        if out.ok || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `key`'s value as the member at `endpoint` serves it from its own store.
fn local_value(endpoint: &str, key: &str) -> String {
    let out = etcdctl::run(
        endpoint,
        &["get", key, "--consistency=s", "--print-value-only"],
    );
    out.stdout.trim().to_string()
}

#[test]
fn mutual_tls_cluster_serves_through_every_member_and_a_killed_member_catches_up() {
    let pki = make_pki();
    let ports = Ports::free(3);
    let mut servers = mtls_cluster(&pki, &ports);
    // Writes through every member (followers relay them to the leader over the TLS links).
    for (i, s) in servers.iter().enumerate() {
        let out = until_ok(
            &s.endpoint(),
            &["put", &format!("k{i}"), &format!("v{i}")],
            20,
        );
        assert!(out.ok, "put through m{i}: {out:?}");
    }
    for s in &servers {
        for i in 0..3 {
            let out = s.etcdctl(&["get", &format!("k{i}"), "--print-value-only"]);
            assert_eq!(out.stdout.trim(), format!("v{i}"), "{out:?}");
        }
    }
    let list = servers[0].etcdctl(&["member", "list"]);
    assert!(list.ok, "{list:?}");
    for p in &ports {
        assert!(list.stdout.contains(&https_peer(p)), "{}", list.stdout);
    }

    // A member killed while the others take writes catches up over TLS once it is back.
    servers[2].kill();
    for n in 0..20 {
        let out = until_ok(
            &servers[n % 2].endpoint(),
            &["put", "missed", &format!("w{n}")],
            10,
        );
        assert!(out.ok, "{out:?}");
    }
    servers[2].restart();
    let e2 = servers[2].endpoint();
    wait_for("m2 to catch up", 20, || local_value(&e2, "missed") == "w19");
    let out = until_ok(&e2, &["put", "after", "restart"], 10);
    assert!(out.ok, "{out:?}");
    // A serializable read on m0: it applies the write once the leader tells it the commit.
    let e0 = servers[0].endpoint();
    wait_for("m0 to apply the write made through m2", 10, || {
        local_value(&e0, "after") == "restart"
    });
    for s in &servers {
        assert!(
            !s.log().contains("peer TLS handshake refused"),
            "members with good certificates were refused:\n{}",
            s.log_tail(40)
        );
    }
}

#[test]
fn a_member_with_a_certificate_from_another_ca_is_refused_and_the_cluster_keeps_serving() {
    let pki = make_pki();
    let ports = Ports::free(4);
    let servers = mtls_cluster(&pki, &ports[..3]);
    let e0 = servers[0].endpoint();
    let out = until_ok(&e0, &["put", "before", "1"], 20);
    assert!(out.ok, "{out:?}");

    // member add takes an https:// peer URL.
    let url = https_peer(&ports[3]);
    let added = until_ok(
        &e0,
        &[
            "member",
            "add",
            "m3",
            "--learner",
            &format!("--peer-urls={url}"),
        ],
        10,
    );
    assert!(added.ok, "{added:?}");
    let initial = added
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER="))
        .expect("ETCD_INITIAL_CLUSTER line")
        .trim_matches('"')
        .to_string();
    assert!(initial.contains(&format!("m3={url}")), "{initial}");

    // Its process trusts the cluster's CA but presents a certificate from another CA: the
    // members refuse it at the handshake, so it cannot even fetch the membership, and it stops.
    let mut stranger = Server::spawn_on(
        Kind::Spindle,
        ports[3],
        &mtls_member(&pki, "m3", "stranger", &ports[3], &initial, "existing"),
    );
    let status = stranger.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = stranger.log();
    assert!(
        log.contains("no member of the cluster answered") && log.contains("refused: TLS"),
        "{log}"
    );
    wait_for("a member to log the refusal", 10, || {
        servers
            .iter()
            .any(|s| s.log().contains("peer TLS handshake refused"))
    });

    // Plain TCP on a TLS peer port: closed without an answer, logged, and nothing else changes.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", ports[1].peer)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"\x00\x00\x00\x10plain bytes, no TLS")
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(
        !buf.starts_with(b"\x00\x00"),
        "a plain answer from a TLS port: {buf:?}"
    );

    // The cluster keeps serving through every member.
    for (i, s) in servers.iter().enumerate() {
        let out = until_ok(&s.endpoint(), &["put", &format!("after{i}"), "ok"], 10);
        assert!(out.ok, "m{i}: {out:?}");
        assert_eq!(local_value(&e0, "before"), "1");
    }
    let list = servers[1].etcdctl(&["member", "list"]);
    assert!(
        list.stdout.contains("unstarted") && list.stdout.contains(&url),
        "{}",
        list.stdout
    );
    drop(stranger);

    // With a certificate from the cluster's CA the added member joins over TLS and catches up.
    let mut m3 = Server::spawn_on(
        Kind::Spindle,
        ports[3],
        &mtls_member(&pki, "m3", "m3", &ports[3], &initial, "existing"),
    );
    m3.wait_ready();
    let e3 = m3.endpoint();
    wait_for("m3 to catch up", 20, || local_value(&e3, "after2") == "ok");
    // Its name and client URLs are published through the log once it runs, which may be
    // applied after the data it caught up on.
    wait_for("m3 to publish its attributes", 20, || {
        !servers[1]
            .etcdctl(&["member", "list"])
            .stdout
            .contains("unstarted")
    });
}

/// A server of `kind` with `https://` client and peer URLs and auto TLS on both.
struct AutoTls {
    kind: Kind,
    proc: Kill,
    dir: tempfile::TempDir,
    client: u16,
}

impl AutoTls {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client)
    }

    fn fixtures(&self, side: &str) -> PathBuf {
        self.dir.path().join("data/fixtures").join(side)
    }
}

impl Drop for AutoTls {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {:?} log ---\n{}", self.kind, self.log());
        }
    }
}

/// Three members of `kind` with auto TLS on client and peer URLs, ready.
fn auto_tls_cluster(kind: Kind) -> Vec<AutoTls> {
    let ports = free_ports(6);
    let peer = |i: usize| format!("https://127.0.0.1:{}", ports[2 * i + 1]);
    let initial = common::cluster::initial_cluster("a", &(0..3).map(peer).collect::<Vec<_>>());
    let members: Vec<AutoTls> = (0..3)
        .map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let client = format!("https://127.0.0.1:{}", ports[2 * i]);
            let mut args: Vec<String> = match kind {
                Kind::Spindle => ["serve", "--cores", "2"].map(str::to_string).to_vec(),
                Kind::Etcd => Vec::new(),
            };
            args.extend(common::cluster::flags(
                &format!("a{i}"),
                &initial,
                "new",
                TOKEN,
            ));
            args.extend(
                [
                    "--data-dir",
                    dir.path().join("data").to_str().unwrap(),
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                    "--listen-peer-urls",
                    &peer(i),
                    "--initial-advertise-peer-urls",
                    &peer(i),
                    "--auto-tls",
                    "--peer-auto-tls",
                ]
                .map(str::to_string),
            );
            let child = spawn_logged(kind, &args, &dir.path().join("server.log"));
            AutoTls {
                kind,
                proc: Kill::new(child),
                dir,
                client: ports[2 * i],
            }
        })
        .collect();
    let mut members = members;
    for m in &mut members {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctl(m, true, &["--command-timeout=2s", "endpoint", "health"]).ok {
            if let Ok(Some(st)) = m.proc.child().try_wait() {
                panic!("{kind:?} exited ({st}):\n{}", m.log());
            }
            assert!(
                Instant::now() < deadline,
                "{kind:?} not ready:\n{}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    members
}

/// etcdctl against `m` over TLS, skipping verification of its certificate or not.
fn ctl(m: &AutoTls, skip_verify: bool, args: &[&str]) -> Ctl {
    let mut all = vec!["--insecure-transport=false"];
    if skip_verify {
        all.push("--insecure-skip-tls-verify");
    }
    all.extend_from_slice(args);
    etcdctl::run(&m.endpoint(), &all)
}

/// What a user sees of an auto-TLS certificate: subject alternative names, validity in days,
/// key usages, whether it is a CA, and the key file's permissions.
fn describe_cert(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let pem = std::fs::read(dir.join("cert.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86400;
    let eku = cert
        .extended_key_usage()
        .unwrap()
        .map(|e| (e.value.server_auth, e.value.client_auth));
    let ku = cert.key_usage().unwrap().map(|k| k.value.to_string());
    let ca = cert.basic_constraints().unwrap().map(|b| b.value.ca);
    let mode = std::fs::metadata(dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    format!(
        "sans={sans:?} days={days} (server_auth, client_auth)={eku:?} key_usage={ku:?} \
         ca={ca:?} self_signed={} key_mode={mode:o}",
        cert.issuer() == cert.subject(),
    )
}

/// The same etcdctl session against an auto-TLS cluster of `kind`: what each step printed.
fn auto_tls_session(kind: Kind) -> Vec<String> {
    let members = auto_tls_cluster(kind);
    let mut seen = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let mut out = ctl(m, true, &["put", &format!("k{i}"), "v"]);
        for _ in 0..50 {
            if out.ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            out = ctl(m, true, &["put", &format!("k{i}"), "v"]);
        }
        seen.push(format!("put via a{i}: ok={} {}", out.ok, out.stdout.trim()));
    }
    let got = ctl(&members[2], true, &["get", "k", "--prefix"]);
    seen.push(format!("get: ok={} {}", got.ok, got.stdout.trim()));
    let list = ctl(&members[1], true, &["member", "list", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let mut urls: Vec<String> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let peer = m["peerURLs"][0].as_str().unwrap_or_default();
            let client = m["clientURLs"][0].as_str().unwrap_or_default();
            format!("{} {}", &peer[..8], &client[..8])
        })
        .collect();
    urls.sort();
    seen.push(format!("member list: {urls:?}"));
    // Without skipping verification, the self-signed certificate is refused by the client.
    let refused = ctl(
        &members[0],
        false,
        &["--dial-timeout=2s", "--command-timeout=3s", "get", "k0"],
    );
    let last = refused
        .stderr
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    seen.push(format!("verified get: ok={} {last}", refused.ok));
    for side in ["client", "peer"] {
        seen.push(format!(
            "{side} certificate: {}",
            describe_cert(&members[0].fixtures(side))
        ));
    }
    seen
}

#[test]
fn auto_tls_clusters_answer_etcdctl_as_etcd_s_do() {
    let spindle = auto_tls_session(Kind::Spindle);
    assert!(
        spindle[0].starts_with("put via a0: ok=true OK"),
        "{spindle:#?}"
    );
    assert!(spindle[3].contains("k0\nv\nk1\nv\nk2\nv"), "{spindle:#?}");
    eprintln!("spindle: {spindle:#?}");
    let etcd = auto_tls_session(Kind::Etcd);
    assert_eq!(spindle, etcd);
}

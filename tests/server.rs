//! `spindle serve` as a process: etcdctl works against it, bad input gets etcd's errors while
//! other clients keep being served, and SIGTERM shuts it down cleanly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The server's own log is the first thing to read when a test fails.
            let log = std::fs::read_to_string(self._dir.path().join("server.log"));
            eprintln!("--- spindle serve log ---\n{}", log.unwrap_or_default());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{port}"),
            "--cores",
            "2",
        ])
        .args(["--wal-segment-mb", "1"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start spindle");
    let mut s = Server {
        child,
        port,
        _dir: dir,
    };
    // Ready means the log says so: a connect alone can reach a core that is
    // listening while another core still fails to bind.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(s._dir.path().join("server.log")).unwrap_or_default();
        if log.contains("ready to serve client requests") {
            break;
        }
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!("spindle exited before serving ({status})");
        }
        assert!(Instant::now() < deadline, "spindle did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    s
}

fn etcdctl(port: u16, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=127.0.0.1:{port}"))
        .args(["--command-timeout=5s", "--dial-timeout=3s"])
        .args(args)
        .output()
        .expect("etcdctl is installed by tools/test");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn http(port: u16, raw: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn post(port: u16, path: &str, body: &str) -> String {
    http(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn etcdctl_basics_work() {
    let s = start(&[]);
    assert!(etcdctl(s.port, &["put", "foo", "bar"]).0);
    let (ok, out, _) = etcdctl(s.port, &["get", "foo", "--print-value-only"]);
    assert!(ok);
    assert_eq!(out.trim(), "bar");
    let (ok, out, err) = etcdctl(s.port, &["endpoint", "status", "-w", "json"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"revision\":2"), "{out}");
    let (ok, out, _) = etcdctl(s.port, &["member", "list"]);
    assert!(ok && out.contains("default"), "{out}");
    let snap = s._dir.path().join("snap.db");
    let (ok, out, err) = etcdctl(s.port, &["snapshot", "save", snap.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(std::fs::metadata(&snap).unwrap().len() > 32);
}

#[test]
fn bad_input_gets_errors_and_the_server_keeps_serving() {
    let s = start(&["--max-request-bytes", "2048"]);
    // Unimplemented services answer Unimplemented, not a fake success.
    let (ok, _, err) = etcdctl(s.port, &["user", "list"]);
    assert!(!ok && err.contains("Unimplemented"), "{err}");
    // Oversized request: etcd's message.
    let big = "x".repeat(4096);
    let (ok, _, err) = etcdctl(s.port, &["put", "k", &big]);
    assert!(
        !ok && err.contains("etcdserver: request is too large"),
        "{err}"
    );
    // Garbage on the socket, a torn HTTP/2 preface, an abrupt disconnect mid-request.
    let _ = http(s.port, "\x00\x01\x02garbage\r\n\r\n");
    let _ = http(s.port, "PRI * HTTP/2.0\r\n\r\nSM");
    {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        c.write_all(b"POST /v3/kv/put HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"ke")
            .unwrap();
    }
    // Malformed JSON on the gateway: a 400 with a JSON error body.
    let r = post(s.port, "/v3/kv/put", "{not json");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // Unknown path.
    assert!(post(s.port, "/v3/nope", "{}").contains("404"));
    // Still serving.
    assert!(etcdctl(s.port, &["put", "after", "ok"]).0);
    let r = post(s.port, "/v3/kv/range", "{\"key\":\"YWZ0ZXI=\"}");
    assert!(r.contains("\"value\":\"b2s=\""), "{r}");
    assert!(http(
        s.port,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .contains("\"health\":\"true\""));
    let m = http(
        s.port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        m.contains("spindle_grpc_requests_total{method=\"/etcdserverpb.KV/Put\"}"),
        "{m}"
    );
    assert!(
        m.contains("spindle_wal_fsync_duration_seconds_count"),
        "{m}"
    );
}

/// `raft_term` from `etcdctl endpoint status -w json`.
fn raft_term(port: u16) -> u64 {
    let (ok, out, err) = etcdctl(port, &["endpoint", "status", "-w", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["Status"]["raftTerm"].as_u64().expect("raftTerm")
}

#[test]
fn sigterm_flushes_and_exits_zero_and_data_survives() {
    let mut s = start(&[]);
    // A fresh data dir: each shard's group elects itself in term 1.
    assert_eq!(raft_term(s.port), 1);
    for i in 0..20 {
        assert!(etcdctl(s.port, &["put", &format!("k{i}"), "v"]).0);
    }
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let dir = s._dir.path().join("data");
    let db = spindle::Db::open(
        &dir,
        spindle::Options {
            cores: 1,
            pin: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(db.revision(), 21);
    // The reopen elected term 2 in every shard's group.
    assert_eq!(db.raft_term(), 2);
    db.close();
}

#[test]
fn quota_raises_nospace_and_refuses_writes_that_add_data() {
    let s = start(&["--quota-backend-bytes", "1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let (ok, _, err) = etcdctl(s.port, &["put", "k", "v"]);
        if !ok {
            break err;
        }
        assert!(Instant::now() < deadline, "NOSPACE was never raised");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        err.contains("etcdserver: mvcc: database space exceeded"),
        "{err}"
    );
    let (ok, out, _) = etcdctl(s.port, &["alarm", "list"]);
    assert!(ok && out.contains("NOSPACE"), "{out}");
    // Deletes and reads still work, as in etcd.
    assert!(etcdctl(s.port, &["del", "k"]).0);
    assert!(etcdctl(s.port, &["get", "k"]).0);
}

#[test]
fn bench_drives_the_server_and_reports_every_request() {
    let s = start(&[]);
    let ep = format!("127.0.0.1:{}", s.port);
    for (workload, extra) in [
        ("put", vec![]),
        ("range", vec![]),
        ("txn-put", vec!["--txn-ops", "3"]),
        // Renewals write nothing, so the revision check below is unaffected.
        ("lease-keepalive", vec![]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
            .args([
                "bench",
                workload,
                "--endpoints",
                &ep,
                "--total",
                "300",
                "--clients",
                "8",
                "--conns",
                "2",
            ])
            .args(["--key-space-size", "50", "--json", "--cores", "2"])
            .args(&extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["ops"], 300, "{workload}: {report}");
        assert_eq!(
            report["errors"],
            serde_json::json!({}),
            "{workload}: {report}"
        );
        assert!(report["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    }
    // The writes landed: 300 puts, 50 preloaded for the range run, 300 txns of 3 puts.
    let (ok, out, _) = etcdctl(s.port, &["endpoint", "status", "-w", "json"]);
    assert!(ok && out.contains("\"revision\":651"), "{out}");
}

#[test]
fn bench_self_check_and_histogram_file() {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("latency.hdr");
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args([
            "bench",
            "put",
            "--self-check",
            "--total",
            "500",
            "--clients",
            "4",
            "--json",
        ])
        .arg("--hdr-out")
        .arg(&hdr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ops"], 500, "{report}");
    let bytes = std::fs::read(&hdr).unwrap();
    // HdrHistogram V2 serialization cookie.
    assert_eq!(
        &bytes[..4],
        &[0x1c, 0x84, 0x93, 0x13],
        "not an HdrHistogram V2 encoding"
    );
}

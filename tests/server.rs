//! `spindle serve` as a process: etcdctl works against it, bad input gets etcd's errors while
//! other clients keep being served, and SIGTERM shuts it down cleanly.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod common;
use common::http::{http, post};
use common::server::bench;
use common::server::Server;

/// spindle with small WAL segments and `extra` flags.
fn start(extra: &[&str]) -> Server {
    let args = [&["--wal-segment-mb", "1"], extra].concat();
    Server::spindle(&args)
}

#[test]
fn etcdctl_basics_work() {
    let s = start(&[]);
    assert!(s.etcdctl(&["put", "foo", "bar"]).ok);
    let r = s.etcdctl(&["get", "foo", "--print-value-only"]);
    assert!(r.ok);
    assert_eq!(r.stdout.trim(), "bar");
    let r = s.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("\"revision\":2"), "{}", r.stdout);
    let r = s.etcdctl(&["member", "list"]);
    assert!(r.ok && r.stdout.contains("default"), "{}", r.stdout);
    let snap = s.dir().join("snap.db");
    let r = s.etcdctl(&["snapshot", "save", snap.to_str().unwrap()]);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert!(std::fs::metadata(&snap).unwrap().len() > 32);
}

#[test]
fn bad_input_gets_errors_and_the_server_keeps_serving() {
    let s = start(&["--max-request-bytes", "2048"]);
    // The Auth service answers (auth disabled: no users yet).
    let r = s.etcdctl(&["user", "list"]);
    assert!(r.ok && r.stdout.trim().is_empty(), "{}", r.stderr);
    // Oversized request: etcd's message.
    let big = "x".repeat(4096);
    let r = s.etcdctl(&["put", "k", &big]);
    assert!(
        !r.ok && r.stderr.contains("etcdserver: request is too large"),
        "{}",
        r.stderr
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
    assert!(s.etcdctl(&["put", "after", "ok"]).ok);
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
fn raft_term(s: &Server) -> u64 {
    let r = s.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(r.ok, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v[0]["Status"]["raftTerm"].as_u64().expect("raftTerm")
}

#[test]
fn sigterm_flushes_and_exits_zero_and_data_survives() {
    let mut s = start(&[]);
    // A fresh data dir: each shard's group elects itself in term 1.
    assert_eq!(raft_term(&s), 1);
    for i in 0..20 {
        assert!(s.etcdctl(&["put", &format!("k{i}"), "v"]).ok);
    }
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    let db = spindle::Db::open(
        s.data_dir(),
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
        let r = s.etcdctl(&["put", "k", "v"]);
        if !r.ok {
            break r.stderr;
        }
        assert!(Instant::now() < deadline, "NOSPACE was never raised");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        err.contains("etcdserver: mvcc: database space exceeded"),
        "{err}"
    );
    // The refusal raises the alarm through the log, right after answering.
    let r = loop {
        let r = s.etcdctl(&["alarm", "list"]);
        if r.stdout.contains("NOSPACE") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(r.ok && r.stdout.contains("alarm:NOSPACE"), "{}", r.stdout);
    // Deletes and reads still work, as in etcd.
    assert!(s.etcdctl(&["del", "k"]).ok);
    assert!(s.etcdctl(&["get", "k"]).ok);
}

#[test]
fn bench_drives_the_server_and_reports_every_request() {
    let s = start(&[]);
    let ep = s.endpoint();
    for (workload, extra) in [
        ("put", vec![]),
        ("range", vec![]),
        ("txn-put", vec!["--txn-ops", "3"]),
        // Renewals write nothing, so the revision check below is unaffected.
        ("lease-keepalive", vec![]),
    ] {
        let args = [
            workload,
            "--endpoints",
            &ep,
            "--total",
            "300",
            "--clients",
            "8",
            "--conns",
            "2",
            "--key-space-size",
            "50",
            "--json",
            "--cores",
            "2",
        ];
        let report = bench(&[&args[..], &extra].concat());
        assert_eq!(report["ops"], 300, "{workload}: {report}");
        assert_eq!(
            report["errors"],
            serde_json::json!({}),
            "{workload}: {report}"
        );
        assert!(report["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    }
    // The writes landed: 300 puts, 50 preloaded for the range run, 300 txns of 3 puts.
    let r = s.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(
        r.ok && r.stdout.contains("\"revision\":651"),
        "{}",
        r.stdout
    );
}

#[test]
fn metrics_time_every_put_by_stage_and_bench_reports_them() {
    let s = start(&[]);
    let ep = s.endpoint();
    let n = 200u64;
    // One connection, so it sits on one core: with random keys over both shards some puts are
    // served where they arrive and the others hop to the other core and back.
    let report = bench(&[
        "put",
        "--endpoints",
        &ep,
        "--total",
        &n.to_string(),
        "--clients",
        "1",
        "--conns",
        "1",
        "--key-space-size",
        "100000",
        "--json",
    ]);
    assert_eq!(report["ops"], n, "{report}");
    let m = http(
        s.port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let scraped = spindle::bench::stages::parse(&m);
    let count = |stage: &str| {
        let st = scraped
            .get(stage)
            .unwrap_or_else(|| panic!("no {stage} histogram in {m}"));
        // The +Inf bucket and the count agree.
        assert_eq!(st.cumulative.last().map(|b| b.1), Some(st.count), "{stage}");
        st.count
    };
    for stage in [
        "decode",
        "route",
        "execute",
        "wal_queue",
        "wal_write",
        "fdatasync",
        "commit",
        "visible",
        "encode",
    ] {
        assert_eq!(count(stage), n, "{stage}: {m}");
    }
    let hops = count("hop_to_owner");
    assert_eq!(count("hop_back"), hops);
    assert!(hops > 0 && hops < n, "{hops} of {n} puts hopped");
    // What the generator printed: this run's puts, stage by stage.
    let stages = report["stages"].as_array().expect("stages in the report");
    let decode = stages
        .iter()
        .find(|d| d["stage"] == "decode")
        .expect("decode stage");
    assert_eq!(decode["count"], n, "{report}");
    assert!(decode["p99_us"].as_f64().unwrap() > 0.0, "{report}");
    // The durable write is the WAL's cost (segments are O_DSYNC: no separate fdatasync).
    let write = stages
        .iter()
        .find(|d| d["stage"] == "wal_write")
        .expect("wal_write stage");
    assert!(write["mean_us"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn bench_self_check_and_histogram_file() {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("latency.hdr");
    let report = bench(&[
        "put",
        "--self-check",
        "--total",
        "500",
        "--clients",
        "4",
        "--json",
        "--hdr-out",
        hdr.to_str().unwrap(),
    ]);
    assert_eq!(report["ops"], 500, "{report}");
    let bytes = std::fs::read(&hdr).unwrap();
    // HdrHistogram V2 serialization cookie.
    assert_eq!(
        &bytes[..4],
        &[0x1c, 0x84, 0x93, 0x13],
        "not an HdrHistogram V2 encoding"
    );
}

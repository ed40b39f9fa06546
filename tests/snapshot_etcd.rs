//! Maintenance/Snapshot streams etcd 3.4's snapshot format: `etcdctl snapshot status` reads what
//! spindle streams, `etcdctl snapshot restore` turns it into a data dir real etcd serves the same
//! keys and history from, and `spindle snapshot status` prints what etcdctl prints, for
//! spindle's snapshots and etcd's, and refuses damaged files naming what is wrong.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::path::Path;
use std::process::Command;

use serde_json::Value as Json;

mod common;
use common::etcd;
use common::etcdctl;
use common::process::{output_ok, text};
use common::server::{Server, SPINDLE};

/// The revision a put or delete made.
fn write_rev(s: &Server, args: &[&str]) -> i64 {
    s.ctl_json(args)["header"]["revision"].as_i64().unwrap()
}

/// Runs `etcdctl txn` with `input` (compares, blank line, success ops, blank line, failure ops).
fn txn(s: &Server, input: &str) {
    let out = etcdctl::run_with_input(&s.endpoint(), &["txn"], input);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("SUCCESS"), "{}", out.stdout);
}

/// `etcdctl snapshot status FILE -w FORMAT` (no server involved).
fn etcdctl_status(file: &Path, format: &str) -> String {
    let out = output_ok(&mut etcdctl::command(
        "127.0.0.1:1",
        &["snapshot", "status", file.to_str().unwrap(), "-w", format],
    ));
    text(&out.stdout)
}

fn spindle_status(file: &Path, format: &str) -> std::process::Output {
    Command::new(SPINDLE)
        .args(["snapshot", "status", file.to_str().unwrap(), "-w", format])
        .output()
        .expect("run spindle snapshot status")
}

/// `spindle snapshot status` prints exactly what etcdctl prints, in every format.
fn assert_same_status(file: &Path) -> Json {
    for format in ["json", "table", "simple"] {
        let ours = spindle_status(file, format);
        assert!(ours.status.success(), "{}", text(&ours.stderr));
        assert_eq!(
            text(&ours.stdout),
            etcdctl_status(file, format),
            "-w {format}"
        );
    }
    serde_json::from_str(&etcdctl_status(file, "json")).unwrap()
}

/// The `kvs` of a get: what the comparison between servers is about (headers differ).
fn kvs(s: &Server, args: &[&str]) -> Json {
    s.ctl_json(args)["kvs"].clone()
}

/// `etcdctl snapshot restore` of `snapshot` into a new data dir under `dir`, and etcd 3.4 started
/// on it, ready.
fn restore_and_serve(snapshot: &Path, dir: &Path) -> Server {
    let mut etcd = restore_and_spawn(snapshot, dir);
    etcd.wait_ready();
    etcd
}

/// As [`restore_and_serve`], not waited for.
fn restore_and_spawn(snapshot: &Path, dir: &Path) -> Server {
    etcd::spawn_restored(snapshot, &dir.join("restored"))
}

/// A spindle history: puts, overwrites, deletes, a multi-op txn, a leased key and a compaction;
/// etcd restored from spindle's snapshot serves the same keys, history and lease.
#[test]
fn etcd_restores_spindle_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let spindle = Server::spindle(&["--bcrypt-cost", "4"]);
    spindle.ctl(&["user", "add", "alice", "--new-user-password", "pw"]);
    spindle.ctl(&["role", "add", "reader"]);
    spindle.ctl(&["role", "grant-permission", "reader", "read", "a", "c"]);
    spindle.ctl(&["user", "grant-role", "alice", "reader"]);
    write_rev(&spindle, &["put", "a", "1"]);
    write_rev(&spindle, &["put", "b", "1"]);
    let compact_at = write_rev(&spindle, &["put", "b", "2"]);
    let b3 = write_rev(&spindle, &["put", "b", "3"]);
    write_rev(&spindle, &["put", "c", "gone"]);
    write_rev(&spindle, &["del", "c"]);
    // One revision, several sub-revisions: new keys, a delete and an overwrite.
    txn(&spindle, "\nput t/1 x\nput t/2 y\ndel a\nput b 4\n\n\n");
    let grant = spindle.ctl_json(&["lease", "grant", "600"]);
    let lease = grant["ID"].as_i64().unwrap();
    let lease_hex = format!("{lease:x}");
    write_rev(&spindle, &["put", "l", "leased", "--lease", &lease_hex]);
    spindle.ctl(&["compact", &compact_at.to_string()]);
    // Large values: the file spans several 64 KiB Snapshot messages and overflow pages.
    for i in 0..3 {
        let big = format!("{i}").repeat(40_000);
        spindle.ctl(&["put", &format!("big/{i}"), &big]);
    }
    let last = write_rev(&spindle, &["put", "d", "after"]);

    let all = kvs(&spindle, &["get", "--prefix", ""]);
    let auth_of = |s: &Server| {
        let user = s.ctl_json(&["user", "get", "alice"]);
        let role = s.ctl_json(&["role", "get", "reader"]);
        (user["roles"].clone(), role["perm"].clone())
    };
    let auth = auth_of(&spindle);
    assert_eq!(auth.0, serde_json::json!(["reader"]));
    let old_b = kvs(&spindle, &["get", "b", "--rev", &b3.to_string()]);
    let old_all = kvs(
        &spindle,
        &["get", "--prefix", "", "--rev", &(b3 + 1).to_string()],
    );
    assert_eq!(all.as_array().unwrap().len(), 8);
    assert_eq!(old_b[0]["mod_revision"].as_i64(), Some(b3));

    let saved = tmp.path().join("spindle.db");
    spindle.ctl(&["snapshot", "save", saved.to_str().unwrap()]);
    let status = assert_same_status(&saved);
    assert_eq!(status["revision"].as_i64(), Some(last), "{status}");
    let size = std::fs::metadata(&saved).unwrap().len();
    assert_eq!(status["totalSize"].as_u64().unwrap() + 32, size);
    assert!(size > 2 * 64 * 1024, "{size} bytes: more than two messages");
    drop(spindle);

    let etcd = restore_and_serve(&saved, tmp.path());
    assert_eq!(kvs(&etcd, &["get", "--prefix", ""]), all);
    assert_eq!(kvs(&etcd, &["get", "b", "--rev", &b3.to_string()]), old_b);
    assert_eq!(
        kvs(
            &etcd,
            &["get", "--prefix", "", "--rev", &(b3 + 1).to_string()]
        ),
        old_all
    );
    let header = etcd.ctl_json(&["get", "nothing"])["header"].clone();
    assert_eq!(header["revision"].as_i64(), Some(last), "{header}");
    // Below the compaction the history is gone on both.
    let gone = etcd.etcdctl(&["get", "b", "--rev", &(compact_at - 1).to_string()]);
    assert!(
        !gone.ok && gone.stderr.contains("compacted"),
        "{}",
        gone.stderr
    );
    assert_eq!(auth_of(&etcd), auth);
    let ttl = etcd.ctl_json(&["lease", "timetolive", &lease_hex]);
    assert_eq!(ttl["granted-ttl"].as_i64(), Some(600), "{ttl}");
}

/// `spindle snapshot status` reads etcd's own snapshots as etcdctl does, and refuses a file cut
/// short or with a byte changed, saying what is wrong.
#[test]
fn status_of_etcd_snapshots_and_damaged_files() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Server::etcd(&[]);
    etcd.ctl(&["put", "a", "1"]);
    etcd.ctl(&["put", "a", "2"]);
    etcd.ctl(&["del", "a"]);
    etcd.ctl(&["put", "big", &"x".repeat(20_000)]);
    let saved = tmp.path().join("etcd.db");
    etcd.ctl(&["snapshot", "save", saved.to_str().unwrap()]);
    drop(etcd);
    let status = assert_same_status(&saved);
    assert!(status["totalKey"].as_u64().unwrap() > 4, "{status}");

    let file = std::fs::read(&saved).unwrap();
    let expect_error = |name: &str, bytes: &[u8], what: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = spindle_status(&path, "json");
        assert!(!out.status.success(), "{name}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(err.contains(what), "{name}: {err}");
    };
    // Whole pages cut off, trailer gone: the bbolt file is short of its pages.
    expect_error("pages-cut.db", &file[..file.len() - 32 - 4096], "truncated");
    // A few bytes cut off: the trailer no longer matches (or the file is short).
    expect_error("bytes-cut.db", &file[..file.len() - 100], "truncated");
    let mut flipped = file.clone();
    flipped[5000] ^= 0x40;
    expect_error("flipped.db", &flipped, "sha256 mismatch");
    expect_error("empty.db", &[], "too short");
}

/// With auth enabled on spindle, etcd restored from its snapshot has auth enabled, the same
/// auth revision (tokens and requests checked against it still pass), and the users' password
/// hashes: the password given to spindle logs in to etcd.
#[test]
fn auth_carries_over_to_etcd() {
    let tmp = tempfile::tempdir().unwrap();
    let spindle = Server::spindle(&["--bcrypt-cost", "4"]);
    spindle.ctl(&["user", "add", "root", "--new-user-password", "pw"]);
    spindle.ctl(&["user", "grant-role", "root", "root"]);
    spindle.ctl(&["put", "k", "v"]);
    spindle.ctl(&["auth", "enable"]);
    let saved = tmp.path().join("auth.db");
    spindle.ctl(&[
        "--user",
        "root:pw",
        "snapshot",
        "save",
        saved.to_str().unwrap(),
    ]);
    assert_same_status(&saved);
    drop(spindle);

    // etcdctl's health check needs a user once auth is on: wait for a get as root instead.
    let etcd = restore_and_spawn(&saved, tmp.path());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !etcd.etcdctl(&["--user", "root:pw", "get", "k"]).ok {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            etcd.log_tail(20)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let anonymous = etcd.etcdctl(&["get", "k"]);
    assert!(!anonymous.ok, "auth is enabled: {}", anonymous.stdout);
    let got = etcd.ctl(&["--user", "root:pw", "get", "k", "--print-value-only"]);
    assert_eq!(got.trim(), "v");
    let wrong = etcd.etcdctl(&["--user", "root:nope", "get", "k"]);
    assert!(!wrong.ok, "a wrong password: {}", wrong.stdout);
}

type Buckets = std::collections::BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// Every bucket of a snapshot file and its entries, after checking the sha256 trailer.
fn buckets(snapshot: &Path) -> Buckets {
    use sha2::Digest;
    let bytes = std::fs::read(snapshot).unwrap();
    let (file, sum) = bytes.split_at(bytes.len() - 32);
    assert_eq!(&sha2::Sha256::digest(file)[..], sum, "sha256 trailer");
    let db = spindle::bbolt::Db::open(file).unwrap();
    let mut out = Buckets::new();
    for name in db.buckets().unwrap() {
        let b = db.bucket(name).unwrap().unwrap();
        let entries = b
            .iter()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.to_vec(), v.data().unwrap().to_vec())
            })
            .collect();
        out.insert(String::from_utf8(name.to_vec()).unwrap(), entries);
    }
    out
}

/// The same requests to etcd and to spindle give snapshots with the same buckets and, byte for
/// byte, the same `key` entries (revision keys and `mvccpb.KeyValue`s), compaction marks,
/// cluster version, role records and auth revision; member records have etcd's JSON fields.
/// (Sub-revisions of a multi-key txn whose ops are not in key order differ: see the design doc,
/// §15.)
#[test]
fn spindle_snapshot_matches_etcd_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |s: &Server| {
        s.ctl(&["put", "a", "1"]);
        s.ctl(&["put", "b", "1"]);
        s.ctl(&["put", "c", "x"]);
        s.ctl(&["del", "c"]);
        let compact_at = write_rev(s, &["put", "b", "2"]);
        s.ctl(&["put", "b", "3"]);
        // Sub-revisions follow the txn's op order in etcd, key order in spindle (the index
        // does not record op order across keys): the same here, as the ops are in key order.
        txn(s, "\ndel a\nput t/1 x\nput t/2 y\n\n\n");
        s.ctl(&["put", "a", "again"]);
        s.ctl(&["compact", &compact_at.to_string()]);
        s.ctl(&["role", "add", "reader"]);
        s.ctl(&[
            "role",
            "grant-permission",
            "reader",
            "readwrite",
            "p/",
            "--prefix",
        ]);
        let path = tmp.path().join(format!("{}.db", s.name()));
        s.ctl(&["snapshot", "save", path.to_str().unwrap()]);
        buckets(&path)
    };
    let theirs = run(&Server::etcd(&[]));
    let ours = run(&Server::spindle(&[]));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for bucket in [
        "key",
        "cluster",
        "alarm",
        "members_removed",
        "authRoles",
        "auth",
        "lease",
    ] {
        assert_eq!(ours[bucket], theirs[bucket], "bucket {bucket}");
    }
    let marks = |b: &Buckets| {
        b["meta"]
            .iter()
            .filter(|(k, _)| k.ends_with(b"CompactRev"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(marks(&ours), marks(&theirs));
    assert_eq!(marks(&ours).len(), 2);
    let fields = |b: &Buckets| {
        b["members"]
            .iter()
            .map(|(k, v)| {
                let j: Json = serde_json::from_slice(v).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(k),
                    format!("{:x}", j["id"].as_u64().unwrap())
                );
                j.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(fields(&ours), fields(&theirs));
}

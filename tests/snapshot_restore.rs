//! `spindle snapshot restore`: etcd 3.4's snapshot becomes a spindle data dir serving the same
//! keys, history, compaction, leases and auth store; spindle's own snapshot of it restores into
//! etcd unchanged; damaged files and used data dirs are refused, leaving the target untouched.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value as Json;

mod common;
use common::etcd;
use common::etcdctl;
use common::process::text;
use common::server::{Kind, Ports, Server, SPINDLE};

fn write_rev(s: &Server, args: &[&str]) -> i64 {
    s.ctl_json(args)["header"]["revision"].as_i64().unwrap()
}

/// The `kvs` of a get (headers differ between servers).
fn kvs(s: &Server, args: &[&str]) -> Json {
    s.ctl_json(args)["kvs"].clone()
}

fn txn(s: &Server, input: &str) {
    let out = etcdctl::run_with_input(&s.endpoint(), &["txn"], input);
    assert!(out.ok, "{}", out.stderr);
}

fn restore(file: &Path, data_dir: &Path, extra: &[&str]) -> Output {
    Command::new(SPINDLE)
        .args(["snapshot", "restore", file.to_str().unwrap(), "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .expect("run spindle snapshot restore")
}

/// `spindle snapshot restore FILE` into the data dir of a new spindle, which is then started.
fn restore_and_spawn_spindle(file: &Path, extra: &[&str]) -> Server {
    let file = file.to_path_buf();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Server::spawn_prepared(Kind::Spindle, Ports::free(1)[0], &[], move |data| {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = restore(&file, data, &extra);
        assert!(out.status.success(), "restore: {}", text(&out.stderr));
    })
}

/// `etcdctl snapshot restore` into a new data dir under `dir`, and etcd started on it, ready.
fn etcd_restored(snapshot: &Path, dir: &Path) -> Server {
    let mut s = etcd::spawn_restored(snapshot, &dir.join("etcd-restored"));
    s.wait_ready();
    s
}

/// What the tests compare between the source and the restored store.
struct Reads {
    all: Json,
    old: Json,
    old_b: Json,
    revision: i64,
}

fn reads(s: &Server, older: i64, b_rev: i64) -> Reads {
    Reads {
        all: kvs(s, &["get", "--prefix", ""]),
        old: kvs(s, &["get", "--prefix", "", "--rev", &older.to_string()]),
        old_b: kvs(s, &["get", "b", "--rev", &b_rev.to_string()]),
        revision: s.ctl_json(&["get", "nothing"])["header"]["revision"]
            .as_i64()
            .unwrap(),
    }
}

fn assert_same(ours: &Reads, theirs: &Reads) {
    assert_eq!(ours.all, theirs.all, "get --prefix");
    assert_eq!(ours.old, theirs.old, "get --prefix --rev");
    assert_eq!(ours.old_b, theirs.old_b, "get b --rev");
    assert_eq!(ours.revision, theirs.revision, "header revision");
}

fn assert_compacted(s: &Server, key: &str, rev: i64) {
    let gone = s.etcdctl(&["get", key, "--rev", &rev.to_string()]);
    assert!(
        !gone.ok && gone.stderr.contains("compacted"),
        "{}: {}",
        s.name(),
        gone.stderr
    );
}

/// etcd's history (puts, overwrites, deletes, a multi-op txn, a leased key, a user and role,
/// a compaction) restored into a 3-shard spindle reads the same at the head and below it, is
/// compacted where etcd is, keeps the lease and the auth store, and carries on numbering
/// revisions; spindle's snapshot of it restores into etcd with the same keys and history.
#[test]
fn etcd_snapshot_restores_into_spindle_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Server::etcd(&[]);
    write_rev(&etcd, &["put", "a", "1"]);
    write_rev(&etcd, &["put", "b", "1"]);
    let compact_at = write_rev(&etcd, &["put", "b", "2"]);
    let b3 = write_rev(&etcd, &["put", "b", "3"]);
    write_rev(&etcd, &["put", "c", "gone"]);
    write_rev(&etcd, &["del", "c"]);
    write_rev(&etcd, &["put", "dir/x", "1"]);
    txn(&etcd, "\nput t/1 x\nput t/2 y\ndel a\nput b 4\n\n\n");
    let lease = etcd.ctl_json(&["lease", "grant", "600"])["ID"]
        .as_i64()
        .unwrap();
    let lease_hex = format!("{lease:x}");
    write_rev(&etcd, &["put", "l", "leased", "--lease", &lease_hex]);
    etcd.ctl(&["user", "add", "alice", "--new-user-password", "pw"]);
    etcd.ctl(&["role", "add", "reader"]);
    etcd.ctl(&["role", "grant-permission", "reader", "read", "a", "c"]);
    etcd.ctl(&["user", "grant-role", "alice", "reader"]);
    etcd.ctl(&["compact", &compact_at.to_string()]);
    write_rev(&etcd, &["put", "dir/x", "2"]);
    let last = write_rev(&etcd, &["put", "d", "after"]);
    let theirs = reads(&etcd, b3 + 1, b3);
    assert_eq!(theirs.revision, last);
    let auth_of = |s: &Server| {
        let user = s.ctl_json(&["user", "get", "alice"]);
        let role = s.ctl_json(&["role", "get", "reader"]);
        (user["roles"].clone(), role["perm"].clone())
    };
    let auth = auth_of(&etcd);
    let saved = tmp.path().join("etcd.db");
    etcd.ctl(&["snapshot", "save", saved.to_str().unwrap()]);
    drop(etcd);

    let mut spindle = restore_and_spawn_spindle(&saved, &["--shards", "3"]);
    spindle.wait_ready();
    let ours = reads(&spindle, b3 + 1, b3);
    assert_same(&ours, &theirs);
    assert_compacted(&spindle, "b", compact_at - 1);
    assert_eq!(auth_of(&spindle), auth);
    let leases = spindle.ctl_json(&["lease", "list"]);
    assert_eq!(leases["leases"][0]["id"].as_i64(), Some(lease), "{leases}");
    let ttl = spindle.ctl_json(&["lease", "timetolive", &lease_hex, "--keys"]);
    assert_eq!(ttl["granted-ttl"].as_i64(), Some(600), "{ttl}");
    assert_eq!(ttl["keys"].as_array().map(Vec::len), Some(1), "{ttl}");
    // New writes continue after the restored revision.
    assert_eq!(write_rev(&spindle, &["put", "e", "new"]), last + 1);
    spindle.ctl(&["del", "e"]);
    let after = reads(&spindle, b3 + 1, b3);

    // Round trip: spindle's snapshot of the restored store, restored into etcd.
    let again = tmp.path().join("spindle.db");
    spindle.ctl(&["snapshot", "save", again.to_str().unwrap()]);
    drop(spindle);
    let etcd2 = etcd_restored(&again, tmp.path());
    assert_same(&reads(&etcd2, b3 + 1, b3), &after);
    assert_compacted(&etcd2, "b", compact_at - 1);
    assert_eq!(auth_of(&etcd2), auth);
}

/// With auth enabled in etcd, the restored spindle has it enabled with the same users and
/// password hashes: root's password logs in, anonymous requests are refused.
#[test]
fn auth_enabled_snapshot_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Server::etcd(&[]);
    etcd.ctl(&["user", "add", "root", "--new-user-password", "pw"]);
    etcd.ctl(&["user", "grant-role", "root", "root"]);
    etcd.ctl(&["put", "k", "v"]);
    etcd.ctl(&["auth", "enable"]);
    let saved = tmp.path().join("auth.db");
    etcd.ctl(&[
        "--user",
        "root:pw",
        "snapshot",
        "save",
        saved.to_str().unwrap(),
    ]);
    drop(etcd);

    let mut spindle = restore_and_spawn_spindle(&saved, &["--shards", "2"]);
    spindle.wait_ready();
    let got = spindle.ctl(&["--user", "root:pw", "get", "k", "--print-value-only"]);
    assert_eq!(got.trim(), "v");
    let anonymous = spindle.etcdctl(&["get", "k"]);
    assert!(!anonymous.ok, "auth is enabled: {}", anonymous.stdout);
    let wrong = spindle.etcdctl(&["--user", "root:nope", "get", "k"]);
    assert!(!wrong.ok, "a wrong password: {}", wrong.stdout);
}

/// Everything under `dir`, path and contents, to see that a refused restore changed nothing.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A truncated or altered file, a file without its sha256 trailer and a non-empty target are
/// refused with an error naming the problem, and nothing is left behind in or beside the target.
#[test]
fn restore_refuses_damaged_files_and_used_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Server::etcd(&[]);
    etcd.ctl(&["put", "a", "1"]);
    etcd.ctl(&["put", "big", &"x".repeat(20_000)]);
    let saved = tmp.path().join("etcd.db");
    etcd.ctl(&["snapshot", "save", saved.to_str().unwrap()]);
    drop(etcd);
    let file = std::fs::read(&saved).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let refused = |name: &str, bytes: &[u8], extra: &[&str], what: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let target = work.join("D");
        let out = restore(&path, &target, extra);
        assert!(!out.status.success(), "{name}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(err.contains(what), "{name}: {err}");
        assert!(!target.exists(), "{name}: the target was created");
        let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
        assert!(left.is_empty(), "{name}: left behind {left:?}");
    };
    refused(
        "pages-cut.db",
        &file[..file.len() - 32 - 4096],
        &[],
        "no sha256 trailer",
    );
    refused(
        "pages-cut-skip.db",
        &file[..file.len() - 32 - 4096],
        &["--skip-hash-check"],
        "truncated",
    );
    refused("bytes-cut.db", &file[..file.len() - 100], &[], "sha256");
    let mut flipped = file.clone();
    flipped[5000] ^= 0x40;
    refused("flipped.db", &flipped, &[], "sha256 mismatch");
    refused("empty.db", &[], &["--skip-hash-check"], "too short");

    // A data dir in use is never touched.
    let used = tmp.path().join("used");
    std::fs::create_dir_all(used.join("shard-000")).unwrap();
    std::fs::write(used.join("keep"), b"data").unwrap();
    let before = tree(&used);
    let out = restore(&saved, &used, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(tree(&used), before);

    // An empty dir is fine, and a bare bbolt file restores with --skip-hash-check.
    let empty = work.join("E");
    std::fs::create_dir(&empty).unwrap();
    let bare = tmp.path().join("bare.db");
    std::fs::write(&bare, &file[..file.len() - 32]).unwrap();
    let out = restore(&bare, &empty, &["--skip-hash-check", "--shards", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(empty.join("spindle.meta").exists());
    assert!(empty.join("shard-001").exists());
}

/// With etcd's cluster flags, each member's restored data dir is the one `spindle serve
/// --initial-cluster-state new` with the same flags bootstraps as that member: the members
/// start together as one cluster serving the snapshot's store, and carry on writing.
#[test]
fn restored_members_form_a_cluster() {
    use common::cluster::{initial_cluster, spindle_member};
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Server::etcd(&[]);
    write_rev(&etcd, &["put", "a", "1"]);
    let compact_at = write_rev(&etcd, &["put", "a", "2"]);
    write_rev(&etcd, &["put", "b", "1"]);
    write_rev(&etcd, &["del", "b"]);
    etcd.ctl(&["compact", &compact_at.to_string()]);
    let last = write_rev(&etcd, &["put", "c", "1"]);
    let all = kvs(&etcd, &["get", "--prefix", ""]);
    let saved = tmp.path().join("etcd.db");
    etcd.ctl(&["snapshot", "save", saved.to_str().unwrap()]);
    drop(etcd);

    let ports = Ports::free(2);
    let urls: Vec<String> = ports.iter().map(|p| p.peer_url()).collect();
    let initial = initial_cluster("m", &urls);
    let token = "restored";
    let mut members: Vec<Server> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (name, url) = (format!("m{i}"), p.peer_url());
            let args = spindle_member(&name, &initial, "new", token, &url, &url);
            let restore_flags = [
                "--shards".to_string(),
                "2".to_string(),
                "--name".to_string(),
                name.clone(),
                "--initial-cluster".to_string(),
                initial.clone(),
                "--initial-cluster-token".to_string(),
                token.to_string(),
                "--initial-advertise-peer-urls".to_string(),
                url.clone(),
            ];
            let file = saved.clone();
            Server::spawn_prepared(Kind::Spindle, *p, &args, move |data| {
                let flags: Vec<&str> = restore_flags.iter().map(String::as_str).collect();
                let out = restore(&file, data, &flags);
                assert!(out.status.success(), "restore: {}", text(&out.stderr));
            })
        })
        .collect();
    for m in &mut members {
        m.wait_ready();
    }
    for m in &members {
        assert_eq!(kvs(m, &["get", "--prefix", ""]), all, "{}", m.endpoint());
        assert_compacted(m, "a", compact_at - 1);
        let list = m.ctl_json(&["member", "list"]);
        let names: Vec<&str> = list["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x["name"].as_str())
            .collect();
        assert_eq!(names.len(), 2, "{list}");
    }
    assert_eq!(write_rev(&members[0], &["put", "d", "new"]), last + 1);
    let got = kvs(&members[1], &["get", "d"]);
    assert_eq!(got[0]["mod_revision"].as_i64(), Some(last + 1), "{got}");
}

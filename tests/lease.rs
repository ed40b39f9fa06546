//! Leases end to end: the embedded API, expiry across shards, keep-alive, and recovery after a
//! crash (SIGKILL of `spindle serve`) and after checkpoints dropped the log holding the grants.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use spindle::kv::*;
use spindle::{Db, Error};

mod common;
use common::db::opts;
use common::process::spawn_piped;
use common::server::Server;

/// Keys in several directories, so that they land on several shards.
const KEYS: [&str; 6] = ["a/1", "b/2", "c/3", "d/4", "e/5", "f/6"];

fn put_lease(db: &Db, key: &str, lease: i64) -> Result<PutResponse, Error> {
    db.put(PutRequest {
        lease,
        ..PutRequest::new(key.to_string(), "v")
    })
}

fn live_keys(db: &Db, rev: i64) -> Vec<String> {
    db.range(RangeRequest {
        revision: rev,
        ..RangeRequest::prefix("")
    })
    .unwrap()
    .kvs
    .iter()
    .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
    .collect()
}

fn strs(keys: &[Bytes]) -> Vec<String> {
    keys.iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[test]
fn embedded_grant_put_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 4)).unwrap();
    let rev0 = db.revision();

    // Grants take no revision; short TTLs are raised to etcd's minimum.
    let short = db.lease_grant(0, 1).unwrap();
    assert!(short.id > 0);
    assert_eq!(short.ttl, 2);
    assert_eq!(short.header.revision, rev0);
    let l = db.lease_grant(4660, 60).unwrap();
    assert_eq!((l.id, l.ttl), (4660, 60));
    assert!(matches!(db.lease_grant(4660, 5), Err(Error::LeaseExists)));
    assert!(matches!(
        db.lease_grant(0, 9_000_000_001),
        Err(Error::LeaseTtlTooLarge)
    ));
    let mut listed = db.lease_leases().unwrap().leases;
    listed.sort();
    let mut want = vec![short.id, 4660];
    want.sort();
    assert_eq!(listed, want);

    // Puts name live leases only, alone or inside a txn.
    assert!(matches!(put_lease(&db, "x", 99), Err(Error::LeaseNotFound)));
    for k in KEYS {
        put_lease(&db, k, 4660).unwrap();
    }
    let txn = db
        .txn(TxnRequest {
            compare: vec![],
            success: vec![
                RequestOp::Put(PutRequest {
                    lease: 4660,
                    ..PutRequest::new("g/7", "v")
                }),
                RequestOp::Put(PutRequest::new("h/8", "v")),
            ],
            failure: vec![],
        })
        .unwrap();
    assert!(txn.succeeded);
    // A plain put detaches; ignore_lease keeps the lease.
    db.put(PutRequest::new("f/6", "plain")).unwrap();
    db.put(PutRequest {
        ignore_lease: true,
        ..PutRequest::new("e/5", "kept")
    })
    .unwrap();
    let ttl = db.lease_time_to_live(4660, true).unwrap();
    assert_eq!(ttl.granted_ttl, 60);
    assert!((58..=60).contains(&ttl.ttl), "{ttl:?}");
    assert_eq!(
        strs(&ttl.keys),
        vec!["a/1", "b/2", "c/3", "d/4", "e/5", "g/7"]
    );

    // Unknown leases: TTL -1 and 0, as etcd answers; revoke fails.
    assert_eq!(db.lease_time_to_live(99, true).unwrap().ttl, -1);
    assert_eq!(db.lease_keep_alive(99).unwrap().ttl, 0);
    assert_eq!(db.lease_keep_alive(4660).unwrap().ttl, 60);
    assert!(matches!(db.lease_revoke(99), Err(Error::LeaseNotFound)));

    // Revoke deletes every attached key (on every shard) at one revision.
    let before = db.revision();
    let r = db.lease_revoke(4660).unwrap();
    assert_eq!(r.header.revision, before + 1);
    assert_eq!(live_keys(&db, 0), vec!["f/6", "h/8"]);
    assert_eq!(live_keys(&db, before).len(), 8);
    assert!(matches!(db.lease_revoke(4660), Err(Error::LeaseNotFound)));
    assert!(matches!(
        put_lease(&db, "a/1", 4660),
        Err(Error::LeaseNotFound)
    ));

    // A lease without keys is revoked without a revision.
    let now = db.revision();
    assert_eq!(db.lease_revoke(short.id).unwrap().header.revision, now);
    assert!(db.lease_leases().unwrap().leases.is_empty());
    db.close();
}

#[test]
fn expiry_revokes_across_shards_and_keep_alive_prevents_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 4)).unwrap();
    let doomed = db.lease_grant(0, 2).unwrap().id;
    let kept = db.lease_grant(0, 2).unwrap().id;
    for k in &KEYS[..4] {
        put_lease(&db, k, doomed).unwrap();
    }
    for k in &KEYS[4..] {
        put_lease(&db, k, kept).unwrap();
    }
    let granted = Instant::now();
    let before = db.revision();
    // Keep one lease alive well past the other's TTL; the other must be gone within the TTL plus
    // the expiry check interval (and some slack for a loaded machine).
    let mut gone_after = None;
    while granted.elapsed() < Duration::from_millis(4500) {
        assert_eq!(db.lease_keep_alive(kept).unwrap().ttl, 2);
        if gone_after.is_none() && db.lease_time_to_live(doomed, false).unwrap().ttl == -1 {
            gone_after = Some(granted.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let gone_after = gone_after.expect("the lease without keep-alives expired");
    assert!(
        gone_after >= Duration::from_millis(1900) && gone_after < Duration::from_millis(4000),
        "expired after {gone_after:?}"
    );
    assert_eq!(live_keys(&db, 0), vec!["e/5", "f/6"]);
    // All four keys on their shards went away at one revision.
    assert_eq!(db.revision(), before + 1);
    assert_eq!(live_keys(&db, before).len(), 6);
    assert_eq!(db.lease_time_to_live(kept, true).unwrap().keys.len(), 2);
    db.close();
}

#[test]
fn embedded_reopen_and_checkpoints_keep_leases() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c);
    {
        let db = Db::open(dir.path(), opts(2, 3)).unwrap();
        a = db.lease_grant(0, 600).unwrap().id;
        b = db.lease_grant(0, 600).unwrap().id;
        c = db.lease_grant(0, 600).unwrap().id;
        for k in KEYS {
            put_lease(&db, k, a).unwrap();
        }
        db.lease_revoke(b).unwrap();
        // Fill every shard's log past its first segment, so the checkpoint drops the segments
        // holding the grants; they must have been re-logged.
        let big = "x".repeat(48 << 10);
        for i in 0..60 {
            db.put(PutRequest::new(format!("fill{i}/k"), big.clone()))
                .unwrap();
        }
        db.checkpoint().unwrap();
        for shard in 0..3 {
            let wal = dir.path().join(format!("shard-{shard:03}")).join("wal");
            let first = std::fs::read_dir(&wal)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .min()
                .unwrap();
            assert_ne!(
                first, "00000000000000000001.wal",
                "{wal:?} kept its first segment"
            );
        }
        put_lease(&db, "z/9", c).unwrap();
        db.checkpoint().unwrap();
        db.close();
    }
    let db = Db::open(dir.path(), opts(2, 3)).unwrap();
    let mut listed = db.lease_leases().unwrap().leases;
    listed.sort();
    let mut want = vec![a, c];
    want.sort();
    assert_eq!(listed, want);
    assert_eq!(
        db.lease_time_to_live(a, true).unwrap().keys.len(),
        KEYS.len()
    );
    assert_eq!(
        strs(&db.lease_time_to_live(c, true).unwrap().keys),
        vec!["z/9"]
    );
    // The attachment index was rebuilt from the store: revoke finds every key.
    db.lease_revoke(a).unwrap();
    assert!(live_keys(&db, 0)
        .iter()
        .all(|k| k == "z/9" || k.starts_with("fill")));
    // Generated ids do not collide with recovered ones.
    let d = db.lease_grant(0, 60).unwrap().id;
    assert!(d != a && d != c);
    db.close();
}

// ---- spindle serve, killed with SIGKILL ----

/// Runs `etcdctl -w json ARGS` (which must succeed) and parses its output.
fn ctl(s: &Server, args: &[&str]) -> Value {
    let out = s.etcdctl(&[&["-w", "json"], args].concat());
    assert!(out.ok, "etcdctl {args:?}: {}", out.stderr);
    if args[0] == "defrag" {
        return Value::Null; // prints a sentence, not JSON
    }
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[test]
fn sigkill_restart_recovers_leases_with_a_fresh_ttl() {
    let mut s = Server::spindle(&["--shards", "4"]);
    let id = ctl(&s, &["lease", "grant", "20"])["ID"].as_i64().unwrap();
    let gone = ctl(&s, &["lease", "grant", "20"])["ID"].as_i64().unwrap();
    let hex = format!("{id:x}");
    for k in KEYS {
        ctl(&s, &["put", k, "v", &format!("--lease={hex}")]);
    }
    ctl(&s, &["lease", "revoke", &format!("{gone:x}")]);
    // A checkpoint (defragment) drops the log segments that held the grant.
    ctl(&s, &["defrag"]);
    // A streaming keep-alive (etcdctl renews every TTL/3) holds a 2 s lease past its TTL.
    let short = ctl(&s, &["lease", "grant", "2"])["ID"].as_i64().unwrap();
    let short_hex = format!("{short:x}");
    ctl(
        &s,
        &["put", "k/short", "v", &format!("--lease={short_hex}")],
    );
    let keeper = spawn_piped(
        s.etcdctl_cmd(&["lease", "keep-alive", &short_hex])
            .stderr(Stdio::null()),
    );
    std::thread::sleep(Duration::from_millis(3200));
    let alive = ctl(&s, &["lease", "timetolive", &short_hex, "--keys"]);
    let out = keeper.kill_and_output();
    let renewals = String::from_utf8_lossy(&out.stdout)
        .matches("keepalived with TTL(2)")
        .count();
    assert!(renewals >= 3, "{renewals} renewals");
    assert_eq!(alive["keys"].as_array().map(Vec::len), Some(1), "{alive}");
    ctl(&s, &["lease", "revoke", &short_hex]);
    let before = ctl(&s, &["lease", "timetolive", &hex]);
    assert!(before["ttl"].as_i64().unwrap() <= 16, "{before}");
    s.kill();

    s.restart(); // same data dir and port
    let list = ctl(&s, &["lease", "list"]);
    let ids: Vec<i64> = list["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![id]);
    let after = ctl(&s, &["lease", "timetolive", &hex, "--keys"]);
    // etcd refreshes every lease to its full TTL when a leader takes over.
    assert!(after["ttl"].as_i64().unwrap() >= 19, "{after}");
    assert_eq!(after["granted-ttl"].as_i64().unwrap(), 20);
    assert_eq!(after["keys"].as_array().unwrap().len(), KEYS.len());
    let rev = ctl(&s, &["get", "x"])["header"]["revision"]
        .as_i64()
        .unwrap();
    let revoked = ctl(&s, &["lease", "revoke", &hex]);
    assert_eq!(revoked["header"]["revision"].as_i64().unwrap(), rev + 1);
    assert_eq!(ctl(&s, &["get", "", "--prefix"])["count"].as_i64(), None);
    drop(s);
}

/// Puts naming a lease race its revoke: afterwards no live key may carry the revoked lease (every
/// put either failed with LeaseNotFound or was deleted by the revoke).
#[test]
fn revoke_racing_puts_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 4)).unwrap();
    for round in 0..15 {
        let id = db.lease_grant(0, 60).unwrap().id;
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut ok = 0;
                for i in 0..200 {
                    let key = format!("r{}/k{}", i % 7, i % 13);
                    match put_lease(&db, &key, id) {
                        Ok(_) => ok += 1,
                        Err(Error::LeaseNotFound) => return ok,
                        Err(e) => panic!("put: {e}"),
                    }
                }
                ok
            })
        };
        std::thread::sleep(Duration::from_millis(2 + round % 5));
        db.lease_revoke(id).unwrap();
        writer.join().unwrap();
        let orphans: Vec<KeyValue> = db
            .range(RangeRequest::prefix(""))
            .unwrap()
            .kvs
            .into_iter()
            .filter(|kv| kv.lease == id)
            .collect();
        assert!(orphans.is_empty(), "round {round}: {orphans:?}");
    }
    db.close();
}

/// A revoke is one txn: a watcher sees every attached key's delete at the same revision, together.
#[test]
fn watchers_see_a_revoke_as_one_revision() {
    use spindle::{WatchRequest, WatchUpdate};
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 4)).unwrap();
    let id = db.lease_grant(0, 60).unwrap().id;
    for k in KEYS {
        put_lease(&db, k, id).unwrap();
    }
    let watch = db
        .watch(WatchRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            start_revision: 0,
            no_put: false,
            no_delete: false,
            prev_kv: false,
        })
        .unwrap();
    let rev = db.lease_revoke(id).unwrap().header.revision;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut deletes = Vec::new();
    while deletes.len() < KEYS.len() && Instant::now() < deadline {
        if let Some(WatchUpdate::Events { events, .. }) =
            watch.recv_timeout(Duration::from_millis(200)).unwrap()
        {
            deletes.extend(events.iter().cloned());
        }
    }
    assert_eq!(deletes.len(), KEYS.len(), "{deletes:?}");
    for e in &deletes {
        assert_eq!(e.kind, spindle::mvcc::EventKind::Delete, "{e:?}");
        assert_eq!(e.kv.mod_revision, rev, "{e:?}");
    }
    drop(watch);
    db.close();
}

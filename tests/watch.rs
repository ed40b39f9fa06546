//! Watches through the embedded engine: etcd's event semantics across shards and cores, history
//! catch-up, slow consumers and compaction.

use std::time::Duration;

use bytes::Bytes;
use spindle::kv::*;
use spindle::mvcc::EventKind;
use spindle::{Db, Options, Watch, WatchEvent, WatchRequest, WatchUpdate};

mod common;
use common::db::put;

fn open(dir: &std::path::Path) -> Db {
    Db::open(
        dir,
        Options {
            wal_segment_size: 1 << 20,
            ..common::db::opts(2, 4)
        },
    )
    .unwrap()
}

fn prefix(p: &str) -> WatchRequest {
    let r = RangeRequest::prefix(p.to_string());
    WatchRequest {
        key: r.key,
        range_end: r.range_end,
        ..Default::default()
    }
}

/// Collects events until `n` have arrived (fails after a generous timeout).
fn events(w: &Watch, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        match w.recv_timeout(Duration::from_secs(10)).unwrap() {
            Some(WatchUpdate::Events { revision, events }) => {
                assert!(events.iter().all(|e| e.kv.mod_revision <= revision));
                out.extend(events.iter().cloned());
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("only {} of {n} events arrived: {out:?}", out.len()),
        }
    }
    assert_eq!(out.len(), n, "more events than expected: {out:?}");
    out
}

fn quiet(w: &Watch) {
    assert_eq!(w.recv_timeout(Duration::from_millis(200)).unwrap(), None);
}

fn summary(evs: &[WatchEvent]) -> Vec<(EventKind, String, i64)> {
    evs.iter()
        .map(|e| {
            (
                e.kind,
                String::from_utf8_lossy(&e.kv.key).into_owned(),
                e.kv.mod_revision,
            )
        })
        .collect()
}

#[test]
fn key_prefix_and_history_watches_follow_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let r1 = put(&db, "a/x", "1");
    let key_watch = db
        .watch(WatchRequest {
            key: Bytes::from_static(b"a/x"),
            prev_kv: true,
            ..Default::default()
        })
        .unwrap();
    let all = db
        .watch(WatchRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            ..Default::default()
        })
        .unwrap();
    let r2 = put(&db, "a/x", "2");
    let r3 = put(&db, "b/y", "3");
    let r4 = db
        .delete_range(DeleteRangeRequest::key("a/x"))
        .unwrap()
        .header
        .revision;
    let got = events(&key_watch, 2);
    assert_eq!(
        summary(&got),
        vec![
            (EventKind::Put, "a/x".into(), r2),
            (EventKind::Delete, "a/x".into(), r4)
        ]
    );
    assert_eq!(got[0].kv.version, 2);
    assert_eq!(got[0].kv.create_revision, r1);
    assert_eq!(got[0].prev_kv.as_ref().unwrap().value, Bytes::from("1"));
    assert_eq!(got[1].prev_kv.as_ref().unwrap().value, Bytes::from("2"));
    // A delete event carries only the key and its revision, as in etcd.
    assert_eq!(got[1].kv.version, 0);
    assert_eq!(got[1].kv.create_revision, 0);
    assert_eq!(
        summary(&events(&all, 3))[1],
        (EventKind::Put, "b/y".into(), r3)
    );
    quiet(&key_watch);

    // From history: everything since r1, with filters.
    let hist = db
        .watch(WatchRequest {
            start_revision: r1,
            no_delete: true,
            ..prefix("")
        })
        .unwrap();
    assert_eq!(
        summary(&events(&hist, 3)),
        vec![
            (EventKind::Put, "a/x".into(), r1),
            (EventKind::Put, "a/x".into(), r2),
            (EventKind::Put, "b/y".into(), r3)
        ]
    );
    quiet(&hist);
    // A future start revision waits for it.
    let future = db
        .watch(WatchRequest {
            start_revision: r4 + 2,
            ..prefix("")
        })
        .unwrap();
    put(&db, "c", "skipped");
    let r6 = put(&db, "c", "seen");
    assert_eq!(
        summary(&events(&future, 1)),
        vec![(EventKind::Put, "c".into(), r6)]
    );
    db.close();
}

#[test]
fn a_multi_shard_txn_arrives_in_one_update_in_op_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let w = db.watch(prefix("")).unwrap();
    // Keys in different directories land on different shards.
    let keys = ["z/1", "a/1", "m/1", "q/1"];
    let resp = db
        .txn(TxnRequest {
            compare: vec![],
            success: keys
                .iter()
                .map(|k| RequestOp::Put(PutRequest::new(k.to_string(), "v")))
                .collect(),
            failure: vec![],
        })
        .unwrap();
    match w.recv_timeout(Duration::from_secs(10)).unwrap() {
        Some(WatchUpdate::Events { revision, events }) => {
            assert_eq!(revision, resp.header.revision);
            let got: Vec<_> = events.iter().map(|e| e.kv.key.clone()).collect();
            let want: Vec<_> = keys.iter().map(|k| Bytes::from(k.to_string())).collect();
            assert_eq!(got, want, "events in the txn's op order");
        }
        other => panic!("{other:?}"),
    }
    db.close();
}

#[test]
fn a_slow_consumer_loses_nothing_and_blocks_no_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let w = db.watch(prefix("")).unwrap();
    // Far more updates than the watch buffers, written while nobody reads.
    let n = 3000;
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                for i in 0..n / 4 {
                    put(&db, &format!("d{t}/k{i}"), "v");
                }
            })
        })
        .collect();
    for t in writers {
        t.join().unwrap();
    }
    let got = events(&w, n);
    let revs: Vec<i64> = got.iter().map(|e| e.kv.mod_revision).collect();
    assert!(
        revs.windows(2).all(|p| p[0] < p[1]),
        "gap-free, duplicate-free, in order"
    );
    assert_eq!(revs.last().copied(), Some(db.revision()));
    quiet(&w);
    db.close();
}

#[test]
fn compacted_history_cancels_with_the_compact_revision() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    for i in 0..5 {
        put(&db, "k", &i.to_string());
    }
    let at = put(&db, "k", "last");
    db.compact(CompactionRequest {
        revision: at,
        physical: false,
    })
    .unwrap();
    let w = db
        .watch(WatchRequest {
            start_revision: 2,
            ..prefix("")
        })
        .unwrap();
    assert_eq!(
        w.recv_timeout(Duration::from_secs(10)).unwrap(),
        Some(WatchUpdate::Compacted {
            compact_revision: at
        })
    );
    // At the compact revision itself history is still there.
    let ok = db
        .watch(WatchRequest {
            start_revision: at,
            ..prefix("")
        })
        .unwrap();
    assert_eq!(
        summary(&events(&ok, 1)),
        vec![(EventKind::Put, "k".into(), at)]
    );
    db.close();
}

#[test]
fn watches_resume_after_restart_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let first = put(&db, "r/a", "1");
    put(&db, "r/b", "2");
    db.close();
    let db = open(dir.path());
    let last = put(&db, "r/c", "3");
    // Replayed revisions come from history, new ones from the event log.
    let w = db
        .watch(WatchRequest {
            start_revision: first,
            ..prefix("r/")
        })
        .unwrap();
    let got = events(&w, 3);
    assert_eq!(got[0].kv.mod_revision, first);
    assert_eq!(got[2].kv.mod_revision, last);
    db.close();
}

/// The events a watch on `[key, end)` must report for `rev`, derived only from range reads at
/// `rev - 1` and `rev` (so from the MVCC read path, not the change feed), in key order.
fn expected_at(db: &Db, key: &str, end: &str, rev: i64) -> Vec<(EventKind, String, i64)> {
    let read = |at: i64| {
        db.range(RangeRequest {
            revision: at,
            ..RangeRequest::range(key.to_string(), end.to_string())
        })
        .unwrap()
        .kvs
    };
    let before = read(rev - 1);
    let after = read(rev);
    let mut out = Vec::new();
    for kv in &after {
        if kv.mod_revision == rev {
            out.push((
                EventKind::Put,
                String::from_utf8_lossy(&kv.key).into_owned(),
                rev,
            ));
        }
    }
    for kv in &before {
        if !after.iter().any(|a| a.key == kv.key) {
            out.push((
                EventKind::Delete,
                String::from_utf8_lossy(&kv.key).into_owned(),
                rev,
            ));
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

#[test]
fn random_writes_and_watchers_see_exactly_the_history() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SPINDLE_WATCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let dirs = ["a", "b", "c", "d"];
    let key = |rng: &mut rand::rngs::StdRng| {
        format!("{}/{}", dirs[rng.gen_range(0..4)], rng.gen_range(0..6))
    };
    let ranges = [("a/", "b/"), ("\0", "\0"), ("b/2", "d/"), ("c/1", "")];
    let mut watches = Vec::new();
    let mut start_revs = Vec::new();
    for step in 0..150 {
        // A new watcher now and then, from now or from a past revision.
        if step % 30 == 0 {
            let (k, e) = ranges[watches.len() % ranges.len()];
            let start = if rng.gen_bool(0.5) {
                rng.gen_range(1..=db.revision())
            } else {
                db.revision() + 1
            };
            let w = db
                .watch(WatchRequest {
                    key: Bytes::from(k.to_string()),
                    range_end: Bytes::from(e.to_string()),
                    start_revision: start,
                    ..Default::default()
                })
                .unwrap();
            watches.push((k, e, w));
            start_revs.push(start);
        }
        match rng.gen_range(0..10) {
            0..=5 => {
                put(&db, &key(&mut rng), &step.to_string());
            }
            6..=7 => {
                db.delete_range(DeleteRangeRequest::key(key(&mut rng)))
                    .unwrap();
            }
            _ => {
                // A multi-shard txn: distinct keys in several directories, maybe a delete range.
                let mut keys: Vec<String> = (0..3).map(|_| key(&mut rng)).collect();
                keys.sort();
                keys.dedup();
                let mut success: Vec<RequestOp> = keys
                    .iter()
                    .map(|k| RequestOp::Put(PutRequest::new(k.clone(), "t")))
                    .collect();
                if rng.gen_bool(0.3) {
                    let d = dirs[rng.gen_range(0..4)];
                    if !keys.iter().any(|k| k.starts_with(d)) {
                        success.push(RequestOp::DeleteRange(DeleteRangeRequest::prefix(format!(
                            "{d}/"
                        ))));
                    }
                }
                db.txn(TxnRequest {
                    compare: vec![],
                    success,
                    failure: vec![],
                })
                .unwrap();
            }
        }
    }
    let last = db.revision();
    for ((k, e, w), start) in watches.iter().zip(start_revs) {
        let mut want = Vec::new();
        for rev in start.max(2)..=last {
            want.extend(expected_at(&db, k, e, rev));
        }
        let got = events(w, want.len());
        let mut got = summary(&got);
        // Within one revision the feed follows the txn's op order; the oracle sorts by key.
        got.sort_by(|a, b| (a.2, &a.1).cmp(&(b.2, &b.1)));
        assert_eq!(got, want, "seed {seed}: watch [{k}, {e}) from {start}");
        quiet(w);
    }
    db.close();
}

//! The engine's write path through Raft, seen from outside: every open elects a new term and logs
//! it, every record carries its term, the hard state survives checkpoints that drop the segments
//! it was first written in, and the benchmark baseline without Raft writes the same format.

use std::path::Path;

use spindle::engine::meta;
use spindle::kv::*;
use spindle::wal::{self, EntryKind, Recovered};
use spindle::{Db, Options};

mod common;
use common::db::put;

fn opts() -> Options {
    Options {
        wal_segment_size: 64 << 10,
        ..common::db::opts(1, 2)
    }
}

fn get(db: &Db, key: &str) -> Option<String> {
    db.range(RangeRequest::key(key.to_string()))
        .unwrap()
        .kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

/// The log of `shard` as recovery reads it (entries after `after`).
fn log(dir: &Path, shard: u32, after: u64) -> Recovered {
    wal::recover(&meta::shard_dir(dir, shard).join("wal"), shard, after).unwrap()
}

/// Checks what every shard's log must show after `opens` opens, each with writes after it.
fn check_terms(dir: &Path, opens: u64) {
    for shard in 0..2 {
        let rec = log(dir, shard, 0);
        let hs = rec.hard_state.expect("hard state record");
        assert_eq!((hs.term, hs.vote), (opens, 1), "shard {shard}");
        let mut term = 0;
        let mut noops = Vec::new();
        for e in rec.entries.iter().map(|l| &l.entry) {
            assert!(e.term >= term, "terms go backwards at index {}", e.index);
            if e.term > term {
                // A leader's first entry of its term is its no-op.
                assert_eq!(e.kind, EntryKind::Noop, "first entry of term {}", e.term);
            }
            if e.kind == EntryKind::Noop {
                noops.push(e.term);
            }
            term = e.term;
        }
        assert_eq!(noops, (1..=opens).collect::<Vec<_>>(), "shard {shard}");
    }
}

#[test]
fn every_open_elects_a_new_term_and_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    for open in 1..=3u64 {
        let db = Db::open(dir.path(), opts()).unwrap();
        assert_eq!(db.raft_term(), open);
        for i in 0..20 {
            put(&db, &format!("k{open}/{i}"), &format!("v{open}.{i}"));
        }
        let resp = db
            .txn(TxnRequest {
                success: vec![
                    RequestOp::Put(PutRequest::new("a/x", "1")),
                    RequestOp::Put(PutRequest::new("b/y/z", "2")),
                ],
                ..Default::default()
            })
            .unwrap();
        assert!(resp.succeeded);
        db.close();
        check_terms(dir.path(), open);
    }
    let db = Db::open(dir.path(), opts()).unwrap();
    for open in 1..=3 {
        for i in 0..20 {
            assert_eq!(
                get(&db, &format!("k{open}/{i}")),
                Some(format!("v{open}.{i}"))
            );
        }
    }
    db.close();
}

#[test]
fn hard_state_survives_checkpoints_that_drop_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let value = "x".repeat(2000);
    for open in 1..=2u64 {
        let db = Db::open(dir.path(), opts()).unwrap();
        assert_eq!(db.raft_term(), open);
        // Several 64 KiB segments per shard, so the checkpoint drops the one holding the
        // hard state written at open.
        for i in 0..200 {
            put(&db, &format!("p{}/{i}", i % 2), &value);
        }
        let infos = db.checkpoint().unwrap();
        for info in &infos {
            assert_eq!(info.term, open, "checkpoint term of shard {}", info.shard);
            let segs =
                wal::recovery::list_segments(&meta::shard_dir(dir.path(), info.shard).join("wal"))
                    .unwrap();
            assert!(
                segs[0].first_index > 1,
                "shard {}: old segments dropped",
                info.shard
            );
        }
        put(&db, "after/checkpoint", &format!("{open}"));
        db.close();
        for info in &infos {
            let rec = log(dir.path(), info.shard, info.index);
            let hs = rec
                .hard_state
                .expect("hard state re-logged after the checkpoint");
            assert_eq!((hs.term, hs.vote), (open, 1));
        }
    }
    let db = Db::open(dir.path(), opts()).unwrap();
    assert_eq!(db.raft_term(), 3);
    assert_eq!(get(&db, "after/checkpoint").as_deref(), Some("2"));
    assert_eq!(get(&db, "p1/199").as_deref(), Some(value.as_str()));
    db.close();
}

#[test]
fn the_baseline_without_raft_writes_the_same_log_format() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(
        dir.path(),
        Options {
            bypass_raft: true,
            ..opts()
        },
    )
    .unwrap();
    put(&db, "k", "without raft");
    db.close();
    let db = Db::open(dir.path(), opts()).unwrap();
    assert_eq!(get(&db, "k").as_deref(), Some("without raft"));
    // The baseline's records carry term 1 and no vote, so the first election is term 2.
    assert_eq!(db.raft_term(), 2);
    put(&db, "k", "with raft");
    db.close();
    let db = Db::open(dir.path(), opts()).unwrap();
    assert_eq!(get(&db, "k").as_deref(), Some("with raft"));
    db.close();
}

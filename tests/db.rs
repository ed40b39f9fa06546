//! End-to-end behaviour of the embedded engine: etcd semantics through `Db`, across shards, cores,
//! restarts and checkpoints.

use bytes::Bytes;
use spindle::kv::*;
use spindle::{Db, Error};

mod common;
use common::db::{opts, put};

fn get(db: &Db, key: &str) -> Option<KeyValue> {
    db.range(RangeRequest::key(key.to_string()))
        .unwrap()
        .kvs
        .into_iter()
        .next()
}

fn keys_of(resp: &RangeResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

#[test]
fn revisions_versions_and_history_follow_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 4)).unwrap();
    // An empty store is at revision 1 and the first write is 2, as in etcd.
    assert_eq!(db.revision(), 1);
    assert_eq!(put(&db, "a", "1"), 2);
    assert_eq!(put(&db, "a", "2"), 3);
    assert_eq!(put(&db, "b", "x"), 4);
    let a = get(&db, "a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 3, 2));
    assert_eq!(a.value, Bytes::from_static(b"2"));

    // History read.
    let old = db
        .range(RangeRequest {
            revision: 2,
            ..RangeRequest::key("a")
        })
        .unwrap();
    assert_eq!(old.kvs[0].value, Bytes::from_static(b"1"));
    assert_eq!(
        old.header.revision, 4,
        "header carries the current revision, as etcd"
    );

    // Delete resets the version; a later put starts a new generation.
    let d = db
        .delete_range(DeleteRangeRequest {
            prev_kv: true,
            ..DeleteRangeRequest::key("a")
        })
        .unwrap();
    assert_eq!(d.deleted, 1);
    assert_eq!(d.header.revision, 5);
    assert_eq!(d.prev_kvs[0].value, Bytes::from_static(b"2"));
    assert!(get(&db, "a").is_none());
    assert_eq!(put(&db, "a", "3"), 6);
    let a = get(&db, "a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (6, 6, 1));

    // Deleting nothing does not bump the revision.
    let d = db.delete_range(DeleteRangeRequest::key("zzz")).unwrap();
    assert_eq!((d.deleted, d.header.revision), (0, 6));

    // Future and compacted revisions.
    let err = db
        .range(RangeRequest {
            revision: 99,
            ..RangeRequest::key("a")
        })
        .unwrap_err();
    assert!(matches!(err, Error::FutureRevision), "{err}");
    db.compact(CompactionRequest {
        revision: 5,
        physical: true,
    })
    .unwrap();
    let err = db
        .range(RangeRequest {
            revision: 3,
            ..RangeRequest::key("a")
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(matches!(
        db.compact(CompactionRequest {
            revision: 4,
            physical: false
        }),
        Err(Error::Compacted)
    ));
    assert!(matches!(
        db.compact(CompactionRequest {
            revision: 50,
            physical: false
        }),
        Err(Error::FutureRevision)
    ));
    // Reading exactly at the compact revision still works.
    let at4 = db
        .range(RangeRequest {
            revision: 5,
            ..RangeRequest::prefix("")
        })
        .unwrap();
    assert_eq!(keys_of(&at4), vec!["b"]);
    db.close();
}

#[test]
fn ranges_merge_across_shards_with_limits_and_sorting() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 5)).unwrap();
    for i in 0..50 {
        put(&db, &format!("k{i:02}"), &format!("{}", 50 - i));
    }
    let all = db.range(RangeRequest::prefix("k")).unwrap();
    assert_eq!(all.count, 50);
    assert_eq!(
        keys_of(&all),
        (0..50).map(|i| format!("k{i:02}")).collect::<Vec<_>>()
    );
    let page = db
        .range(RangeRequest {
            limit: 7,
            ..RangeRequest::range("k10", "k40")
        })
        .unwrap();
    assert_eq!(
        keys_of(&page),
        (10..17).map(|i| format!("k{i:02}")).collect::<Vec<_>>()
    );
    assert!(page.more);
    assert_eq!(page.count, 30);
    let desc = db
        .range(RangeRequest {
            limit: 3,
            sort_order: SortOrder::Descend,
            sort_target: SortTarget::Mod,
            ..RangeRequest::prefix("k")
        })
        .unwrap();
    assert_eq!(keys_of(&desc), vec!["k49", "k48", "k47"]);
    let count = db
        .range(RangeRequest {
            count_only: true,
            ..RangeRequest::prefix("k")
        })
        .unwrap();
    assert_eq!((count.count, count.kvs.len()), (50, 0));
    let from = db.range(RangeRequest::range("k45", "\0")).unwrap();
    assert_eq!(from.count, 5);
    db.close();
}

#[test]
fn txn_compare_and_swap_and_nested_ops() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 3)).unwrap();
    put(&db, "cfg/x", "1");
    let cas = |expect: &str, new: &str| {
        db.txn(TxnRequest {
            compare: vec![Compare::value(
                "cfg/x",
                CompareResult::Equal,
                expect.to_string(),
            )],
            success: vec![RequestOp::Put(PutRequest::new("cfg/x", new.to_string()))],
            failure: vec![RequestOp::Range(RangeRequest::key("cfg/x"))],
        })
        .unwrap()
    };
    let ok = cas("1", "2");
    assert!(ok.succeeded);
    assert_eq!(ok.header.revision, 3);
    let fail = cas("1", "3");
    assert!(!fail.succeeded);
    assert_eq!(
        fail.header.revision, 3,
        "a txn that writes nothing does not bump the revision"
    );
    match &fail.responses[0] {
        ResponseOp::Range(r) => assert_eq!(r.kvs[0].value, Bytes::from_static(b"2")),
        other => panic!("{other:?}"),
    }
    // Multi-shard txn (keys in different directories) with a nested txn and a range that sees
    // the txn's own earlier write.
    let resp = db
        .txn(TxnRequest {
            compare: vec![Compare::version("cfg/x", CompareResult::Greater, 0)],
            success: vec![
                RequestOp::Put(PutRequest::new("a/1", "A")),
                RequestOp::Put(PutRequest::new("b/1", "B")),
                RequestOp::Txn(TxnRequest {
                    compare: vec![Compare::create_revision("missing", CompareResult::Equal, 0)],
                    success: vec![RequestOp::Put(PutRequest::new("c/1", "C"))],
                    failure: vec![],
                }),
                RequestOp::Range(RangeRequest::prefix("")),
            ],
            failure: vec![],
        })
        .unwrap();
    assert!(resp.succeeded);
    assert_eq!(
        resp.header.revision, 4,
        "one revision for the whole multi-shard txn"
    );
    match &resp.responses[3] {
        ResponseOp::Range(r) => assert_eq!(keys_of(r), vec!["a/1", "b/1", "c/1", "cfg/x"]),
        other => panic!("{other:?}"),
    }
    for k in ["a/1", "b/1", "c/1"] {
        assert_eq!(get(&db, k).unwrap().mod_revision, 4);
    }
    // etcd's request errors.
    let dup = db.txn(TxnRequest {
        success: vec![
            RequestOp::Put(PutRequest::new("d", "1")),
            RequestOp::Put(PutRequest::new("d", "2")),
        ],
        ..Default::default()
    });
    assert_eq!(
        dup.unwrap_err().to_string(),
        "etcdserver: duplicate key given in txn request"
    );
    let many = db.txn(TxnRequest {
        success: (0..129)
            .map(|i| RequestOp::Put(PutRequest::new(format!("m{i}"), "v")))
            .collect(),
        ..Default::default()
    });
    assert_eq!(
        many.unwrap_err().to_string(),
        "etcdserver: too many operations in txn request"
    );
    assert!(matches!(
        db.put(PutRequest::new("", "v")),
        Err(Error::EmptyKey)
    ));
    let ignore = db.put(PutRequest {
        ignore_value: true,
        ..PutRequest::new("nope", "")
    });
    assert!(matches!(ignore, Err(Error::KeyNotFound)));
    // Multi-shard delete-range.
    let d = db
        .delete_range(DeleteRangeRequest::range("a", "c0"))
        .unwrap();
    assert_eq!(d.deleted, 3, "a/1, b/1 and c/1 on their shards");
    assert_eq!(db.revision(), 5);
    db.close();
}

#[test]
fn data_survives_restart_with_other_core_counts_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path(), opts(2, 4)).unwrap();
        for i in 0..200 {
            put(&db, &format!("d{}/k{i}", i % 7), &format!("v{i}"));
        }
        db.delete_range(DeleteRangeRequest::prefix("d3/")).unwrap();
        db.close();
    }
    {
        // One core hosts all four shards.
        let db = Db::open(dir.path(), opts(1, 99)).unwrap();
        let st = db.status().unwrap();
        assert_eq!((st.shards, st.revision), (4, 202));
        assert_eq!(db.range(RangeRequest::prefix("d")).unwrap().count, 200 - 29);
        let infos = db.checkpoint().unwrap();
        assert_eq!(infos.len(), 4);
        for i in 200..260 {
            put(&db, &format!("d{}/k{i}", i % 7), &format!("v{i}"));
        }
        db.close();
    }
    let db = Db::open(dir.path(), opts(3, 1)).unwrap();
    assert_eq!(db.revision(), 262);
    let all = db.range(RangeRequest::prefix("d")).unwrap();
    assert_eq!(all.count, 260 - 29);
    let k = get(&db, "d5/k250").unwrap();
    assert_eq!(
        (k.value, k.mod_revision),
        (Bytes::from_static(b"v250"), 253)
    );
    // History from before the checkpoint is still there.
    let old = db
        .range(RangeRequest {
            revision: 100,
            ..RangeRequest::prefix("d3/")
        })
        .unwrap();
    assert_eq!(old.count, 14);
    db.close();
}

/// Durable values are served from the mapped WAL segments (while running, and after a restart
/// for the log tail): they read right, also once a checkpoint has deleted those segments and
/// after the next restart.
#[test]
fn log_tail_values_read_right_after_checkpoints_and_restarts() {
    let value = |i: usize, round: usize| format!("{round}:{i}:{}", "x".repeat(1000 + i % 13));
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path(), opts(1, 1)).unwrap();
        // Several 256 KiB segments' worth: the values of all but the last are served from
        // the mapped segments once durable.
        for i in 0..600 {
            put(&db, &format!("k{i:04}"), &value(i, 0));
        }
        let all = db.range(RangeRequest::prefix("k")).unwrap();
        assert_eq!(all.kvs.len(), 600);
        for (i, kv) in all.kvs.iter().enumerate() {
            assert_eq!(kv.key, Bytes::from(format!("k{i:04}")));
            assert_eq!(
                kv.value,
                Bytes::from(value(i, 0)),
                "k{i:04} before a restart"
            );
        }
        db.close();
    }
    {
        let db = Db::open(dir.path(), opts(1, 1)).unwrap();
        let before = db.range(RangeRequest::prefix("k")).unwrap();
        assert_eq!(before.kvs.len(), 600);
        db.checkpoint().unwrap();
        for i in (0..600).step_by(3) {
            put(&db, &format!("k{i:04}"), &value(i, 1));
        }
        // Read before the checkpoint, after the segments they came from were deleted.
        for (i, kv) in before.kvs.iter().enumerate() {
            assert_eq!(kv.value, Bytes::from(value(i, 0)), "k{i:04} as read before");
        }
        for i in 0..600 {
            let round = usize::from(i % 3 == 0);
            let kv = get(&db, &format!("k{i:04}")).unwrap();
            assert_eq!(kv.value, Bytes::from(value(i, round)), "k{i:04}");
        }
        db.close();
    }
    let db = Db::open(dir.path(), opts(1, 1)).unwrap();
    for i in 0..600 {
        let round = usize::from(i % 3 == 0);
        let kv = get(&db, &format!("k{i:04}")).unwrap();
        assert_eq!(
            kv.value,
            Bytes::from(value(i, round)),
            "k{i:04} after restart"
        );
        assert_eq!(kv.version, 1 + round as i64);
    }
    db.close();
}

#[test]
fn multi_shard_writes_are_never_seen_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 4)).unwrap();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            for i in 0..150 {
                let v = format!("{i}");
                db.txn(TxnRequest {
                    success: ["p/x", "q/x", "r/x", "s/x"]
                        .iter()
                        .map(|k| RequestOp::Put(PutRequest::new(k.to_string(), v.clone())))
                        .collect(),
                    ..Default::default()
                })
                .unwrap();
            }
        })
    };
    let single = {
        let db = db.clone();
        std::thread::spawn(move || {
            for i in 0..150 {
                db.put(PutRequest::new(format!("t/{}", i % 5), "v"))
                    .unwrap();
            }
        })
    };
    let mut last_rev = 0;
    while !writer.is_finished() {
        let r = db.range(RangeRequest::range("p", "t")).unwrap();
        assert!(
            r.header.revision >= last_rev,
            "read revision went backwards"
        );
        last_rev = r.header.revision;
        let values: Vec<&Bytes> = r.kvs.iter().map(|kv| &kv.value).collect();
        assert!(
            values.windows(2).all(|w| w[0] == w[1]),
            "torn multi-shard write: {values:?}"
        );
        let mods: Vec<i64> = r.kvs.iter().map(|kv| kv.mod_revision).collect();
        assert!(
            mods.windows(2).all(|w| w[0] == w[1]),
            "mixed revisions: {mods:?}"
        );
    }
    writer.join().unwrap();
    single.join().unwrap();
    assert_eq!(db.revision(), 301);
    db.close();
}

#[test]
fn async_api_works_from_another_runtime_and_many_writers_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 2)).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                futures_lite::future::block_on(async {
                    for i in 0..50 {
                        db.put_async(PutRequest::new(format!("w{t}/{i}"), "v"))
                            .await
                            .unwrap();
                    }
                    db.range_async(RangeRequest::prefix(format!("w{t}/")))
                        .await
                        .unwrap()
                        .count
                })
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 50);
    }
    assert_eq!(db.revision(), 401);
    db.close();
}

#[test]
fn second_open_of_a_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(1, 1)).unwrap();
    assert!(matches!(
        Db::open(dir.path(), opts(1, 1)),
        Err(Error::DataDir { .. })
    ));
    db.close();
    Db::open(dir.path(), opts(1, 1)).unwrap().close();
}

#[test]
fn corrupt_checkpoint_refuses_to_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(1, 1)).unwrap();
    for i in 0..50 {
        put(&db, &format!("k{i}"), "value");
    }
    db.checkpoint().unwrap();
    db.close();
    let shard = dir.path().join("shard-000");
    let ckpt = std::fs::read_dir(&shard)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .expect("a checkpoint file");
    let mut bytes = std::fs::read(&ckpt).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&ckpt, &bytes).unwrap();
    let err = Db::open(dir.path(), opts(1, 1)).err().expect("must refuse");
    match &err {
        Error::Corrupt { path, .. } => assert_eq!(path, &ckpt),
        other => panic!("expected corruption, got {other}"),
    }
    assert!(err.to_string().contains("checkpoint-"), "{err}");
}

/// Threads that ran `after_recovery`, and what each saw: the hook must run on every core's own
/// thread, after its shards were recovered (their data readable), before `open` returns.
static RECOVERED_ON: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn note_recovery() {
    let name = std::thread::current().name().unwrap_or("?").to_string();
    RECOVERED_ON.lock().unwrap().push(name);
}

#[test]
fn after_recovery_runs_once_on_every_core_thread_before_open_returns() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), opts(2, 4)).unwrap();
    for i in 0..20 {
        put(&db, &format!("k{i}"), "v");
    }
    db.close();
    RECOVERED_ON.lock().unwrap().clear();
    let mut o = opts(2, 4);
    o.after_recovery = Some(note_recovery);
    let db = Db::open(dir.path(), o).unwrap();
    let mut ran = RECOVERED_ON.lock().unwrap().clone();
    ran.sort();
    assert_eq!(ran.len(), 2, "once per core: {ran:?}");
    ran.dedup();
    assert_eq!(ran.len(), 2, "each on its own thread: {ran:?}");
    assert!(
        ran.iter().all(|t| t.starts_with("spindle-core-")),
        "{ran:?}"
    );
    assert_eq!(get(&db, "k7").unwrap().value, Bytes::from_static(b"v"));
    db.close();
}

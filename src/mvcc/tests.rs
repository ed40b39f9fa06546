//! Unit tests: one focused test per etcd semantic the store implements.

use bytes::Bytes;

use super::*;
use crate::error::Error;
use crate::kv::{
    Compare, CompareResult, CompareTarget, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest,
    RequestOp, SortOrder, SortTarget, TargetUnion, TxnRequest,
};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn all(_: &[u8]) -> bool {
    true
}

fn txn(ops: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare: vec![],
        success: ops,
        failure: vec![],
    }
}

fn yes() -> TxnPath {
    TxnPath(vec![true])
}

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp::Put(PutRequest::new(b(k), b(v)))
}

fn del_op(k: &str, end: &str) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest::range(b(k), b(end)))
}

/// Checks then executes `ops` as one txn at `rev`, asserting check() agrees with what happened.
fn run(s: &mut ShardStore, rev: i64, ops: Vec<RequestOp>) -> Execution {
    let t = txn(ops);
    let writes = s.check(&t, &yes(), rev - 1, &all).expect("check");
    let ex = s.execute(&t, &yes(), rev, &all);
    assert_eq!(writes, ex.wrote());
    ex
}

fn get(s: &ShardStore, k: &str, rev: i64) -> Option<KeyValue> {
    let r = s.range(&RangeRequest::key(b(k)), rev).expect("range");
    assert!(r.kvs.len() <= 1);
    r.kvs.into_iter().next()
}

fn kv(k: &str, v: &str, create: i64, modr: i64, version: i64) -> KeyValue {
    KeyValue {
        key: b(k),
        create_revision: create,
        mod_revision: modr,
        version,
        value: b(v),
        lease: 0,
    }
}

fn keys(kvs: &[KeyValue]) -> Vec<&[u8]> {
    kvs.iter().map(|kv| kv.key.as_ref()).collect()
}

/// Everything observable about a store, structurally.
fn dump(s: &ShardStore) -> (Vec<KeyHistory>, i64, i64, usize) {
    (
        s.export_keys(None, usize::MAX, i64::MAX),
        s.last_revision(),
        s.compact_revision(),
        s.key_count(),
    )
}

/// a@2 (v1), a@3 (v2), b,c@4, delete a@6, a@8 (new generation).
fn sample() -> ShardStore {
    let mut s = ShardStore::new();
    run(&mut s, 2, vec![put_op("a", "a1")]);
    run(&mut s, 3, vec![put_op("a", "a2")]);
    run(&mut s, 4, vec![put_op("b", "b1"), put_op("c", "c1")]);
    run(&mut s, 6, vec![del_op("a", "")]);
    run(&mut s, 8, vec![put_op("a", "a3")]);
    s
}

#[test]
fn versions_revisions_and_generations() {
    let s = sample();
    assert_eq!(s.last_revision(), 8);
    assert_eq!(get(&s, "a", 1), None);
    assert_eq!(get(&s, "a", 2), Some(kv("a", "a1", 2, 2, 1)));
    assert_eq!(get(&s, "a", 5), Some(kv("a", "a2", 2, 3, 2)));
    assert_eq!(get(&s, "a", 6), None, "delete removes the key");
    assert_eq!(get(&s, "a", 7), None);
    assert_eq!(
        get(&s, "a", 8),
        Some(kv("a", "a3", 8, 8, 1)),
        "recreate: new create revision, version 1"
    );
    assert_eq!(get(&s, "a", 0), get(&s, "a", 8), "rev 0 reads the latest");
    // Every write of one txn shares its revision.
    assert_eq!(get(&s, "b", 4), Some(kv("b", "b1", 4, 4, 1)));
    assert_eq!(get(&s, "c", 9), Some(kv("c", "c1", 4, 4, 1)));
    assert_eq!(s.key_count(), 3);
}

#[test]
fn range_forms() {
    let s = sample();
    let r = |k: &str, end: &str| {
        s.range(&RangeRequest::range(b(k), b(end)), 0)
            .expect("range")
    };
    assert_eq!(keys(&r("a", "c").kvs), [b"a", b"b"]);
    assert_eq!(keys(&r("b", "\0").kvs), [b"b", b"c"], "\\0 = to the end");
    assert_eq!(keys(&r("", "\0").kvs), [b"a", b"b", b"c"]);
    assert_eq!(r("c", "a"), ShardRange::default(), "end <= key is empty");
    assert_eq!(r("c", "c"), ShardRange::default());
    assert_eq!(keys(&r("b", "").kvs), [b"b"], "empty end = single key");
    assert_eq!(r("bb", "").count, 0);
    let p = s.range(&RangeRequest::prefix(b("")), 0).expect("range");
    assert_eq!(p.count, 3);
    // Historical ranges see the keys that existed then.
    let at5 = s
        .range(&RangeRequest::range(b("a"), b("\0")), 5)
        .expect("range");
    assert_eq!(keys(&at5.kvs), [b"a", b"b", b"c"]);
    let at7 = s
        .range(&RangeRequest::range(b("a"), b("\0")), 7)
        .expect("range");
    assert_eq!(keys(&at7.kvs), [b"b", b"c"]);
}

#[test]
fn limit_count_and_filtered() {
    let s = sample();
    let mut req = RangeRequest::range(b("a"), b("\0"));
    req.limit = 2;
    let r = s.range(&req, 0).expect("range");
    assert_eq!(keys(&r.kvs), [b"a", b"b"]);
    assert_eq!((r.count, r.filtered), (3, 3), "count ignores limit");
    req.limit = 5;
    assert_eq!(s.range(&req, 0).expect("range").kvs.len(), 3);
    req.limit = -1;
    assert_eq!(
        s.range(&req, 0).expect("range").kvs.len(),
        3,
        "negative limit = none"
    );
}

#[test]
fn count_only_and_keys_only() {
    let s = sample();
    let mut req = RangeRequest::range(b("a"), b("\0"));
    req.count_only = true;
    req.limit = 1;
    req.min_mod_revision = 5;
    let r = s.range(&req, 0).expect("range");
    assert_eq!(
        r,
        ShardRange {
            kvs: vec![],
            filtered: 0,
            count: 3
        }
    );

    let mut req = RangeRequest::range(b("a"), b("\0"));
    req.keys_only = true;
    req.sort_target = SortTarget::Value;
    req.sort_order = SortOrder::Descend;
    let r = s.range(&req, 0).expect("range");
    assert_eq!(keys(&r.kvs), [b"c", b"b", b"a"], "sorted by value");
    assert!(
        r.kvs.iter().all(|kv| !kv.value.is_empty()),
        "kept under a VALUE sort so shards can be merged; the merger drops them"
    );
    req.sort_target = SortTarget::Mod;
    let r = s.range(&req, 0).expect("range");
    assert_eq!(keys(&r.kvs), [b"a", b"b", b"c"], "b and c tie on mod 4");
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty() && kv.version > 0));
}

/// Keys x1..x4 with distinct create/mod revisions and versions, plus ties.
fn sort_fixture() -> ShardStore {
    let mut s = ShardStore::new();
    run(&mut s, 1, vec![put_op("x3", "b"), put_op("x4", "b")]);
    run(&mut s, 2, vec![put_op("x1", "c")]);
    run(&mut s, 3, vec![put_op("x2", "a")]);
    run(&mut s, 4, vec![put_op("x3", "b")]);
    run(&mut s, 5, vec![put_op("x4", "b")]);
    s
}

#[test]
fn sort_orders_and_targets() {
    let s = sort_fixture();
    let sorted = |order, target| {
        let mut req = RangeRequest::prefix(b("x"));
        req.sort_order = order;
        req.sort_target = target;
        let r = s.range(&req, 0).expect("range");
        keys(&r.kvs)
            .into_iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    use SortOrder::*;
    use SortTarget::*;
    // versions: x1=1 x2=1 x3=2 x4=2; create: x3=x4=1, x1=2, x2=3; mod: x1=2 x2=3 x3=4 x4=5;
    // values: x1=c x2=a x3=b x4=b
    assert_eq!(sorted(None, Key), ["x1", "x2", "x3", "x4"]);
    assert_eq!(sorted(Ascend, Key), ["x1", "x2", "x3", "x4"]);
    assert_eq!(sorted(Descend, Key), ["x4", "x3", "x2", "x1"]);
    assert_eq!(sorted(Ascend, Version), ["x1", "x2", "x3", "x4"]);
    assert_eq!(
        sorted(Descend, Version),
        ["x3", "x4", "x1", "x2"],
        "ties by key ascending"
    );
    assert_eq!(sorted(Ascend, Create), ["x3", "x4", "x1", "x2"]);
    assert_eq!(sorted(Descend, Create), ["x2", "x1", "x3", "x4"]);
    assert_eq!(sorted(Ascend, Mod), ["x1", "x2", "x3", "x4"]);
    assert_eq!(sorted(Descend, Mod), ["x4", "x3", "x2", "x1"]);
    assert_eq!(sorted(Ascend, Value), ["x2", "x3", "x4", "x1"]);
    assert_eq!(sorted(Descend, Value), ["x1", "x3", "x4", "x2"]);
    assert_eq!(
        sorted(None, Create),
        sorted(Ascend, Create),
        "NONE with a non-key target sorts ascending"
    );
    assert_eq!(sorted(None, Value), sorted(Ascend, Value));
}

#[test]
fn sort_then_limit_takes_the_global_top() {
    let s = sort_fixture();
    let mut req = RangeRequest::prefix(b("x"));
    req.sort_order = SortOrder::Descend;
    req.sort_target = SortTarget::Mod;
    req.limit = 2;
    let r = s.range(&req, 0).expect("range");
    assert_eq!(keys(&r.kvs), [b"x4", b"x3"]);
    assert_eq!((r.filtered, r.count), (4, 4));
}

#[test]
fn sort_none_with_limit_uses_etcds_prefetch_window() {
    // etcd fetches limit+1 keys in key order when sort_order is NONE, then sorts by the target.
    let s = sort_fixture();
    let mut req = RangeRequest::prefix(b("x"));
    req.sort_target = SortTarget::Create;
    req.limit = 2;
    assert_eq!(prefetch_window(&req), Some(3));
    let r = s.range(&req, 0).expect("range");
    // Window x1,x2,x3 sorted by create (2,3,1); kept whole (limit + 1) for the merge.
    assert_eq!(keys(&r.kvs), [b"x3", b"x1", b"x2"]);
    assert_eq!((r.filtered, r.count), (4, 4));
    // With an explicit order etcd fetches everything: global top 2.
    req.sort_order = SortOrder::Ascend;
    assert_eq!(prefetch_window(&req), None);
    let r = s.range(&req, 0).expect("range");
    assert_eq!(keys(&r.kvs), [b"x3", b"x4"]);
}

#[test]
fn revision_filters_are_inclusive_and_apply_before_limit() {
    let s = sort_fixture();
    let base = RangeRequest::prefix(b("x"));
    let run_filter = |f: &dyn Fn(&mut RangeRequest)| {
        let mut req = base.clone();
        f(&mut req);
        let r = s.range(&req, 0).expect("range");
        (
            keys(&r.kvs)
                .into_iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect::<Vec<_>>(),
            r.filtered,
            r.count,
        )
    };
    assert_eq!(
        run_filter(&|r| r.min_mod_revision = 3),
        (vec!["x2".into(), "x3".into(), "x4".into()], 3, 4)
    );
    assert_eq!(
        run_filter(&|r| r.max_mod_revision = 3),
        (vec!["x1".into(), "x2".into()], 2, 4)
    );
    assert_eq!(
        run_filter(&|r| {
            r.min_create_revision = 2;
            r.max_create_revision = 2;
        }),
        (vec!["x1".into()], 1, 4)
    );
    // Filter first, then limit: the first two keys *passing* the filter.
    assert_eq!(
        run_filter(&|r| {
            r.min_mod_revision = 3;
            r.limit = 2;
        }),
        (vec!["x2".into(), "x3".into()], 3, 4)
    );
    // A negative bound is set (non-zero) and excludes everything it should.
    assert_eq!(run_filter(&|r| r.max_mod_revision = -1).1, 0);
}

#[test]
fn compacted_reads_fail_but_the_compact_revision_is_readable() {
    let mut s = sample();
    s.compact(5);
    assert!(matches!(
        s.range(&RangeRequest::key(b("a")), 4),
        Err(Error::Compacted)
    ));
    assert_eq!(get(&s, "a", 5), Some(kv("a", "a2", 2, 3, 2)));
    assert!(matches!(
        s.compare(&Compare::version(b("a"), CompareResult::Equal, 2), 4),
        Err(Error::Compacted)
    ));
    assert!(
        s.compare(&Compare::version(b("a"), CompareResult::Equal, 2), 5)
            .expect("compare")
            .all_true
    );
}

#[test]
fn compare_targets_and_missing_keys() {
    let mut s = ShardStore::new();
    let mut p = PutRequest::new(b("k"), b("mid"));
    p.lease = 7;
    run(&mut s, 3, vec![RequestOp::Put(p)]);
    run(&mut s, 5, vec![put_op("k", "mid")]);
    let c = |cmp: Compare| s.compare(&cmp, 0).expect("compare");
    use CompareResult::*;
    let hit = |matched, all_true| CompareOutcome { matched, all_true };
    assert_eq!(c(Compare::version(b("k"), Equal, 2)), hit(1, true));
    assert_eq!(c(Compare::version(b("k"), Greater, 1)), hit(1, true));
    assert_eq!(c(Compare::create_revision(b("k"), Equal, 3)), hit(1, true));
    assert_eq!(c(Compare::mod_revision(b("k"), Less, 6)), hit(1, true));
    assert_eq!(c(Compare::mod_revision(b("k"), NotEqual, 5)), hit(1, false));
    assert_eq!(
        c(Compare::lease(b("k"), Equal, 0)),
        hit(1, true),
        "second put dropped the lease"
    );
    assert_eq!(
        s.compare(&Compare::lease(b("k"), Equal, 7), 4)
            .expect("compare"),
        hit(1, true)
    );
    // VALUE compares bytes lexicographically.
    assert_eq!(c(Compare::value(b("k"), Greater, b("mi"))), hit(1, true));
    assert_eq!(c(Compare::value(b("k"), Less, b("n"))), hit(1, true));
    assert_eq!(c(Compare::value(b("k"), Equal, b("mid"))), hit(1, true));
    // A missing key compares as a zero KeyValue.
    assert_eq!(c(Compare::version(b("zz"), Equal, 0)), hit(0, true));
    assert_eq!(c(Compare::create_revision(b("zz"), Less, 1)), hit(0, true));
    assert_eq!(c(Compare::value(b("zz"), Equal, b(""))), hit(0, true));
    assert_eq!(c(Compare::version(b("k"), Equal, 0)), hit(1, false));
    assert_eq!(
        s.compare(&Compare::version(b("k"), Equal, 0), 2)
            .expect("compare"),
        hit(0, true),
        "not created yet at 2"
    );
    // Missing or mismatched operand = 0 / empty.
    let mut odd = Compare::version(b("k"), Greater, 0);
    odd.target_union = Some(TargetUnion::Value(b("x")));
    assert_eq!(c(odd.clone()), hit(1, true));
    odd.target_union = None;
    assert_eq!(c(odd), hit(1, true));
    let mut odd = Compare::value(b("k"), Greater, b(""));
    odd.target = CompareTarget::Value;
    odd.target_union = Some(TargetUnion::Version(9));
    assert_eq!(c(odd), hit(1, true), "value vs empty");
}

#[test]
fn compare_over_a_range() {
    let s = sort_fixture();
    use CompareResult::*;
    let c = |cmp: Compare| s.compare(&cmp, 0).expect("compare");
    let all_x = |cmp: Compare| cmp.with_range_end(b("y"));
    assert_eq!(
        c(all_x(Compare::version(b("x"), Greater, 0))),
        CompareOutcome {
            matched: 4,
            all_true: true
        }
    );
    assert_eq!(
        c(all_x(Compare::version(b("x"), Equal, 2))),
        CompareOutcome {
            matched: 4,
            all_true: false
        }
    );
    // Empty range: zero KeyValue.
    assert_eq!(
        c(Compare::mod_revision(b("y"), Equal, 0).with_range_end(b("z"))),
        CompareOutcome {
            matched: 0,
            all_true: true
        }
    );
    assert_eq!(
        c(Compare::mod_revision(b("y"), Equal, 0).with_range_end(b("a"))),
        CompareOutcome {
            matched: 0,
            all_true: true
        },
        "end <= key matches nothing"
    );
    assert_eq!(
        c(Compare::version(b("x"), Greater, 0).with_range_end(b("\0"))).matched,
        4
    );
}

#[test]
fn check_reports_writes() {
    let s = sample();
    let check = |ops: Vec<RequestOp>| s.check(&txn(ops), &yes(), 8, &all);
    assert!(matches!(check(vec![put_op("q", "1")]), Ok(true)));
    assert!(matches!(check(vec![del_op("a", "")]), Ok(true)));
    assert!(
        matches!(check(vec![del_op("zz", "")]), Ok(false)),
        "nothing to delete"
    );
    assert!(matches!(check(vec![del_op("d", "\0")]), Ok(false)));
    assert!(matches!(
        check(vec![RequestOp::Range(RangeRequest::key(b("a")))]),
        Ok(false)
    ));
    assert!(matches!(check(vec![]), Ok(false)));
    let not_mine = |k: &[u8]| k != b"q";
    assert!(matches!(
        s.check(&txn(vec![put_op("q", "1")]), &yes(), 8, &not_mine),
        Ok(false)
    ));
}

#[test]
fn check_put_preconditions() {
    let s = sample();
    let mut iv = PutRequest::new(b("zz"), b(""));
    iv.ignore_value = true;
    let mut il = PutRequest::new(b("zz"), b("v"));
    il.ignore_lease = true;
    for p in [iv.clone(), il.clone()] {
        assert!(matches!(
            s.check(&txn(vec![RequestOp::Put(p.clone())]), &yes(), 8, &all),
            Err(Error::KeyNotFound)
        ));
        // Another shard owns it: not checked here.
        assert!(matches!(
            s.check(&txn(vec![RequestOp::Put(p)]), &yes(), 8, &|_| false),
            Ok(false)
        ));
    }
    iv.key = b("b");
    assert!(matches!(
        s.check(&txn(vec![RequestOp::Put(iv)]), &yes(), 8, &all),
        Ok(true)
    ));
    // A key that existed once but is deleted at the latest revision.
    let mut s2 = sample();
    run(&mut s2, 9, vec![del_op("b", "")]);
    il.key = b("b");
    assert!(matches!(
        s2.check(&txn(vec![RequestOp::Put(il)]), &yes(), 9, &all),
        Err(Error::KeyNotFound)
    ));
}

#[test]
fn check_range_revisions() {
    let mut s = sample();
    let at = |rev| {
        let mut r = RangeRequest::key(b("a"));
        r.revision = rev;
        txn(vec![RequestOp::Range(r)])
    };
    assert!(matches!(s.check(&at(8), &yes(), 8, &all), Ok(false)));
    assert!(matches!(
        s.check(&at(9), &yes(), 8, &all),
        Err(Error::FutureRevision)
    ));
    assert!(
        matches!(s.check(&at(-1), &yes(), 8, &all), Ok(false)),
        "etcd's floor is -1 before compaction"
    );
    assert!(matches!(
        s.check(&at(-2), &yes(), 8, &all),
        Err(Error::Compacted)
    ));
    s.compact(5);
    assert!(matches!(s.check(&at(5), &yes(), 8, &all), Ok(false)));
    assert!(matches!(
        s.check(&at(4), &yes(), 8, &all),
        Err(Error::Compacted)
    ));
    assert!(matches!(
        s.check(&at(-1), &yes(), 8, &all),
        Err(Error::Compacted)
    ));
    // Put errors take precedence over range errors, as etcd checks puts first.
    let mut bad_put = PutRequest::new(b("zz"), b(""));
    bad_put.ignore_value = true;
    let mut t = at(99);
    t.success.push(RequestOp::Put(bad_put));
    assert!(matches!(
        s.check(&t, &yes(), 8, &all),
        Err(Error::KeyNotFound)
    ));
}

#[test]
fn check_rejects_paths_that_do_not_fit() {
    let s = ShardStore::new();
    let nested = TxnRequest {
        compare: vec![],
        success: vec![
            put_op("a", "1"),
            RequestOp::Txn(txn(vec![put_op("b", "2")])),
        ],
        failure: vec![],
    };
    assert!(matches!(
        s.check(&nested, &TxnPath(vec![true, true]), 0, &all),
        Ok(true)
    ));
    assert!(matches!(
        s.check(&nested, &TxnPath(vec![true]), 0, &all),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.check(&nested, &TxnPath(vec![true, true, true]), 0, &all),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.check(&nested, &TxnPath(vec![]), 0, &all),
        Err(Error::InvalidArgument(_))
    ));
    assert!(
        matches!(s.check(&nested, &TxnPath(vec![false]), 0, &all), Ok(false)),
        "failure branch is empty, the nested txn is never met"
    );
}

#[test]
fn put_prev_kv_ignore_value_and_ignore_lease() {
    let mut s = ShardStore::new();
    let mut p = PutRequest::new(b("k"), b("v1"));
    p.lease = 5;
    run(&mut s, 2, vec![RequestOp::Put(p)]);

    let mut p = PutRequest::new(b("k"), b(""));
    p.ignore_value = true;
    p.prev_kv = true;
    let ex = run(&mut s, 3, vec![RequestOp::Put(p)]);
    let mut prev = kv("k", "v1", 2, 2, 1);
    prev.lease = 5;
    assert_eq!(
        ex.partials,
        vec![OpPartial::Put {
            prev_kv: Some(prev)
        }]
    );
    assert_eq!(
        ex.effects,
        vec![Effect::Put {
            key: b("k"),
            value: b("v1"),
            lease: 0
        }],
        "ignore_value keeps the value; the lease is the request's"
    );

    let mut p = PutRequest::new(b("k"), b("v2"));
    p.lease = 9;
    run(&mut s, 4, vec![RequestOp::Put(p)]);
    let mut p = PutRequest::new(b("k"), b("v3"));
    p.ignore_lease = true;
    let ex = run(&mut s, 5, vec![RequestOp::Put(p)]);
    assert_eq!(
        ex.partials,
        vec![OpPartial::Put { prev_kv: None }],
        "prev_kv only when asked"
    );
    let got = get(&s, "k", 0).expect("live");
    assert_eq!(
        (got.value.as_ref(), got.lease, got.version),
        (&b"v3"[..], 9, 4)
    );

    // prev_kv on a new key is None.
    let mut p = PutRequest::new(b("new"), b("x"));
    p.prev_kv = true;
    let ex = run(&mut s, 6, vec![RequestOp::Put(p)]);
    assert_eq!(ex.partials, vec![OpPartial::Put { prev_kv: None }]);
}

#[test]
fn delete_range_partials_and_effects() {
    let mut s = sample();
    let mut d = DeleteRangeRequest::range(b("a"), b("c"));
    d.prev_kv = true;
    let ex = run(&mut s, 9, vec![RequestOp::DeleteRange(d)]);
    assert_eq!(
        ex.partials,
        vec![OpPartial::DeleteRange {
            deleted: 2,
            prev_kvs: vec![kv("a", "a3", 8, 8, 1), kv("b", "b1", 4, 4, 1)],
        }]
    );
    assert_eq!(
        ex.effects,
        vec![
            Effect::Delete { key: b("a") },
            Effect::Delete { key: b("b") }
        ]
    );
    assert_eq!(s.key_count(), 1);
    assert_eq!(s.last_revision(), 9);
    let ex = run(&mut s, 10, vec![del_op("c", "")]);
    assert_eq!(
        ex.partials,
        vec![OpPartial::DeleteRange {
            deleted: 1,
            prev_kvs: vec![]
        }]
    );
}

#[test]
fn txn_that_writes_nothing_leaves_the_store_unchanged() {
    let mut s = sample();
    let before = dump(&s);
    let ex = run(
        &mut s,
        9,
        vec![
            del_op("zz", ""),
            RequestOp::Range(RangeRequest::key(b("a"))),
        ],
    );
    assert!(!ex.wrote() && ex.undo.is_empty());
    assert_eq!(dump(&s), before);
    assert_eq!(s.last_revision(), 8);
    // A read-only path executes at a read revision at or below last_revision.
    let t = txn(vec![RequestOp::Range(RangeRequest::key(b("a")))]);
    let ex = s.execute(&t, &yes(), 5, &all);
    assert_eq!(
        ex.partials,
        vec![OpPartial::Range(ShardRange {
            kvs: vec![kv("a", "a2", 2, 3, 2)],
            filtered: 1,
            count: 1
        })]
    );
    assert_eq!(dump(&s), before);
}

#[test]
fn reads_inside_a_txn_see_earlier_writes_of_the_txn() {
    let mut s = sample();
    let mut old = RangeRequest::range(b("a"), b("\0"));
    old.revision = 8;
    let ex = run(
        &mut s,
        9,
        vec![
            RequestOp::Range(RangeRequest::range(b("a"), b("\0"))),
            put_op("b", "b2"),
            del_op("c", ""),
            RequestOp::Range(RangeRequest::range(b("a"), b("\0"))),
            RequestOp::Range(old),
        ],
    );
    let ranges: Vec<_> = ex
        .partials
        .iter()
        .filter_map(|p| match p {
            OpPartial::Range(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(keys(&ranges[0].kvs), [b"a", b"b", b"c"]);
    assert_eq!(
        ranges[1].kvs,
        vec![kv("a", "a3", 8, 8, 1), kv("b", "b2", 4, 9, 2)],
        "sees the put and the delete at the txn revision"
    );
    assert_eq!(
        keys(&ranges[2].kvs),
        [b"a", b"b", b"c"],
        "explicit revision reads before the txn"
    );
}

#[test]
fn nested_txn_paths_choose_branches_in_execution_order() {
    let mut s = ShardStore::new();
    let inner = |tag: &str| TxnRequest {
        compare: vec![],
        success: vec![put_op(&format!("{tag}-then"), "1")],
        failure: vec![put_op(&format!("{tag}-else"), "1")],
    };
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Txn(inner("x")),
            put_op("mid", "1"),
            RequestOp::Txn(inner("y")),
        ],
        failure: vec![put_op("never", "1")],
    };
    let path = TxnPath(vec![true, false, true]);
    assert!(matches!(s.check(&t, &path, 0, &all), Ok(true)));
    let ex = s.execute(&t, &path, 1, &all);
    assert_eq!(ex.partials.len(), 3);
    let written: Vec<_> = ex
        .effects
        .iter()
        .map(|e| match e {
            Effect::Put { key, .. } | Effect::Delete { key } => key.clone(),
        })
        .collect();
    assert_eq!(written, [b("x-else"), b("mid"), b("y-then")]);
}

#[test]
fn puts_on_keys_owned_elsewhere_are_not_owned() {
    let mut s = ShardStore::new();
    let owns = |k: &[u8]| k.starts_with(b"m");
    let t = txn(vec![put_op("mine", "1"), put_op("theirs", "1")]);
    assert!(matches!(s.check(&t, &yes(), 0, &owns), Ok(true)));
    let ex = s.execute(&t, &yes(), 1, &owns);
    assert_eq!(
        ex.partials,
        vec![OpPartial::Put { prev_kv: None }, OpPartial::NotOwned]
    );
    assert_eq!(s.key_count(), 1);
    let only_theirs = txn(vec![put_op("theirs", "1")]);
    assert!(matches!(s.check(&only_theirs, &yes(), 1, &owns), Ok(false)));
    let ex = s.execute(&only_theirs, &yes(), 2, &owns);
    assert!(!ex.wrote());
    assert_eq!(s.last_revision(), 1);
}

#[test]
fn rollback_is_exact() {
    let mut s = sample();
    s.compact(3);
    let before = dump(&s);
    let ex = run(
        &mut s,
        9,
        vec![
            put_op("b", "b2"),
            put_op("new", "n"),
            del_op("a", ""),
            put_op("a", "again"),
            del_op("c", "\0"),
        ],
    );
    assert!(ex.wrote());
    assert_ne!(dump(&s), before);
    s.rollback(ex.undo);
    assert_eq!(dump(&s), before);
    // And the store keeps working at the same revision afterwards.
    run(&mut s, 9, vec![put_op("b", "b3")]);
    assert_eq!(get(&s, "b", 9), Some(kv("b", "b3", 4, 9, 2)));
}

#[test]
#[should_panic(expected = "after a later write")]
fn rollback_after_a_later_write_panics() {
    let mut s = sample();
    let ex = run(&mut s, 9, vec![put_op("b", "b2")]);
    run(&mut s, 10, vec![put_op("c", "c2")]);
    s.rollback(ex.undo);
}

#[test]
fn apply_reproduces_execute() {
    let mut s = sample();
    let mut replica = ShardStore::new();
    // Replay the sample's own history from its effects.
    let mut src = ShardStore::new();
    for (rev, ops) in [
        (2, vec![put_op("a", "a1")]),
        (3, vec![put_op("a", "a2")]),
        (4, vec![put_op("b", "b1"), put_op("c", "c1")]),
        (6, vec![del_op("a", "")]),
        (8, vec![put_op("a", "a3")]),
    ] {
        let ex = run(&mut src, rev, ops);
        replica.apply(&ex.effects, rev);
    }
    assert_eq!(dump(&replica), dump(&s));
    let mut iv = PutRequest::new(b("b"), b(""));
    iv.ignore_value = true;
    let ex = run(
        &mut s,
        11,
        vec![
            RequestOp::Put(iv),
            del_op("a", "b"),
            put_op("z", "z"),
            del_op("zz", ""),
        ],
    );
    replica.apply(&ex.effects, 11);
    assert_eq!(dump(&replica), dump(&s));
    replica.apply(&[], 12);
    assert_eq!(replica.last_revision(), 11, "empty effects are not a write");
}

#[test]
#[should_panic(expected = "not above last revision")]
fn write_revisions_must_increase() {
    let mut s = sample();
    run(&mut s, 8, vec![put_op("x", "1")]);
}

#[test]
fn compaction_semantics() {
    let mut s = sample();
    // Extra: d created at 9 and deleted at 10; e deleted then recreated.
    run(&mut s, 9, vec![put_op("d", "d1"), put_op("e", "e1")]);
    run(&mut s, 10, vec![del_op("d", ""), del_op("e", "")]);
    run(&mut s, 12, vec![put_op("e", "e2")]);
    let reads = |s: &ShardStore, rev| {
        s.range(&RangeRequest::range(b(""), b("\0")), rev)
            .expect("range")
    };
    let snapshot: Vec<_> = (7..=12).map(|r| reads(&s, r)).collect();
    s.compact(7);
    assert_eq!(s.compact_revision(), 7);
    assert_eq!((7..=12).map(|r| reads(&s, r)).collect::<Vec<_>>(), snapshot);
    assert!(matches!(
        s.range(&RangeRequest::key(b("a")), 6),
        Err(Error::Compacted)
    ));
    assert_eq!(s.indexed_keys(), 5);
    s.compact(10);
    assert_eq!(
        (10..=12).map(|r| reads(&s, r)).collect::<Vec<_>>(),
        snapshot[3..]
    );
    assert_eq!(
        s.indexed_keys(),
        4,
        "d (deleted at 10, nothing after) is gone; e has a later generation"
    );
    let e = s.export_keys(Some(b"d"), 1, i64::MAX);
    assert_eq!(e[0].key, b("e"));
    assert_eq!(e[0].generations.len(), 1);
    // Idempotent, and compacting lower is a no-op.
    let d = dump(&s);
    s.compact(10);
    s.compact(3);
    assert_eq!(dump(&s), d);
    // Versions survive compaction of older puts.
    let mut s = ShardStore::new();
    for rev in 1..=5 {
        run(&mut s, rev, vec![put_op("k", &rev.to_string())]);
    }
    s.compact(4);
    assert_eq!(get(&s, "k", 4), Some(kv("k", "4", 1, 4, 4)));
    assert_eq!(get(&s, "k", 5), Some(kv("k", "5", 1, 5, 5)));
    assert_eq!(
        s.export_keys(None, 10, i64::MAX)[0].generations[0]
            .puts
            .len(),
        2
    );
    // Compacting above this shard's last write (revisions are global) is fine.
    s.compact(50);
    assert_eq!(get(&s, "k", 50), Some(kv("k", "5", 1, 5, 5)));
    run(&mut s, 51, vec![put_op("k", "51")]);
    assert_eq!(get(&s, "k", 51).map(|kv| kv.version), Some(6));
}

#[test]
fn export_and_rebuild() {
    let mut s = sample();
    run(&mut s, 9, vec![del_op("b", "")]);
    s.compact(3);
    // Paged export of everything.
    let mut all_h = Vec::new();
    let mut after: Option<Bytes> = None;
    loop {
        let page = s.export_keys(after.as_deref(), 2, i64::MAX);
        if page.is_empty() {
            break;
        }
        after = page.last().map(|h| h.key.clone());
        all_h.extend(page);
    }
    assert!(all_h.iter().all(KeyHistory::is_well_formed));
    assert_eq!(all_h, s.export_keys(None, usize::MAX, i64::MAX));
    let r = ShardStore::from_histories(all_h, s.last_revision(), s.compact_revision());
    assert_eq!(dump(&r), dump(&s));

    // Export as of revision 5: later events are cut, the state at 5 is what the copy has.
    let at5 = ShardStore::from_histories(s.export_keys(None, usize::MAX, 5), 5, 3);
    let everything = RangeRequest::range(b(""), b("\0"));
    for rev in 3..=5 {
        assert_eq!(
            at5.range(&everything, rev).ok(),
            s.range(&everything, rev).ok()
        );
    }
    assert_eq!(at5.range(&everything, 0).ok(), s.range(&everything, 5).ok());
    assert_eq!(at5.key_count(), 3);
    assert_eq!(at5.last_revision(), 5);
    assert!(s.export_keys(None, 0, i64::MAX).is_empty());
    assert!(
        s.export_keys(None, 10, 1).is_empty(),
        "nothing existed at revision 1"
    );
}

/// Logs the write at `rev` with `effects` as a WAL record, shares the record's keys and values
/// with the store, and returns the record.
fn share_logged(s: &mut ShardStore, effects: Vec<crate::mvcc::Effect>, rev: i64) -> Bytes {
    use crate::wal::record::{decode_payload, encode_payload, EntryKind, WalEntry};
    let record = Bytes::from(encode_payload(&WalEntry {
        kind: EntryKind::Write,
        revision: rev,
        ops: effects,
        ..Default::default()
    }));
    let logged = decode_payload(&record).expect("decodes");
    s.share_record(&logged.ops, rev);
    record
}

/// Whether `x` points into `record`'s buffer.
fn within(record: &Bytes, x: &Bytes) -> bool {
    let (p, r) = (x.as_ptr() as usize, record.as_ptr() as usize);
    (r..r + record.len()).contains(&p)
}

#[test]
fn logged_record_shares_keys_and_values() {
    let mut s = ShardStore::new();
    run(&mut s, 1, vec![put_op("a", "old")]);
    let ex = run(
        &mut s,
        2,
        vec![put_op("a", "one"), put_op("b", "two"), del_op("c", "d")],
    );
    let record = share_logged(&mut s, ex.effects, 2);
    let inside = |x: &Bytes| within(&record, x);
    for (k, v) in [("a", "one"), ("b", "two")] {
        let got = get(&s, k, 2).expect("live");
        assert_eq!(got.value, b(v));
        assert!(inside(&got.key) && inside(&got.value), "{k} not shared");
    }
    // Older revisions keep their own values.
    assert_eq!(get(&s, "a", 1).expect("live").value, b("old"));
    let everything = crate::kv::KeyRange {
        start: b("a"),
        end: Some(b("z")),
    };
    let ch = s.changes(&[everything], 1, 2, 100).expect("changes");
    assert_eq!(ch.events.len(), 2);
    assert!(ch
        .events
        .iter()
        .all(|e| inside(&e.kv.key) && inside(&e.kv.value)));
    assert_eq!(ch.events[1].kv.value, b("two"));
}

/// A write with more ops than the scan limit (a delete-range of many keys) shares every
/// event's key through the by-key lookup, deletes included.
#[test]
fn logged_record_of_many_ops_shares_every_event() {
    let mut s = ShardStore::new();
    let keys: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    run(&mut s, 1, keys.iter().map(|k| put_op(k, "v")).collect());
    let ex = run(&mut s, 2, vec![del_op("k", "l")]);
    assert_eq!(ex.effects.len(), 40);
    let record = share_logged(&mut s, ex.effects, 2);
    let inside = |x: &Bytes| within(&record, x);
    let everything = crate::kv::KeyRange {
        start: b("a"),
        end: Some(b("z")),
    };
    let ch = s.changes(&[everything], 1, 2, 100).expect("changes");
    assert_eq!(ch.events.len(), 40);
    assert!(ch.events.iter().all(|e| inside(&e.kv.key)));
}

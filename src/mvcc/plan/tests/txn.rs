//! Tests of txn planning: compares, path selection, response assembly, routing.

use super::*;
use crate::kv::{DeleteRangeResponse, PutResponse, RangeResponse, ResponseOp, TargetUnion};

// ---- compares --------------------------------------------------------------------------

#[test]
fn compare_kv_reads_matching_operand() {
    use CompareResult::*;
    let k = KeyValue {
        key: b("k"),
        create_revision: 5,
        mod_revision: 9,
        version: 3,
        value: b("abc"),
        lease: 42,
    };
    assert!(compare_kv(&Compare::version("k", Equal, 3), &k));
    assert!(compare_kv(&Compare::version("k", Greater, 2), &k));
    assert!(!compare_kv(&Compare::version("k", Greater, 3), &k));
    assert!(compare_kv(&Compare::version("k", Less, 4), &k));
    assert!(compare_kv(&Compare::version("k", NotEqual, 4), &k));
    assert!(!compare_kv(&Compare::version("k", NotEqual, 3), &k));
    assert!(compare_kv(&Compare::create_revision("k", Equal, 5), &k));
    assert!(compare_kv(&Compare::mod_revision("k", Less, 10), &k));
    assert!(!compare_kv(&Compare::mod_revision("k", Less, 9), &k));
    assert!(compare_kv(&Compare::lease("k", Equal, 42), &k));
    // Value: byte-wise lexicographic, kv field on the left.
    assert!(compare_kv(&Compare::value("k", Equal, "abc"), &k));
    assert!(compare_kv(&Compare::value("k", Greater, "ab"), &k));
    assert!(compare_kv(&Compare::value("k", Less, "abd"), &k));
    assert!(compare_kv(&Compare::value("k", Less, "b"), &k));
    assert!(compare_kv(&Compare::value("k", NotEqual, ""), &k));
    // Missing or mismatched operand compares as zero / empty.
    let mut c = Compare::version("k", Greater, 100);
    c.target_union = Some(TargetUnion::ModRevision(100));
    assert!(compare_kv(&c, &k)); // 3 > 0
    c.target_union = None;
    assert!(compare_kv(&c, &k));
    let mut c = Compare::value("k", Greater, "zzz");
    c.target_union = Some(TargetUnion::Lease(1));
    assert!(compare_kv(&c, &k)); // "abc" > ""
    let mut c = Compare::lease("k", Equal, 42);
    c.target_union = Some(TargetUnion::Version(42));
    assert!(!compare_kv(&c, &k)); // 42 != 0
}

#[test]
fn compare_on_missing_keys_uses_zero_kv() {
    use CompareResult::*;
    let none: [CompareOutcome; 2] = [
        CompareOutcome {
            matched: 0,
            all_true: true,
        },
        CompareOutcome {
            matched: 0,
            all_true: false,
        },
    ];
    // Numeric targets compare 0 against the operand, for every result kind.
    for (ctor, _name) in [
        (
            Compare::version as fn(Bytes, CompareResult, i64) -> Compare,
            "version",
        ),
        (Compare::create_revision, "create"),
        (Compare::mod_revision, "mod"),
        (Compare::lease, "lease"),
    ] {
        assert!(merge_compare(&ctor(b("k"), Equal, 0), &none));
        assert!(!merge_compare(&ctor(b("k"), Equal, 1), &none));
        assert!(merge_compare(&ctor(b("k"), NotEqual, 1), &none));
        assert!(!merge_compare(&ctor(b("k"), NotEqual, 0), &none));
        assert!(merge_compare(&ctor(b("k"), Less, 1), &none));
        assert!(!merge_compare(&ctor(b("k"), Less, 0), &none));
        assert!(merge_compare(&ctor(b("k"), Greater, -1), &none));
        assert!(!merge_compare(&ctor(b("k"), Greater, 0), &none));
        // No shard consulted at all is the same as no match.
        assert!(merge_compare(&ctor(b("k"), Equal, 0), &[]));
    }
    // Value always fails on missing keys, even where an empty value would pass.
    for r in [Equal, NotEqual, Less, Greater] {
        assert!(!merge_compare(&Compare::value("k", r, ""), &none));
        assert!(!merge_compare(&Compare::value("k", r, "x"), &[]));
    }
    // Mismatched operand on a missing key: 0 vs 0.
    let mut c = Compare::create_revision("k", Equal, 7);
    c.target_union = Some(TargetUnion::Lease(7));
    assert!(merge_compare(&c, &none));
}

#[test]
fn compare_with_matches_needs_every_matched_shard() {
    let c = Compare::value("a", CompareResult::Equal, "x").with_range_end("z");
    let o = |matched, all_true| CompareOutcome { matched, all_true };
    assert!(merge_compare(&c, &[o(2, true), o(1, true)]));
    assert!(!merge_compare(&c, &[o(2, true), o(1, false)]));
    // Shards that matched nothing do not vote, whatever they say.
    assert!(merge_compare(&c, &[o(0, false), o(3, true)]));
    // A numeric compare that matched keys does not fall back to the zero KeyValue.
    let c = Compare::create_revision("a", CompareResult::Equal, 0);
    assert!(!merge_compare(&c, &[o(1, false), o(0, true)]));
}

// ---- path selection ----------------------------------------------------------------------

/// top{c0,c1}
///   success: put a, S1{c2; success: S1a{c3; s: put s1a / f: put f1a}; failure: get r}, S2{c4; s: put s2}
///   failure: F1{c5; success: F1a{c6; s: put f1as}, put f1s; failure: put f1f}
fn tree() -> TxnRequest {
    let s1a = nested(vec![cmp("c3")], vec![put("s1a")], vec![put("f1a")]);
    let s1 = nested(vec![cmp("c2")], vec![s1a], vec![get("r")]);
    let s2 = nested(vec![cmp("c4")], vec![put("s2")], vec![]);
    let f1a = nested(vec![cmp("c6")], vec![put("f1as")], vec![]);
    let f1 = nested(vec![cmp("c5")], vec![f1a, put("f1s")], vec![put("f1f")]);
    txn(vec![cmp("c0"), cmp("c1")], vec![put("a"), s1, s2], vec![f1])
}

fn results(false_at: &[&str]) -> Vec<bool> {
    all_compares(&tree())
        .iter()
        .map(|c| !false_at.iter().any(|f| c.key.as_ref() == f.as_bytes()))
        .collect()
}

fn leaf_keys(t: &TxnRequest, p: &TxnPath) -> Vec<String> {
    leaf_ops(t, p)
        .iter()
        .map(|op| match op {
            RequestOp::Range(r) => format!("get {}", String::from_utf8_lossy(&r.key)),
            RequestOp::Put(p) => format!("put {}", String::from_utf8_lossy(&p.key)),
            RequestOp::DeleteRange(d) => format!("del {}", String::from_utf8_lossy(&d.key)),
            RequestOp::Txn(_) => "txn".into(),
        })
        .collect()
}

#[test]
fn compares_in_preorder() {
    let t = tree();
    let ks: Vec<_> = all_compares(&t).iter().map(|c| c.key.clone()).collect();
    let want: Vec<_> = ["c0", "c1", "c2", "c3", "c4", "c5", "c6"].map(b).to_vec();
    assert_eq!(ks, want);
}

#[test]
fn path_follows_compares() {
    let t = tree();
    let p = choose_path(&t, &results(&[]));
    assert_eq!(p, TxnPath(vec![true, true, true, true]));
    assert_eq!(leaf_keys(&t, &p), ["put a", "put s1a", "put s2"]);

    let p = choose_path(&t, &results(&["c3"]));
    assert_eq!(p, TxnPath(vec![true, true, false, true]));
    assert_eq!(leaf_keys(&t, &p), ["put a", "put f1a", "put s2"]);

    // S1 fails: its nested S1a is skipped, S2's compare is still found at its position.
    let p = choose_path(&t, &results(&["c2"]));
    assert_eq!(p, TxnPath(vec![true, false, true]));
    assert_eq!(leaf_keys(&t, &p), ["put a", "get r", "put s2"]);
    let p = choose_path(&t, &results(&["c2", "c4"]));
    assert_eq!(p, TxnPath(vec![true, false, false]));
    assert_eq!(leaf_keys(&t, &p), ["put a", "get r"]);

    // One false compare of several fails the top level; the failure branch's nested txns
    // read their results past the success branch's.
    let p = choose_path(&t, &results(&["c1", "c3"]));
    assert_eq!(p, TxnPath(vec![false, true, true]));
    assert_eq!(leaf_keys(&t, &p), ["put f1as", "put f1s"]);
    let p = choose_path(&t, &results(&["c1", "c6"]));
    assert_eq!(p, TxnPath(vec![false, true, false]));
    assert_eq!(leaf_keys(&t, &p), ["put f1s"]);
    let p = choose_path(&t, &results(&["c0", "c5"]));
    assert_eq!(p, TxnPath(vec![false, false]));
    assert_eq!(leaf_keys(&t, &p), ["put f1f"]);
}

#[test]
fn path_edge_cases() {
    // No compares: success, as etcd.
    let t = txn(vec![], vec![put("a")], vec![put("b")]);
    assert_eq!(choose_path(&t, &[]), TxnPath(vec![true]));
    // Too few results: the missing ones count as false.
    let t = txn(vec![cmp("x"), cmp("y")], vec![], vec![]);
    assert_eq!(choose_path(&t, &[true]), TxnPath(vec![false]));
    assert_eq!(choose_path(&t, &[true, true]), TxnPath(vec![true]));
    // Short path: missing entries take the failure branch.
    let t = tree();
    assert_eq!(leaf_keys(&t, &TxnPath(vec![])), ["put f1f"]);
}

#[test]
fn assemble_rebuilds_nested_shape() {
    let t = tree();
    let p = choose_path(&t, &results(&["c3"]));
    let ops = leaf_ops(&t, &p);
    let merged: Vec<MergedOp> = ops
        .iter()
        .map(|op| {
            let prev = match op {
                RequestOp::Put(p) => Some(kv(
                    std::str::from_utf8(&p.key).unwrap_or("?"),
                    1,
                    1,
                    1,
                    "old",
                )),
                _ => None,
            };
            merge_op(
                op,
                vec![OpPartial::NotOwned, OpPartial::Put { prev_kv: prev }],
            )
        })
        .collect();
    let r = assemble_txn(&t, &p, merged);
    assert!(r.succeeded);
    assert_eq!(r.responses.len(), 3);
    let prev_key = |resp: &ResponseOp| match resp {
        ResponseOp::Put(p) => p.prev_kv.as_ref().map(|kv| kv.key.clone()),
        _ => None,
    };
    assert_eq!(prev_key(&r.responses[0]), Some(b("a")));
    let ResponseOp::Txn(s1) = &r.responses[1] else {
        panic!("S1 response")
    };
    assert!(s1.succeeded);
    let ResponseOp::Txn(s1a) = &s1.responses[0] else {
        panic!("S1a response")
    };
    assert!(!s1a.succeeded);
    assert_eq!(s1a.responses.len(), 1);
    assert_eq!(prev_key(&s1a.responses[0]), Some(b("f1a")));
    let ResponseOp::Txn(s2) = &r.responses[2] else {
        panic!("S2 response")
    };
    assert!(s2.succeeded);
    assert_eq!(prev_key(&s2.responses[0]), Some(b("s2")));

    // Failure path with a range leaf and an empty nested failure list.
    let p = choose_path(&t, &results(&["c2", "c4"]));
    let rr = RangeResponse {
        count: 5,
        ..Default::default()
    };
    let merged = vec![
        MergedOp::Put(PutResponse::default()),
        MergedOp::Range(rr.clone()),
    ];
    let r = assemble_txn(&t, &p, merged);
    let ResponseOp::Txn(s1) = &r.responses[1] else {
        panic!("S1 response")
    };
    assert!(!s1.succeeded);
    assert_eq!(s1.responses, vec![ResponseOp::Range(rr)]);
    let ResponseOp::Txn(s2) = &r.responses[2] else {
        panic!("S2 response")
    };
    assert!(!s2.succeeded && s2.responses.is_empty());
}

#[test]
fn assemble_tolerates_missing_results() {
    let t = txn(vec![], vec![get("a"), put("b"), del_key("c")], vec![]);
    let p = choose_path(&t, &[]);
    let r = assemble_txn(&t, &p, vec![MergedOp::Put(PutResponse::default())]);
    assert_eq!(
        r.responses,
        vec![
            ResponseOp::Range(RangeResponse::default()),
            ResponseOp::Put(PutResponse::default()),
            ResponseOp::DeleteRange(DeleteRangeResponse::default()),
        ]
    );
}

#[test]
fn merge_put_and_delete() {
    let m = merge_op(&put("k"), vec![OpPartial::NotOwned, OpPartial::NotOwned]);
    assert_eq!(m, MergedOp::Put(PutResponse::default()));
    let prev = kv("k", 2, 1, 3, "old");
    let m = merge_op(
        &put("k"),
        vec![
            OpPartial::NotOwned,
            OpPartial::Put {
                prev_kv: Some(prev.clone()),
            },
        ],
    );
    assert_eq!(
        m,
        MergedOp::Put(PutResponse {
            prev_kv: Some(prev),
            ..Default::default()
        })
    );

    let m = merge_op(
        &del("a", "z"),
        vec![
            OpPartial::DeleteRange {
                deleted: 2,
                prev_kvs: vec![kv("d", 1, 1, 1, ""), kv("m", 1, 1, 1, "")],
            },
            OpPartial::DeleteRange {
                deleted: 0,
                prev_kvs: vec![],
            },
            OpPartial::DeleteRange {
                deleted: 2,
                prev_kvs: vec![kv("b", 1, 1, 1, ""), kv("x", 1, 1, 1, "")],
            },
        ],
    );
    let MergedOp::DeleteRange(d) = m else {
        panic!("delete response")
    };
    assert_eq!(d.deleted, 4);
    assert_eq!(keys(&d.prev_kvs), ["b", "d", "m", "x"]);
}

// ---- routing -----------------------------------------------------------------------------

fn first_byte_shard(k: &[u8]) -> u32 {
    u32::from(k.first().copied().unwrap_or(0)) % 4
}

#[test]
fn routing() {
    let f: &dyn Fn(&[u8]) -> u32 = &first_byte_shard;
    // 'a' = 97 -> 1, 'b' -> 2, 'd' -> 0.
    let t = txn(vec![cmp("a")], vec![put("b")], vec![del_key("d")]);
    assert_eq!(shards_touched(&t, f, 4), vec![0, 1, 2]);
    let t = txn(
        vec![],
        vec![nested(vec![cmp("a")], vec![], vec![get("b")])],
        vec![],
    );
    assert_eq!(shards_touched(&t, f, 4), vec![1, 2]);
    // range_end = key + "\0" is still one key.
    let t = txn(
        vec![],
        vec![RequestOp::Range(RangeRequest::range("a", "a\0"))],
        vec![],
    );
    assert_eq!(shards_touched(&t, f, 4), vec![1]);
    // Any real range, anywhere, means every shard.
    for op in [
        RequestOp::Range(RangeRequest::prefix("a")),
        del("a", "\0"),
        nested(
            vec![Compare::version("a", CompareResult::Equal, 0).with_range_end("b")],
            vec![],
            vec![],
        ),
    ] {
        let t = txn(
            vec![cmp("a")],
            vec![],
            vec![nested(vec![], vec![op], vec![])],
        );
        assert_eq!(shards_touched(&t, f, 4), vec![0, 1, 2, 3]);
    }
    // Empty intervals touch nothing; duplicates collapse.
    let t = txn(vec![], vec![del("c", "a"), put("a"), put("e")], vec![]);
    assert_eq!(shards_touched(&t, f, 4), vec![1]);
    assert!(shards_touched(&TxnRequest::default(), f, 4).is_empty());
}

#[test]
fn has_writes() {
    assert!(!txn_has_writes(&TxnRequest::default()));
    assert!(!txn_has_writes(&txn(
        vec![cmp("a")],
        vec![get("a")],
        vec![get("b")]
    )));
    assert!(!txn_has_writes(&txn(
        vec![],
        vec![nested(vec![], vec![get("a")], vec![])],
        vec![]
    )));
    assert!(txn_has_writes(&txn(vec![], vec![get("a")], vec![put("b")])));
    assert!(txn_has_writes(&txn(vec![], vec![], vec![del_key("b")])));
    let deep = nested(
        vec![],
        vec![],
        vec![nested(vec![], vec![del_key("x")], vec![])],
    );
    assert!(txn_has_writes(&txn(vec![], vec![deep], vec![])));
}

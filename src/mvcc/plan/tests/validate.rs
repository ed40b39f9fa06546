//! Tests of request validation: per-request checks, the txn op budget and the duplicate-key rule.

use proptest::prelude::*;

use super::*;
use crate::kv::KeyRange;
use crate::mvcc::plan::validate::DelSet;

// ---- single-request validation ----------------------------------------------------------

#[test]
fn single_requests() {
    assert!(matches!(
        validate_range(&RangeRequest::default()),
        Err(Error::EmptyKey)
    ));
    assert!(validate_range(&RangeRequest::key("a")).is_ok());
    assert!(matches!(
        validate_delete(&DeleteRangeRequest::default()),
        Err(Error::EmptyKey)
    ));
    assert!(validate_delete(&DeleteRangeRequest::key("a")).is_ok());

    assert!(matches!(
        validate_put(&PutRequest::new("", "v")),
        Err(Error::EmptyKey)
    ));
    let mut p = PutRequest::new("k", "v");
    p.ignore_value = true;
    assert!(matches!(validate_put(&p), Err(Error::ValueProvided)));
    p.value = Bytes::new();
    assert!(validate_put(&p).is_ok());
    p.ignore_lease = true;
    p.lease = 7;
    assert!(matches!(validate_put(&p), Err(Error::LeaseProvided)));
    p.lease = 0;
    assert!(validate_put(&p).is_ok());
    // A lease without ignore_lease is the normal case.
    let mut p = PutRequest::new("k", "v");
    p.lease = 7;
    assert!(validate_put(&p).is_ok());
}

#[test]
fn txn_field_checks_reach_nested_ops_and_compares() {
    let bad_put = RequestOp::Put(PutRequest::new("", "v"));
    assert!(matches!(
        validate_txn(&txn(vec![], vec![], vec![bad_put.clone()]), 128),
        Err(Error::EmptyKey)
    ));
    let t = txn(
        vec![],
        vec![nested(
            vec![],
            vec![],
            vec![nested(vec![], vec![bad_put], vec![])],
        )],
        vec![],
    );
    assert!(matches!(validate_txn(&t, 128), Err(Error::EmptyKey)));
    let t = txn(
        vec![Compare::version("", CompareResult::Equal, 0)],
        vec![],
        vec![],
    );
    assert!(matches!(validate_txn(&t, 128), Err(Error::EmptyKey)));
    let nested_cmp = nested(
        vec![Compare::version("", CompareResult::Equal, 0)],
        vec![],
        vec![],
    );
    assert!(matches!(
        validate_txn(&txn(vec![], vec![nested_cmp], vec![]), 128),
        Err(Error::EmptyKey)
    ));
    let mut p = PutRequest::new("k", "v");
    p.ignore_value = true;
    let t = txn(
        vec![],
        vec![nested(vec![], vec![RequestOp::Put(p)], vec![])],
        vec![],
    );
    assert!(matches!(validate_txn(&t, 128), Err(Error::ValueProvided)));
    assert!(matches!(
        validate_txn(
            &txn(
                vec![],
                vec![RequestOp::Range(RangeRequest::default())],
                vec![]
            ),
            128
        ),
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        validate_txn(
            &txn(
                vec![],
                vec![RequestOp::DeleteRange(DeleteRangeRequest::default())],
                vec![]
            ),
            128
        ),
        Err(Error::EmptyKey)
    ));
    // The empty txn is valid.
    assert!(validate_txn(&TxnRequest::default(), 128).is_ok());
}

#[test]
fn too_many_ops() {
    let puts = |n: usize| (0..n).map(|i| put(&format!("k{i}"))).collect::<Vec<_>>();
    let cmps = |n: usize| (0..n).map(|i| cmp(&format!("k{i}"))).collect::<Vec<_>>();
    assert!(validate_txn(&txn(cmps(128), puts(128), puts(128)), 128).is_ok());
    for t in [
        txn(cmps(129), vec![], vec![]),
        txn(vec![], puts(129), vec![]),
        txn(vec![], vec![], puts(129)),
    ] {
        assert!(matches!(validate_txn(&t, 128), Err(Error::TooManyOps)));
    }
    assert!(matches!(
        validate_txn(&txn(vec![], puts(3), vec![]), 2),
        Err(Error::TooManyOps)
    ));
    // Checked before anything else: 129 identical puts report TooManyOps, not DuplicateKey.
    let same: Vec<_> = (0..129).map(|_| put("k")).collect();
    assert!(matches!(
        validate_txn(&txn(vec![], same, vec![]), 128),
        Err(Error::TooManyOps)
    ));
}

#[test]
fn nested_txn_gets_the_remaining_budget() {
    // Top level is 100 wide, so a nested txn may be at most 28 wide (etcd: max - opc).
    let build = |inner: usize| {
        let mut ops: Vec<_> = (0..99).map(|i| get(&format!("r{i}"))).collect();
        ops.push(nested(
            vec![],
            (0..inner).map(|i| put(&format!("n{i}"))).collect(),
            vec![],
        ));
        txn(vec![], ops, vec![])
    };
    assert!(validate_txn(&build(28), 128).is_ok());
    assert!(matches!(
        validate_txn(&build(29), 128),
        Err(Error::TooManyOps)
    ));
    // Compares count towards the width too.
    let t = txn(
        (0..127).map(|i| cmp(&format!("c{i}"))).collect(),
        vec![nested(vec![cmp("a"), cmp("b")], vec![], vec![])],
        vec![],
    );
    assert!(matches!(validate_txn(&t, 128), Err(Error::TooManyOps)));
}

#[test]
fn field_errors_win_over_duplicates() {
    // etcd runs all field checks (both branches) before the overlap check.
    let t = txn(
        vec![],
        vec![put("a"), put("a")],
        vec![RequestOp::Put(PutRequest::new("", "v"))],
    );
    assert!(matches!(validate_txn(&t, 128), Err(Error::EmptyKey)));
}

// ---- duplicate-key rule -----------------------------------------------------------------

#[test]
fn duplicate_same_level() {
    assert!(dup(&txn(vec![], vec![put("a"), put("a")], vec![])));
    assert!(dup(&txn(
        vec![],
        vec![],
        vec![put("a"), get("x"), put("a")]
    )));
    assert!(ok(&txn(vec![], vec![put("a"), put("b")], vec![])));
    // Success and failure are separate executions.
    assert!(ok(&txn(vec![], vec![put("a")], vec![put("a")])));
    // Reads never conflict.
    assert!(ok(&txn(
        vec![],
        vec![
            put("a"),
            get("a"),
            RequestOp::Range(RangeRequest::prefix("a"))
        ],
        vec![]
    )));
}

#[test]
fn put_inside_delete_same_level() {
    // Point delete, in either order relative to the put.
    assert!(dup(&txn(vec![], vec![put("a"), del_key("a")], vec![])));
    assert!(dup(&txn(vec![], vec![del_key("a"), put("a")], vec![])));
    // Range delete is half-open.
    assert!(dup(&txn(vec![], vec![del("a", "c"), put("b")], vec![])));
    assert!(dup(&txn(vec![], vec![del("a", "c"), put("a")], vec![])));
    assert!(ok(&txn(vec![], vec![del("a", "c"), put("c")], vec![])));
    assert!(ok(&txn(vec![], vec![del_key("a"), put("a\0")], vec![])));
    assert!(ok(&txn(vec![], vec![del_key("a"), put("ab")], vec![])));
    // Prefix delete.
    let pre = RequestOp::DeleteRange(DeleteRangeRequest::prefix("dir/"));
    assert!(dup(&txn(vec![], vec![pre.clone(), put("dir/x")], vec![])));
    assert!(ok(&txn(vec![], vec![pre, put("dir0")], vec![])));
    // An empty interval (range_end <= key) deletes nothing and conflicts with nothing.
    assert!(ok(&txn(
        vec![],
        vec![del("c", "a"), put("c"), put("b")],
        vec![]
    )));
    assert!(ok(&txn(vec![], vec![del("c", "c"), put("c")], vec![])));
    // Deletes may overlap each other.
    assert!(ok(&txn(
        vec![],
        vec![del("a", "m"), del("c", "z"), del_key("d")],
        vec![]
    )));
}

#[test]
fn unbounded_delete() {
    let all_from_b = del("b", "\0");
    assert!(dup(&txn(
        vec![],
        vec![all_from_b.clone(), put("zzzz")],
        vec![]
    )));
    assert!(dup(&txn(
        vec![],
        vec![all_from_b.clone(), put("b")],
        vec![]
    )));
    assert!(dup(&txn(
        vec![],
        vec![all_from_b.clone(), put("\u{7f}\u{7f}")],
        vec![]
    )));
    assert!(ok(&txn(vec![], vec![all_from_b.clone(), put("a")], vec![])));
    // From an enclosing level too, and from a nested level upwards.
    assert!(dup(&txn(
        vec![],
        vec![all_from_b.clone(), nested(vec![], vec![put("q")], vec![])],
        vec![]
    )));
    assert!(dup(&txn(
        vec![],
        vec![put("q"), nested(vec![], vec![], vec![all_from_b])],
        vec![]
    )));
}

#[test]
fn put_inside_enclosing_delete() {
    let t = txn(
        vec![],
        vec![del("a", "c"), nested(vec![], vec![put("b")], vec![])],
        vec![],
    );
    assert!(dup(&t));
    let t = txn(
        vec![],
        vec![del("a", "c"), nested(vec![], vec![], vec![put("b")])],
        vec![],
    );
    assert!(dup(&t));
    // Two levels down, delete at the top.
    let deep = nested(vec![], vec![nested(vec![], vec![put("b")], vec![])], vec![]);
    assert!(dup(&txn(vec![], vec![deep.clone(), del_key("b")], vec![])));
    // Outside the interval is fine.
    let t = txn(
        vec![],
        vec![del("a", "c"), nested(vec![], vec![put("c")], vec![])],
        vec![],
    );
    assert!(ok(&t));
    // The enclosing delete's other branch does not count.
    let t = txn(vec![], vec![deep], vec![del_key("b")]);
    assert!(ok(&t));
}

#[test]
fn nested_delete_joins_enclosing_level() {
    // A put at the enclosing level inside a nested txn's delete (either nested branch).
    let t = txn(
        vec![],
        vec![put("b"), nested(vec![], vec![del("a", "c")], vec![])],
        vec![],
    );
    assert!(dup(&t));
    let t = txn(
        vec![],
        vec![nested(vec![], vec![], vec![del_key("b")]), put("b")],
        vec![],
    );
    assert!(dup(&t));
    // A later sibling txn's put inside an earlier sibling's delete.
    let t = txn(
        vec![],
        vec![
            nested(vec![], vec![del("a", "c")], vec![]),
            nested(vec![], vec![put("b")], vec![]),
        ],
        vec![],
    );
    assert!(dup(&t));
    // etcd's order: an earlier sibling's put is not re-checked against a later sibling's
    // delete (deletes of a nested txn join only after its puts were checked).
    let t = txn(
        vec![],
        vec![
            nested(vec![], vec![put("b")], vec![]),
            nested(vec![], vec![del("a", "c")], vec![]),
        ],
        vec![],
    );
    assert!(ok(&t));
    // Within one nested txn, its branches are checked separately: a put in one branch and a
    // delete in the other is fine.
    let t = txn(
        vec![],
        vec![nested(vec![], vec![put("b")], vec![del_key("b")])],
        vec![],
    );
    assert!(ok(&t));
}

#[test]
fn nested_branches_may_write_the_same_key() {
    let t = txn(
        vec![],
        vec![nested(vec![cmp("x")], vec![put("k")], vec![put("k")])],
        vec![],
    );
    assert!(ok(&t));
    // But a key of a nested branch may not also be written at the enclosing level ...
    let t = txn(
        vec![],
        vec![put("k"), nested(vec![], vec![], vec![put("k")])],
        vec![],
    );
    assert!(dup(&t));
    let t = txn(
        vec![],
        vec![nested(vec![], vec![put("k")], vec![]), put("k")],
        vec![],
    );
    assert!(dup(&t));
    // ... or by a sibling nested txn, whichever branches.
    let a = nested(vec![], vec![put("k")], vec![]);
    let b_then = nested(vec![], vec![put("k")], vec![]);
    let b_else = nested(vec![], vec![], vec![put("k")]);
    assert!(dup(&txn(vec![], vec![a.clone(), b_then], vec![])));
    assert!(dup(&txn(vec![], vec![a.clone(), b_else], vec![])));
    // The same nested txn writing k in both branches, next to a sibling writing k: conflict.
    let both = nested(vec![], vec![put("k")], vec![put("k")]);
    assert!(dup(&txn(vec![], vec![a, both], vec![])));
    // Duplicates inside a nested branch itself.
    let t = txn(
        vec![],
        vec![nested(vec![], vec![put("k"), put("k")], vec![])],
        vec![],
    );
    assert!(dup(&t));
    // Nested both-branch key propagates up: a grandparent put conflicts.
    let inner = nested(vec![], vec![put("k")], vec![put("k")]);
    let t = txn(
        vec![],
        vec![put("k"), nested(vec![], vec![inner], vec![])],
        vec![],
    );
    assert!(dup(&t));
}

#[test]
fn delset_merges_runs() {
    let r = |s: &str, e: Option<&str>| KeyRange {
        start: b(s),
        end: e.map(b),
    };
    let mut d = DelSet::default();
    d.insert(r("c", Some("e")));
    d.insert(r("a", Some("b")));
    d.insert(r("g", Some("h")));
    assert_eq!(d.runs.len(), 3);
    d.insert(r("b", Some("c"))); // touches a..b and c..e
    assert_eq!(d.runs.len(), 2);
    assert!(d.contains(b"a") && d.contains(b"d") && !d.contains(b"e") && !d.contains(b"f"));
    d.insert(r("f", None));
    assert_eq!(d.runs.len(), 2);
    assert!(d.contains(b"zzz") && d.contains(b"f") && !d.contains(b"e"));
    d.insert(r("0", Some("1")));
    d.insert(r("", None));
    assert_eq!(d.runs.len(), 1);
    assert!(d.contains(b"") && d.contains(b"\xff"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn delset_matches_naive(
        ivs in prop::collection::vec((prop::collection::vec(b'a'..=b'e', 1..3), prop::option::of(prop::collection::vec(b'a'..=b'f', 1..3))), 0..12),
        probes in prop::collection::vec(prop::collection::vec(b'a'..=b'f', 0..4), 0..20),
    ) {
        let ranges: Vec<KeyRange> = ivs
            .into_iter()
            .filter_map(|(s, e)| {
                let end = e.map(Bytes::from).unwrap_or_else(|| Bytes::from_static(b"\0"));
                KeyRange::from_etcd(&Bytes::from(s), &end)
            })
            .collect();
        let mut d = DelSet::default();
        for r in &ranges {
            d.insert(r.clone());
        }
        for p in probes {
            prop_assert_eq!(d.contains(&p), ranges.iter().any(|r| r.contains(&p)));
        }
    }
}

//! Txn compares and branch selection: gathering a txn tree's compares in one fixed order,
//! evaluating one against a key, merging per-shard outcomes, and choosing the path taken.
//!
//! Separate because it is the one step between validation and execution that decides what a
//! txn does; the coordinator evaluates all compares in one round before running any op.

use std::cmp::Ordering;

use crate::kv::{
    Compare, CompareResult, CompareTarget, KeyValue, RequestOp, TargetUnion, TxnRequest,
};
use crate::mvcc::{CompareOutcome, TxnPath};

/// Every compare of the tree in a fixed pre-order (own compares, then nested txns of the success
/// ops, then of the failure ops). etcd evaluates all of a txn's compares against the same read
/// view before applying anything, so the coordinator can evaluate them in one round.
pub fn all_compares(t: &TxnRequest) -> Vec<&Compare> {
    let mut out = Vec::new();
    gather_compares(t, &mut out);
    out
}

fn gather_compares<'a>(t: &'a TxnRequest, out: &mut Vec<&'a Compare>) {
    out.extend(t.compare.iter());
    for op in t.success.iter().chain(&t.failure) {
        if let RequestOp::Txn(n) = op {
            gather_compares(n, out);
        }
    }
}

fn compare_count(t: &TxnRequest) -> usize {
    t.compare.len()
        + t.success
            .iter()
            .chain(&t.failure)
            .map(|op| match op {
                RequestOp::Txn(n) => compare_count(n),
                _ => 0,
            })
            .sum::<usize>()
}

/// The branches taken, given `results` in [`all_compares`] order. A txn succeeds iff all its
/// compares hold (none = success, as etcd). A missing result counts as false so a short slice
/// can never take a success branch by accident.
pub fn choose_path(t: &TxnRequest, results: &[bool]) -> TxnPath {
    let mut path = Vec::new();
    let mut cursor = 0;
    walk_path(t, results, &mut cursor, &mut path);
    TxnPath(path)
}

fn walk_path(t: &TxnRequest, results: &[bool], cursor: &mut usize, path: &mut Vec<bool>) {
    let n = t.compare.len();
    let ok = (*cursor..*cursor + n).all(|i| results.get(i).copied().unwrap_or(false));
    *cursor += n;
    path.push(ok);
    // Walk both lists to keep the cursor aligned with `all_compares`; only the taken branch's
    // nested txns add path entries.
    for (ops, taken) in [(&t.success, ok), (&t.failure, !ok)] {
        for op in ops {
            if let RequestOp::Txn(nested) = op {
                if taken {
                    walk_path(nested, results, cursor, path);
                } else {
                    *cursor += compare_count(nested);
                }
            }
        }
    }
}

/// etcd's `compareKV`: the operand is read from the `target_union` variant matching `target`;
/// a missing or mismatched one is 0 / empty, as a proto3 unset field would be.
pub fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let ord = match c.target {
        CompareTarget::Value => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(v)
        }
        CompareTarget::Version => kv.version.cmp(&int_operand(c)),
        CompareTarget::Create => kv.create_revision.cmp(&int_operand(c)),
        CompareTarget::Mod => kv.mod_revision.cmp(&int_operand(c)),
        CompareTarget::Lease => kv.lease.cmp(&int_operand(c)),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

fn int_operand(c: &Compare) -> i64 {
    match (c.target, &c.target_union) {
        (CompareTarget::Version, Some(TargetUnion::Version(v)))
        | (CompareTarget::Create, Some(TargetUnion::CreateRevision(v)))
        | (CompareTarget::Mod, Some(TargetUnion::ModRevision(v)))
        | (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => *v,
        _ => 0,
    }
}

/// Combines one compare's per-shard outcomes with etcd's `applyCompare` rule. When no key
/// matched anywhere, etcd compares a zero KeyValue (so `create_revision = 0` tests absence),
/// except for VALUE, which always fails because a missing value is not an empty one.
pub fn merge_compare(c: &Compare, outcomes: &[CompareOutcome]) -> bool {
    let mut any = false;
    for o in outcomes.iter().filter(|o| o.matched > 0) {
        if !o.all_true {
            return false;
        }
        any = true;
    }
    if any {
        true
    } else if c.target == CompareTarget::Value {
        false
    } else {
        compare_kv(c, &KeyValue::default())
    }
}

//! etcd's request validation: per-request field checks and the txn rules (op budget, nested
//! budgets, no key written twice along one execution).
//!
//! Separate because it runs on the caller's thread before anything is routed, and the
//! duplicate-write check carries its own interval set.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use bytes::Bytes;

use crate::error::Error;
use crate::kv::{DeleteRangeRequest, KeyRange, PutRequest, RangeRequest, RequestOp, TxnRequest};

/// Rejects what etcd's v3 server rejects before a range reaches the store.
pub fn validate_range(r: &RangeRequest) -> Result<(), Error> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// `ignore_value`/`ignore_lease` mean "keep the current one", so also giving one is contradictory.
pub fn validate_put(r: &PutRequest) -> Result<(), Error> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn validate_delete(r: &DeleteRangeRequest) -> Result<(), Error> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// etcd's txn checks, in etcd's order: first the per-field checks of the whole tree (sizes,
/// empty keys, put flags), then the put/delete overlap check for each top-level branch. The
/// overlap check runs last because it is the costly one and etcd reports field errors first.
///
/// As in etcd, a nested txn gets only the budget its parent leaves (`max - parent's widest list`),
/// which bounds the whole tree's size.
pub fn validate_txn(t: &TxnRequest, max_txn_ops: usize) -> Result<(), Error> {
    check_txn_fields(t, max_txn_ops)?;
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

fn check_txn_fields(t: &TxnRequest, max_txn_ops: usize) -> Result<(), Error> {
    let opc = t.compare.len().max(t.success.len()).max(t.failure.len());
    if opc > max_txn_ops {
        return Err(Error::TooManyOps);
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    let budget = max_txn_ops - opc;
    for op in t.success.iter().chain(&t.failure) {
        match op {
            RequestOp::Range(r) => validate_range(r)?,
            RequestOp::Put(p) => validate_put(p)?,
            RequestOp::DeleteRange(d) => validate_delete(d)?,
            RequestOp::Txn(n) => check_txn_fields(n, budget)?,
        }
    }
    Ok(())
}

/// Puts and deletes of one op list, for the enclosing level to check its own against.
struct LevelWrites {
    puts: HashSet<Bytes>,
    dels: DelSet,
}

/// etcd's `checkIntervals`: a key may be written at most once along any execution of the txn,
/// because the store applies a txn's ops as one revision and a second write would be ambiguous.
/// Deletes use [`KeyRange::from_etcd`], so a `"\0"` end means "to the end of the key space";
/// etcd 3.4 takes that end literally here (an empty interval that never conflicts), so we reject
/// some txns etcd 3.4 lets through, which then write a key twice in one revision.
fn check_intervals(ops: &[RequestOp]) -> Result<LevelWrites, Error> {
    // This level's deletes first, so that nested puts are checked against them.
    let mut dels = DelSet::default();
    for op in ops {
        if let RequestOp::DeleteRange(d) = op {
            if let Some(r) = KeyRange::from_etcd(&d.key, &d.range_end) {
                dels.insert(r);
            }
        }
    }

    let mut puts: HashSet<Bytes> = HashSet::new();
    for op in ops {
        let RequestOp::Txn(n) = op else { continue };
        let then = check_intervals(&n.success)?;
        let els = check_intervals(&n.failure)?;
        for k in &then.puts {
            if puts.contains(k) || dels.contains(k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &els.puts {
            // The nested branches are mutually exclusive, so a key in both is fine.
            if (puts.contains(k) && !then.puts.contains(k)) || dels.contains(k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.union(then.dels);
        dels.union(els.dels);
    }

    for op in ops {
        if let RequestOp::Put(p) = op {
            if puts.contains(&p.key) || dels.contains(&p.key) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(p.key.clone());
        }
    }
    Ok(LevelWrites { puts, dels })
}

/// A union of key intervals kept as disjoint, sorted runs so point lookups are `O(log n)`; a tree
/// within etcd's op budget can hold thousands of deletes, too many to scan per put.
#[derive(Default)]
pub(super) struct DelSet {
    /// start -> end (exclusive, `None` = unbounded); runs are disjoint and non-touching.
    pub(super) runs: BTreeMap<Bytes, Option<Bytes>>,
}

impl DelSet {
    pub(super) fn contains(&self, k: &[u8]) -> bool {
        self.runs
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(k)))
            .next_back()
            .is_some_and(|(_, end)| end.as_ref().is_none_or(|e| k < e.as_ref()))
    }

    pub(super) fn insert(&mut self, r: KeyRange) {
        let KeyRange { mut start, mut end } = r;
        let pred = self
            .runs
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start.as_ref())))
            .next_back()
            .map(|(s, e)| (s.clone(), e.clone()));
        if let Some((ps, pe)) = pred {
            if pe.as_ref().is_none_or(|e| e.as_ref() >= start.as_ref()) {
                self.runs.remove(&ps);
                start = ps;
                end = max_end(end, pe);
            }
        }
        loop {
            let next = self
                .runs
                .range::<[u8], _>((Bound::Included(start.as_ref()), Bound::Unbounded))
                .next()
                .map(|(s, e)| (s.clone(), e.clone()));
            match next {
                Some((s, e)) if end.as_ref().is_none_or(|end| s.as_ref() <= end.as_ref()) => {
                    self.runs.remove(&s);
                    end = max_end(end, e);
                }
                _ => break,
            }
        }
        self.runs.insert(start, end);
    }

    fn union(&mut self, other: DelSet) {
        for (start, end) in other.runs {
            self.insert(KeyRange { start, end });
        }
    }
}

fn max_end(a: Option<Bytes>, b: Option<Bytes>) -> Option<Bytes> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

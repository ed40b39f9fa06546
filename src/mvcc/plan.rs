//! Pure request planning for the sharded store: etcd's request validation, txn branch selection
//! from compare results, routing, and merging per-shard partial results into etcd responses.
//!
//! Nothing here does I/O or touches a store, so every etcd rule the coordinator relies on can be
//! tested in isolation. The coordinator's flow for a txn is: [`validate_txn`] ->
//! [`shards_touched`] -> evaluate [`all_compares`] on the shards -> [`merge_compare`] each ->
//! [`choose_path`] -> run [`leaf_ops`] on the shards -> [`merge_op`] each -> [`assemble_txn`].

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;

use bytes::Bytes;

use crate::error::Error;
use crate::kv::{
    Compare, CompareResult, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, KeyRange,
    KeyValue, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp,
    SortTarget, TargetUnion, TxnRequest, TxnResponse,
};

pub use crate::mvcc::{CompareOutcome, OpPartial, ShardRange, TxnPath};

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

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
struct DelSet {
    /// start -> end (exclusive, `None` = unbounded); runs are disjoint and non-touching.
    runs: BTreeMap<Bytes, Option<Bytes>>,
}

impl DelSet {
    fn contains(&self, k: &[u8]) -> bool {
        self.runs
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(k)))
            .next_back()
            .is_some_and(|(_, end)| end.as_ref().is_none_or(|e| k < e.as_ref()))
    }

    fn insert(&mut self, r: KeyRange) {
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

// ---------------------------------------------------------------------------------------------
// Compares and path selection
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// Shards a txn may touch (sorted, deduplicated), over both branches and all compares, so the
/// coordinator can pin one read view per shard before knowing the path. Single-key items go to
/// their owner, real ranges to every shard; empty intervals (`range_end <= key`) match nothing
/// in etcd and touch no shard.
pub fn shards_touched(t: &TxnRequest, shard_of: &dyn Fn(&[u8]) -> u32, nshards: u32) -> Vec<u32> {
    let mut set = BTreeSet::new();
    if collect_shards(t, shard_of, &mut set) {
        return (0..nshards).collect();
    }
    set.into_iter().collect()
}

/// Adds single-key owners to `set`; returns true as soon as something needs every shard.
fn collect_shards(
    t: &TxnRequest,
    shard_of: &dyn Fn(&[u8]) -> u32,
    set: &mut BTreeSet<u32>,
) -> bool {
    let empty = Bytes::new();
    let compares = t.compare.iter().map(|c| Some((&c.key, &c.range_end)));
    let ops = t.success.iter().chain(&t.failure).map(|op| match op {
        RequestOp::Range(r) => Some((&r.key, &r.range_end)),
        RequestOp::Put(p) => Some((&p.key, &empty)),
        RequestOp::DeleteRange(d) => Some((&d.key, &d.range_end)),
        RequestOp::Txn(_) => None,
    });
    for (key, end) in compares.chain(ops).flatten() {
        match KeyRange::from_etcd(key, end) {
            None => {}
            Some(r) if r.is_single_key() => {
                set.insert(shard_of(key));
            }
            Some(_) => return true,
        }
    }
    for op in t.success.iter().chain(&t.failure) {
        if let RequestOp::Txn(n) = op {
            if collect_shards(n, shard_of, set) {
                return true;
            }
        }
    }
    false
}

/// Structural: any put or delete anywhere in the tree, whichever branch runs. The coordinator
/// needs this before compares are evaluated, to decide whether a write revision may be needed.
/// (etcd's `isTxnReadonly` also counts a read-only nested txn as a write; that only changes its
/// internal routing, not the response, so we look at the leaves.)
pub fn txn_has_writes(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match op {
        RequestOp::Range(_) => false,
        RequestOp::Put(_) | RequestOp::DeleteRange(_) => true,
        RequestOp::Txn(n) => txn_has_writes(n),
    })
}

// ---------------------------------------------------------------------------------------------
// Range results: the per-shard contract and the merge
// ---------------------------------------------------------------------------------------------

/// Whether `kv` survives the request's min/max mod/create revision filters (0 = no bound).
pub fn passes_range_filters(r: &RangeRequest, kv: &KeyValue) -> bool {
    (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
        && (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
        && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
        && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
}

/// The total order of a range's result. etcd returns key order for NONE+KEY and sorts ascending
/// for NONE with another target. Ties go to the smaller key: etcd leaves them unspecified, but
/// shards and the merge must agree on one total order for per-shard limits to be exact.
pub fn range_order(r: &RangeRequest) -> impl Fn(&KeyValue, &KeyValue) -> Ordering {
    let (order, target) = crate::mvcc::effective_sort(r);
    move |a, b| crate::mvcc::cmp_kvs(a, b, order, target)
}

fn limit_len(limit: i64) -> Option<usize> {
    (limit > 0).then(|| usize::try_from(limit).unwrap_or(usize::MAX))
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reference implementation of a shard's side of a range: `in_range` is the shard's keys in the
/// request's interval at the read revision. Values are kept under `keys_only` when sorting by
/// value, because the merge still has to order by them; [`merge_range`] strips them at the end.
/// With `count_only` no kvs are produced (and `filtered` is 0), as etcd reads none.
pub fn local_range(r: &RangeRequest, in_range: Vec<KeyValue>) -> ShardRange {
    let count = len_i64(in_range.len());
    if r.count_only {
        return ShardRange {
            kvs: Vec::new(),
            filtered: 0,
            count,
        };
    }
    let mut kvs: Vec<KeyValue> = in_range
        .into_iter()
        .filter(|kv| passes_range_filters(r, kv))
        .collect();
    let filtered = len_i64(kvs.len());
    if let Some(window) = crate::mvcc::prefetch_window(r) {
        // etcd sorts only the first `limit + 1` keys in key order; the merge needs them all.
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        kvs.truncate(window);
        kvs.sort_by(range_order(r));
    } else {
        kvs.sort_by(range_order(r));
        if let Some(n) = limit_len(r.limit) {
            kvs.truncate(n);
        }
    }
    if r.keys_only && r.sort_target != SortTarget::Value {
        strip_values(&mut kvs);
    }
    ShardRange {
        kvs,
        filtered,
        count,
    }
}

fn strip_values(kvs: &mut [KeyValue]) {
    for kv in kvs {
        kv.value = Bytes::new();
    }
}

/// Merges per-shard slices into etcd's response. Each shard already holds its own top `limit`
/// under [`range_order`], so the global top `limit` is among their union. `more` follows etcd:
/// more filtered keys than `limit`. `keys_only` is (re)applied after sorting, as etcd strips
/// values only after sorting by them; `count_only` yields no kvs and never `more`.
pub fn merge_range(r: &RangeRequest, parts: Vec<ShardRange>) -> RangeResponse {
    let mut count: i64 = 0;
    let mut filtered: i64 = 0;
    let mut kvs = Vec::new();
    for p in parts {
        count = count.saturating_add(p.count);
        filtered = filtered.saturating_add(p.filtered);
        kvs.extend(p.kvs);
    }
    if let Some(window) = crate::mvcc::prefetch_window(r) {
        // etcd's window: the first `limit + 1` keys in key order, then sorted by the target.
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        kvs.truncate(window);
    }
    kvs.sort_by(range_order(r));
    let mut more = false;
    if let Some(n) = limit_len(r.limit) {
        kvs.truncate(n);
        more = filtered > r.limit;
    }
    if r.keys_only {
        strip_values(&mut kvs);
    }
    if r.count_only {
        kvs.clear();
        more = false;
    }
    RangeResponse {
        kvs,
        more,
        count,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Txn results
// ---------------------------------------------------------------------------------------------

/// The merged result of one leaf op across shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergedOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
}

/// The leaf ops (range/put/delete) that run for `path`, in execution order, nested txns expanded.
/// A path entry missing for a txn node is read as false (failure branch), as in [`choose_path`].
pub fn leaf_ops<'a>(t: &'a TxnRequest, path: &TxnPath) -> Vec<&'a RequestOp> {
    let mut out = Vec::new();
    let mut cursor = 0;
    walk_leaves(t, &path.0, &mut cursor, &mut out);
    out
}

fn take_branch(path: &[bool], cursor: &mut usize) -> bool {
    let ok = path.get(*cursor).copied().unwrap_or(false);
    *cursor += 1;
    ok
}

fn walk_leaves<'a>(
    t: &'a TxnRequest,
    path: &[bool],
    cursor: &mut usize,
    out: &mut Vec<&'a RequestOp>,
) {
    let ops = if take_branch(path, cursor) {
        &t.success
    } else {
        &t.failure
    };
    for op in ops {
        match op {
            RequestOp::Txn(n) => walk_leaves(n, path, cursor, out),
            leaf => out.push(leaf),
        }
    }
}

/// Merges one leaf op's per-shard partials. Partials of another kind (and `NotOwned`) are
/// ignored. A `Txn` op is not a leaf ([`leaf_ops`] never yields one) and gives an empty range.
pub fn merge_op(op: &RequestOp, partials: Vec<OpPartial>) -> MergedOp {
    match op {
        RequestOp::Range(r) => {
            let parts = partials
                .into_iter()
                .filter_map(|p| match p {
                    OpPartial::Range(s) => Some(s),
                    _ => None,
                })
                .collect();
            MergedOp::Range(merge_range(r, parts))
        }
        RequestOp::Put(_) => {
            let prev_kv = partials
                .into_iter()
                .find_map(|p| match p {
                    OpPartial::Put { prev_kv } => Some(prev_kv),
                    _ => None,
                })
                .flatten();
            MergedOp::Put(PutResponse {
                prev_kv,
                ..Default::default()
            })
        }
        RequestOp::DeleteRange(_) => {
            let mut deleted: i64 = 0;
            let mut prev_kvs = Vec::new();
            for p in partials {
                if let OpPartial::DeleteRange {
                    deleted: d,
                    prev_kvs: kvs,
                } = p
                {
                    deleted = deleted.saturating_add(d);
                    prev_kvs.extend(kvs);
                }
            }
            // etcd reports deleted kvs in key order; shards are disjoint so keys are unique.
            prev_kvs.sort_by(|a, b| a.key.cmp(&b.key));
            MergedOp::DeleteRange(DeleteRangeResponse {
                deleted,
                prev_kvs,
                ..Default::default()
            })
        }
        RequestOp::Txn(_) => MergedOp::Range(RangeResponse::default()),
    }
}

/// Rebuilds etcd's nested `TxnResponse` from the merged leaf results (in [`leaf_ops`] order).
/// `succeeded` comes from the path and nested txn responses sit at their op's position. A missing
/// or wrong-kind merged result becomes an empty response of the op's kind, keeping the shape
/// etcd clients index into. Headers stay default for the caller to fill.
pub fn assemble_txn(t: &TxnRequest, path: &TxnPath, merged: Vec<MergedOp>) -> TxnResponse {
    let mut merged = merged.into_iter();
    let mut cursor = 0;
    build_txn(t, &path.0, &mut cursor, &mut merged)
}

fn build_txn(
    t: &TxnRequest,
    path: &[bool],
    cursor: &mut usize,
    merged: &mut impl Iterator<Item = MergedOp>,
) -> TxnResponse {
    let succeeded = take_branch(path, cursor);
    let ops = if succeeded { &t.success } else { &t.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let resp = match op {
            RequestOp::Txn(n) => ResponseOp::Txn(build_txn(n, path, cursor, merged)),
            RequestOp::Range(_) => match merged.next() {
                Some(MergedOp::Range(r)) => ResponseOp::Range(r),
                _ => ResponseOp::Range(RangeResponse::default()),
            },
            RequestOp::Put(_) => match merged.next() {
                Some(MergedOp::Put(p)) => ResponseOp::Put(p),
                _ => ResponseOp::Put(PutResponse::default()),
            },
            RequestOp::DeleteRange(_) => match merged.next() {
                Some(MergedOp::DeleteRange(d)) => ResponseOp::DeleteRange(d),
                _ => ResponseOp::DeleteRange(DeleteRangeResponse::default()),
            },
        };
        responses.push(resp);
    }
    TxnResponse {
        succeeded,
        responses,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::SortOrder;
    use proptest::prelude::*;

    // ---- builders -------------------------------------------------------------------------

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }
    fn put(k: &str) -> RequestOp {
        RequestOp::Put(PutRequest::new(b(k), "v"))
    }
    fn get(k: &str) -> RequestOp {
        RequestOp::Range(RangeRequest::key(b(k)))
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp::DeleteRange(DeleteRangeRequest::range(b(k), b(end)))
    }
    fn del_key(k: &str) -> RequestOp {
        RequestOp::DeleteRange(DeleteRangeRequest::key(b(k)))
    }
    fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare,
            success,
            failure,
        }
    }
    fn nested(
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
        failure: Vec<RequestOp>,
    ) -> RequestOp {
        RequestOp::Txn(txn(compare, success, failure))
    }
    fn cmp(k: &str) -> Compare {
        Compare::version(b(k), CompareResult::Equal, 0)
    }
    fn kv(k: &str, version: i64, create: i64, modr: i64, value: &str) -> KeyValue {
        KeyValue {
            key: b(k),
            create_revision: create,
            mod_revision: modr,
            version,
            value: b(value),
            lease: 0,
        }
    }
    fn keys(kvs: &[KeyValue]) -> Vec<&str> {
        kvs.iter()
            .map(|kv| std::str::from_utf8(&kv.key).unwrap_or("?"))
            .collect()
    }
    fn ok(t: &TxnRequest) -> bool {
        validate_txn(t, DEFAULT_MAX_TXN_OPS).is_ok()
    }
    fn dup(t: &TxnRequest) -> bool {
        matches!(
            validate_txn(t, DEFAULT_MAX_TXN_OPS),
            Err(Error::DuplicateKey)
        )
    }

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

    // ---- range merge -------------------------------------------------------------------------

    /// key, version, create, mod, value — chosen so every target has ties and a distinct order.
    fn sample() -> Vec<KeyValue> {
        vec![
            kv("a", 2, 5, 9, "m"),
            kv("b", 1, 3, 3, "z"),
            kv("c", 2, 1, 7, "a"),
            kv("d", 3, 5, 4, "m"),
            kv("e", 1, 2, 9, "b"),
        ]
    }

    /// Splits the sample over three shards (a,d | b,e | c) and merges.
    fn split_merge(req: &RangeRequest) -> RangeResponse {
        let s = sample();
        let parts = vec![
            local_range(req, vec![s[0].clone(), s[3].clone()]),
            local_range(req, vec![s[1].clone(), s[4].clone()]),
            local_range(req, vec![s[2].clone()]),
        ];
        merge_range(req, parts)
    }

    fn req(order: SortOrder, target: SortTarget, limit: i64) -> RangeRequest {
        RangeRequest {
            key: b("a"),
            range_end: b("\0"),
            limit,
            sort_order: order,
            sort_target: target,
            ..Default::default()
        }
    }

    #[test]
    fn range_merge_orders() {
        use SortOrder::*;
        use SortTarget::*;
        let cases: &[(SortOrder, SortTarget, &[&str])] = &[
            (None, Key, &["a", "b", "c", "d", "e"]),
            (Ascend, Key, &["a", "b", "c", "d", "e"]),
            (Descend, Key, &["e", "d", "c", "b", "a"]),
            // versions 2,1,2,3,1
            (None, Version, &["b", "e", "a", "c", "d"]),
            (Ascend, Version, &["b", "e", "a", "c", "d"]),
            (Descend, Version, &["d", "a", "c", "b", "e"]),
            // create 5,3,1,5,2
            (None, Create, &["c", "e", "b", "a", "d"]),
            (Descend, Create, &["a", "d", "b", "e", "c"]),
            // mod 9,3,7,4,9
            (Ascend, Mod, &["b", "d", "c", "a", "e"]),
            (Descend, Mod, &["a", "e", "c", "d", "b"]),
            // values m,z,a,m,b
            (None, Value, &["c", "e", "a", "d", "b"]),
            (Ascend, Value, &["c", "e", "a", "d", "b"]),
            (Descend, Value, &["b", "a", "d", "e", "c"]),
        ];
        for &(order, target, want) in cases {
            let r = split_merge(&req(order, target, 0));
            assert_eq!(keys(&r.kvs), want, "{order:?} {target:?}");
            assert_eq!((r.count, r.more), (5, false), "{order:?} {target:?}");
            for limit in 1..=6 {
                let r = split_merge(&req(order, target, limit));
                let n = want.len().min(limit as usize);
                // NONE with another target: etcd sorts only the first limit+1 keys (a..e order).
                let window: Vec<&str> = if order == None && target != Key {
                    let first = ["a", "b", "c", "d", "e"];
                    let w = &first[..first.len().min(limit as usize + 1)];
                    want.iter()
                        .copied()
                        .filter(|k| w.contains(k))
                        .take(n)
                        .collect()
                } else {
                    want[..n].to_vec()
                };
                assert_eq!(keys(&r.kvs), window, "{order:?} {target:?} limit {limit}");
                assert_eq!(r.more, limit < 5, "{order:?} {target:?} limit {limit}");
                assert_eq!(r.count, 5);
            }
        }
    }

    #[test]
    fn range_merge_filters_count_and_more() {
        // Filters shrink `more`'s base but never `count`.
        let mut r = req(SortOrder::None, SortTarget::Key, 2);
        r.min_mod_revision = 4; // drops b (mod 3)
        r.max_create_revision = 4; // drops a, d (create 5)
        let got = split_merge(&r);
        assert_eq!(keys(&got.kvs), ["c", "e"]);
        assert_eq!((got.count, got.more), (5, false));
        r.limit = 1;
        let got = split_merge(&r);
        assert_eq!(keys(&got.kvs), ["c"]);
        assert_eq!((got.count, got.more), (5, true));
        let mut r = req(SortOrder::None, SortTarget::Key, 0);
        r.max_mod_revision = 4;
        r.min_create_revision = 4;
        assert_eq!(keys(&split_merge(&r).kvs), ["d"]);

        // Negative limit means no limit.
        let got = split_merge(&req(SortOrder::None, SortTarget::Key, -1));
        assert_eq!((got.kvs.len(), got.more), (5, false));

        // count_only: no kvs, no more, full count.
        let mut r = req(SortOrder::None, SortTarget::Key, 1);
        r.count_only = true;
        let got = split_merge(&r);
        assert_eq!((got.kvs.len(), got.more, got.count), (0, false, 5));

        // No shards at all.
        let got = merge_range(&req(SortOrder::None, SortTarget::Key, 3), vec![]);
        assert_eq!(got, RangeResponse::default());
    }

    #[test]
    fn keys_only_still_sorts_by_value() {
        let mut r = req(SortOrder::Descend, SortTarget::Value, 3);
        r.keys_only = true;
        let got = split_merge(&r);
        assert_eq!(keys(&got.kvs), ["b", "a", "d"]);
        assert!(got.kvs.iter().all(|kv| kv.value.is_empty()));
        let mut r = req(SortOrder::None, SortTarget::Key, 0);
        r.keys_only = true;
        let got = split_merge(&r);
        assert!(got.kvs.iter().all(|kv| kv.value.is_empty()) && got.kvs.len() == 5);
    }

    // ---- properties --------------------------------------------------------------------------

    /// Independent reference: etcd's range post-processing over the whole key set, with ties
    /// broken by key (a key-ordered input sorted stably by the target).
    fn reference(r: &RangeRequest, all: &[KeyValue]) -> RangeResponse {
        let count = all.len() as i64;
        if r.count_only {
            return RangeResponse {
                count,
                ..Default::default()
            };
        }
        let mut kvs: Vec<KeyValue> = all
            .iter()
            .filter(|kv| r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
            .filter(|kv| r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
            .filter(|kv| r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
            .filter(|kv| r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
            .cloned()
            .collect();
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        let windowed = r.sort_order == SortOrder::None
            && r.sort_target != SortTarget::Key
            && r.min_mod_revision == 0
            && r.max_mod_revision == 0
            && r.min_create_revision == 0
            && r.max_create_revision == 0
            && r.limit > 0;
        if windowed {
            kvs.truncate(r.limit as usize + 1);
        }
        let field = |kv: &KeyValue| -> (i64, Bytes) {
            match r.sort_target {
                SortTarget::Key => (0, kv.key.clone()),
                SortTarget::Version => (kv.version, Bytes::new()),
                SortTarget::Create => (kv.create_revision, Bytes::new()),
                SortTarget::Mod => (kv.mod_revision, Bytes::new()),
                SortTarget::Value => (0, kv.value.clone()),
            }
        };
        match r.sort_order {
            SortOrder::Descend => kvs.sort_by_key(|kv| std::cmp::Reverse(field(kv))),
            _ => kvs.sort_by_key(|kv| field(kv)),
        }
        let mut more = false;
        if r.limit > 0 && kvs.len() as i64 > r.limit {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if r.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        RangeResponse {
            kvs,
            more,
            count,
            ..Default::default()
        }
    }

    fn arb_kvs() -> impl Strategy<Value = Vec<(KeyValue, u32)>> {
        let key = prop::collection::vec(b'a'..=b'd', 1..4);
        let val = prop::collection::vec(b'x'..=b'z', 0..3);
        prop::collection::btree_map(key, (1i64..4, 1i64..6, 0i64..4, val, any::<u32>()), 0..30)
            .prop_map(|m| {
                m.into_iter()
                    .map(|(k, (version, create, dmod, value, shard))| {
                        let kv = KeyValue {
                            key: Bytes::from(k),
                            create_revision: create,
                            mod_revision: create + dmod,
                            version,
                            value: Bytes::from(value),
                            lease: 0,
                        };
                        (kv, shard)
                    })
                    .collect()
            })
    }

    fn arb_req() -> impl Strategy<Value = RangeRequest> {
        let order = prop_oneof![
            Just(SortOrder::None),
            Just(SortOrder::Ascend),
            Just(SortOrder::Descend)
        ];
        let target = prop_oneof![
            Just(SortTarget::Key),
            Just(SortTarget::Version),
            Just(SortTarget::Create),
            Just(SortTarget::Mod),
            Just(SortTarget::Value),
        ];
        let bound = prop_oneof![3 => Just(0i64), 1 => 1i64..9];
        (
            order,
            target,
            -1i64..8,
            [bound.clone(), bound.clone(), bound.clone(), bound],
            any::<bool>(),
            prop::bool::weighted(0.1),
        )
            .prop_map(
                |(sort_order, sort_target, limit, [a, b2, c, d], keys_only, count_only)| {
                    RangeRequest {
                        key: Bytes::from_static(b"a"),
                        range_end: Bytes::from_static(b"\0"),
                        limit,
                        sort_order,
                        sort_target,
                        keys_only,
                        count_only,
                        min_mod_revision: a,
                        max_mod_revision: b2,
                        min_create_revision: c,
                        max_create_revision: d,
                        ..Default::default()
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn split_then_merge_equals_whole(kvs in arb_kvs(), r in arb_req(), nshards in 1u32..6) {
            let all: Vec<KeyValue> = kvs.iter().map(|(kv, _)| kv.clone()).collect();
            let mut per: Vec<Vec<KeyValue>> = vec![Vec::new(); nshards as usize];
            for (kv, s) in kvs {
                per[(s % nshards) as usize].push(kv);
            }
            let parts = per.into_iter().map(|in_range| local_range(&r, in_range)).collect();
            prop_assert_eq!(merge_range(&r, parts), reference(&r, &all));
        }

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
}

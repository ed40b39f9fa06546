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
    SortOrder, SortTarget, TargetUnion, TxnRequest, TxnResponse,
};

// ================================================================================================
// Shared partial-result types. They belong to the per-shard store (`mvcc`) and will move there
// and be re-exported from here; keep them byte-for-byte in sync with that module until then.
// ================================================================================================

/// Per-shard slice of a range result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardRange {
    /// After filters+sort, truncated to the request's limit.
    pub kvs: Vec<KeyValue>,
    /// Kvs that passed min/max filters before limit truncation.
    pub filtered: i64,
    /// Keys in range at rev before filters and limit (etcd's count).
    pub count: i64,
}

/// Per shard: number of keys the compare covered there, and whether it held for all of them.
pub struct CompareOutcome {
    pub matched: u64,
    pub all_true: bool,
}

/// Branch taken at each txn node in execution order: the top-level txn first, then nested txns as
/// met depth-first along the chosen branch's ops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnPath(pub Vec<bool>);

/// One per leaf op (Range/Put/DeleteRange) along the path, in execution order; nested Txn ops are
/// expanded, not leaves; `NotOwned` = the put's key lives on another shard.
pub enum OpPartial {
    Range(ShardRange),
    Put {
        prev_kv: Option<KeyValue>,
    },
    DeleteRange {
        deleted: i64,
        prev_kvs: Vec<KeyValue>,
    },
    NotOwned,
}

// ================================================================================================
// End of shared types.
// ================================================================================================

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
            .is_some_and(|(_, end)| end.as_ref().map_or(true, |e| k < e.as_ref()))
    }

    fn insert(&mut self, r: KeyRange) {
        let KeyRange { mut start, mut end } = r;
        let pred = self
            .runs
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start.as_ref())))
            .next_back()
            .map(|(s, e)| (s.clone(), e.clone()));
        if let Some((ps, pe)) = pred {
            if pe.as_ref().map_or(true, |e| e.as_ref() >= start.as_ref()) {
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
                Some((s, e)) if end.as_ref().map_or(true, |end| s.as_ref() <= end.as_ref()) => {
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
    let target = r.sort_target;
    let descend = r.sort_order == SortOrder::Descend;
    move |a, b| {
        let primary = match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        let primary = if descend { primary.reverse() } else { primary };
        primary.then_with(|| a.key.cmp(&b.key))
    }
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
    kvs.sort_by(range_order(r));
    if let Some(n) = limit_len(r.limit) {
        kvs.truncate(n);
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


//! Merging per-shard partial results into etcd responses: a range's per-shard slices, and a
//! txn's leaf ops rebuilt into etcd's nested response shape.
//!
//! Separate because this is the result side of planning: it runs after the shards answered and
//! owns the ordering and limit rules that make per-shard results combine exactly.

use std::cmp::Ordering;

use bytes::Bytes;

use crate::kv::{
    DeleteRangeResponse, KeyValue, PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp,
    SortTarget, TxnRequest, TxnResponse,
};
use crate::mvcc::{OpPartial, ShardRange, TxnPath};

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

/// The merged result of one leaf op across shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergedOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
}

/// The leaf ops (range/put/delete) that run for `path`, in execution order, nested txns expanded.
/// A path entry missing for a txn node is read as false (failure branch), as in
/// [`choose_path`](super::choose_path).
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

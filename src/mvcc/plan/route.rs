//! Routing facts about a txn: which shards it may touch and whether it can write at all.
//!
//! Separate because the coordinator needs these before it evaluates anything, to pick a core,
//! pin read views and decide whether a write revision may be needed.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::kv::{KeyRange, RequestOp, TxnRequest};

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

//! Pure, IO-free per-shard MVCC store with etcd v3.4 revision semantics.
//!
//! Each shard owns a [`ShardStore`] holding the full retained history of its own keys. Revisions
//! are global and allocated by the caller (the shard runtime): the store is told the revision of
//! every write and asserts that a shard's write revisions strictly increase. Reads take an explicit
//! revision. Everything the store does to its state is expressed as [`Effect`]s, so the WAL can log
//! them and [`ShardStore::apply`] reproduces the state exactly on replay.
//!
//! Request validation (empty keys, duplicate keys in a txn, op limits), choosing txn branches from
//! compare results, and merging per-shard results into etcd responses belong to the planner; this
//! module reports per-shard partial results ([`ShardRange`], [`CompareOutcome`], [`OpPartial`]) and
//! exposes the ordering helpers ([`cmp_kvs`], [`effective_sort`], [`prefetch_window`]) a merge needs.

pub mod btree;
mod events;
mod index;
mod key_index;
pub mod lease;
pub mod plan;
mod query;
mod store;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use bytes::Bytes;

use crate::kv::KeyValue;

pub use events::{in_ranges, Changes, Event, EventKind, EVENT_LOG_CAPACITY};
pub use key_index::{Generation, KeyHistory, PutEvent};
pub use query::{
    cmp_kvs, effective_sort, has_revision_filters, keeps_values_for_merge, prefetch_window,
};
pub use store::{ShardStore, SharedOp};

/// A write to apply; the WAL stores these, and replaying them with the same revision must
/// reproduce the state exactly.
///
/// A `Put` carries the resolved value and lease (after `ignore_value` / `ignore_lease`), and a
/// delete range becomes one `Delete` per key it removed, so replay needs no reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Put {
        key: Bytes,
        value: Bytes,
        lease: i64,
    },
    Delete {
        key: Bytes,
    },
}

/// Per-shard slice of a range result.
///
/// Merging shards: `count` and `filtered` add up; `more` is `sum(filtered) > limit` for
/// `limit > 0`; kvs merge in the order of [`cmp_kvs`] under [`effective_sort`] and are cut to
/// `limit`, except in etcd's prefetch-window case (see [`prefetch_window`]), where `kvs` holds up
/// to `limit + 1` entries. With `count_only`, `kvs` is empty and `filtered` is 0 (etcd reports
/// `more = false` then). With `keys_only`, values are empty except when sorting by VALUE (see
/// [`keeps_values_for_merge`]): the merger empties them after merging.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardRange {
    /// After filters and sort, truncated to limit (to `limit + 1` in the prefetch-window case).
    pub kvs: Vec<KeyValue>,
    /// Number of kvs that passed the min/max filters, before limit truncation.
    pub filtered: i64,
    /// etcd's count: all keys in range at the revision, ignoring filters and limit.
    pub count: i64,
}

/// Per-shard view of one compare: how many keys in the compare's key/range exist at the revision,
/// and whether the compare holds for all of them.
///
/// When `matched == 0`, `all_true` is the compare evaluated against a zero KeyValue, which is what
/// etcd uses when no key exists (for target VALUE etcd instead fails; that is the caller's call).
/// So a merge should AND `all_true` over shards with `matched > 0`, and use any shard's `all_true`
/// only when every shard matched nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompareOutcome {
    pub matched: u64,
    pub all_true: bool,
}

/// The branch taken at each txn node, in execution order (top-level txn first, then nested txns as
/// met depth-first along the chosen ops). `true` = success branch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnPath(pub Vec<bool>);

/// Result of one leaf op (Range/Put/DeleteRange) on this shard, in execution order along the path
/// (nested Txn ops are expanded, not leaves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpPartial {
    Range(ShardRange),
    /// `prev_kv` only when the put asked for it and the key existed.
    Put {
        prev_kv: Option<KeyValue>,
    },
    /// This shard's deletions; `prev_kvs` only when the request asked for them.
    DeleteRange {
        deleted: i64,
        prev_kvs: Vec<KeyValue>,
    },
    /// A put on a key another shard owns.
    NotOwned,
}

/// What [`ShardStore::execute`] did.
#[derive(Debug)]
pub struct Execution {
    pub partials: Vec<OpPartial>,
    /// The writes, in execution order; empty when this shard wrote nothing.
    pub effects: Vec<Effect>,
    pub undo: Undo,
}

impl Execution {
    /// Whether this shard wrote anything (and so took the write revision).
    pub fn wrote(&self) -> bool {
        !self.effects.is_empty()
    }
}

/// Enough to exactly reverse one [`ShardStore::execute`].
///
/// All writes of a txn share its revision, which is above everything else in the store, so undoing
/// is removing the events at that revision from the touched keys; no old state needs copying.
#[derive(Debug)]
pub struct Undo {
    rev: i64,
    prev_last_revision: i64,
    /// Keys written, in order; may repeat.
    keys: Vec<Bytes>,
}

impl Undo {
    /// True when the execution wrote nothing, so rolling back is a no-op.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

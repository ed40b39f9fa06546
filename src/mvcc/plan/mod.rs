//! Pure request planning for the sharded store: etcd's request validation, txn branch selection
//! from compare results, routing, and merging per-shard partial results into etcd responses.
//!
//! Nothing here does I/O or touches a store, so every etcd rule the coordinator relies on can be
//! tested in isolation. The coordinator's flow for a txn is: [`validate_txn`] ->
//! [`shards_touched`] -> evaluate [`all_compares`] on the shards -> [`merge_compare`] each ->
//! [`choose_path`] -> run [`leaf_ops`] on the shards -> [`merge_op`] each -> [`assemble_txn`].

mod compare;
mod merge;
mod route;
mod validate;

#[cfg(test)]
mod tests;

pub use compare::{all_compares, choose_path, compare_kv, merge_compare};
pub use merge::{
    assemble_txn, leaf_ops, local_range, merge_op, merge_range, passes_range_filters, range_order,
    MergedOp,
};
pub use route::{shards_touched, txn_has_writes};
pub use validate::{validate_delete, validate_put, validate_range, validate_txn};

pub use crate::mvcc::{CompareOutcome, OpPartial, ShardRange, TxnPath};

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

//! Placeholder for the per-shard MVCC store (being written on its own branch).
use bytes::Bytes;

/// A write to apply; the WAL stores these, and replaying them with the same revision must reproduce the state exactly.
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

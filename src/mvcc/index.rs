//! The ordered map from key to per-key history: our own B+tree (`crate::mvcc::btree`), whose sorted,
//! linked leaves serve range scans and whose bulk load makes restart fast.

use bytes::Bytes;

use super::key_index::KeyIndex;

/// The per-shard key index.
pub(crate) type Index = crate::mvcc::btree::BPlusTree<Bytes, KeyIndex>;

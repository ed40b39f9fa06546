//! An embedded `Db` in tests: its options, and the plain put most tests write with.

use spindle::kv::PutRequest;
use spindle::{Db, Options};

/// `cores` executors (unpinned) over `shards` shards, small WAL segments, no automatic
/// checkpoints; override single fields with `Options { field, ..opts(c, s) }`.
pub fn opts(cores: usize, shards: u32) -> Options {
    Options {
        cores,
        shards: Some(shards),
        pin: false,
        wal_segment_size: 256 << 10,
        checkpoint_every: 0,
        ..Options::default()
    }
}

/// Puts `key = value` (which must succeed) and returns the revision it was written at.
pub fn put(db: &Db, key: &str, value: &str) -> i64 {
    db.put(PutRequest::new(key.to_string(), value.to_string()))
        .unwrap()
        .header
        .revision
}

//! Allocation regression guard: heap allocations per durable put and per single-key range of
//! the embedded engine (one core, one shard), counted process-wide (the caller's request and
//! the core's work alike) by a counting global allocator. Counting does not depend on the
//! machine's speed, so this is a test, not a benchmark; the bounds sit above what was measured
//! when they were set (docs/benchmarks.md, "Allocations per request") and fail if the hot path
//! grows new allocations.

mod common;

use common::alloc_count::{per_op, Counting};
use spindle::kv::{PutRequest, RangeRequest};
use spindle::Db;

#[global_allocator]
static ALLOC: Counting = Counting;

/// Measured 2026-12-04: 75 per put (about 34 of them glommio's, each time an executor parks
/// and wakes), 23 per range; the bounds leave room for the park count's variation between
/// machines, and fail on a hot path that allocates half as much again.
const MAX_ALLOCS_PER_PUT: f64 = 110.0;
const MAX_ALLOCS_PER_RANGE: f64 = 35.0;

#[test]
fn puts_and_ranges_allocate_within_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Segments large enough that no rollover falls in the measured window.
    let opts = spindle::Options {
        wal_segment_size: 16 << 20,
        ..common::db::opts(1, 1)
    };
    let db = Db::open(dir.path(), opts).expect("open");
    let value = bytes::Bytes::from(vec![b'v'; 256]);
    let keys: Vec<String> = (0..4000)
        .map(|i| format!("k/{:08}", i * 7919 % 4000))
        .collect();
    // Warm up: the index, the WAL's buffers and the event log reach their working sizes.
    for k in &keys[..2000] {
        db.put(PutRequest::new(k.clone(), value.clone()))
            .expect("put");
    }
    let (puts, put_bytes) = per_op(2000, |i| {
        // New keys and overwrites alike.
        let k = if i % 2 == 0 {
            &keys[2000 + i / 2]
        } else {
            &keys[i]
        };
        db.put(PutRequest::new(k.clone(), value.clone()))
            .expect("put");
    });
    let (ranges, range_bytes) = per_op(2000, |i| {
        let r = db.range(RangeRequest::key(keys[i].clone())).expect("range");
        assert_eq!(r.kvs.len(), 1);
    });
    db.close();
    println!("allocations per put {puts:.1} ({put_bytes:.0} bytes), per range {ranges:.1} ({range_bytes:.0} bytes)");
    assert!(
        puts <= MAX_ALLOCS_PER_PUT,
        "{puts:.1} allocations per put, bound {MAX_ALLOCS_PER_PUT}"
    );
    assert!(
        ranges <= MAX_ALLOCS_PER_RANGE,
        "{ranges:.1} allocations per range, bound {MAX_ALLOCS_PER_RANGE}"
    );
}

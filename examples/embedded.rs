//! Embedding spindle: open a store, write, read history, run a compare-and-swap txn, compact.
//!
//! Run with `cargo run --release --example embedded [DATA_DIR]`.

use spindle::kv::{
    CompactionRequest, Compare, CompareResult, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use spindle::{Db, Options};

fn main() -> Result<(), spindle::Error> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "spindle-example-data".into());
    let db = Db::open(&dir, Options::default())?;

    let first = db.put(PutRequest::new("/config/mode", "blue"))?;
    db.put(PutRequest::new("/config/replicas", "3"))?;
    println!("wrote at revision {}", first.header.revision);

    // Compare-and-swap: switch mode only if nobody changed it since we read it.
    let current = db.range(RangeRequest::key("/config/mode"))?;
    let seen = current.kvs[0].mod_revision;
    let swap = db.txn(TxnRequest {
        compare: vec![Compare::mod_revision(
            "/config/mode",
            CompareResult::Equal,
            seen,
        )],
        success: vec![RequestOp::Put(PutRequest::new("/config/mode", "green"))],
        failure: vec![],
    })?;
    println!(
        "swap succeeded: {} (revision {})",
        swap.succeeded, swap.header.revision
    );

    for kv in db.range(RangeRequest::prefix("/config/"))?.kvs {
        println!(
            "{} = {} (version {}, mod revision {})",
            String::from_utf8_lossy(&kv.key),
            String::from_utf8_lossy(&kv.value),
            kv.version,
            kv.mod_revision
        );
    }
    // The value before the swap is still readable at its revision until compacted.
    let old = db.range(RangeRequest {
        revision: seen,
        ..RangeRequest::key("/config/mode")
    })?;
    println!(
        "mode at revision {seen}: {}",
        String::from_utf8_lossy(&old.kvs[0].value)
    );
    db.compact(CompactionRequest {
        revision: seen,
        physical: true,
    })?;

    // Async methods work from any runtime.
    let count = futures_lite::future::block_on(db.range_async(RangeRequest::prefix("/")))?.count;
    println!("{count} keys under /");
    db.close();
    Ok(())
}

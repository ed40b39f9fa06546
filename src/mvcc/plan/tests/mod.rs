//! Unit and property tests of the planner, with the request builders they share.
//!
//! Split by planning step (validation, txn compares/paths/results, range merge) because together
//! they outweigh the code they test.

mod range;
mod txn;
mod validate;

use bytes::Bytes;

use super::*;
use crate::error::Error;
use crate::kv::{
    Compare, CompareResult, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};

// ---- builders -------------------------------------------------------------------------

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}
fn put(k: &str) -> RequestOp {
    RequestOp::Put(PutRequest::new(b(k), "v"))
}
fn get(k: &str) -> RequestOp {
    RequestOp::Range(RangeRequest::key(b(k)))
}
fn del(k: &str, end: &str) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest::range(b(k), b(end)))
}
fn del_key(k: &str) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest::key(b(k)))
}
fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}
fn nested(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    RequestOp::Txn(txn(compare, success, failure))
}
fn cmp(k: &str) -> Compare {
    Compare::version(b(k), CompareResult::Equal, 0)
}
fn kv(k: &str, version: i64, create: i64, modr: i64, value: &str) -> KeyValue {
    KeyValue {
        key: b(k),
        create_revision: create,
        mod_revision: modr,
        version,
        value: b(value),
        lease: 0,
    }
}
fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter()
        .map(|kv| std::str::from_utf8(&kv.key).unwrap_or("?"))
        .collect()
}
fn ok(t: &TxnRequest) -> bool {
    validate_txn(t, DEFAULT_MAX_TXN_OPS).is_ok()
}
fn dup(t: &TxnRequest) -> bool {
    matches!(
        validate_txn(t, DEFAULT_MAX_TXN_OPS),
        Err(Error::DuplicateKey)
    )
}

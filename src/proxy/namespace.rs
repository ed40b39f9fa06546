//! The proxy's `--namespace`: every key a client names gets the prefix on the way to the cluster,
//! and loses it on the way back, so a client sees the cluster's `/ns/…` keys as its whole
//! keyspace. Pure functions over the wire messages, with etcd's namespace semantics:
//!
//! - a key is `prefix + key`; a range end of `"\0"` (to the end of the keyspace) becomes the end
//!   of the prefix (the least key above every prefixed key), any other non-empty end is
//!   prefixed too, and an empty end (a single key) stays empty;
//! - a single-key request (range, put, delete) with an empty key is refused with
//!   `etcdserver: key is not provided` before anything is sent; inside a transaction keys are
//!   prefixed as they are, as etcd does;
//! - keys in answers (ranges, previous values, watch events, a lease's keys, lock and election
//!   keys) are returned without the prefix.

use bytes::{Bytes, BytesMut};

use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb::KeyValue;
use crate::proto::{v3electionpb as el, v3lockpb as lk};
use crate::server::grpc::{Code, Status};

/// What etcd's namespace layer answers a single-key request with an empty key. It is a client
/// error there, not a gRPC status, so the proxy's clients see code Unknown.
pub fn empty_key() -> Status {
    Status::new(Code::Unknown, "etcdserver: key is not provided")
}

/// The least key greater than every key starting with `prefix`; `"\0"` (the end of the
/// keyspace) when there is none (an empty prefix, or one of only `0xff` bytes).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            let n = end.len();
            end[n - 1] = last + 1;
            return Bytes::from(end);
        }
        end.pop();
    }
    Bytes::from_static(b"\0")
}

/// `prefix + key`.
pub fn prefixed(prefix: &[u8], key: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(prefix.len() + key.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(key);
    out.freeze()
}

/// A request's `(key, range_end)` in the namespace.
pub fn interval(prefix: &[u8], key: &[u8], end: &[u8]) -> (Bytes, Bytes) {
    let key = prefixed(prefix, key);
    let end = match end {
        b"" => Bytes::new(),
        b"\0" => prefix_end(prefix),
        end => prefixed(prefix, end),
    };
    (key, end)
}

/// `key` without the prefix. A key outside the namespace (which no rewritten request selects)
/// is left as it is.
pub fn strip(prefix: &[u8], key: &Bytes) -> Bytes {
    if key.starts_with(prefix) {
        key.slice(prefix.len()..)
    } else {
        key.clone()
    }
}

fn strip_kv(prefix: &[u8], kv: &mut KeyValue) {
    kv.key = strip(prefix, &kv.key);
}

fn rewrite(prefix: &[u8], key: &mut Bytes, end: &mut Bytes) {
    let (k, e) = interval(prefix, key, end);
    *key = k;
    *end = e;
}

pub fn range_request(prefix: &[u8], r: &mut pb::RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(empty_key());
    }
    rewrite(prefix, &mut r.key, &mut r.range_end);
    Ok(())
}

pub fn put_request(prefix: &[u8], r: &mut pb::PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(empty_key());
    }
    r.key = prefixed(prefix, &r.key);
    Ok(())
}

pub fn delete_request(prefix: &[u8], r: &mut pb::DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(empty_key());
    }
    rewrite(prefix, &mut r.key, &mut r.range_end);
    Ok(())
}

/// A transaction's compares and operations, nested transactions included.
pub fn txn_request(prefix: &[u8], t: &mut pb::TxnRequest) {
    use pb::request_op::Request as R;
    for c in &mut t.compare {
        rewrite(prefix, &mut c.key, &mut c.range_end);
    }
    for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
        match &mut op.request {
            Some(R::RequestRange(r)) => rewrite(prefix, &mut r.key, &mut r.range_end),
            Some(R::RequestPut(p)) => p.key = prefixed(prefix, &p.key),
            Some(R::RequestDeleteRange(d)) => rewrite(prefix, &mut d.key, &mut d.range_end),
            Some(R::RequestTxn(n)) => txn_request(prefix, n),
            None => {}
        }
    }
}

pub fn range_response(prefix: &[u8], r: &mut pb::RangeResponse) {
    r.kvs.iter_mut().for_each(|kv| strip_kv(prefix, kv));
}

pub fn put_response(prefix: &[u8], r: &mut pb::PutResponse) {
    if let Some(kv) = &mut r.prev_kv {
        strip_kv(prefix, kv);
    }
}

pub fn delete_response(prefix: &[u8], r: &mut pb::DeleteRangeResponse) {
    r.prev_kvs.iter_mut().for_each(|kv| strip_kv(prefix, kv));
}

pub fn txn_response(prefix: &[u8], t: &mut pb::TxnResponse) {
    use pb::response_op::Response as R;
    for op in &mut t.responses {
        match &mut op.response {
            Some(R::ResponseRange(r)) => range_response(prefix, r),
            Some(R::ResponsePut(p)) => put_response(prefix, p),
            Some(R::ResponseDeleteRange(d)) => delete_response(prefix, d),
            Some(R::ResponseTxn(n)) => txn_response(prefix, n),
            None => {}
        }
    }
}

/// A watch's range. An empty key is allowed (it watches the key equal to the prefix), as etcd's
/// namespace watcher allows it.
pub fn watch_create(prefix: &[u8], w: &mut pb::WatchCreateRequest) {
    rewrite(prefix, &mut w.key, &mut w.range_end);
}

pub fn watch_response(prefix: &[u8], w: &mut pb::WatchResponse) {
    for ev in &mut w.events {
        if let Some(kv) = &mut ev.kv {
            strip_kv(prefix, kv);
        }
        if let Some(kv) = &mut ev.prev_kv {
            strip_kv(prefix, kv);
        }
    }
}

/// The keys attached to a lease, as the namespace sees them: only those in it.
pub fn lease_ttl_response(prefix: &[u8], r: &mut pb::LeaseTimeToLiveResponse) {
    r.keys.retain(|k| k.starts_with(prefix));
    r.keys.iter_mut().for_each(|k| *k = strip(prefix, k));
}

pub fn lock_request(prefix: &[u8], r: &mut lk::LockRequest) {
    r.name = prefixed(prefix, &r.name);
}

pub fn lock_response(prefix: &[u8], r: &mut lk::LockResponse) {
    r.key = strip(prefix, &r.key);
}

pub fn unlock_request(prefix: &[u8], r: &mut lk::UnlockRequest) {
    r.key = prefixed(prefix, &r.key);
}

fn leader_key_in(prefix: &[u8], l: &mut Option<el::LeaderKey>) {
    if let Some(l) = l {
        l.name = prefixed(prefix, &l.name);
        l.key = prefixed(prefix, &l.key);
    }
}

pub fn campaign_request(prefix: &[u8], r: &mut el::CampaignRequest) {
    r.name = prefixed(prefix, &r.name);
}

pub fn campaign_response(prefix: &[u8], r: &mut el::CampaignResponse) {
    if let Some(l) = &mut r.leader {
        l.name = strip(prefix, &l.name);
        l.key = strip(prefix, &l.key);
    }
}

pub fn proclaim_request(prefix: &[u8], r: &mut el::ProclaimRequest) {
    leader_key_in(prefix, &mut r.leader);
}

pub fn resign_request(prefix: &[u8], r: &mut el::ResignRequest) {
    leader_key_in(prefix, &mut r.leader);
}

/// `Leader` and `Observe` requests.
pub fn leader_request(prefix: &[u8], r: &mut el::LeaderRequest) {
    r.name = prefixed(prefix, &r.name);
}

pub fn leader_response(prefix: &[u8], r: &mut el::LeaderResponse) {
    if let Some(kv) = &mut r.kv {
        strip_kv(prefix, kv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    #[test]
    fn intervals_follow_etcds_namespace() {
        let p = b"/ns/";
        // One key, a prefix range, from a key to the end, everything.
        assert_eq!(interval(p, b"a", b""), (b(b"/ns/a"), b(b"")));
        assert_eq!(interval(p, b"a", b"b"), (b(b"/ns/a"), b(b"/ns/b")));
        assert_eq!(interval(p, b"a", b"\0"), (b(b"/ns/a"), b(b"/ns0")));
        assert_eq!(interval(p, b"\0", b"\0"), (b(b"/ns/\0"), b(b"/ns0")));
        // An empty key is the prefix itself (a watch may name it).
        assert_eq!(interval(p, b"", b""), (b(b"/ns/"), b(b"")));
        assert_eq!(prefix_end(b"a\xff"), b(b"b"));
        assert_eq!(prefix_end(b"\xff\xff"), b(b"\0"));
        assert_eq!(prefix_end(b""), b(b"\0"));
    }

    #[test]
    fn single_key_requests_need_a_key() {
        let mut r = pb::RangeRequest::default();
        assert_eq!(range_request(b"/ns/", &mut r), Err(empty_key()));
        let mut p = pb::PutRequest::default();
        assert_eq!(put_request(b"/ns/", &mut p), Err(empty_key()));
        let mut d = pb::DeleteRangeRequest::default();
        assert_eq!(delete_request(b"/ns/", &mut d), Err(empty_key()));
    }

    #[test]
    fn transactions_rewrite_compares_and_nested_ops_and_strip_answers() {
        use pb::request_op::Request as Rq;
        use pb::response_op::Response as Rs;
        let mut t = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: b(b"k"),
                range_end: b(b"\0"),
                ..Default::default()
            }],
            success: vec![pb::RequestOp {
                request: Some(Rq::RequestTxn(pb::TxnRequest {
                    failure: vec![pb::RequestOp {
                        request: Some(Rq::RequestDeleteRange(pb::DeleteRangeRequest {
                            key: b(b"x"),
                            range_end: b(b"y"),
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                })),
            }],
            failure: vec![pb::RequestOp {
                request: Some(Rq::RequestPut(pb::PutRequest {
                    key: b(b"p"),
                    ..Default::default()
                })),
            }],
        };
        txn_request(b"/ns/", &mut t);
        assert_eq!(
            (&t.compare[0].key, &t.compare[0].range_end),
            (&b(b"/ns/k"), &b(b"/ns0"))
        );
        let Some(Rq::RequestTxn(n)) = &t.success[0].request else {
            panic!("nested txn kept")
        };
        let Some(Rq::RequestDeleteRange(d)) = &n.failure[0].request else {
            panic!("nested delete kept")
        };
        assert_eq!((&d.key, &d.range_end), (&b(b"/ns/x"), &b(b"/ns/y")));
        let kv = |k: &[u8]| KeyValue {
            key: b(k),
            ..Default::default()
        };
        let mut resp = pb::TxnResponse {
            responses: vec![pb::ResponseOp {
                response: Some(Rs::ResponseTxn(pb::TxnResponse {
                    responses: vec![pb::ResponseOp {
                        response: Some(Rs::ResponseRange(pb::RangeResponse {
                            kvs: vec![kv(b"/ns/a"), kv(b"/ns/b")],
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        txn_response(b"/ns/", &mut resp);
        let Some(Rs::ResponseTxn(n)) = &resp.responses[0].response else {
            panic!()
        };
        let Some(Rs::ResponseRange(r)) = &n.responses[0].response else {
            panic!()
        };
        assert_eq!(r.kvs, vec![kv(b"a"), kv(b"b")]);
    }

    #[test]
    fn lease_keys_outside_the_namespace_are_not_shown() {
        let mut r = pb::LeaseTimeToLiveResponse {
            keys: vec![b(b"/ns/a"), b(b"/other"), b(b"/ns/b")],
            ..Default::default()
        };
        lease_ttl_response(b"/ns/", &mut r);
        assert_eq!(r.keys, vec![b(b"a"), b(b"b")]);
    }

    proptest! {
        /// A key is in the client's range exactly when its prefixed form is in the rewritten
        /// range, and stripping undoes prefixing.
        #[test]
        fn rewritten_ranges_select_the_same_keys(
            prefix in proptest::collection::vec(any::<u8>(), 1..4),
            key in proptest::collection::vec(any::<u8>(), 1..4),
            end in prop_oneof![
                Just(Vec::new()),
                Just(vec![0u8]),
                proptest::collection::vec(any::<u8>(), 1..4),
            ],
            probe in proptest::collection::vec(any::<u8>(), 0..5),
        ) {
            let in_range = |k: &[u8], start: &[u8], end: &[u8]| match end {
                b"" => k == start,
                b"\0" => k >= start,
                e => k >= start && k < e,
            };
            let (pk, pe) = interval(&prefix, &key, &end);
            let probe_p = prefixed(&prefix, &probe);
            prop_assert_eq!(in_range(&probe, &key, &end), in_range(&probe_p, &pk, &pe));
            prop_assert_eq!(strip(&prefix, &probe_p), b(&probe));
            // Nothing outside the namespace is selected.
            let outside = [&prefix[..prefix.len() - 1], &[prefix[prefix.len() - 1].wrapping_add(1)][..]].concat();
            if prefix[prefix.len() - 1] < 0xff {
                prop_assert!(!in_range(&outside, &pk, &pe));
            }
        }
    }
}

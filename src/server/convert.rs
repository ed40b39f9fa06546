//! Conversions between etcd's wire messages and the engine's request/response types.
//!
//! Requests are validated the way etcd's gRPC layer does before they reach the store (enum values
//! out of range are rejected with etcd's messages).

use crate::error::Error;
use crate::kv;
use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb;

pub fn range_request(r: pb::RangeRequest) -> Result<kv::RangeRequest, Error> {
    let sort_order = match r.sort_order {
        0 => kv::SortOrder::None,
        1 => kv::SortOrder::Ascend,
        2 => kv::SortOrder::Descend,
        _ => return Err(Error::InvalidSortOption),
    };
    let sort_target = match r.sort_target {
        0 => kv::SortTarget::Key,
        1 => kv::SortTarget::Version,
        2 => kv::SortTarget::Create,
        3 => kv::SortTarget::Mod,
        4 => kv::SortTarget::Value,
        _ => return Err(Error::InvalidSortOption),
    };
    Ok(kv::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        serializable: r.serializable,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

/// Keys and values decoded by prost are slices of the connection's receive buffer; the store keeps
/// them for as long as the revision lives, so they are copied out to stop them pinning that buffer.
fn own(b: bytes::Bytes) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&b)
}

pub fn put_request(r: pb::PutRequest) -> kv::PutRequest {
    kv::PutRequest {
        key: own(r.key),
        value: own(r.value),
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

pub fn delete_request(r: pb::DeleteRangeRequest) -> kv::DeleteRangeRequest {
    kv::DeleteRangeRequest {
        key: r.key,
        range_end: r.range_end,
        prev_kv: r.prev_kv,
    }
}

fn compare(c: pb::Compare) -> Result<kv::Compare, Error> {
    use pb::compare::TargetUnion as W;
    let result = match c.result {
        0 => kv::CompareResult::Equal,
        1 => kv::CompareResult::Greater,
        2 => kv::CompareResult::Less,
        3 => kv::CompareResult::NotEqual,
        n => {
            return Err(Error::InvalidArgument(format!(
                "invalid compare result {n}"
            )))
        }
    };
    let target = match c.target {
        0 => kv::CompareTarget::Version,
        1 => kv::CompareTarget::Create,
        2 => kv::CompareTarget::Mod,
        3 => kv::CompareTarget::Value,
        4 => kv::CompareTarget::Lease,
        n => {
            return Err(Error::InvalidArgument(format!(
                "invalid compare target {n}"
            )))
        }
    };
    let target_union = c.target_union.map(|u| match u {
        W::Version(v) => kv::TargetUnion::Version(v),
        W::CreateRevision(v) => kv::TargetUnion::CreateRevision(v),
        W::ModRevision(v) => kv::TargetUnion::ModRevision(v),
        W::Value(v) => kv::TargetUnion::Value(v),
        W::Lease(v) => kv::TargetUnion::Lease(v),
    });
    Ok(kv::Compare {
        result,
        target,
        key: c.key,
        range_end: c.range_end,
        target_union,
    })
}

fn request_op(op: pb::RequestOp) -> Result<kv::RequestOp, Error> {
    use pb::request_op::Request as R;
    match op.request {
        Some(R::RequestRange(r)) => Ok(kv::RequestOp::Range(range_request(r)?)),
        Some(R::RequestPut(r)) => Ok(kv::RequestOp::Put(put_request(r))),
        Some(R::RequestDeleteRange(r)) => Ok(kv::RequestOp::DeleteRange(delete_request(r))),
        Some(R::RequestTxn(t)) => Ok(kv::RequestOp::Txn(txn_request(t)?)),
        // etcd rejects an op with no request as a malformed txn.
        None => Err(Error::InvalidArgument(
            "etcdserver: request op is empty".into(),
        )),
    }
}

pub fn txn_request(t: pb::TxnRequest) -> Result<kv::TxnRequest, Error> {
    Ok(kv::TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare)
            .collect::<Result<_, _>>()?,
        success: t
            .success
            .into_iter()
            .map(request_op)
            .collect::<Result<_, _>>()?,
        failure: t
            .failure
            .into_iter()
            .map(request_op)
            .collect::<Result<_, _>>()?,
    })
}

pub fn key_value(kv: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// Nested responses carry only a revision in their header, as etcd's do.
fn nested_header(h: kv::ResponseHeader) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision: h.revision,
        ..Default::default()
    })
}

pub fn range_response(r: kv::RangeResponse, header: pb::ResponseHeader) -> pb::RangeResponse {
    pb::RangeResponse {
        header: Some(header),
        kvs: r.kvs.into_iter().map(key_value).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_response(r: kv::PutResponse, header: pb::ResponseHeader) -> pb::PutResponse {
    pb::PutResponse {
        header: Some(header),
        prev_kv: r.prev_kv.map(key_value),
    }
}

pub fn delete_response(
    r: kv::DeleteRangeResponse,
    header: pb::ResponseHeader,
) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: Some(header),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(key_value).collect(),
    }
}

fn response_op(op: kv::ResponseOp) -> pb::ResponseOp {
    use pb::response_op::Response as R;
    let response = match op {
        kv::ResponseOp::Range(r) => {
            let h = nested_header(r.header);
            R::ResponseRange(pb::RangeResponse {
                header: h,
                ..range_response(r, Default::default())
            })
        }
        kv::ResponseOp::Put(r) => {
            let h = nested_header(r.header);
            R::ResponsePut(pb::PutResponse {
                header: h,
                ..put_response(r, Default::default())
            })
        }
        kv::ResponseOp::DeleteRange(r) => {
            let h = nested_header(r.header);
            R::ResponseDeleteRange(pb::DeleteRangeResponse {
                header: h,
                ..delete_response(r, Default::default())
            })
        }
        kv::ResponseOp::Txn(t) => {
            let h = nested_header(t.header);
            R::ResponseTxn(pb::TxnResponse {
                header: h,
                ..txn_response(t, Default::default())
            })
        }
    };
    pb::ResponseOp {
        response: Some(response),
    }
}

pub fn txn_response(t: kv::TxnResponse, header: pb::ResponseHeader) -> pb::TxnResponse {
    pb::TxnResponse {
        header: Some(header),
        succeeded: t.succeeded,
        responses: t.responses.into_iter().map(response_op).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn invalid_sort_options_are_rejected_as_etcd_does() {
        let r = pb::RangeRequest {
            key: Bytes::from_static(b"a"),
            sort_order: 7,
            ..Default::default()
        };
        assert!(matches!(range_request(r), Err(Error::InvalidSortOption)));
        let r = pb::RangeRequest {
            key: Bytes::from_static(b"a"),
            sort_target: 9,
            ..Default::default()
        };
        assert!(matches!(range_request(r), Err(Error::InvalidSortOption)));
    }

    #[test]
    fn nested_txn_round_trips_through_the_engine_types() {
        let inner = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: 3,
                target: 3,
                key: Bytes::from_static(b"k"),
                target_union: Some(pb::compare::TargetUnion::Value(Bytes::from_static(b"v"))),
                ..Default::default()
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: Bytes::from_static(b"k"),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        let outer = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(inner)),
            }],
            ..Default::default()
        };
        let t = txn_request(outer).unwrap();
        match &t.success[0] {
            kv::RequestOp::Txn(n) => {
                assert_eq!(n.compare[0].result, kv::CompareResult::NotEqual);
                assert_eq!(n.compare[0].target, kv::CompareTarget::Value);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! Arbitrary bytes through the request decoding path: decode, convert, validate. Nothing may
    //! panic; every input either becomes a request or a typed error.
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use prost::Message;

    fn decode_all(data: &[u8]) {
        let b = Bytes::copy_from_slice(data);
        if let Ok(msgs) = crate::server::grpc::decode_messages(b.clone()) {
            for m in msgs {
                if let Ok(t) = pb::TxnRequest::decode(m.clone()) {
                    if let Ok(t) = txn_request(t) {
                        let _ = crate::mvcc::plan::validate_txn(&t, 128);
                    }
                }
                if let Ok(r) = pb::RangeRequest::decode(m) {
                    if let Ok(r) = range_request(r) {
                        let _ = crate::mvcc::plan::validate_range(&r);
                    }
                }
            }
        }
        if let Ok(t) = pb::TxnRequest::decode(b) {
            let _ = txn_request(t).map(|t| crate::mvcc::plan::validate_txn(&t, 128));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
            decode_all(&data);
        }

        #[test]
        fn mutated_valid_txns_never_panic(flips in prop::collection::vec((0usize..400, any::<u8>()), 0..8)) {
            let put = pb::RequestOp { request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: Bytes::from_static(b"key"), value: Bytes::from_static(b"value"), ..Default::default()
            })) };
            let nested = pb::TxnRequest { success: vec![put.clone()], ..Default::default() };
            let txn = pb::TxnRequest {
                compare: vec![pb::Compare { key: Bytes::from_static(b"key"), target: 3, ..Default::default() }],
                success: vec![put, pb::RequestOp { request: Some(pb::request_op::Request::RequestTxn(nested)) }],
                failure: vec![],
            };
            let mut bytes = crate::server::grpc::encode_message(&txn).to_vec();
            for (pos, val) in flips {
                if !bytes.is_empty() {
                    let i = pos % bytes.len();
                    bytes[i] = val;
                }
            }
            decode_all(&bytes);
        }
    }
}

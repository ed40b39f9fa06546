//! etcd's v3election service (`v3electionpb.Election`), as etcd's server runs it on top of its
//! own KV: a candidate's key `name/<lease in hex>` carries its value, the key created first under
//! `name/` is the leader, and a candidate waits like a lock waiter (see [`super::lock`]).
//!
//! Errors are etcd's: its election errors are plain Go errors, so clients see gRPC code Unknown
//! with the error text; store errors (an unknown lease, …) keep their etcd codes.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;

use super::convert::key_value;
use super::grpc::{self, Code, GrpcBody, Status};
use super::lock::{
    as_etcd, first_created, lease_key, prefix_of, range_at, session_lease, wait_deletes,
    AbandonGuard, KeyWatch,
};
use super::{check_space, enc, one, Ctx};
use crate::kv::{
    Compare, CompareResult, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use crate::mvcc::EventKind;
use crate::proto::v3electionpb as epb;

pub const OBSERVE: &str = "/v3electionpb.Election/Observe";
pub const CAMPAIGN: &str = "/v3electionpb.Election/Campaign";

fn not_leader() -> Status {
    Status::new(Code::Unknown, "election: not leader")
}

fn no_leader() -> Status {
    Status::new(Code::Unknown, "election: no leader")
}

fn missing_leader_key() -> Status {
    Status::new(Code::Unknown, "\"leader\" field must be provided")
}

/// The unary Election calls.
pub(super) async fn call(ctx: &Rc<Ctx>, path: &str, msgs: Vec<Bytes>) -> Result<Bytes, Status> {
    serve(ctx, path, msgs).await.map_err(|s| match s.code {
        // A request that could not be decoded never reached etcd's handler.
        Code::Internal | Code::Unimplemented => s,
        _ => as_etcd(s),
    })
}

async fn serve(ctx: &Rc<Ctx>, path: &str, msgs: Vec<Bytes>) -> Result<Bytes, Status> {
    match path {
        CAMPAIGN => {
            let req: epb::CampaignRequest = one(msgs)?;
            Ok(enc(&campaign(ctx, req).await?))
        }
        "/v3electionpb.Election/Proclaim" => {
            let req: epb::ProclaimRequest = one(msgs)?;
            let leader = req.leader.ok_or_else(missing_leader_key)?;
            // etcd opens a session on the leader's lease (granting one for lease 0) and puts the
            // value with that lease.
            let lease = session_lease(ctx, leader.lease).await?;
            let revision = proclaim(ctx, &leader.key, leader.rev, lease, req.value).await?;
            Ok(enc(&epb::ProclaimResponse {
                header: Some(ctx.header(revision)),
            }))
        }
        "/v3electionpb.Election/Leader" => {
            let req: epb::LeaderRequest = one(msgs)?;
            let resp = ctx.db.range(first_created(&prefix_of(&req.name))).await?;
            let kv = resp.kvs.into_iter().next().ok_or_else(no_leader)?;
            Ok(enc(&epb::LeaderResponse {
                header: Some(ctx.header(resp.header.revision)),
                kv: Some(key_value(kv)),
            }))
        }
        "/v3electionpb.Election/Resign" => {
            let req: epb::ResignRequest = one(msgs)?;
            let leader = req.leader.ok_or_else(missing_leader_key)?;
            // A stale leader key is not an error in etcd: the guarded delete just does nothing.
            let resp = ctx.db.txn(resign_txn(leader.key, leader.rev)).await?;
            Ok(enc(&epb::ResignResponse {
                header: Some(ctx.header(resp.header.revision)),
            }))
        }
        _ => Err(Status::unimplemented(path)),
    }
}

fn resign_txn(key: Bytes, rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare::create_revision(
            key.clone(),
            CompareResult::Equal,
            rev,
        )],
        success: vec![RequestOp::DeleteRange(DeleteRangeRequest::key(key))],
        failure: vec![],
    }
}

/// etcd's `Election.Campaign` run by the server. The header is the one of the campaign's first
/// txn, as etcd reports it.
async fn campaign(
    ctx: &Rc<Ctx>,
    req: epb::CampaignRequest,
) -> Result<epb::CampaignResponse, Status> {
    let lease = session_lease(ctx, req.lease).await?;
    check_space(ctx, super::quota::KV_OVERHEAD)?;
    let prefix = prefix_of(&req.name);
    let key = lease_key(&prefix, lease);
    let txn = TxnRequest {
        compare: vec![Compare::create_revision(
            key.clone(),
            CompareResult::Equal,
            0,
        )],
        success: vec![RequestOp::Put(PutRequest {
            lease,
            ..PutRequest::new(key.clone(), req.value.clone())
        })],
        failure: vec![RequestOp::Range(RangeRequest::key(key.clone()))],
    };
    let resp = ctx.db.txn(txn).await?;
    let mut rev = resp.header.revision;
    if !resp.succeeded {
        let kv = range_at(&resp, 0)?.kvs.first().cloned().ok_or_else(|| {
            Status::new(
                Code::Internal,
                "internal: candidate key vanished inside its txn",
            )
        })?;
        rev = kv.create_revision;
        if kv.value != req.value {
            if let Err(e) = proclaim(ctx, &key, rev, lease, req.value.clone()).await {
                ctx.db.txn(resign_txn(key.clone(), rev)).await?;
                return Err(e);
            }
        }
    }
    let guard = AbandonGuard::new(ctx, key.clone(), Some(rev));
    wait_deletes(ctx, &prefix, rev - 1).await?;
    guard.disarm();
    Ok(epb::CampaignResponse {
        header: Some(ctx.header(resp.header.revision)),
        leader: Some(epb::LeaderKey {
            name: req.name,
            key,
            rev,
            lease,
        }),
    })
}

/// Replaces the leader's value if `key` is still the one created at `rev`; returns the revision.
async fn proclaim(
    ctx: &Ctx,
    key: &Bytes,
    rev: i64,
    lease: i64,
    value: Bytes,
) -> Result<i64, Status> {
    check_space(ctx, super::quota::KV_OVERHEAD)?;
    let txn = TxnRequest {
        compare: vec![Compare::create_revision(
            key.clone(),
            CompareResult::Equal,
            rev,
        )],
        success: vec![RequestOp::Put(PutRequest {
            lease,
            ..PutRequest::new(key.clone(), value)
        })],
        failure: vec![],
    };
    let resp = ctx.db.txn(txn).await?;
    if !resp.succeeded {
        return Err(not_leader());
    }
    Ok(resp.header.revision)
}

/// Observe: streams the leader now and each time it changes (a new leader, or a new value
/// proclaimed), until the client goes away.
pub(super) fn observe(ctx: Rc<Ctx>, req: epb::LeaderRequest) -> http::Response<GrpcBody> {
    let (out, rx) = flume::bounded::<Frame<Bytes>>(16);
    spawn_observer(ctx, req, out, |m| Ok(grpc::encode_message(m)), true);
    grpc::stream(rx)
}

/// The JSON gateway's `POST /v3/election/observe`: `{"result": ...}` lines, one per leader
/// response, as etcd's gateway streams them; an error ends the stream with an `{"error": ...}`
/// line.
pub(super) fn observe_json(ctx: Rc<Ctx>, req: epb::LeaderRequest) -> http::Response<GrpcBody> {
    let (out, rx) = flume::bounded::<Frame<Bytes>>(16);
    spawn_observer(ctx, req, out, json_line, false);
    super::gateway::json_stream(rx)
}

fn json_line(m: &epb::LeaderResponse) -> Result<Bytes, Status> {
    let encoded = grpc::encode_message(m).slice(5..);
    let text = super::gateway::to_json("v3electionpb.LeaderResponse", encoded)?;
    Ok(Bytes::from(format!("{{\"result\":{text}}}\n")))
}

type Encoder = fn(&epb::LeaderResponse) -> Result<Bytes, Status>;

fn spawn_observer(
    ctx: Rc<Ctx>,
    req: epb::LeaderRequest,
    out: flume::Sender<Frame<Bytes>>,
    encode: Encoder,
    trailers: bool,
) {
    glommio::spawn_local(async move {
        let gone = {
            let out = out.clone();
            async move {
                // The hub only notices a vanished reader when it sends; check now and then so
                // an idle observer's watch does not outlive its client for long.
                while !out.is_disconnected() {
                    glommio::timer::sleep(Duration::from_millis(500)).await;
                }
                Ok(())
            }
        };
        let res = futures_lite::future::or(observe_loop(&ctx, &req.name, &out, encode), gone).await;
        if let Err(status) = res.map_err(as_etcd) {
            let last = if trailers {
                Frame::trailers(grpc::status_trailers(&status))
            } else {
                let line = serde_json::json!({ "error": {
                    "grpc_code": status.code as i32,
                    "message": status.message,
                }});
                Frame::data(Bytes::from(format!("{line}\n")))
            };
            let _ = out.send_async(last).await;
        }
    })
    .detach();
}

/// etcd's `Election.observe`. Returns Ok when the client went away.
async fn observe_loop(
    ctx: &Ctx,
    name: &[u8],
    out: &flume::Sender<Frame<Bytes>>,
    encode: Encoder,
) -> Result<(), Status> {
    let prefix = prefix_of(name);
    let send = |revision: i64, kv: KeyValue| {
        let msg = epb::LeaderResponse {
            header: Some(ctx.header(revision)),
            kv: Some(key_value(kv)),
        };
        let frame = encode(&msg).map(Frame::data);
        async move {
            match frame {
                Ok(f) => out.send_async(f).await.map_err(drop),
                Err(_) => Err(()),
            }
        }
    };
    loop {
        let resp = ctx.db.range(first_created(&prefix)).await?;
        let (revision, leader) = match resp.kvs.into_iter().next() {
            Some(kv) => (resp.header.revision, kv),
            None => {
                // No leader: the first put under the prefix makes one.
                let mut w = KeyWatch::start(
                    ctx,
                    prefix.clone(),
                    crate::kv::prefix_end(&prefix),
                    resp.header.revision,
                );
                loop {
                    let (_, events) = w.next().await?;
                    if let Some((_, kv)) = events.into_iter().find(|(k, _)| *k == EventKind::Put) {
                        break (kv.mod_revision, kv);
                    }
                }
            }
        };
        let key = leader.key.clone();
        if send(revision, leader).await.is_err() {
            return Ok(());
        }
        // Follow this leader's key until it is deleted: every put is a new proclamation.
        let mut w = KeyWatch::start(ctx, key, Bytes::new(), revision + 1);
        'follow: loop {
            let (wrev, events) = w.next().await?;
            for (kind, kv) in events {
                if kind == EventKind::Delete {
                    break 'follow;
                }
                if send(wrev, kv).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

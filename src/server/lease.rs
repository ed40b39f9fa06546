//! etcd's Lease service: the unary calls, and LeaseKeepAlive as a bidirectional stream that
//! answers each request message as soon as it arrives.

use std::rc::Rc;

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::grpc::{self, Code, GrpcBody, Status};
use super::{enc, forward, one, Ctx};
use crate::proto::etcdserverpb as pb;

pub const KEEP_ALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";

/// Served through the JSON gateway only (`/v3/lease/keepalive`): one keep-alive, unary.
pub const KEEP_ALIVE_ONCE: &str = "/spindle.gateway/LeaseKeepAliveOnce";

/// The unary Lease calls (and the gateway's single keep-alive).
pub(super) async fn call(ctx: &Rc<Ctx>, path: &str, msgs: Vec<Bytes>) -> Result<Bytes, Status> {
    let db = &ctx.db;
    match path {
        "/etcdserverpb.Lease/LeaseGrant" => {
            let req: pb::LeaseGrantRequest = one(msgs)?;
            // etcd refuses new leases while the NOSPACE alarm is raised.
            super::check_space(ctx, super::quota::LEASE_OVERHEAD)?;
            let resp = db.lease_grant(req.id, req.ttl).await?;
            Ok(enc(&pb::LeaseGrantResponse {
                header: Some(ctx.header(resp.header.revision)),
                id: resp.id,
                ttl: resp.ttl,
                error: String::new(),
            }))
        }
        "/etcdserverpb.Lease/LeaseRevoke" => {
            let req: pb::LeaseRevokeRequest = one(msgs)?;
            let resp = db.lease_revoke(req.id).await?;
            Ok(enc(&pb::LeaseRevokeResponse {
                header: Some(ctx.header(resp.header.revision)),
            }))
        }
        "/etcdserverpb.Lease/LeaseTimeToLive" => {
            let req: pb::LeaseTimeToLiveRequest = one(msgs)?;
            let resp = db.lease_time_to_live(req.id, req.keys).await?;
            Ok(enc(&pb::LeaseTimeToLiveResponse {
                header: Some(ctx.header(resp.header.revision)),
                id: resp.id,
                ttl: resp.ttl,
                granted_ttl: resp.granted_ttl,
                keys: resp.keys,
            }))
        }
        "/etcdserverpb.Lease/LeaseLeases" => {
            let _: pb::LeaseLeasesRequest = one(msgs)?;
            let resp = db.lease_leases();
            Ok(enc(&pb::LeaseLeasesResponse {
                header: Some(ctx.header(resp.header.revision)),
                leases: resp
                    .leases
                    .into_iter()
                    .map(|id| pb::LeaseStatus { id })
                    .collect(),
            }))
        }
        KEEP_ALIVE_ONCE => {
            let req: pb::LeaseKeepAliveRequest = one(msgs)?;
            Ok(enc(&keep_alive(ctx, req.id)))
        }
        _ => Err(Status::unimplemented(path)),
    }
}

fn keep_alive(ctx: &Ctx, id: i64) -> pb::LeaseKeepAliveResponse {
    let resp = ctx.db.lease_keep_alive(id);
    pb::LeaseKeepAliveResponse {
        header: Some(ctx.header(resp.header.revision)),
        id: resp.id,
        ttl: resp.ttl,
    }
}

/// LeaseKeepAlive: every request message gets one response (TTL 0 for an unknown lease, as etcd
/// answers); the stream ends with OK when the client closes its side.
pub(super) fn keep_alive_stream(ctx: Rc<Ctx>, body: Incoming) -> http::Response<GrpcBody> {
    let (tx, rx) = flume::unbounded::<Frame<Bytes>>();
    glommio::spawn_local(async move {
        let status = match pump(&ctx, body, &tx).await {
            Ok(()) => Status::new(Code::Ok, ""),
            Err(s) => s,
        };
        let _ = tx.send(Frame::trailers(grpc::status_trailers(&status)));
    })
    .detach();
    grpc::stream(rx)
}

async fn pump(
    ctx: &Ctx,
    mut body: Incoming,
    tx: &flume::Sender<Frame<Bytes>>,
) -> Result<(), Status> {
    let limit = ctx.cfg.max_request_bytes + super::GRPC_OVERHEAD_BYTES;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| Status::new(Code::Cancelled, format!("request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            if buf[0] != 0 {
                return Err(Status::new(
                    Code::Unimplemented,
                    "grpc: compressed messages are not supported",
                ));
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > limit {
                return Err(grpc::too_large(len, limit));
            }
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len).freeze();
            let resp = match super::remote_leader(ctx) {
                // Only the leader's table counts: a follower relays each renewal, one at a time,
                // as the gateway's single keep-alive.
                Some(to) => {
                    let out = forward::relay(&ctx.db, to, KEEP_ALIVE_ONCE, &[msg]).await?;
                    let out = forward::as_served_here(out, ctx.member_id, ctx.db.raft_term());
                    <pb::LeaseKeepAliveResponse as prost::Message>::decode(out).map_err(|e| {
                        Status::new(Code::Internal, format!("leader's keep-alive answer: {e}"))
                    })?
                }
                None => {
                    let req: pb::LeaseKeepAliveRequest = one(vec![msg])?;
                    keep_alive(ctx, req.id)
                }
            };
            if tx.send(Frame::data(grpc::encode_message(&resp))).is_err() {
                return Ok(()); // the client went away
            }
        }
    }
    Ok(())
}

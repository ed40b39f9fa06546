//! Followers forward what only the leader can do (writes, lease and lock/election calls, and
//! linearizable reads) to the member leading the cluster over the peer transport, and relay its
//! answer: clients may talk to any member, as they do with etcd. Each core's calls to the leader
//! leave in that core's peer frames, many clients' calls in one write (`db::relay`).
//!
//! A request is forwarded only when this member refused it before executing anything
//! (`etcdserver: not leader`), so a forwarded write never runs twice; the leader runs it as
//! [`Hop::Forwarded`], which it answers or refuses but never passes on.

use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use super::grpc::{decode_messages, Code, Status};
use super::{call_anywhere, Ctx, Hop};
use crate::db::{CallHandler, LocalDb, RelayError};

impl From<ForwardError> for Status {
    fn from(e: ForwardError) -> Status {
        match e {
            ForwardError::NotSent(s) | ForwardError::Sent(s) => s,
        }
    }
}

/// Why a forward failed: whether the leader may have seen the request decides whether another
/// leader may be asked.
#[derive(Debug)]
pub enum ForwardError {
    /// Nothing reached the leader (no connection): safe to send elsewhere.
    NotSent(Status),
    /// The leader answered with this error, or the call may have reached it.
    Sent(Status),
}

/// Calls that wait on the leader for as long as they take: nothing gives up on them early.
fn blocks(path: &str) -> bool {
    matches!(path, super::lock::LOCK | super::election::CAMPAIGN)
}

/// Sends the unary call `path` with `msgs` to member `to` and returns its one response message,
/// or the leader's error.
pub(super) async fn relay(
    db: &LocalDb,
    to: u64,
    path: &str,
    msgs: &[Bytes],
) -> Result<Bytes, ForwardError> {
    let mut body = BytesMut::with_capacity(msgs.iter().map(|m| m.len() + 5).sum());
    for m in msgs {
        body.put_u8(0);
        body.put_u32(m.len() as u32);
        body.put_slice(m);
    }
    match db.relay(to, path, body.freeze(), blocks(path)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err((code, message))) => Err(ForwardError::Sent(Status::new(
            Code::from_wire(code),
            message,
        ))),
        Err(RelayError::NotSent(e)) => Err(ForwardError::NotSent(e.into())),
        Err(RelayError::Lost(e)) => Err(ForwardError::Sent(e.into())),
    }
}

/// What runs, on the leader node, the calls other members relay to this core. Holds the
/// context weakly: the context owns the store that owns this handler.
pub(super) fn relayed_calls(ctx: &Rc<Ctx>) -> CallHandler {
    let weak: Weak<Ctx> = Rc::downgrade(ctx);
    Rc::new(move |path: String, body: Bytes| {
        let weak = weak.clone();
        Box::pin(async move {
            let refuse = |s: Status| Err((s.code as u32, s.message));
            let Some(ctx) = weak.upgrade() else {
                return refuse(crate::error::Error::Closed.into());
            };
            let _in_flight = super::InFlight::enter(&ctx.drain);
            if ctx.drain.draining.load(Ordering::Acquire) {
                return refuse(super::server_stopped());
            }
            let msgs = match decode_messages(body) {
                Ok(m) => m,
                Err(s) => return refuse(s),
            };
            match call_anywhere(&ctx, &path, msgs, Some(Instant::now()), Hop::Forwarded).await {
                Ok(resp) => Ok(resp),
                Err(s) => refuse(s),
            }
        })
    })
}

/// Gives a relayed answer this member's identity, as etcd fills every response header on the
/// member that serves the client: `member_id` and `raft_term` become this member's, the
/// revision stays the leader's. Every etcd response carries its header as field 1; an answer
/// without one, or one that does not parse, is relayed unchanged.
pub(super) fn as_served_here(resp: Bytes, member_id: u64, raft_term: u64) -> Bytes {
    let Some((field, start, end)) = header_field(&resp) else {
        return resp;
    };
    let Ok(mut h) =
        <crate::proto::etcdserverpb::ResponseHeader as prost::Message>::decode(&resp[start..end])
    else {
        return resp;
    };
    h.member_id = member_id;
    h.raft_term = raft_term;
    let mut out = BytesMut::with_capacity(resp.len() + 12);
    prost::encoding::message::encode(1, &h, &mut out);
    out.put_slice(&resp[..field]);
    out.put_slice(&resp[end..]);
    out.freeze()
}

/// Where the first top-level field 1 (length-delimited) of `msg` starts, and where its payload
/// starts and ends.
fn header_field(msg: &[u8]) -> Option<(usize, usize, usize)> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut buf = msg;
    while !buf.is_empty() {
        let field = msg.len() - buf.len();
        let (tag, wire) = decode_key(&mut buf).ok()?;
        if tag == 1 && wire == WireType::LengthDelimited {
            let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
            let start = msg.len() - buf.len();
            let end = start.checked_add(len).filter(|&e| e <= msg.len())?;
            return Some((field, start, end));
        }
        skip_field(wire, tag, &mut buf, DecodeContext::default()).ok()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb as pb;
    use prost::Message;

    #[test]
    fn relayed_headers_name_this_member_and_keep_the_rest() {
        let resp = pb::PutResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 7,
                member_id: 1,
                revision: 42,
                raft_term: 3,
            }),
            prev_kv: Some(crate::proto::mvccpb::KeyValue {
                key: b"k".to_vec().into(),
                value: vec![0x0a; 300].into(),
                ..Default::default()
            }),
        };
        let out = as_served_here(Bytes::from(resp.encode_to_vec()), 9, 4);
        let got = pb::PutResponse::decode(out).unwrap();
        let h = got.header.unwrap();
        assert_eq!(
            (h.cluster_id, h.member_id, h.revision, h.raft_term),
            (7, 9, 42, 4)
        );
        assert_eq!(got.prev_kv, resp.prev_kv);

        // A header after other fields, and no header at all.
        let mut late = pb::RangeResponse {
            count: 5,
            more: true,
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::message::encode(
            1,
            &pb::ResponseHeader {
                member_id: 1,
                revision: 8,
                ..Default::default()
            },
            &mut late,
        );
        let got = pb::RangeResponse::decode(as_served_here(Bytes::from(late), 9, 4)).unwrap();
        assert_eq!((got.count, got.more), (5, true));
        assert_eq!(got.header.map(|h| (h.member_id, h.revision)), Some((9, 8)));
        let bare = Bytes::from(
            pb::RangeResponse {
                count: 2,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(as_served_here(bare.clone(), 9, 4), bare);
        // Garbage is relayed as it came.
        let junk = Bytes::from_static(&[0x0a, 0xff, 0xff]);
        assert_eq!(as_served_here(junk.clone(), 9, 4), junk);
    }
}

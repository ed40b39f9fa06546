//! Followers forward what only the leader can do (writes, lease and lock/election calls) to
//! the member leading the cluster, over one HTTP/2 connection per core and leader, and relay
//! its answer: clients may talk to any member, as they do with etcd.
//!
//! A request is forwarded only when this member refused it before executing anything
//! (`etcdserver: not leader`), so a forwarded write never runs twice.

use std::cell::RefCell;
use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;

use super::grpc::{decode_messages, status_of, Code, Status};
use crate::runtime::io::{Conn, LocalExec};

/// This core's connections to leaders, by authority.
#[derive(Default)]
pub struct Forwarder {
    conns: RefCell<HashMap<String, SendRequest<Full<Bytes>>>>,
}

/// Marks a call one member forwarded to another (see `server::Hop`).
pub(super) const FORWARDED_HEADER: &str = "spindle-forwarded";

fn unavailable(what: impl std::fmt::Display) -> Status {
    Status::new(
        Code::Unavailable,
        format!("etcdserver: leader unreachable: {what}"),
    )
}

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
    /// The leader answered with this error, or the exchange broke after sending.
    Sent(Status),
}

impl Forwarder {
    async fn connection(&self, authority: &str) -> Result<SendRequest<Full<Bytes>>, Status> {
        if let Some(c) = self.conns.borrow().get(authority) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let stream = glommio::net::TcpStream::connect(authority)
            .await
            .map_err(unavailable)?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http2::Builder::new(LocalExec)
            .handshake(Conn::new(stream))
            .await
            .map_err(unavailable)?;
        glommio::spawn_local(async move {
            let _ = conn.await;
        })
        .detach();
        self.conns
            .borrow_mut()
            .insert(authority.to_string(), send.clone());
        Ok(send)
    }

    /// Sends the unary call `path` with `msgs` to `leader_url` and returns its one response
    /// message, or the leader's error.
    pub async fn unary(
        &self,
        leader_url: &str,
        path: &str,
        msgs: &[Bytes],
    ) -> Result<Bytes, ForwardError> {
        use ForwardError::{NotSent, Sent};
        let authority = leader_url
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut body = BytesMut::new();
        for m in msgs {
            body.put_u8(0);
            body.put_u32(m.len() as u32);
            body.put_slice(m);
        }
        let uri: Uri = format!("http://{authority}{path}")
            .parse()
            .map_err(|e| Sent(Status::new(Code::Internal, format!("bad leader URL: {e}"))))?;
        let req = Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(FORWARDED_HEADER, "1")
            .body(Full::new(body.freeze()))
            .map_err(|e| Sent(Status::new(Code::Internal, e.to_string())))?;
        let mut send = self.connection(authority).await.map_err(NotSent)?;
        if let Err(e) = send.ready().await {
            self.conns.borrow_mut().remove(authority);
            return Err(NotSent(unavailable(e)));
        }
        let resp = match send.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.conns.borrow_mut().remove(authority);
                return Err(Sent(unavailable(e)));
            }
        };
        if let Some(status) = status_of(resp.headers()) {
            return Err(Sent(status));
        }
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Sent(unavailable(e)))?;
        if let Some(status) = collected.trailers().and_then(status_of) {
            return Err(Sent(status));
        }
        decode_messages(collected.to_bytes())
            .map_err(Sent)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Sent(Status::new(
                    Code::Internal,
                    "empty response from the leader",
                ))
            })
    }
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

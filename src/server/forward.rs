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

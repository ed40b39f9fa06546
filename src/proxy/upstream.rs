//! The proxy's side toward the cluster: one HTTP/2 connection to one of the `--endpoints` at a
//! time (plain, or TLS with `--cert`/`--key`/`--cacert`), replaced by a connection to the next
//! endpoint when it breaks. Calls carry raw gRPC messages; what they mean is the caller's business.
//!
//! A call that never reached an endpoint (no connection, or the connection was already gone) is
//! sent to the next one. A call lost on a connection that broke while it was in flight is sent
//! again only if repeating it is harmless (reads); otherwise the client gets `Unavailable`, as
//! etcd's client does for writes.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use glommio::net::TcpStream;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::client::conn::http2::SendRequest;

use crate::server::grpc::{
    call_request, dial_h2, status_of, Code, FrameStream, ReqBody, ResponseFuture, ResponseReader,
    Status,
};
pub use crate::server::grpc::{frame, next_message};

/// How long connecting to one endpoint may take before the next is tried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Request headers passed on from the client (its auth token).
pub type Headers = Vec<(http::HeaderName, http::HeaderValue)>;

/// One endpoint of `--endpoints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    pub tls: bool,
}

impl Endpoint {
    /// `host:port`, `http://host:port` or `https://host:port`.
    pub fn parse(s: &str, tls_default: bool) -> Endpoint {
        let s = s.trim().trim_end_matches('/');
        if let Some(a) = s.strip_prefix("https://") {
            Endpoint {
                addr: a.to_string(),
                tls: true,
            }
        } else if let Some(a) = s.strip_prefix("http://") {
            Endpoint {
                addr: a.to_string(),
                tls: false,
            }
        } else {
            Endpoint {
                addr: s.to_string(),
                tls: tls_default,
            }
        }
    }
}

/// Why a call failed.
enum CallError {
    /// Nothing reached the endpoint.
    NotSent(String),
    /// The connection broke while the call was out: it may have run.
    Lost(String),
    /// The endpoint answered with an error.
    Status(Status),
}

/// The connections toward the cluster.
pub struct Upstream {
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<rustls::ClientConfig>>,
    current: RefCell<Option<(usize, SendRequest<ReqBody>)>>,
    /// The endpoint to try first when a new connection is needed.
    next: Cell<usize>,
}

impl Upstream {
    pub fn new(endpoints: Vec<Endpoint>, tls: Option<Arc<rustls::ClientConfig>>) -> Upstream {
        Upstream {
            endpoints,
            tls,
            current: RefCell::new(None),
            next: Cell::new(0),
        }
    }

    /// The live connection, or a new one to the first endpoint (from the one after the last
    /// that failed) that accepts.
    async fn connection(&self) -> Result<(usize, SendRequest<ReqBody>), Status> {
        if let Some((i, send)) = self.current.borrow().as_ref() {
            if !send.is_closed() {
                return Ok((*i, send.clone()));
            }
        }
        let n = self.endpoints.len();
        let mut last = String::from("no endpoints");
        for k in 0..n {
            let i = (self.next.get() + k) % n;
            match self.dial(&self.endpoints[i]).await {
                Ok(send) => {
                    tracing::info!(endpoint = %self.endpoints[i].addr, "connected upstream");
                    *self.current.borrow_mut() = Some((i, send.clone()));
                    self.next.set(i);
                    return Ok((i, send));
                }
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoints[i].addr, error = %e, "endpoint unreachable");
                    last = e;
                }
            }
        }
        Err(Status::new(
            Code::Unavailable,
            format!("no endpoint is reachable: {last}"),
        ))
    }

    /// Forgets the connection to endpoint `i` (broken): the next call tries the one after it.
    fn failed(&self, i: usize) {
        let mut cur = self.current.borrow_mut();
        if cur.as_ref().is_some_and(|(c, _)| *c == i) {
            *cur = None;
            self.next.set((i + 1) % self.endpoints.len().max(1));
        }
    }

    async fn dial(&self, ep: &Endpoint) -> Result<SendRequest<ReqBody>, String> {
        let addr = ep.addr.clone();
        let connect = async move { Ok(TcpStream::connect(addr.as_str()).await) };
        let stream = match glommio::timer::timeout(DIAL_TIMEOUT, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect {}: {e}", ep.addr)),
            Err(_) => return Err(format!("connect {}: timed out", ep.addr)),
        };
        let tls = match (ep.tls, &self.tls) {
            (false, _) => None,
            (true, None) => return Err(format!("{}: https endpoint without TLS setup", ep.addr)),
            (true, Some(cfg)) => Some(cfg),
        };
        let send = dial_h2(stream, &ep.addr, tls).await?;
        Ok(send)
    }

    fn request(
        &self,
        i: usize,
        path: &str,
        body: ReqBody,
        headers: &Headers,
    ) -> Result<Request<ReqBody>, Status> {
        let mut builder = call_request(&self.endpoints[i].addr, path)?;
        for (k, v) in headers {
            builder = builder.header(k, v);
        }
        builder
            .body(body)
            .map_err(|e| Status::new(Code::Internal, e.to_string()))
    }

    /// One unary call with the encoded request `msg`; the encoded response.
    pub async fn unary(&self, path: &str, msg: Bytes, headers: &Headers) -> Result<Bytes, Status> {
        let mut last = String::new();
        for _ in 0..=self.endpoints.len() {
            let (i, send) = self.connection().await?;
            match self.unary_on(i, send, path, msg.clone(), headers).await {
                Ok(b) => return Ok(b),
                Err(CallError::Status(s)) => return Err(s),
                Err(CallError::NotSent(e)) => {
                    self.failed(i);
                    last = e;
                }
                Err(CallError::Lost(e)) => {
                    self.failed(i);
                    if !repeatable(path) {
                        return Err(Status::new(Code::Unavailable, e));
                    }
                    last = e;
                }
            }
        }
        Err(Status::new(Code::Unavailable, last))
    }

    async fn unary_on(
        &self,
        i: usize,
        mut send: SendRequest<ReqBody>,
        path: &str,
        msg: Bytes,
        headers: &Headers,
    ) -> Result<Bytes, CallError> {
        let req = self
            .request(i, path, Either::Left(Full::new(frame(&msg))), headers)
            .map_err(CallError::Status)?;
        send.ready()
            .await
            .map_err(|e| CallError::NotSent(format!("connection: {e}")))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| CallError::Lost(format!("request: {e}")))?;
        if let Some(status) = status_of(resp.headers()) {
            return Err(CallError::Status(status));
        }
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CallError::Lost(format!("response: {e}")))?;
        if let Some(status) = collected.trailers().and_then(status_of) {
            return Err(CallError::Status(status));
        }
        let mut body = collected.to_bytes();
        next_message(&mut body)
            .map_err(CallError::Status)?
            .ok_or_else(|| CallError::Status(Status::new(Code::Internal, "empty response")))
    }

    /// Opens a streaming call on a live connection; messages sent on it go out as they come.
    pub async fn stream(&self, path: &str, headers: &Headers) -> Result<RawStream, Status> {
        let mut last = String::new();
        for _ in 0..=self.endpoints.len() {
            let (i, mut send) = self.connection().await?;
            let (tx, rx) = flume::unbounded::<Bytes>();
            let frames: FrameStream =
                futures_lite::StreamExt::map(rx.into_stream(), |b| Ok(Frame::data(b)));
            let req = self.request(i, path, Either::Right(StreamBody::new(frames)), headers)?;
            if let Err(e) = send.ready().await {
                self.failed(i);
                last = format!("connection: {e}");
                continue;
            }
            // Servers may hold the response headers until the first message: await them lazily.
            let resp: ResponseFuture = Box::pin(send.send_request(req));
            return Ok(RawStream {
                endpoint: i,
                tx: Some(tx),
                answers: ResponseReader::new(resp),
            });
        }
        Err(Status::new(Code::Unavailable, last))
    }

    /// The stream's endpoint broke: later calls go elsewhere.
    pub fn stream_failed(&self, s: &RawStream) {
        self.failed(s.endpoint);
    }
}

/// Calls that may run twice without harm.
fn repeatable(path: &str) -> bool {
    matches!(
        path,
        "/etcdserverpb.KV/Range"
            | "/etcdserverpb.Lease/LeaseTimeToLive"
            | "/etcdserverpb.Lease/LeaseLeases"
            | "/etcdserverpb.Cluster/MemberList"
            | "/etcdserverpb.Maintenance/Status"
            | "/etcdserverpb.Maintenance/Hash"
            | "/etcdserverpb.Maintenance/HashKV"
            | "/v3electionpb.Election/Leader"
    )
}

/// An open streaming call toward the cluster.
pub struct RawStream {
    endpoint: usize,
    tx: Option<flume::Sender<Bytes>>,
    answers: ResponseReader,
}

impl RawStream {
    /// Sends the encoded message `msg`.
    pub fn send(&self, msg: &[u8]) -> Result<(), Status> {
        self.tx
            .as_ref()
            .ok_or_else(|| Status::new(Code::Internal, "send side closed"))?
            .send(frame(msg))
            .map_err(|_| Status::new(Code::Unavailable, "stream ended"))
    }

    /// Where the stream's requests go, already framed (see [`frame`]); the stream's request
    /// side stays open while a clone lives.
    pub fn sender(&self) -> Option<flume::Sender<Bytes>> {
        self.tx.clone()
    }

    /// No more requests; answers keep coming.
    pub fn close_send(&mut self) {
        self.tx = None;
    }

    /// The next encoded response; `Ok(None)` when the call ended with OK. A broken connection
    /// is `Unavailable`.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, Status> {
        self.answers.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_and_without_scheme() {
        assert_eq!(
            Endpoint::parse("127.0.0.1:2379", false),
            Endpoint {
                addr: "127.0.0.1:2379".into(),
                tls: false
            }
        );
        assert!(Endpoint::parse("https://h:1/", false).tls);
        assert!(!Endpoint::parse("http://h:1", true).tls);
        assert!(Endpoint::parse("h:1", true).tls);
        // The certificate is checked against the host, without the port.
        let ep = Endpoint::parse("https://h:1", false);
        assert_eq!(
            crate::tls::server_name(&ep.addr).unwrap(),
            rustls_pki_types::ServerName::try_from("h").unwrap()
        );
    }

    #[test]
    fn messages_are_cut_at_their_length_prefix() {
        let mut buf = bytes::BytesMut::new();
        buf.extend_from_slice(&frame(b"abc"));
        buf.extend_from_slice(&frame(b"")[..3]);
        assert_eq!(
            next_message(&mut buf).unwrap(),
            Some(Bytes::from_static(b"abc"))
        );
        assert_eq!(next_message(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[0, 0]);
        assert_eq!(next_message(&mut buf).unwrap(), Some(Bytes::new()));
        let mut compressed = Bytes::from_static(&[1, 0, 0, 0, 0]);
        assert!(next_message(&mut compressed).is_err());
    }
}

//! gRPC over HTTP/2: message framing, status codes, and the response body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use http_body::Frame;

use crate::error::Error;

/// gRPC status codes (the subset etcd uses, by their wire numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The code with wire number `n` (a code etcd never sends reads as `Unknown`).
    pub fn from_wire(n: u32) -> Code {
        [
            Code::Ok,
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ]
        .into_iter()
        .find(|&c| c as u32 == n)
        .unwrap_or(Code::Unknown)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    pub fn unimplemented(path: &str) -> Status {
        Status::new(Code::Unimplemented, format!("unknown method {path}"))
    }
}

/// The gRPC status etcd sends for each engine error (clients match on code and message).
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::Compacted | Error::FutureRevision | Error::LeaseTtlTooLarge => Code::OutOfRange,
            Error::LeaseNotFound | Error::MemberNotFound => Code::NotFound,
            Error::LeaseExists
            | Error::BadLeaderTransferee
            | Error::MemberExists
            | Error::PeerUrlExists
            | Error::NotEnoughStartedMembers
            | Error::MemberNotLearner
            | Error::LearnerNotReady
            | Error::TooManyLearners => Code::FailedPrecondition,
            Error::KeyNotFound
            | Error::DuplicateKey
            | Error::TooManyOps
            | Error::EmptyKey
            | Error::ValueProvided
            | Error::LeaseProvided
            | Error::InvalidSortOption
            | Error::RequestTooLarge
            | Error::MemberBadUrls
            | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::DiskFull { .. } => {
                return Status::new(
                    Code::ResourceExhausted,
                    "etcdserver: mvcc: database space exceeded",
                )
            }
            Error::Closed => return Status::new(Code::Unavailable, "etcdserver: server stopped"),
            Error::NoLeader
            | Error::NotLeader
            | Error::LeaderChanged
            | Error::PartInDoubt
            | Error::Timeout
            | Error::Unhealthy => Code::Unavailable,
            Error::Io { .. }
            | Error::Corrupt { .. }
            | Error::DataDir { .. }
            | Error::ShardFailed { .. }
            | Error::Executor(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// A message over the receive limit, with grpc-go's wording (what etcd's clients see).
pub fn too_large(len: usize, limit: usize) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("grpc: received message larger than max ({len} vs. {limit})"),
    )
}

/// Splits a request body into its length-prefixed messages.
pub fn decode_messages(mut body: Bytes) -> Result<Vec<Bytes>, Status> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if body.len() < 5 {
            return Err(Status::new(Code::Internal, "grpc: truncated message frame"));
        }
        let compressed = body.get_u8();
        let len = body.get_u32() as usize;
        if compressed != 0 {
            return Err(Status::new(
                Code::Unimplemented,
                "grpc: compressed messages are not supported",
            ));
        }
        if body.len() < len {
            return Err(Status::new(Code::Internal, "grpc: truncated message"));
        }
        out.push(body.split_to(len));
    }
    Ok(out)
}

pub fn encode_message(msg: &impl prost::Message) -> Bytes {
    encode_message_then(msg, &[])
}

/// One gRPC-framed message whose encoding is `msg`'s followed by `rest`, fields already encoded
/// (protobuf concatenates: the watch service appends events encoded once for many watchers).
pub fn encode_message_then(msg: &impl prost::Message, rest: &[u8]) -> Bytes {
    let len = msg.encoded_len() + rest.len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode(&mut buf).expect("BytesMut grows as needed");
    buf.extend_from_slice(rest);
    buf.freeze()
}

fn percent_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn status_trailers(status: &Status) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(status.code as u16));
    if !status.message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&status.message)) {
            h.insert("grpc-message", v);
        }
    }
    h
}

/// A gRPC response body: queued messages, then the status trailers; or messages from a stream.
pub enum GrpcBody {
    Frames {
        data: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Stream(Pin<Box<flume::r#async::RecvStream<'static, Frame<Bytes>>>>),
    Plain(Option<Bytes>),
}

impl http_body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            GrpcBody::Frames { data, trailers } => {
                if let Some(d) = data.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            GrpcBody::Stream(s) => {
                use futures_lite::Stream;
                s.as_mut().poll_next(cx).map(|f| f.map(Ok))
            }
            GrpcBody::Plain(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    /// An empty body ends the stream with the headers, which makes an error response
    /// "trailers-only" as gRPC clients expect.
    fn is_end_stream(&self) -> bool {
        match self {
            GrpcBody::Frames { data, trailers } => data.is_empty() && trailers.is_none(),
            GrpcBody::Stream(_) => false,
            GrpcBody::Plain(b) => b.is_none(),
        }
    }
}

fn grpc_response(body: GrpcBody) -> Response<GrpcBody> {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

/// A unary reply: one already encoded message and an OK status.
pub fn ok_bytes(msg: Bytes) -> Response<GrpcBody> {
    let mut framed = BytesMut::with_capacity(5 + msg.len());
    framed.put_u8(0);
    framed.put_u32(msg.len() as u32);
    framed.extend_from_slice(&msg);
    grpc_response(GrpcBody::Frames {
        data: VecDeque::from([framed.freeze()]),
        trailers: Some(status_trailers(&Status::new(Code::Ok, ""))),
    })
}

/// A failed call: a trailers-only response carrying the status in the headers.
pub fn error(status: &Status) -> Response<GrpcBody> {
    let mut r = grpc_response(GrpcBody::Frames {
        data: VecDeque::new(),
        trailers: None,
    });
    r.headers_mut().extend(status_trailers(status));
    r
}

/// A server-streaming reply fed by `rx`; the sender ends it with a trailers frame.
pub fn stream(rx: flume::Receiver<Frame<Bytes>>) -> Response<GrpcBody> {
    grpc_response(GrpcBody::Stream(Box::pin(rx.into_stream())))
}

/// Whether a request is a gRPC call (its content type), rather than plain HTTP.
pub fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The gRPC status in a header or trailer map, if it is an error.
pub fn status_of(h: &http::HeaderMap) -> Option<Status> {
    let code: u16 = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if code == 0 {
        return None;
    }
    let message = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let code = match code {
        1 => Code::Cancelled,
        3 => Code::InvalidArgument,
        5 => Code::NotFound,
        8 => Code::ResourceExhausted,
        9 => Code::FailedPrecondition,
        11 => Code::OutOfRange,
        12 => Code::Unimplemented,
        14 => Code::Unavailable,
        13 => Code::Internal,
        15 => Code::DataLoss,
        _ => Code::Unknown,
    };
    Some(Status::new(code, message))
}

/// A message with its gRPC length prefix.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The next whole message at the front of `buf`, if all of it is there.
pub fn next_message(buf: &mut impl MessageBuf) -> Result<Option<Bytes>, Status> {
    if buf.available() < 5 {
        return Ok(None);
    }
    let head = buf.head();
    if head[0] != 0 {
        return Err(Status::new(
            Code::Unimplemented,
            "grpc: compressed messages are not supported",
        ));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if buf.available() < 5 + len {
        return Ok(None);
    }
    Ok(Some(buf.take(len)))
}

/// What [`next_message`] reads from.
pub trait MessageBuf {
    /// Bytes held.
    fn available(&self) -> usize;
    fn head(&self) -> [u8; 5];
    /// Drops the prefix and takes the `len` message bytes after it.
    fn take(&mut self, len: usize) -> Bytes;
}

impl MessageBuf for Bytes {
    fn available(&self) -> usize {
        Bytes::len(self)
    }
    fn head(&self) -> [u8; 5] {
        [self[0], self[1], self[2], self[3], self[4]]
    }
    fn take(&mut self, len: usize) -> Bytes {
        self.advance(5);
        self.split_to(len)
    }
}

impl MessageBuf for BytesMut {
    fn available(&self) -> usize {
        BytesMut::len(self)
    }
    fn head(&self) -> [u8; 5] {
        [self[0], self[1], self[2], self[3], self[4]]
    }
    fn take(&mut self, len: usize) -> Bytes {
        self.advance(5);
        self.split_to(len).freeze()
    }
}

/// A client call's answers as they arrive: the response head (its status, if it is a
/// Trailers-Only answer), then length-prefixed messages from the body, then the status in the
/// trailers. Shared by the load generator's client and the gRPC proxy's upstream calls.
pub struct ResponseReader {
    resp: Option<ResponseFuture>,
    body: Option<hyper::body::Incoming>,
    buf: BytesMut,
    /// How the call failed: every later read answers the same (not a clean end).
    failed: Option<Status>,
}

/// A response head still to come (servers may hold it until their first message).
pub type ResponseFuture = Pin<
    Box<dyn std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>>,
>;

impl ResponseReader {
    pub fn new(resp: ResponseFuture) -> ResponseReader {
        ResponseReader {
            resp: Some(resp),
            body: None,
            buf: BytesMut::new(),
            failed: None,
        }
    }

    /// The next message's bytes; `Ok(None)` when the call ended with OK. A broken connection
    /// is `Unavailable`. Cancel-safe: a call dropped while it waits (for the head or a frame)
    /// loses nothing, so callers may race it against a timer.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        if let Some(status) = &self.failed {
            return Err(status.clone());
        }
        let read = self.read().await;
        if let Err(status) = &read {
            self.failed = Some(status.clone());
        }
        read
    }

    async fn read(&mut self) -> Result<Option<Bytes>, Status> {
        use http_body_util::BodyExt;
        if let Some(fut) = self.resp.as_mut() {
            // The head's future stays in `resp` until it is ready: dropping this call while
            // the head is awaited must not lose it (the stream would then look ended).
            let resp = fut.await;
            self.resp = None;
            let resp = resp.map_err(|e| Status::new(Code::Unavailable, format!("request: {e}")))?;
            if let Some(status) = status_of(resp.headers()) {
                return Err(status);
            }
            self.body = Some(resp.into_body());
        }
        loop {
            if let Some(m) = next_message(&mut self.buf)? {
                return Ok(Some(m));
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            match body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(Status::new(Code::Unavailable, format!("response: {e}")))
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => self.buf.extend_from_slice(&d),
                    Err(frame) => {
                        if let Some(status) = frame.trailers_ref().and_then(status_of) {
                            return Err(status);
                        }
                    }
                },
            }
        }
    }
}

/// A client call's request body: one message, or messages as a stream sends them.
pub type ReqBody =
    http_body_util::Either<http_body_util::Full<Bytes>, http_body_util::StreamBody<FrameStream>>;
/// The frames of a streaming call's requests, as they are sent.
pub type FrameStream = futures_lite::stream::Map<
    flume::r#async::RecvStream<'static, Bytes>,
    fn(Bytes) -> Result<Frame<Bytes>, Infallible>,
>;

/// The start of a gRPC call to `authority` (`host:port`): a POST of `path` with gRPC's
/// content type and `te: trailers`; the caller adds its own headers and the body. Shared by the
/// load generator's client and the gRPC proxy's upstream calls.
pub fn call_request(authority: &str, path: &str) -> Result<http::request::Builder, Status> {
    let uri: http::Uri = format!("http://{authority}{path}")
        .parse()
        .map_err(|e| Status::new(Code::Internal, format!("bad URI: {e}")))?;
    Ok(http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers"))
}

/// The client side of an HTTP/2 connection over `stream` to `authority` (`host:port`), through
/// TLS when `tls` is given; its connection task runs on this executor. Shared by the load
/// generator's client and the gRPC proxy's upstream connections.
pub async fn dial_h2(
    stream: glommio::net::TcpStream,
    authority: &str,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> Result<hyper::client::conn::http2::SendRequest<ReqBody>, String> {
    use crate::runtime::io::{Conn, LocalExec};
    let _ = stream.set_nodelay(true);
    let io = match tls {
        None => Conn::new(stream),
        Some(cfg) => {
            let name = crate::tls::server_name(authority)?;
            let tls = futures_rustls::TlsConnector::from(cfg.clone())
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake with {authority}: {e}"))?;
            Conn::client_tls(tls)
        }
    };
    let (send, conn) = hyper::client::conn::http2::Builder::new(LocalExec)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {authority}: {e}"))?;
    glommio::spawn_local(async move {
        let _ = conn.await;
    })
    .detach();
    Ok(send)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::PutRequest;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let m = PutRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        };
        let mut two = BytesMut::new();
        two.extend_from_slice(&encode_message(&m));
        two.extend_from_slice(&encode_message(&m));
        let msgs = decode_messages(two.freeze()).unwrap();
        assert_eq!(msgs.len(), 2);
        let back: PutRequest = prost::Message::decode(msgs[0].clone()).unwrap();
        assert_eq!(back, m);
        assert!(decode_messages(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
        assert!(decode_messages(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
        assert!(decode_messages(Bytes::from_static(&[0, 0])).is_err());
    }

    /// A call to `next` dropped while the response head is still on its way (a caller racing
    /// it against a timer) must not lose the head: the next call gets the message. A call that
    /// failed answers with its error again, not with a clean end.
    #[test]
    fn a_read_cancelled_before_the_head_loses_nothing_and_a_failed_call_stays_failed() {
        use crate::runtime::io::{Conn, LocalExec};
        use std::time::Duration;
        let ex = crate::runtime::builder(glommio::Placement::Unbound, "grpc-test")
            .make()
            .expect("executor");
        ex.run(async {
            let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("address");
            glommio::spawn_local(async move {
                let stream = listener.accept().await.expect("accept");
                let service = hyper::service::service_fn(|req: http::Request<_>| async move {
                    if req.uri().path() == "/test/Fail" {
                        let refused = Status::new(Code::NotFound, "no such thing");
                        return Ok::<_, Infallible>(error(&refused));
                    }
                    // The head comes only with the first message, as a watch's does.
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    let late = PutRequest {
                        key: Bytes::from_static(b"late"),
                        ..Default::default()
                    };
                    Ok::<_, Infallible>(ok_bytes(prost::Message::encode_to_vec(&late).into()))
                });
                let _ = hyper::server::conn::http2::Builder::new(LocalExec)
                    .serve_connection(Conn::new(stream), service)
                    .await;
            })
            .detach();
            let stream = glommio::net::TcpStream::connect(addr)
                .await
                .expect("connect");
            let mut send = dial_h2(stream, &addr.to_string(), None)
                .await
                .expect("dial");
            let mut call = |path: &str| {
                let request = call_request(&addr.to_string(), path)
                    .expect("request")
                    .body(http_body_util::Either::Left(http_body_util::Full::new(
                        Bytes::new(),
                    )))
                    .expect("request body");
                ResponseReader::new(Box::pin(send.send_request(request)))
            };
            let mut reader = call("/test/Call");
            let early = futures_lite::future::or(async { Some(reader.next().await) }, async {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                None
            })
            .await;
            assert!(early.is_none(), "the head came before the timer");
            let msg = reader.next().await.expect("a message").expect("not ended");
            let back: PutRequest = prost::Message::decode(msg).expect("decodes");
            assert_eq!(back.key, Bytes::from_static(b"late"));
            assert_eq!(reader.next().await.expect("ends with OK"), None);
            // A failed call keeps answering with its error, never with a clean end.
            let mut failed = call("/test/Fail");
            for _ in 0..2 {
                let status = failed.next().await.expect_err("the call failed");
                assert_eq!(
                    (status.code, status.message.as_str()),
                    (Code::NotFound, "no such thing")
                );
            }
        });
    }

    #[test]
    fn error_messages_are_percent_encoded() {
        let t = status_trailers(&Status::new(Code::InvalidArgument, "a%b\nc"));
        assert_eq!(t["grpc-message"], "a%25b%0Ac");
        assert_eq!(t["grpc-status"], "3");
    }
}

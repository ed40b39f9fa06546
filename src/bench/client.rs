//! A minimal etcd gRPC client on glommio: HTTP/2 via hyper on the same I/O glue as the server, so
//! the load generator runs thread-per-core too and talks to spindle and etcd alike.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::client::conn::http2::SendRequest;

use crate::server::grpc::{
    call_request, decode_messages, dial_h2, encode_message, status_of, Code, FrameStream, ReqBody,
    ResponseFuture, ResponseReader, Status,
};

/// One HTTP/2 connection; cheap to clone, clones multiplex streams over it.
#[derive(Clone)]
pub struct Client {
    send: SendRequest<ReqBody>,
    authority: String,
    /// An auth token sent as etcd's `token` metadata on every call (see [`Client::login`]).
    token: Option<http::HeaderValue>,
}

impl Client {
    /// Connects to `host:port` or `http://host:port`.
    pub async fn connect(endpoint: &str) -> Result<Client, String> {
        Client::connect_with(endpoint, None).await
    }

    /// Also `https://host:port`, given `tls` (the dialer configuration,
    /// [`crate::tls::dial_config`]).
    pub async fn connect_with(
        endpoint: &str,
        tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Client, String> {
        let secure = endpoint.starts_with("https://");
        let authority = endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let stream = glommio::net::TcpStream::connect(authority.as_str())
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let tls = match (secure, tls) {
            (false, _) => None,
            (true, None) => return Err(format!("{endpoint}: https:// needs TLS settings")),
            (true, Some(cfg)) => Some(cfg),
        };
        let send = dial_h2(stream, &authority, tls).await?;
        Ok(Client {
            send,
            authority,
            token: None,
        })
    }

    /// Authenticates as `user` with `password` (etcd's Auth/Authenticate) and sends the token
    /// with every later call on this connection and its clones.
    pub async fn login(&mut self, user: &str, password: &str) -> Result<(), Status> {
        let resp: crate::proto::etcdserverpb::AuthenticateResponse = self
            .unary(
                "/etcdserverpb.Auth/Authenticate",
                &crate::proto::etcdserverpb::AuthenticateRequest {
                    name: user.into(),
                    password: password.into(),
                },
            )
            .await?;
        let token = http::HeaderValue::from_str(&resp.token)
            .map_err(|e| Status::new(Code::Internal, format!("token is not a header: {e}")))?;
        self.token = Some(token);
        Ok(())
    }

    /// One unary call.
    pub async fn unary<Req, Resp>(&mut self, path: &str, req: &Req) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        self.unary_with(path, req, &[]).await
    }

    /// One unary call with extra request headers.
    pub async fn unary_with<Req, Resp>(
        &mut self,
        path: &str,
        req: &Req,
        headers: &[(&str, &str)],
    ) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let mut builder = call_request(&self.authority, path)?;
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        if let Some(t) = &self.token {
            builder = builder.header("token", t.clone());
        }
        let request = builder
            .body(Either::Left(Full::new(encode_message(req))))
            .map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        self.send
            .ready()
            .await
            .map_err(|e| Status::new(Code::Unavailable, format!("connection: {e}")))?;
        let resp = self
            .send
            .send_request(request)
            .await
            .map_err(|e| Status::new(Code::Unavailable, format!("request: {e}")))?;
        if let Some(status) = status_of(resp.headers()) {
            return Err(status);
        }
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Status::new(Code::Unavailable, format!("response: {e}")))?;
        if let Some(status) = collected.trailers().and_then(status_of) {
            return Err(status);
        }
        let msgs = decode_messages(collected.to_bytes())?;
        let first = msgs
            .into_iter()
            .next()
            .ok_or_else(|| Status::new(Code::Internal, "empty response"))?;
        Resp::decode(first)
            .map_err(|e| Status::new(Code::Internal, format!("response decoding: {e}")))
    }
}

impl Client {
    /// Opens a bidirectional (or client-streaming) call; messages go out as they are sent.
    pub async fn stream<Resp>(&mut self, path: &str) -> Result<GrpcStream<Resp>, Status>
    where
        Resp: prost::Message + Default,
    {
        let mut builder = call_request(&self.authority, path)?;
        let (tx, rx) = flume::unbounded::<Bytes>();
        let frames: FrameStream =
            futures_lite::StreamExt::map(rx.into_stream(), |b| Ok(Frame::data(b)));
        if let Some(t) = &self.token {
            builder = builder.header("token", t.clone());
        }
        let request = builder
            .body(Either::Right(StreamBody::new(frames)))
            .map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        self.send
            .ready()
            .await
            .map_err(|e| Status::new(Code::Unavailable, format!("connection: {e}")))?;
        // Servers may hold the response headers until the first message: await them lazily.
        let resp: ResponseFuture = Box::pin(self.send.send_request(request));
        Ok(GrpcStream {
            tx: Some(tx),
            answers: ResponseReader::new(resp),
            _resp: std::marker::PhantomData,
        })
    }
}

/// An open streaming call.
pub struct GrpcStream<Resp> {
    tx: Option<flume::Sender<Bytes>>,
    answers: ResponseReader,
    _resp: std::marker::PhantomData<Resp>,
}

impl<Resp: prost::Message + Default> GrpcStream<Resp> {
    pub fn send(&self, msg: &impl prost::Message) -> Result<(), Status> {
        self.tx
            .as_ref()
            .ok_or_else(|| Status::new(Code::Internal, "send side closed"))?
            .send(encode_message(msg))
            .map_err(|_| Status::new(Code::Unavailable, "stream ended"))
    }

    /// Half-closes: no more requests, responses keep coming.
    pub fn close_send(&mut self) {
        self.tx = None;
    }

    /// The next response; `Ok(None)` when the server ended the call with OK.
    pub async fn recv(&mut self) -> Result<Option<Resp>, Status> {
        match self.answers.next().await? {
            None => Ok(None),
            Some(msg) => Resp::decode(msg)
                .map(Some)
                .map_err(|e| Status::new(Code::Internal, format!("response decoding: {e}"))),
        }
    }
}

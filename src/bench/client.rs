//! A minimal etcd gRPC client on glommio: HTTP/2 via hyper on the same I/O glue as the server, so
//! the load generator runs thread-per-core too and talks to spindle and etcd alike.

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;

use crate::server::grpc::{decode_messages, encode_message, Code, Status};
use crate::server::io::{Conn, LocalExec};

/// One HTTP/2 connection; cheap to clone, clones multiplex streams over it.
#[derive(Clone)]
pub struct Client {
    send: SendRequest<Full<Bytes>>,
    authority: String,
}

impl Client {
    pub async fn connect(endpoint: &str) -> Result<Client, String> {
        let authority = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let stream = glommio::net::TcpStream::connect(authority.as_str())
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http2::Builder::new(LocalExec)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake(Conn::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {authority}: {e}"))?;
        glommio::spawn_local(async move {
            let _ = conn.await;
        })
        .detach();
        Ok(Client { send, authority })
    }

    /// One unary call.
    pub async fn unary<Req, Resp>(&mut self, path: &str, req: &Req) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let uri: Uri = format!("http://{}{}", self.authority, path)
            .parse()
            .map_err(|e| Status::new(Code::Internal, format!("bad URI: {e}")))?;
        let request = Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(encode_message(req)))
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

/// The gRPC status in a header or trailer map, if it is an error.
fn status_of(h: &http::HeaderMap) -> Option<Status> {
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
        _ => Code::Unknown,
    };
    Some(Status::new(code, message))
}

//! `spindle grpc-proxy start`: a stateless etcd v3 gRPC proxy in front of a cluster (spindle or
//! etcd), as `etcd grpc-proxy start`. It serves the whole API on one executor, sends each call
//! to one live endpoint of `--endpoints` (the next when one dies), optionally confines its
//! clients to a key prefix (`--namespace`, see [`namespace`]), and coalesces identical watches
//! into one upstream watch ([`watch`]).
//!
//! `spindle gateway start` ([`tcp`]) is etcd's plain TCP gateway.

pub mod namespace;
pub mod tcp;
pub mod upstream;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;

use crate::proto::etcdserverpb as pb;
use crate::proto::{v3electionpb as el, v3lockpb as lk};
use crate::server::grpc::{self, status_trailers, Code, GrpcBody, Status};
use upstream::{next_message, Endpoint, Headers, Upstream};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("executor: {0}")]
    Executor(String),
}

/// `spindle grpc-proxy start`'s flags, as etcd's.
#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    pub endpoints: Vec<String>,
    pub listen_addr: String,
    pub namespace: String,
    /// Reported by MemberList as the cluster's only member, so that clients that sync their
    /// endpoints from the member list keep talking to the proxy.
    pub advertise_client_url: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub cacert: Option<PathBuf>,
    pub insecure_skip_tls_verify: bool,
}

impl ProxyConfig {
    /// The TLS setup toward the cluster, when any TLS flag is given.
    fn client_tls(&self) -> Result<Option<Arc<rustls::ClientConfig>>, ProxyError> {
        if self.cert.is_none() && self.cacert.is_none() && !self.insecure_skip_tls_verify {
            return Ok(None);
        }
        tls_config(self).map(Some)
    }
}

fn tls_config(cfg: &ProxyConfig) -> Result<Arc<rustls::ClientConfig>, ProxyError> {
    let cert_key = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        (None, None) => None,
        _ => {
            return Err(ProxyError::TlsSetup(
                "--cert and --key go together".to_string(),
            ))
        }
    };
    crate::tls::dial_config(
        cfg.cacert.as_deref(),
        cert_key,
        cfg.insecure_skip_tls_verify,
    )
    .map(Arc::new)
    .map_err(|e| ProxyError::TlsSetup(e.to_string()))
}

/// What every request handler shares.
struct Ctx {
    upstream: Rc<Upstream>,
    hub: Rc<watch::Hub>,
    prefix: Bytes,
    advertise_client_url: Option<String>,
}

/// Runs the proxy until the process ends.
pub fn run(cfg: ProxyConfig) -> Result<(), ProxyError> {
    let tls = cfg.client_tls()?;
    let endpoints: Vec<Endpoint> = cfg
        .endpoints
        .iter()
        .flat_map(|e| e.split(','))
        .filter(|e| !e.trim().is_empty())
        .map(|e| Endpoint::parse(e, tls.is_some()))
        .collect();
    if endpoints.is_empty() {
        return Err(ProxyError::NoEndpoints);
    }
    let addr: SocketAddr = resolve(&cfg.listen_addr)?;
    let ex = crate::runtime::builder(glommio::Placement::Unbound, "grpc-proxy")
        .make()
        .map_err(|e| ProxyError::Executor(e.to_string()))?;
    ex.run(async move {
        let listener = glommio::net::TcpListener::bind(addr).map_err(|e| ProxyError::Listen {
            addr: addr.to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let upstream = Rc::new(Upstream::new(endpoints, tls));
        let prefix = Bytes::from(cfg.namespace.clone().into_bytes());
        let ctx = Rc::new(Ctx {
            hub: watch::Hub::new(upstream.clone(), prefix.clone()),
            upstream,
            prefix,
            advertise_client_url: cfg.advertise_client_url.clone(),
        });
        tracing::info!(%addr, namespace = %cfg.namespace, "grpc-proxy listening");
        loop {
            let stream = crate::runtime::io::accept(&listener).await;
            let ctx = ctx.clone();
            glommio::spawn_local(async move {
                let service = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(ctx, req).await) }
                });
                let conn = crate::runtime::io::Conn::new(stream);
                let result = crate::server::serve_connection(conn, service).await;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
            })
            .detach();
        }
    })
}

/// `host:port` (`localhost` included) as a socket address.
fn resolve(addr: &str) -> Result<SocketAddr, ProxyError> {
    use std::net::ToSocketAddrs;
    let addr = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ProxyError::Listen {
            addr: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not host:port"),
        })
}

/// The client's credentials, passed on with every call.
fn passed_headers(h: &http::HeaderMap) -> Headers {
    ["token", "authorization"]
        .iter()
        .filter_map(|name| {
            h.get(*name)
                .map(|v| (http::HeaderName::from_static(name), v.clone()))
        })
        .collect()
}

async fn handle(ctx: Rc<Ctx>, req: Request<Incoming>) -> Response<GrpcBody> {
    let path = req.uri().path().to_string();
    if !crate::server::grpc::is_grpc(req.headers()) {
        return match (req.method().as_str(), path.as_str()) {
            ("GET", "/metrics") => plain(StatusCode::OK, metrics(&ctx)),
            ("GET", "/health") => {
                let probe = pb::RangeRequest {
                    key: Bytes::from_static(b"health"),
                    ..Default::default()
                };
                let ok = ctx
                    .upstream
                    .unary(RANGE, probe.encode_to_vec().into(), &Vec::new())
                    .await
                    .is_ok();
                plain(StatusCode::OK, format!("{{\"health\":\"{ok}\"}}\n"))
            }
            _ => plain(StatusCode::NOT_FOUND, "404 page not found\n".to_string()),
        };
    }
    let headers = passed_headers(req.headers());
    let body = req.into_body();
    match path.as_str() {
        watch::WATCH => grpc::stream(watch::serve(ctx.hub.clone(), body, headers)),
        KEEPALIVE | SNAPSHOT | OBSERVE => grpc::stream(pump(ctx, path, body, headers)),
        _ => match unary(&ctx, &path, body, &headers).await {
            Ok(resp) => grpc::ok_bytes(resp),
            Err(s) => grpc::error(&s),
        },
    }
}

fn plain(status: StatusCode, body: String) -> Response<GrpcBody> {
    let mut r = Response::new(GrpcBody::Plain(Some(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// The proxy's own gauges, in Prometheus' text format.
fn metrics(ctx: &Ctx) -> String {
    format!(
        "# HELP spindle_proxy_upstream_watches Watches the proxy holds open toward the \
         cluster.\n# TYPE spindle_proxy_upstream_watches gauge\n\
         spindle_proxy_upstream_watches {}\n\
         # HELP spindle_proxy_client_watches Client watches the proxy serves.\n\
         # TYPE spindle_proxy_client_watches gauge\n\
         spindle_proxy_client_watches {}\n",
        ctx.hub.upstream_watches(),
        ctx.hub.client_watches()
    )
}

const RANGE: &str = "/etcdserverpb.KV/Range";
const KEEPALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
const SNAPSHOT: &str = "/etcdserverpb.Maintenance/Snapshot";
const OBSERVE: &str = "/v3electionpb.Election/Observe";
const MEMBER_LIST: &str = "/etcdserverpb.Cluster/MemberList";

async fn read_body(body: Incoming) -> Result<Bytes, Status> {
    let mut buf = body
        .collect()
        .await
        .map_err(|e| Status::new(Code::Cancelled, format!("request body: {e}")))?
        .to_bytes();
    next_message(&mut buf)?.ok_or_else(|| Status::new(Code::Internal, "grpc: no request message"))
}

async fn unary(ctx: &Ctx, path: &str, body: Incoming, headers: &Headers) -> Result<Bytes, Status> {
    let msg = read_body(body).await?;
    let msg = rewrite_request(&ctx.prefix, path, msg)?;
    let resp = ctx.upstream.unary(path, msg, headers).await?;
    if path == MEMBER_LIST {
        if let Some(url) = &ctx.advertise_client_url {
            return as_only_member(resp, url);
        }
    }
    rewrite_response(&ctx.prefix, path, resp)
}

/// MemberList with `--advertise-client-url`: the proxy is the cluster's only member.
fn as_only_member(resp: Bytes, url: &str) -> Result<Bytes, Status> {
    let mut r = decode::<pb::MemberListResponse>(resp)?;
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    r.members = vec![pb::Member {
        name,
        client_ur_ls: vec![url.to_string()],
        ..Default::default()
    }];
    Ok(r.encode_to_vec().into())
}

fn decode<M: Message + Default>(b: Bytes) -> Result<M, Status> {
    M::decode(b).map_err(|e| Status::new(Code::InvalidArgument, format!("grpc: {e}")))
}

/// Decodes `msg` as an `M`, applies `f`, encodes it again.
fn with<M: Message + Default>(msg: Bytes, f: impl FnOnce(&mut M)) -> Result<Bytes, Status> {
    try_with(msg, |m| {
        f(m);
        Ok(())
    })
}

/// [`with`] for a rewrite that may refuse the message.
fn try_with<M: Message + Default>(
    msg: Bytes,
    f: impl FnOnce(&mut M) -> Result<(), Status>,
) -> Result<Bytes, Status> {
    let mut m = decode::<M>(msg)?;
    f(&mut m)?;
    let mut out = BytesMut::with_capacity(m.encoded_len());
    m.encode(&mut out)
        .map_err(|e| Status::new(Code::Internal, e.to_string()))?;
    Ok(out.freeze())
}

/// A request with its keys moved into the namespace (unchanged without one).
pub fn rewrite_request(prefix: &[u8], path: &str, msg: Bytes) -> Result<Bytes, Status> {
    use namespace as ns;
    if prefix.is_empty() {
        return Ok(msg);
    }
    match path {
        "/etcdserverpb.KV/Range" => try_with(msg, |r| ns::range_request(prefix, r)),
        "/etcdserverpb.KV/Put" => try_with(msg, |r| ns::put_request(prefix, r)),
        "/etcdserverpb.KV/DeleteRange" => try_with(msg, |r| ns::delete_request(prefix, r)),
        "/etcdserverpb.KV/Txn" => with(msg, |r| ns::txn_request(prefix, r)),
        "/v3lockpb.Lock/Lock" => with(msg, |r| ns::lock_request(prefix, r)),
        "/v3lockpb.Lock/Unlock" => with(msg, |r| ns::unlock_request(prefix, r)),
        "/v3electionpb.Election/Campaign" => with(msg, |r| ns::campaign_request(prefix, r)),
        "/v3electionpb.Election/Proclaim" => with(msg, |r| ns::proclaim_request(prefix, r)),
        "/v3electionpb.Election/Resign" => with(msg, |r| ns::resign_request(prefix, r)),
        "/v3electionpb.Election/Leader" | OBSERVE => with(msg, |r| ns::leader_request(prefix, r)),
        _ => Ok(msg),
    }
}

/// An answer with the namespace taken off its keys (unchanged without one).
pub fn rewrite_response(prefix: &[u8], path: &str, msg: Bytes) -> Result<Bytes, Status> {
    use namespace as ns;
    if prefix.is_empty() {
        return Ok(msg);
    }
    match path {
        "/etcdserverpb.KV/Range" => with(msg, |r| ns::range_response(prefix, r)),
        "/etcdserverpb.KV/Put" => with(msg, |r| ns::put_response(prefix, r)),
        "/etcdserverpb.KV/DeleteRange" => with(msg, |r| ns::delete_response(prefix, r)),
        "/etcdserverpb.KV/Txn" => with(msg, |r| ns::txn_response(prefix, r)),
        "/etcdserverpb.Lease/LeaseTimeToLive" => with(msg, |r| ns::lease_ttl_response(prefix, r)),
        "/v3lockpb.Lock/Lock" => with(msg, |r: &mut lk::LockResponse| ns::lock_response(prefix, r)),
        "/v3electionpb.Election/Campaign" => with(msg, |r: &mut el::CampaignResponse| {
            ns::campaign_response(prefix, r)
        }),
        "/v3electionpb.Election/Leader" | OBSERVE => with(msg, |r| ns::leader_response(prefix, r)),
        _ => Ok(msg),
    }
}

/// A streaming call other than Watch, relayed message by message (with the namespace applied
/// to requests and answers).
fn pump(
    ctx: Rc<Ctx>,
    path: String,
    mut body: Incoming,
    headers: Headers,
) -> flume::Receiver<Frame<Bytes>> {
    let (tx, rx) = flume::unbounded::<Frame<Bytes>>();
    glommio::spawn_local(async move {
        let end = async {
            let mut up = ctx.upstream.stream(&path, &headers).await?;
            let to_up = up.sender();
            up.close_send();
            let prefix = ctx.prefix.clone();
            let p = path.clone();
            // Client to cluster: its own task, so that answers flow while requests wait.
            let requests = glommio::spawn_local(async move {
                let mut buf = BytesMut::new();
                while let Some(Ok(f)) = body.frame().await {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                    while let Ok(Some(m)) = next_message(&mut buf) {
                        let Ok(m) = rewrite_request(&prefix, &p, m) else {
                            return;
                        };
                        if to_up
                            .as_ref()
                            .is_none_or(|t| t.send(upstream::frame(&m)).is_err())
                        {
                            return;
                        }
                    }
                }
            });
            let result = loop {
                match up.recv().await {
                    Ok(Some(m)) => {
                        let m = rewrite_response(&ctx.prefix, &path, m)?;
                        if tx.send(Frame::data(upstream::frame(&m))).is_err() {
                            break Ok(());
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(s) => {
                        if s.code == Code::Unavailable {
                            ctx.upstream.stream_failed(&up);
                        }
                        break Err(s);
                    }
                }
            };
            drop(requests);
            result
        }
        .await;
        let status = end.err().unwrap_or_else(|| Status::new(Code::Ok, ""));
        let _ = tx.send(Frame::trailers(status_trailers(&status)));
    })
    .detach();
    rx
}

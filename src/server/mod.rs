//! `spindle serve`: etcd's v3 gRPC API (plus `/health`, `/metrics` and the JSON gateway) served
//! by hyper on every core.
//!
//! Each core binds its own listener on the client port (SO_REUSEPORT), so the kernel spreads
//! connections over cores; a connection stays on the core that accepted it, and its requests run
//! through [`LocalDb`]: data this core owns is served without any hop, other shards are one
//! message away. HTTP/2 streams of one connection are served concurrently.

mod auth;
mod authority;
pub mod compaction;
mod convert;
mod corrupt;
mod election;
mod forward;
mod gateway;
pub mod grpc;

mod lease;
mod lock;
pub mod metrics;
pub mod quota;
mod snapshot;
pub mod tls;
mod watch;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::db::{CoreHook, Db, LocalDb, Options, RelayError};
use crate::error::Error;
use crate::proto::etcdserverpb as pb;
use crate::runtime::stages::Stage;
use grpc::{Code, GrpcBody, Status};

/// Room gRPC allows on top of `--max-request-bytes` before refusing to read a message (etcd's
/// `grpcOverheadBytes`), so slightly larger requests still get etcd's "request is too large".
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The etcd API version this server speaks (reported by Status).
pub const ETCD_API_VERSION: &str = "3.4.0";

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    /// `http://` client listeners.
    pub listen: Vec<SocketAddr>,
    /// `https://` client listeners, served with `tls`.
    pub listen_tls: Vec<SocketAddr>,
    /// The TLS setup of the `https://` listeners (needed when there are any).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// etcd's `--client-cert-auth`: with auth enabled, the Common Name of a verified client
    /// certificate is the user of a call that carries no token.
    pub client_cert_auth: bool,
    pub advertise_client_urls: Vec<String>,
    pub advertise_peer_urls: Vec<String>,
    /// etcd's `--max-request-bytes`.
    pub max_request_bytes: usize,
    /// etcd's `--quota-backend-bytes`: a write that would take the store past it is refused and
    /// raises the NOSPACE alarm (see [`quota`]). 0 = etcd's default (2 GiB), negative = none.
    pub quota_backend_bytes: i64,
    /// etcd's `--experimental-corrupt-check-time`: how often the leader compares every member's
    /// hash with its own (`None`: never).
    pub corrupt_check_time: Option<Duration>,
    /// etcd's `--experimental-initial-corrupt-check`: compare hashes with the other members
    /// before serving clients, and refuse to run on a mismatch.
    pub initial_corrupt_check: bool,
    /// etcd's `--experimental-watch-progress-notify-interval`: how often idle watches created
    /// with `progress_notify` are told they are current.
    pub watch_progress_notify_interval: Duration,
    /// etcd's `--auth-token-ttl`: how long a simple token lives after its last use.
    pub auth_token_ttl: Duration,
    /// etcd's `--bcrypt-cost` for hashing new passwords.
    pub bcrypt_cost: u32,
    /// `--auth-token jwt,…`: tokens are signed JWTs instead of simple ones.
    pub jwt: Option<Arc<crate::auth::JwtTokens>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: "default".into(),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2379))],
            listen_tls: Vec::new(),
            tls: None,
            client_cert_auth: false,
            advertise_client_urls: vec!["http://127.0.0.1:2379".into()],
            advertise_peer_urls: vec!["http://localhost:2380".into()],
            max_request_bytes: 1536 * 1024,
            quota_backend_bytes: 0,
            corrupt_check_time: None,
            initial_corrupt_check: false,
            watch_progress_notify_interval: watch::DEFAULT_PROGRESS_NOTIFY_INTERVAL,
            auth_token_ttl: crate::auth::DEFAULT_TOKEN_TTL,
            bcrypt_cost: crate::auth::DEFAULT_BCRYPT_COST,
            jwt: None,
        }
    }
}

/// Client listen URLs by scheme.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenUrls {
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
}

/// Parses etcd-style URL lists (`http://host:port,https://...`) into socket addresses.
pub fn parse_listen_urls(urls: &str) -> Result<ListenUrls, Error> {
    let mut out = ListenUrls::default();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (rest, list) = if let Some(rest) = url.strip_prefix("http://") {
            (rest, &mut out.http)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (rest, &mut out.https)
        } else {
            return Err(Error::InvalidArgument(format!(
                "unsupported URL {url:?}: only http:// and https:// are served"
            )));
        };
        let hostport = rest.trim_end_matches('/');
        let addr = if let Some(port) = hostport.strip_prefix("localhost:") {
            format!("127.0.0.1:{port}")
        } else {
            hostport.to_string()
        };
        list.push(
            addr.parse()
                .map_err(|e| Error::InvalidArgument(format!("bad listen URL {url:?}: {e}")))?,
        );
    }
    if out.http.is_empty() && out.https.is_empty() {
        return Err(Error::InvalidArgument("no listen URL given".into()));
    }
    Ok(out)
}

/// What every connection handler on a core shares.
struct Ctx {
    db: LocalDb,
    cfg: Arc<ServerConfig>,
    metrics: Arc<metrics::Metrics>,
    /// The quota and the store's sampled size, shared by every core.
    quota: Arc<quota::Quota>,
    drain: Arc<Drain>,
    cluster_id: u64,
    member_id: u64,
    /// This core's view of the node's auth state and the tokens it resolved.
    auth: auth::CoreAuth,
    /// Open once clients may be served (see `corrupt::initial`).
    gate: Arc<corrupt::Gate>,
}

impl Ctx {
    fn header(&self, revision: i64) -> pb::ResponseHeader {
        pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.db.raft_term(),
        }
    }

    fn member(&self) -> pb::Member {
        pb::Member {
            id: self.member_id,
            name: self.cfg.name.clone(),
            peer_ur_ls: self.cfg.advertise_peer_urls.clone(),
            client_ur_ls: self.cfg.advertise_client_urls.clone(),
            is_learner: false,
        }
    }
}

/// Requests in flight, and whether the server is shutting down (then new requests are refused).
#[derive(Default)]
struct Drain {
    draining: AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
}

/// A running server.
pub struct Running {
    pub db: Db,
    drain: Arc<Drain>,
}

impl Running {
    /// Graceful shutdown: refuse new requests, wait (at most `grace`) for those in flight to
    /// finish and their answers to be written, then close the store, which flushes every WAL.
    pub fn shutdown(self, grace: Duration) {
        self.drain.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        while self.drain.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A finished request's answer is handed to its connection's task, which writes it at
        // once; give those tasks a moment before the executors stop.
        std::thread::sleep(Duration::from_millis(50));
        self.db.close();
    }
}

/// Opens the store and starts listeners on every core. Returns once all cores listen.
pub fn start(
    data_dir: &std::path::Path,
    opts: Options,
    cfg: ServerConfig,
) -> Result<Running, Error> {
    let drain = Arc::new(Drain::default());
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(metrics::Metrics::default());
    let quota = Arc::new(quota::Quota::new(quota::effective(cfg.quota_backend_bytes)));
    let gate = Arc::new(corrupt::Gate::new(!cfg.initial_corrupt_check));
    let (bound_tx, bound_rx) = flume::unbounded::<Result<(), String>>();
    let hook: CoreHook = {
        let cfg = cfg.clone();
        let drain = drain.clone();
        Arc::new(move |db: LocalDb| {
            let (cluster_id, member_id) = db.identity();
            db.auth().set_token_ttl(cfg.auth_token_ttl);
            if let Some(jwt) = &cfg.jwt {
                db.auth().set_jwt(jwt.clone());
            }
            let core_auth = auth::CoreAuth::new(db.auth(), cfg.bcrypt_cost);
            let first_core = db.core_id() == 0;
            let ctx = Rc::new(Ctx {
                db,
                cfg: cfg.clone(),
                metrics: metrics.clone(),
                quota: quota.clone(),
                drain: drain.clone(),
                cluster_id,
                member_id,
                auth: core_auth,
                gate: gate.clone(),
            });
            if first_core {
                let every = cfg.auth_token_ttl.max(Duration::from_secs(1));
                glommio::spawn_local(auth::purge_loop(ctx.clone(), every)).detach();
                glommio::spawn_local(quota::watch(ctx.clone())).detach();
                if cfg.initial_corrupt_check {
                    glommio::spawn_local(corrupt::initial(ctx.clone(), gate.clone())).detach();
                }
                if let Some(every) = cfg.corrupt_check_time {
                    glommio::spawn_local(corrupt::periodic(ctx.clone(), every)).detach();
                }
            }
            ctx.db.serve_relayed_calls(forward::relayed_calls(&ctx));
            let plain = cfg.listen.iter().map(|a| (a, None));
            let tls = cfg.listen_tls.iter().map(|a| (a, cfg.tls.clone()));
            for (addr, tls) in plain.chain(tls) {
                match glommio::net::TcpListener::bind(addr) {
                    Ok(listener) => {
                        let _ = bound_tx.send(Ok(()));
                        let acceptor = tls.map(futures_rustls::TlsAcceptor::from);
                        glommio::spawn_local(accept_loop(listener, ctx.clone(), acceptor)).detach();
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(format!("cannot listen on {addr}: {e}")));
                    }
                }
            }
        })
    };
    if !cfg.listen_tls.is_empty() && cfg.tls.is_none() {
        return Err(Error::InvalidArgument(
            "TLS key/cert (--cert-file, --key-file) must be provided for client URLs with the \
             HTTPS scheme"
                .into(),
        ));
    }
    let cores = opts.cores;
    let db = Db::open_with(data_dir, opts, Some(hook))?;
    for _ in 0..cores * (cfg.listen.len() + cfg.listen_tls.len()) {
        match bound_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                db.close();
                return Err(Error::InvalidArgument(e));
            }
            Err(_) => return Err(Error::Closed),
        }
    }
    Ok(Running { db, drain })
}

/// See [`quota::check`]: `cost` is how many bytes the write adds (0 for one that adds none).
fn check_space(ctx: &Ctx, cost: u64) -> Result<(), Status> {
    quota::check(ctx, cost)
}

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_loop(
    listener: glommio::net::TcpListener,
    ctx: Rc<Ctx>,
    tls: Option<futures_rustls::TlsAcceptor>,
) {
    ctx.gate.wait().await;
    loop {
        let stream = crate::runtime::io::accept(&listener).await;
        let ctx = ctx.clone();
        let tls = tls.clone();
        glommio::spawn_local(async move {
            let (conn, cert_user) = match tls {
                None => (crate::runtime::io::Conn::new(stream), None),
                Some(acceptor) => {
                    let peer = stream.peer_addr().ok();
                    let handshake =
                        async { Ok::<_, glommio::GlommioError<()>>(acceptor.accept(stream).await) };
                    match glommio::timer::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(s)) => {
                            let cn = tls::peer_common_name(s.get_ref().1).map(Rc::<str>::from);
                            (crate::runtime::io::Conn::tls(s), cn)
                        }
                        // Not TLS, a certificate the CAs did not sign, no certificate where one
                        // is required: the connection closes and nobody else is affected.
                        Ok(Err(e)) => {
                            tracing::warn!(?peer, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(?peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                let cert_user = cert_user.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(ctx, req, cert_user).await) }
            });
            // HTTP/2 for gRPC, HTTP/1.1 for curl and the JSON gateway: auto-detected per connection.
            if let Err(e) = serve_connection(conn, service).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        })
        .detach();
    }
}

/// Serves one accepted connection: HTTP/2 (gRPC, with the `:authority` repair) or HTTP/1.1
/// (curl, the JSON gateway), chosen by the connection preface. The gRPC proxy serves its
/// clients with it too.
pub(crate) async fn serve_connection<S>(
    conn: crate::runtime::io::Conn,
    service: S,
) -> Result<(), hyper::Error>
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<GrpcBody>,
            Error = std::convert::Infallible,
        > + Clone
        + 'static,
    S::Future: 'static,
{
    // Peek at the connection preface to choose the protocol.
    let mut conn = conn;
    let is_h2 = conn.peek_h2_preface().await;
    if is_h2 {
        conn.filter_reads(Box::<authority::AuthorityFix>::default());
        hyper::server::conn::http2::Builder::new(crate::runtime::io::LocalExec)
            .max_concurrent_streams(1024)
            .serve_connection(conn, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(conn, service)
            .await
    }
}

/// Counts a request in flight while it lives (a graceful shutdown waits for them).
struct InFlight<'a>(&'a Drain);

impl<'a> InFlight<'a> {
    fn enter(drain: &'a Drain) -> InFlight<'a> {
        drain.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(drain)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a server that is shutting down answers new requests with.
fn server_stopped() -> Status {
    Status::new(Code::Unavailable, "etcdserver: server stopped")
}

/// Serves one request; `cert_user` is the Common Name of the client's verified certificate.
async fn handle(
    ctx: Rc<Ctx>,
    req: Request<Incoming>,
    cert_user: Option<Rc<str>>,
) -> Response<GrpcBody> {
    let _guard = InFlight::enter(&ctx.drain);
    if ctx.drain.draining.load(Ordering::Acquire) {
        return grpc::error(&server_stopped());
    }
    serve_request(&ctx, req, cert_user.as_deref()).await
}

async fn serve_request(
    ctx: &Rc<Ctx>,
    req: Request<Incoming>,
    cert_user: Option<&str>,
) -> Response<GrpcBody> {
    let path = req.uri().path().to_string();
    if grpc::is_grpc(req.headers()) {
        let started = Instant::now();
        let caller = auth::identify(ctx, req.headers(), cert_user);
        let resp = grpc_call(ctx, &path, req.into_body(), started, caller).await;
        ctx.metrics.observe(&path, started.elapsed());
        return resp;
    }
    if cert_user.is_some() && path.starts_with("/v3/") {
        // etcd 3.4 refuses the gateway to a client whose verified certificate has a Common Name,
        // rather than serve it without the name (its gateway proxies with its own certificate).
        return plain(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            "CommonName of client sending a request against gateway will be ignored and not \
             used as expected\n"
                .into(),
        );
    }
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/health") => plain(
            StatusCode::OK,
            "application/json",
            "{\"health\":\"true\"}\n".into(),
        ),
        ("GET", "/metrics") => {
            let text = ctx.metrics.render(&ctx.db).await;
            plain(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        ("POST", p) if p.starts_with("/v3/") => {
            // A token or nobody: certificates with a name were refused above.
            let caller = auth::identify_gateway(ctx, req.headers());
            Box::pin(gateway::handle(ctx, p, req.into_body(), caller)).await
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 page not found\n".into(),
        ),
    }
}

fn plain(status: StatusCode, content_type: &'static str, body: String) -> Response<GrpcBody> {
    plain_owned(status, content_type, body)
}

fn plain_owned(status: StatusCode, content_type: &'static str, body: String) -> Response<GrpcBody> {
    let mut r = Response::new(GrpcBody::Plain(Some(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", http::HeaderValue::from_static(content_type));
    r
}

/// Reads a gRPC request body, refusing a message longer than `limit` as soon as its length
/// prefix arrives (with grpc-go's message, which clients see from etcd).
async fn read_grpc_body(mut body: Incoming, limit: usize) -> Result<Bytes, Status> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| Status::new(Code::Cancelled, format!("request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > limit {
                return Err(grpc::too_large(len, limit));
            }
        }
        if buf.len() > 2 * (limit + 5) {
            return Err(Status::new(
                Code::ResourceExhausted,
                "grpc: too many request messages",
            ));
        }
    }
    Ok(buf.freeze())
}

/// Reads a whole request body, refusing more than `limit` bytes.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Status> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Status::new(
            Code::ResourceExhausted,
            format!("grpc: received message larger than max (more than {limit} bytes)"),
        )),
        Err(e) => Err(Status::new(Code::Cancelled, format!("request body: {e}"))),
    }
}

/// `started` is when the request reached the handler (a put's stages are timed from it).
async fn grpc_call(
    ctx: &Rc<Ctx>,
    path: &str,
    body: Incoming,
    started: Instant,
    caller: auth::Caller,
) -> Response<GrpcBody> {
    let learner = ctx.db.is_learner();
    if learner && !matches!(path, "/etcdserverpb.Maintenance/Status" | RANGE) {
        // etcd's learners serve only Status and serializable ranges; clients move on to
        // another member.
        return grpc::error(&not_for_learner());
    }
    if path == "/etcdserverpb.Maintenance/Snapshot" {
        if let Err(s) = auth::check(ctx, &caller, path, &[]).await {
            return grpc::error(&s);
        }
        return snapshot::stream(ctx.clone());
    }
    if path == lease::KEEP_ALIVE {
        return lease::keep_alive_stream(ctx.clone(), body);
    }
    if path == "/etcdserverpb.Watch/Watch" {
        return watch::serve(ctx.clone(), body, caller);
    }
    let limit = ctx.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let bytes = match read_grpc_body(body, limit).await {
        Ok(b) => b,
        Err(s) => return grpc::error(&s),
    };
    let msgs = match grpc::decode_messages(bytes) {
        Ok(m) => m,
        Err(s) => return grpc::error(&s),
    };
    if learner && path == RANGE && range_serializable(&msgs) != Some(true) {
        return grpc::error(&not_for_learner());
    }
    // Checked here, on the member the client talks to, before the call is served or relayed.
    if let Err(s) = auth::check(ctx, &caller, path, &msgs).await {
        return grpc::error(&s);
    }
    if path == election::OBSERVE {
        return match one(msgs) {
            Ok(req) => election::observe(ctx.clone(), req),
            Err(s) => grpc::error(&s),
        };
    }
    match call_anywhere(ctx, path, msgs, Some(started), Hop::Client).await {
        Ok(resp) => grpc::ok_bytes(resp),
        Err(s) => grpc::error(&s),
    }
}

/// Whether a call came from a client or was already forwarded by another member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hop {
    Client,
    /// Relayed once by another member: it is answered here or refused, never passed on
    /// again, so two members with crossing views of the leader cannot bounce it.
    Forwarded,
}

/// [`call`] on any member of a cluster: what only the leader may do is forwarded to it (the
/// gRPC services and the JSON gateway both come through here). With `started`, a put served
/// here is timed by stage.
async fn call_anywhere(
    ctx: &Rc<Ctx>,
    path: &str,
    msgs: Vec<Bytes>,
    started: Option<Instant>,
    hop: Hop,
) -> Result<Bytes, Status> {
    let member = ctx.db.is_cluster_member();
    // A member that does not lead never answers a linearizable read from its own state: it
    // forwards to the leader, or waits for one.
    if member && ctx.db.leader() != ctx.member_id && needs_leader(path, &msgs) {
        if hop == Hop::Forwarded {
            return Err(Error::NotLeader.into());
        }
        if path == RANGE {
            return Box::pin(follower_read(ctx, msgs)).await;
        }
        return Box::pin(forward(ctx, remote_leader(ctx), path, msgs)).await;
    }
    let member = member && hop == Hop::Client;
    // Kept only where a refusal may be forwarded: a single node's hot path copies nothing.
    let copy = member.then(|| msgs.clone());
    match call(ctx, path, msgs, started).await {
        Err(s) if is_not_leader(&s) => match (remote_leader(ctx), copy) {
            (Some(to), Some(msgs)) => Box::pin(forward(ctx, Some(to), path, msgs)).await,
            _ => Err(s),
        },
        other => other,
    }
}

const RANGE: &str = "/etcdserverpb.KV/Range";

async fn range(ctx: &Ctx, req: pb::RangeRequest) -> Result<Bytes, Status> {
    let resp = ctx.db.range(convert::range_request(req)?).await?;
    let h = ctx.header(resp.header.revision);
    Ok(enc(&convert::range_response(resp, h)))
}

/// A linearizable Range on a follower: a read barrier from the leader node (ReadIndex across
/// every shard, `LocalDb::read_barrier_from`), then the read from this member's own state, as
/// etcd's followers serve them. While no leader can be reached it is forwarded like a write,
/// which waits for the next leader.
async fn follower_read(ctx: &Rc<Ctx>, msgs: Vec<Bytes>) -> Result<Bytes, Status> {
    // A leader that does not lead every shard yet (just elected, or handing over) answers the
    // barrier with "not leader": the read waits for it, as etcd's followers hold reads during
    // an election, up to the same patience as forwarded calls.
    let deadline = Instant::now() + ctx.db.leader_patience();
    loop {
        let Some(leader) = remote_leader(ctx) else {
            return forward(ctx, None, RANGE, msgs).await;
        };
        match ctx.db.read_barrier_from(leader).await {
            Ok(Ok(())) => break,
            Ok(Err((code, message))) => {
                let status = Status::new(Code::from_wire(code), message);
                if !is_not_leader(&status) || Instant::now() >= deadline {
                    return Err(status);
                }
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            Err(RelayError::NotSent(_)) => return forward(ctx, None, RANGE, msgs).await,
            Err(RelayError::Lost(e)) => return Err(e.into()),
        }
    }
    let mut req: pb::RangeRequest = one(msgs)?;
    // Everything acknowledged before the barrier is now applied here.
    req.serializable = true;
    range(ctx, req).await
}

/// The member leading the cluster, if it is another one.
fn remote_leader(ctx: &Ctx) -> Option<u64> {
    let leader = ctx.db.leader();
    (leader != 0 && leader != ctx.member_id).then_some(leader)
}

/// Relays a call to the leader `to`. When the leader cannot be reached (it died, and this
/// member has not seen the election yet) the call waits for the next leader, up to two election
/// timeouts, as etcd's followers hold requests during an election; if this member is elected,
/// it runs the call itself. A call the leader may have seen is never sent twice.
async fn forward(
    ctx: &Rc<Ctx>,
    mut to: Option<u64>,
    path: &str,
    msgs: Vec<Bytes>,
) -> Result<Bytes, Status> {
    let deadline = Instant::now() + ctx.db.leader_patience();
    let mut last: Status = Error::NoLeader.into();
    loop {
        if let Some(leader) = to {
            match forward::relay(&ctx.db, leader, path, &msgs).await {
                Ok(resp) => {
                    let term = ctx.db.raft_term();
                    return Ok(forward::as_served_here(resp, ctx.member_id, term));
                }
                Err(forward::ForwardError::Sent(s)) => return Err(s),
                Err(forward::ForwardError::NotSent(s)) => last = s,
            }
        }
        let retry_same = Instant::now() + Duration::from_millis(200);
        loop {
            if Instant::now() >= deadline {
                tracing::debug!(leader = ?to, error = %last.message, "no reachable leader in time");
                return Err(Error::Timeout.into());
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
            match remote_leader(ctx) {
                // A new leader, or the same one again after a pause (it may have restarted
                // and been re-elected).
                Some(next) if to != Some(next) || Instant::now() >= retry_same => {
                    to = Some(next);
                    break;
                }
                None if ctx.db.leader() == ctx.member_id => {
                    return call(ctx, path, msgs, None).await
                }
                _ => {}
            }
        }
    }
}

/// Reads a follower must not serve from its own state: linearizable ranges and txns (etcd
/// treats every txn as linearizable). Serializable ranges are served locally.
fn needs_leader(path: &str, msgs: &[Bytes]) -> bool {
    match path {
        // Only the leader's lease table is renewed by keep-alives.
        "/etcdserverpb.KV/Txn"
        | "/etcdserverpb.Lease/LeaseTimeToLive"
        | "/etcdserverpb.Lease/LeaseLeases" => true,
        RANGE => range_serializable(msgs) == Some(false),
        _ => false,
    }
}

/// Whether a Range call asks for a serializable read (what followers and learners may serve
/// from their own state); `None` when the request does not decode (the call refuses it).
fn range_serializable(msgs: &[Bytes]) -> Option<bool> {
    let m = msgs.first()?;
    <pb::RangeRequest as prost::Message>::decode(m.clone())
        .ok()
        .map(|r| r.serializable)
}

/// This member refused the call before executing anything because another member leads.
fn is_not_leader(s: &Status) -> bool {
    s.code == Code::Unavailable && s.message == crate::error::Error::NotLeader.to_string()
}

/// Decodes exactly one request message.
fn one<M: prost::Message + Default>(msgs: Vec<Bytes>) -> Result<M, Status> {
    let mut it = msgs.into_iter();
    match (it.next(), it.next()) {
        (Some(m), None) => M::decode(m).map_err(|e| {
            Status::new(
                Code::Internal,
                format!("grpc: error unmarshalling request: {e}"),
            )
        }),
        _ => Err(Status::new(
            Code::Internal,
            "grpc: expected exactly one request message",
        )),
    }
}

/// etcd refuses proposals above `--max-request-bytes` with its own error.
fn check_size(ctx: &Ctx, msgs: &[Bytes]) -> Result<(), Status> {
    if msgs.iter().any(|m| m.len() > ctx.cfg.max_request_bytes) {
        return Err(Error::RequestTooLarge.into());
    }
    Ok(())
}

fn enc(m: &impl prost::Message) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// Dispatches one unary call and returns the encoded response; the JSON gateway calls this too.
/// A put with `started` (when its request reached the handler) records its stages.
/// hyper spawns every request as one future, allocated and moved per request, whose size is
/// that of the largest path inlined in it: rare and large paths (other services, cluster
/// forwarding, the gateway, hashes) are boxed so the KV calls stay small.
async fn call(
    ctx: &Rc<Ctx>,
    path: &str,
    msgs: Vec<Bytes>,
    started: Option<Instant>,
) -> Result<Bytes, Status> {
    let db = &ctx.db;
    match path {
        RANGE => range(ctx, one(msgs)?).await,
        "/etcdserverpb.KV/Put" => {
            check_size(ctx, &msgs)?;
            let req: pb::PutRequest = one(msgs)?;
            check_space(ctx, quota::put_cost(&req))?;
            let req = convert::put_request(req);
            let Some(started) = started else {
                let resp = db.put(req).await?;
                let h = ctx.header(resp.header.revision);
                return Ok(enc(&convert::put_response(resp, h)));
            };
            let mut trace = db.put_tracer(started);
            trace.mark(Stage::Decode);
            let resp = db.put_traced(req, &mut trace).await?;
            let h = ctx.header(resp.header.revision);
            let out = enc(&convert::put_response(resp, h));
            trace.mark(Stage::Encode);
            Ok(out)
        }
        "/etcdserverpb.KV/DeleteRange" => {
            check_size(ctx, &msgs)?;
            check_space(ctx, 0)?;
            let resp = db.delete_range(convert::delete_request(one(msgs)?)).await?;
            let h = ctx.header(resp.header.revision);
            Ok(enc(&convert::delete_response(resp, h)))
        }
        "/etcdserverpb.KV/Txn" => {
            check_size(ctx, &msgs)?;
            let req: pb::TxnRequest = one(msgs)?;
            if quota::txn_writes(&req) {
                check_space(ctx, quota::txn_cost(&req))?;
            }
            let resp = db.txn(convert::txn_request(req)?).await?;
            let h = ctx.header(resp.header.revision);
            Ok(enc(&convert::txn_response(resp, h)))
        }
        "/etcdserverpb.KV/Compact" => {
            let req: pb::CompactionRequest = one(msgs)?;
            check_space(ctx, 0)?;
            let resp = db
                .compact(crate::kv::CompactionRequest {
                    revision: req.revision,
                    physical: req.physical,
                })
                .await?;
            Ok(enc(&pb::CompactionResponse {
                header: Some(ctx.header(resp.header.revision)),
            }))
        }
        "/etcdserverpb.Maintenance/Status" => {
            let _: pb::StatusRequest = one(msgs)?;
            let st = db.status().await?;
            ctx.quota.note_size(st.disk_bytes);
            let leader = ctx.db.leader();
            let mut errors = Vec::new();
            if leader == 0 {
                errors.push(Error::NoLeader.to_string());
            }
            // etcd lists the raised alarms among a member's errors.
            for a in ctx.db.alarms().get().list(0) {
                errors.push(format!(
                    "memberID:{} alarm:{} ",
                    a.member,
                    crate::alarm::name(a.alarm)
                ));
            }
            Ok(enc(&pb::StatusResponse {
                header: Some(ctx.header(st.revision)),
                version: ETCD_API_VERSION.into(),
                db_size: st.disk_bytes as i64,
                leader,
                raft_index: st.log_index,
                raft_term: ctx.db.raft_term(),
                raft_applied_index: st.log_index,
                errors,
                db_size_in_use: st.disk_bytes as i64,
                is_learner: ctx.db.is_learner(),
            }))
        }
        quota::ALARM => {
            use pb::alarm_request::AlarmAction;
            let req: pb::AlarmRequest = one(msgs)?;
            let known = matches!(req.alarm, crate::alarm::NOSPACE | crate::alarm::CORRUPT);
            let alarms = match AlarmAction::try_from(req.action) {
                Ok(AlarmAction::Get) => ctx.db.alarms().get().list(req.alarm),
                Ok(action) if known => {
                    let op = crate::alarm::AlarmOp {
                        activate: action == AlarmAction::Activate,
                        alarm: crate::alarm::Alarm {
                            member: req.member_id,
                            alarm: req.alarm,
                        },
                    };
                    db.alarm_change(op).await?.into_iter().collect()
                }
                _ => {
                    return Err(Status::new(
                        Code::InvalidArgument,
                        "etcdserver: unsupported alarm",
                    ))
                }
            };
            Ok(enc(&pb::AlarmResponse {
                header: Some(ctx.header(db.revision())),
                alarms: alarms
                    .into_iter()
                    .map(|a| pb::AlarmMember {
                        member_id: a.member,
                        alarm: a.alarm,
                    })
                    .collect(),
            }))
        }
        "/etcdserverpb.Maintenance/Defragment" => {
            let _: pb::DefragmentRequest = one(msgs)?;
            db.checkpoint().await?;
            // The next write sees the smaller store at once.
            if let Ok(st) = db.status().await {
                ctx.quota.note_size(st.disk_bytes);
            }
            Ok(enc(&pb::DefragmentResponse {
                header: Some(ctx.header(db.revision())),
            }))
        }
        "/etcdserverpb.Maintenance/Hash" => {
            let _: pb::HashRequest = one(msgs)?;
            let rev = db.revision();
            let hash = Box::pin(snapshot::hash(ctx, rev)).await?;
            Ok(enc(&pb::HashResponse {
                header: Some(ctx.header(rev)),
                hash,
            }))
        }
        "/etcdserverpb.Maintenance/HashKV" => {
            let req: pb::HashKvRequest = one(msgs)?;
            Ok(enc(&Box::pin(snapshot::hash_kv(ctx, req)).await?))
        }
        "/etcdserverpb.Maintenance/MoveLeader" => {
            let req: pb::MoveLeaderRequest = one(msgs)?;
            db.move_leader(req.target_id).await?;
            Ok(enc(&pb::MoveLeaderResponse {
                header: Some(ctx.header(db.revision())),
            }))
        }
        "/etcdserverpb.Cluster/MemberList" => {
            let _: pb::MemberListRequest = one(msgs)?;
            Ok(enc(&pb::MemberListResponse {
                header: Some(ctx.header(db.revision())),
                members: member_list(ctx),
            }))
        }
        "/etcdserverpb.Cluster/MemberAdd" => {
            let req: pb::MemberAddRequest = one(msgs)?;
            if !db.is_cluster_member() {
                return Err(not_enough_members());
            }
            let m = db.member_add(req.peer_ur_ls, req.is_learner).await?;
            Ok(enc(&pb::MemberAddResponse {
                header: Some(ctx.header(db.revision())),
                member: Some(pb_member(m)),
                members: member_list(ctx),
            }))
        }
        "/etcdserverpb.Cluster/MemberRemove" => {
            let req: pb::MemberRemoveRequest = one(msgs)?;
            if !db.is_cluster_member() {
                return Err(member_change(ctx, req.id));
            }
            db.member_remove(req.id).await?;
            Ok(enc(&pb::MemberRemoveResponse {
                header: Some(ctx.header(db.revision())),
                members: member_list(ctx),
            }))
        }
        "/etcdserverpb.Cluster/MemberUpdate" => {
            let req: pb::MemberUpdateRequest = one(msgs)?;
            if !db.is_cluster_member() {
                return Err(member_change(ctx, req.id));
            }
            db.member_update(req.id, req.peer_ur_ls).await?;
            Ok(enc(&pb::MemberUpdateResponse {
                header: Some(ctx.header(db.revision())),
                members: member_list(ctx),
            }))
        }
        "/etcdserverpb.Cluster/MemberPromote" => {
            let req: pb::MemberPromoteRequest = one(msgs)?;
            if !db.is_cluster_member() {
                if req.id != ctx.member_id {
                    return Err(Status::new(Code::NotFound, "etcdserver: member not found"));
                }
                return Err(Status::new(
                    Code::FailedPrecondition,
                    "etcdserver: can only promote a learner member",
                ));
            }
            db.member_promote(req.id).await?;
            Ok(enc(&pb::MemberPromoteResponse {
                header: Some(ctx.header(db.revision())),
                members: member_list(ctx),
            }))
        }
        p if p.starts_with("/etcdserverpb.Lease/") || p == lease::KEEP_ALIVE_ONCE => {
            Box::pin(lease::call(ctx, p, msgs)).await
        }
        p if p.starts_with("/etcdserverpb.Auth/") => Box::pin(auth::call(ctx, p, msgs)).await,
        p if p.starts_with("/v3lockpb.Lock/") => Box::pin(lock::call(ctx, p, msgs)).await,
        p if p.starts_with("/v3electionpb.Election/") => {
            Box::pin(election::call(ctx, p, msgs)).await
        }
        _ => Err(Status::unimplemented(path)),
    }
}

fn pb_member(m: crate::cluster::Member) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name,
        peer_ur_ls: m.peer_urls,
        client_ur_ls: m.client_urls,
        is_learner: m.is_learner,
    }
}

/// The members as this member knows them; its own entry carries its flags' names and URLs.
fn member_list(ctx: &Ctx) -> Vec<pb::Member> {
    match ctx.db.members() {
        Some(ms) => ms
            .into_iter()
            .map(|m| {
                if m.id == ctx.member_id {
                    let mut me = ctx.member();
                    me.is_learner = m.is_learner;
                    me
                } else {
                    pb_member(m)
                }
            })
            .collect(),
        None => vec![ctx.member()],
    }
}

fn not_for_learner() -> Status {
    Status::new(
        Code::Unavailable,
        "etcdserver: rpc not supported for learner",
    )
}

/// A single node cannot change membership: etcd's refusal for a change the cluster cannot take.
fn not_enough_members() -> Status {
    Status::new(
        Code::FailedPrecondition,
        "etcdserver: re-configuration failed due to not enough started members",
    )
}

fn member_change(ctx: &Ctx, id: u64) -> Status {
    if id != ctx.member_id {
        return Status::new(Code::NotFound, "etcdserver: member not found");
    }
    not_enough_members()
}

//! The peer transport of one core: a listener on the node's peer port (every core binds it with
//! SO_REUSEPORT) and, per remote member, one outgoing connection this core dials lazily.
//!
//! Raft traffic is one-way after the handshake: a node sends on the connection it dialed and
//! receives on the ones it accepted, so neither side ever waits for the other to read. The one
//! exception is relayed client calls ([`Transport::call`]): the leader node answers each on the
//! connection it arrived on, so the answer reaches the very core that sent the call, and the
//! dialing side learns at once when that connection dies with calls in flight
//! ([`Inbound::Lost`]). Everything queued between two [`Transport::flush`] calls leaves as one
//! batch frame per destination, one write. Raft tolerates loss, so a broken connection drops what
//! was queued and is redialed with backoff; nothing here retries a message or a call.
//!
//! With `https://` peer URLs the connection is TLS ([`PeerTls`]): the listener runs the handshake
//! before anything else (refusing plain TCP, a certificate from an unknown CA, or none where one is
//! required), and a dialer verifies the member it reached with the URL's host as its name. A
//! failed handshake closes that connection and is logged on both ends; nobody else is affected.
//!
//! Both sides check the other's `Hello` ([`check_hello`]): another cluster, another token,
//! another shard count or protocol version, or a member the cluster does not know is refused with
//! a message naming both sides' values, logged on both ends. A peer that sends an invalid frame is
//! disconnected and logged; nothing a peer sends can panic the core.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::codec::{
    self, Answer, Batch, Call, FrameReader, Hello, Join, PeerMsg, ReadStamp, PROTOCOL_VERSION,
};
use crate::raft::{Message, NodeId};

/// What arrives on this core from a peer, or what became of calls this core relayed.
#[derive(Debug)]
pub enum Inbound {
    /// A Raft message of `shard`'s group.
    Raft(u32, Message),
    /// The sender's read stamp for one of its shards.
    Stamp(ReadStamp),
    /// A client call relayed by member `from`, to be answered through `reply`.
    Call(NodeId, Call, Rc<Replies>),
    /// The answer to a call this core relayed.
    Answer(Answer),
    /// Calls this core queued for `to` that never left: no connection could be made.
    Unsent(NodeId, Vec<u64>),
    /// The connection to `to` broke: calls already written to it may or may not have run.
    Lost(NodeId),
}

/// The way back for answers to the calls that arrived on one accepted connection.
pub struct Replies {
    queue: RefCell<Vec<Answer>>,
    ready: event_listener::Event,
    closed: Cell<bool>,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replies")
    }
}

impl Replies {
    /// Queues `answer`; answers queued together leave in one frame. Dropped if the
    /// connection is gone (the caller's side learns that from the broken connection).
    pub fn send(&self, answer: Answer) {
        if self.closed.get() {
            return;
        }
        self.queue.borrow_mut().push(answer);
        self.ready.notify(1);
    }
}

/// Receives everything that arrives on this core.
pub type Handler = Rc<dyn Fn(Inbound)>;

/// The bytes of one peer connection: the socket, or a TLS session over it.
trait Duplex: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Duplex for T {}
type PeerStream = Box<dyn Duplex>;

/// TLS for `https://` peer URLs (`--peer-cert-file` and friends, or `--peer-auto-tls`).
#[derive(Clone, Debug, Default)]
pub struct PeerTls {
    /// Set when this member's peer URL is `https://`: its listener speaks only TLS.
    pub accept: Option<Arc<rustls::ServerConfig>>,
    /// How this member dials `https://` peers (it presents its certificate); without it such
    /// peers cannot be reached.
    pub dial: Option<Arc<rustls::ClientConfig>>,
}

/// How long either side has to finish a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a peer URL (or a bare `host:port`, dialed without TLS) points.
fn target(url: &str) -> (bool, &str) {
    if let Some(rest) = url.strip_prefix("https://") {
        (true, rest.trim_end_matches('/'))
    } else {
        (
            false,
            url.strip_prefix("http://")
                .unwrap_or(url)
                .trim_end_matches('/'),
        )
    }
}

/// An IO error as the transport reports it: a TLS failure (a refused certificate, an alert
/// from the other side, TLS spoken to a plain port) is a refusal.
fn describe(e: std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => format!("refused: TLS: {t}"),
        None => e.to_string(),
    }
}

/// What a peer announced about itself in its handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: String,
    pub client_urls: Vec<String>,
}

/// This node's identity and its peers' addresses.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub local: Hello,
    /// Member id → its peer URL (`http://host:port`, `https://host:port`, or a bare
    /// `host:port`), this node excluded. Shared with the cluster layer, which rewrites it when
    /// membership changes.
    pub peers: Arc<RwLock<BTreeMap<NodeId, String>>>,
    pub dial_timeout: Duration,
    /// What peers announced in their handshakes, shared with the rest of the node.
    pub peer_info: Arc<RwLock<BTreeMap<NodeId, PeerInfo>>>,
    /// The membership record (JSON) handed to a joining member; empty: joins are refused.
    pub membership: Arc<RwLock<Vec<u8>>>,
    pub tls: PeerTls,
}

impl PeerConfig {
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        shards: u32,
        name: &str,
        token: &str,
        peers: BTreeMap<NodeId, String>,
    ) -> PeerConfig {
        PeerConfig {
            local: Hello {
                version: PROTOCOL_VERSION,
                cluster_id,
                member_id,
                to_member: 0,
                shards,
                name: name.to_string(),
                token: token.to_string(),
                client_urls: Vec::new(),
            },
            peers: Arc::new(RwLock::new(peers)),
            dial_timeout: Duration::from_millis(500),
            peer_info: Arc::default(),
            membership: Arc::default(),
            tls: PeerTls::default(),
        }
    }

    fn knows(&self, remote: &Hello) -> Result<(), String> {
        let peers = self
            .peers
            .read()
            .map_err(|_| "peer table poisoned".to_string())?;
        check_hello(&self.local, remote, &peers)
    }

    fn addr_of(&self, id: NodeId) -> Option<String> {
        self.peers.read().ok()?.get(&id).cloned()
    }

    /// The answer to a joining member: the membership, or why it may not join.
    fn answer_join(&self, j: &Join) -> Result<Bytes, String> {
        let local = &self.local;
        if j.version != local.version {
            return Err(format!(
                "peer protocol version mismatch: {} speaks {}, the joiner speaks {}",
                who(local),
                local.version,
                j.version
            ));
        }
        if j.token != local.token {
            return Err(format!(
                "cluster mismatch: {} is in a cluster with token {:?}, the joiner has token {:?}",
                who(local),
                local.token,
                j.token
            ));
        }
        if j.shards != local.shards {
            return Err(format!(
                "shard count mismatch: {} has {} shards, the joiner has {}",
                who(local),
                local.shards,
                j.shards
            ));
        }
        let m = self.membership.read().map_err(|_| "membership poisoned")?;
        if m.is_empty() {
            return Err(format!("{} does not take joining members", who(local)));
        }
        Ok(Bytes::copy_from_slice(&m))
    }
}

/// Asks the member at peer URL `url` for the cluster's membership, as a member started with
/// `--initial-cluster-state existing` does before it opens its data dir; `https://` URLs are
/// dialed with `tls`. Blocking: it runs before any executor exists.
pub fn request_membership(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    join: &Join,
    timeout: Duration,
) -> Result<Bytes, String> {
    use std::io::{Read, Write};
    let (secure, addr) = target(url);
    let sock = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let tcp = std::net::TcpStream::connect_timeout(&sock, timeout).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    trait Blocking: Read + Write {}
    impl<T: Read + Write> Blocking for T {}
    let mut s: Box<dyn Blocking> = if secure {
        let cfg = tls.ok_or_else(|| no_dial_tls(url))?;
        let name = crate::tls::server_name(addr)?;
        let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
        Box::new(rustls::StreamOwned::new(conn, tcp))
    } else {
        Box::new(tcp)
    };
    s.write_all(&codec::encode_join(join))
        .and_then(|()| s.flush())
        .map_err(describe)?;
    let mut reader = FrameReader::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Some(frame) = reader.next_frame().map_err(|e| e.to_string())? {
            return match codec::decode(&frame, 0, 0).map_err(|e| e.to_string())? {
                PeerMsg::Members(m) => Ok(m),
                PeerMsg::Refusal(r) => Err(format!("refused: {r}")),
                other => Err(format!("expected the membership, got {other:?}")),
            };
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("{addr} closed before answering")),
            Ok(n) => reader.feed(&buf[..n]),
            Err(e) => return Err(describe(e)),
        }
    }
}

fn no_dial_tls(url: &str) -> String {
    format!(
        "peer URL {url} needs TLS, and this member has no peer certificate (--peer-cert-file and \
         --peer-key-file, or --peer-auto-tls)"
    )
}

fn who(h: &Hello) -> String {
    format!(
        "{} ({:x})",
        if h.name.is_empty() { "?" } else { &h.name },
        h.member_id
    )
}

/// Whether `local` accepts `remote` as a peer; the error names both sides' values.
pub fn check_hello(
    local: &Hello,
    remote: &Hello,
    known: &BTreeMap<NodeId, String>,
) -> Result<(), String> {
    let (me, them) = (who(local), who(remote));
    if remote.version != local.version {
        return Err(format!(
            "peer protocol version mismatch: {me} speaks {}, {them} speaks {}",
            local.version, remote.version
        ));
    }
    if remote.token != local.token || remote.cluster_id != local.cluster_id {
        return Err(format!(
            "cluster mismatch: {me} is in cluster {:x} (token {:?}), {them} in cluster {:x} \
             (token {:?})",
            local.cluster_id, local.token, remote.cluster_id, remote.token
        ));
    }
    if remote.to_member != 0 && remote.to_member != local.member_id {
        return Err(format!(
            "member mismatch: {them} dialed member {:x} but reached {me}",
            remote.to_member
        ));
    }
    if !known.contains_key(&remote.member_id) {
        return Err(format!(
            "{them} is not a member of cluster {:x} as {me} knows it",
            local.cluster_id
        ));
    }
    if remote.shards != local.shards {
        return Err(format!(
            "shard count mismatch: {me} has {} shards, {them} has {}",
            local.shards, remote.shards
        ));
    }
    Ok(())
}

/// Connections to one remote member.
struct Link {
    to: NodeId,
    /// What leaves with the next frame; read stamps (the newest per shard) only ride along.
    queue: RefCell<Batch>,
    ready: event_listener::Event,
    /// A frame is being written.
    writing: Cell<bool>,
    /// What was queued got written or dropped.
    taken: event_listener::Event,
}

/// Counters a test or `/metrics` can read.
#[derive(Default)]
pub struct PeerStats {
    pub frames_sent: Cell<u64>,
    pub frames_received: Cell<u64>,
    pub dropped: Cell<u64>,
    pub refused: Cell<u64>,
    /// The newest handshake refusal or protocol error, as logged.
    pub last_error: RefCell<Option<String>>,
}

pub struct Transport {
    cfg: PeerConfig,
    links: RefCell<HashMap<NodeId, Rc<Link>>>,
    handler: Handler,
    pub stats: PeerStats,
    closed: Cell<bool>,
    /// Wakes every task of this transport when it closes, so sockets are released even while
    /// a task waits in accept, read or write.
    shutdown: event_listener::Event,
}

impl Transport {
    /// Starts this core's share of the transport: accepts on `listener`, dials peers as messages
    /// for them are flushed.
    pub fn start(cfg: PeerConfig, listener: TcpListener, handler: Handler) -> Rc<Transport> {
        let t = Rc::new(Transport {
            cfg,
            links: RefCell::new(HashMap::new()),
            handler,
            stats: PeerStats::default(),
            closed: Cell::new(false),
            shutdown: event_listener::Event::new(),
        });
        glommio::spawn_local(accept_loop(t.clone(), listener)).detach();
        t
    }

    pub fn member_id(&self) -> NodeId {
        self.cfg.local.member_id
    }

    /// Queues `msg` of `shard`'s group for member `to`; it leaves at the next [`Self::flush`].
    pub fn send(self: &Rc<Self>, to: NodeId, shard: u32, msg: Message) {
        let link = self.link(to);
        link.queue.borrow_mut().messages.push((shard, msg));
    }

    /// Queues a client call for member `to`; it leaves at the next [`Self::flush`]. Its answer
    /// arrives as [`Inbound::Answer`] on this core, or its fate as [`Inbound::Unsent`] /
    /// [`Inbound::Lost`].
    pub fn call(self: &Rc<Self>, to: NodeId, call: Call) {
        let link = self.link(to);
        link.queue.borrow_mut().calls.push(call);
    }

    /// Attaches `stamp` to the next frame for `to` (replacing an older one of its shard).
    pub fn stamp(self: &Rc<Self>, to: NodeId, stamp: ReadStamp) {
        let link = self.link(to);
        let mut q = link.queue.borrow_mut();
        let stamps = &mut q.stamps;
        match stamps.iter_mut().find(|s| s.shard == stamp.shard) {
            Some(s) => *s = stamp,
            None => stamps.push(stamp),
        }
    }

    /// Waits until nothing queued for `to` is left waiting (taken for a write, or dropped with a
    /// dead connection): a sender of bulk data keeps one frame in flight this way.
    pub async fn drained(&self, to: NodeId) {
        let Some(link) = self.links.borrow().get(&to).cloned() else {
            return;
        };
        loop {
            let l = link.taken.listen();
            if (!link.queue.borrow().has_traffic() && !link.writing.get()) || self.closed.get() {
                return;
            }
            l.await;
        }
    }

    /// Sends everything queued: one frame, one write per destination.
    pub fn flush(&self) {
        for link in self.links.borrow().values() {
            if link.queue.borrow().has_traffic() {
                link.ready.notify(1);
            }
        }
    }

    /// Stops dialing and accepting (connections end as their tasks notice).
    pub fn close(&self) {
        self.closed.set(true);
        self.shutdown.notify(usize::MAX);
        for link in self.links.borrow().values() {
            link.ready.notify(usize::MAX);
        }
    }

    fn link(self: &Rc<Self>, to: NodeId) -> Rc<Link> {
        if let Some(l) = self.links.borrow().get(&to) {
            return l.clone();
        }
        let link = Rc::new(Link {
            to,
            queue: RefCell::default(),
            ready: event_listener::Event::new(),
            writing: Cell::new(false),
            taken: event_listener::Event::new(),
        });
        self.links.borrow_mut().insert(to, link.clone());
        glommio::spawn_local(dial_loop(self.clone(), link.clone())).detach();
        link
    }

    /// Runs `f` until it finishes or the transport closes (then `None`).
    async fn until_closed<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        let l = self.shutdown.listen();
        if self.closed.get() {
            return None;
        }
        futures_lite::future::or(async { Some(f.await) }, async {
            l.await;
            None
        })
        .await
    }

    fn note_peer(&self, h: &Hello) {
        if let Ok(mut m) = self.cfg.peer_info.write() {
            m.insert(
                h.member_id,
                PeerInfo {
                    name: h.name.clone(),
                    client_urls: h.client_urls.clone(),
                },
            );
        }
    }

    fn note_error(&self, refused: bool, msg: String) {
        if refused {
            self.stats.refused.set(self.stats.refused.get() + 1);
        }
        *self.stats.last_error.borrow_mut() = Some(msg);
    }
}

/// The first frame on a plain peer port, refusing a TLS client at once.
async fn read_first_plain(
    stream: &mut (impl AsyncRead + Unpin),
    reader: &mut FrameReader,
    buf: &mut [u8],
) -> Result<Option<bytes::Bytes>, String> {
    read_frame_checked(stream, reader, buf, true).await
}

/// Writes `bytes` whole and pushes them out (a TLS session may hold them back otherwise).
async fn write_flush(w: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), String> {
    w.write_all(bytes).await.map_err(describe)?;
    w.flush().await.map_err(describe)
}

async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin),
    reader: &mut FrameReader,
    buf: &mut [u8],
) -> Result<Option<bytes::Bytes>, String> {
    read_frame_checked(stream, reader, buf, false).await
}

/// The next frame; with `refuse_tls`, bytes that open a TLS handshake are refused first (a
/// plain port would otherwise read a ClientHello as a frame header announcing over 64 KiB).
async fn read_frame_checked(
    stream: &mut (impl AsyncRead + Unpin),
    reader: &mut FrameReader,
    buf: &mut [u8],
    refuse_tls: bool,
) -> Result<Option<bytes::Bytes>, String> {
    loop {
        if refuse_tls && reader.starts_like_tls() {
            return Err(
                "refused: TLS spoken to a plain peer port (this member's peer URL is http://)"
                    .to_string(),
            );
        }
        if let Some(f) = reader.next_frame().map_err(|e| e.to_string())? {
            return Ok(Some(f));
        }
        match stream.read(buf).await {
            Ok(0) => return Ok(None),
            Ok(n) => reader.feed(&buf[..n]),
            Err(e) => return Err(describe(e)),
        }
    }
}

async fn accept_loop(t: Rc<Transport>, listener: TcpListener) {
    while !t.closed.get() {
        let Some(accepted) = t.until_closed(listener.accept()).await else {
            return;
        };
        match accepted {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let t = t.clone();
                glommio::spawn_local(async move {
                    let peer = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let stream: PeerStream = match t.cfg.tls.accept.clone() {
                        None => Box::new(stream),
                        Some(cfg) => {
                            let acceptor = futures_rustls::TlsAcceptor::from(cfg);
                            let handshake = async {
                                Ok::<_, glommio::GlommioError<()>>(acceptor.accept(stream).await)
                            };
                            let shook = glommio::timer::timeout(TLS_HANDSHAKE_TIMEOUT, handshake);
                            let shaken = match t.until_closed(shook).await {
                                None => return,
                                Some(Ok(Ok(s))) => Ok(s),
                                Some(Ok(Err(e))) => Err(describe(e)),
                                Some(Err(_)) => Err("refused: TLS: handshake timed out".into()),
                            };
                            match shaken {
                                Ok(s) => Box::new(s),
                                Err(e) => {
                                    // Plain TCP, an untrusted certificate or none where one is
                                    // required: this connection closes, nobody else is affected.
                                    tracing::warn!(peer = %peer, error = %e, "peer TLS handshake refused");
                                    t.note_error(true, e);
                                    return;
                                }
                            }
                        }
                    };
                    if let Some(Err(e)) = t.until_closed(serve_inbound(&t, stream)).await {
                        tracing::warn!(peer = %peer, error = %e, "peer connection closed");
                        t.note_error(e.starts_with("refused"), e);
                    }
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One accepted connection: handshake, then Raft batches until the peer goes away.
async fn serve_inbound(t: &Rc<Transport>, mut stream: PeerStream) -> Result<(), String> {
    let mut reader = FrameReader::default();
    let mut buf = vec![0u8; 64 << 10];
    let first = if t.cfg.tls.accept.is_some() {
        read_frame(&mut stream, &mut reader, &mut buf).await?
    } else {
        read_first_plain(&mut stream, &mut reader, &mut buf).await?
    };
    let Some(first) = first else {
        return Ok(());
    };
    let hello = match codec::decode(&first, 0, 0).map_err(|e| e.to_string())? {
        PeerMsg::Hello(h) => h,
        PeerMsg::Join(j) => {
            let answer = match t.cfg.answer_join(&j) {
                Ok(m) => codec::encode_members(&m),
                Err(reason) => {
                    tracing::warn!(peer_urls = ?j.peer_urls, %reason, "refused a joining member");
                    codec::encode_refusal(&reason)
                }
            };
            return write_flush(&mut stream, &answer).await;
        }
        other => return Err(format!("expected a hello, got {other:?}")),
    };
    if let Err(reason) = t.cfg.knows(&hello) {
        let _ = write_flush(&mut stream, &codec::encode_refusal(&reason)).await;
        return Err(format!("refused: {reason}"));
    }
    t.note_peer(&hello);
    write_flush(&mut stream, &codec::encode_hello(&t.cfg.local)).await?;
    let (from, to) = (hello.member_id, t.cfg.local.member_id);
    let (mut rd, wr) = futures_lite::io::split(stream);
    let replies = Rc::new(Replies {
        queue: RefCell::default(),
        ready: event_listener::Event::new(),
        closed: Cell::new(false),
    });
    glommio::spawn_local(write_replies(t.clone(), wr, replies.clone())).detach();
    let served = async {
        while let Some(frame) = read_frame(&mut rd, &mut reader, &mut buf).await? {
            let PeerMsg::Batch(batch) =
                codec::decode(&frame, from, to).map_err(|e| e.to_string())?
            else {
                return Err("unexpected frame after the handshake".to_string());
            };
            t.stats
                .frames_received
                .set(t.stats.frames_received.get() + 1);
            let shards = t.cfg.local.shards;
            if let Some(shard) = batch
                .messages
                .iter()
                .map(|(s, _)| *s)
                .chain(batch.stamps.iter().map(|s| s.shard))
                .find(|&s| s >= shards)
            {
                return Err(format!("message for shard {shard} of {shards}"));
            }
            if !batch.answers.is_empty() {
                return Err("answers on a connection that carries calls".to_string());
            }
            for (shard, m) in batch.messages {
                (t.handler)(Inbound::Raft(shard, m));
            }
            for st in batch.stamps {
                (t.handler)(Inbound::Stamp(st));
            }
            for c in batch.calls {
                (t.handler)(Inbound::Call(from, c, replies.clone()));
            }
        }
        Ok(())
    }
    .await;
    replies.closed.set(true);
    replies.ready.notify(usize::MAX);
    served
}

/// Writes the answers to calls that arrived on one accepted connection back on it, those
/// ready together in one frame, until the connection ends.
async fn write_replies(t: Rc<Transport>, mut wr: WriteHalf<PeerStream>, replies: Rc<Replies>) {
    loop {
        let l = replies.ready.listen();
        if replies.closed.get() || t.closed.get() {
            return;
        }
        if replies.queue.borrow().is_empty() {
            if t.until_closed(l).await.is_none() {
                return;
            }
            continue;
        }
        let batch = Batch {
            answers: std::mem::take(&mut *replies.queue.borrow_mut()),
            ..Default::default()
        };
        match t
            .until_closed(write_flush(&mut wr, &codec::encode_batch(&batch)))
            .await
        {
            Some(Ok(())) => t.stats.frames_sent.set(t.stats.frames_sent.get() + 1),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "writing answers to a peer failed");
                replies.closed.set(true);
                return;
            }
            None => return,
        }
    }
}

/// Reads the answers that come back on a connection this core dialed, until it ends; then
/// marks the link broken so its next write redials.
async fn read_answers(
    t: Rc<Transport>,
    link: Rc<Link>,
    mut rd: ReadHalf<PeerStream>,
    broken: Rc<Cell<bool>>,
) {
    let mut reader = FrameReader::default();
    let mut buf = vec![0u8; 64 << 10];
    let (from, to) = (link.to, t.cfg.local.member_id);
    let ended = loop {
        let frame = match t
            .until_closed(read_frame(&mut rd, &mut reader, &mut buf))
            .await
        {
            None => return,
            Some(Ok(Some(f))) => f,
            Some(Ok(None)) => break "closed by the peer".to_string(),
            Some(Err(e)) => break e,
        };
        match codec::decode(&frame, from, to) {
            Ok(PeerMsg::Batch(b)) if !b.has_traffic() || b.answers.len() == b.items() => {
                for a in b.answers {
                    (t.handler)(Inbound::Answer(a));
                }
            }
            Ok(_) => break "unexpected frame on a dialed connection".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(to = %format!("{:x}", link.to), reason = %ended, "dialed peer connection ended");
    broken.set(true);
    link.ready.notify(usize::MAX);
    (t.handler)(Inbound::Lost(link.to));
}

/// Keeps a connection to `link.to` while there is something to send.
async fn dial_loop(t: Rc<Transport>, link: Rc<Link>) {
    let mut backoff = Duration::from_millis(50);
    // The write half of the connection, and whether its reader saw it end.
    let mut conn: Option<(WriteHalf<PeerStream>, Rc<Cell<bool>>)> = None;
    while !t.closed.get() {
        if conn.as_ref().is_some_and(|(_, broken)| broken.get()) {
            conn = None;
        }
        if !link.queue.borrow().has_traffic() {
            let listener = link.ready.listen();
            if !link.queue.borrow().has_traffic()
                && !t.closed.get()
                && !conn.as_ref().is_some_and(|(_, broken)| broken.get())
            {
                listener.await;
            }
            continue;
        }
        if conn.is_none() {
            let Some(dialed) = t.until_closed(dial(&t, link.to)).await else {
                return;
            };
            match dialed {
                Ok(s) => {
                    backoff = Duration::from_millis(50);
                    let (rd, wr) = futures_lite::io::split(s);
                    let broken = Rc::new(Cell::new(false));
                    glommio::spawn_local(read_answers(t.clone(), link.clone(), rd, broken.clone()))
                        .detach();
                    conn = Some((wr, broken));
                }
                Err(e) => {
                    // Raft resends what matters; what was queued for a dead peer is dropped,
                    // and the callers of relayed calls learn that theirs never left.
                    let dropped = std::mem::take(&mut *link.queue.borrow_mut());
                    link.taken.notify(usize::MAX);
                    t.stats
                        .dropped
                        .set(t.stats.dropped.get() + dropped.items() as u64);
                    if !dropped.calls.is_empty() {
                        let ids = dropped.calls.iter().map(|c| c.id).collect();
                        (t.handler)(Inbound::Unsent(link.to, ids));
                    }
                    tracing::debug!(to = %format!("{:x}", link.to), error = %e, "peer dial failed");
                    if e.starts_with("refused") {
                        tracing::warn!(to = %format!("{:x}", link.to), error = %e, "peer refused us");
                        t.note_error(true, e);
                    }
                    t.until_closed(glommio::timer::sleep(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let batch = std::mem::take(&mut *link.queue.borrow_mut());
        let frame = codec::encode_batch(&batch);
        let Some((s, _)) = conn.as_mut() else {
            continue;
        };
        link.writing.set(true);
        let written = t.until_closed(write_flush(s, &frame)).await;
        link.writing.set(false);
        link.taken.notify(usize::MAX);
        let Some(written) = written else {
            return;
        };
        if let Err(e) = written {
            tracing::debug!(to = %format!("{:x}", link.to), error = %e, "peer write failed");
            t.stats
                .dropped
                .set(t.stats.dropped.get() + batch.items() as u64);
            conn = None;
            if !batch.calls.is_empty() {
                (t.handler)(Inbound::Lost(link.to));
            }
            continue;
        }
        t.stats.frames_sent.set(t.stats.frames_sent.get() + 1);
    }
}

/// Connects to member `to` (over TLS if its URL is `https://`) and completes the handshake.
async fn dial(t: &Rc<Transport>, to: NodeId) -> Result<PeerStream, String> {
    let url = t
        .cfg
        .addr_of(to)
        .ok_or_else(|| format!("no address for member {to:x}"))?;
    let (secure, addr) = target(&url);
    let sock: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let tcp = TcpStream::connect_timeout(sock, t.cfg.dial_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mut s: PeerStream = if secure {
        let cfg = t.cfg.tls.dial.clone().ok_or_else(|| no_dial_tls(&url))?;
        let name = crate::tls::server_name(addr)?;
        let connector = futures_rustls::TlsConnector::from(cfg);
        let handshake =
            async { Ok::<_, glommio::GlommioError<()>>(connector.connect(name, tcp).await) };
        match glommio::timer::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                // Whatever ends a TLS handshake (an untrusted certificate, a plain port that
                // hangs up) is a refusal.
                let e = describe(e);
                let e = e.strip_prefix("refused: TLS: ").unwrap_or(&e);
                return Err(format!("refused: TLS handshake with {url}: {e}"));
            }
            Err(_) => return Err(format!("refused: TLS: handshake with {url} timed out")),
        }
    } else {
        Box::new(tcp)
    };
    let mut hello = t.cfg.local.clone();
    hello.to_member = to;
    write_flush(&mut s, &codec::encode_hello(&hello)).await?;
    let mut reader = FrameReader::default();
    let mut buf = vec![0u8; 4096];
    let reply = read_frame(&mut s, &mut reader, &mut buf)
        .await
        .map_err(|e| format!("{e} (dialing {url})"))?
        .ok_or_else(|| {
            if secure {
                format!("{addr} closed during the handshake")
            } else {
                // A TLS listener answers a plain hello with an alert and hangs up.
                format!("{addr} closed during the handshake (is it a TLS peer port?)")
            }
        })?;
    match codec::decode(&reply, 0, 0).map_err(|e| e.to_string())? {
        PeerMsg::Hello(h) => {
            let mut expect = h.clone();
            expect.to_member = 0;
            t.cfg.knows(&expect).map_err(|r| format!("refused: {r}"))?;
            if h.member_id != to {
                return Err(format!(
                    "refused: member mismatch: dialed {to:x} at {addr}, reached {:x}",
                    h.member_id
                ));
            }
            t.note_peer(&h);
            Ok(s)
        }
        PeerMsg::Refusal(r) => Err(format!("refused: {r}")),
        other => Err(format!("expected a hello, got {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::MessageKind;
    use crate::runtime::run_local;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn cfg(me: u64, shards: u32, token: &str, ports: &BTreeMap<u64, u16>) -> PeerConfig {
        let peers = ports
            .iter()
            .filter(|(&id, _)| id != me)
            .map(|(&id, p)| (id, format!("127.0.0.1:{p}")))
            .collect();
        PeerConfig::new(77, me, shards, &format!("n{me}"), token, peers)
    }

    type Inbox = Rc<RefCell<Vec<(u32, Message)>>>;

    fn start(c: PeerConfig, port: u16) -> (Rc<Transport>, Inbox) {
        let got: Inbox = Rc::default();
        let sink = got.clone();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let t = Transport::start(
            c,
            listener,
            Rc::new(move |inbound| {
                if let Inbound::Raft(s, m) = inbound {
                    sink.borrow_mut().push((s, m));
                }
            }),
        );
        (t, got)
    }

    async fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if cond() {
                return true;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[test]
    fn batches_flow_and_bad_peers_are_refused() {
        run_local(|| async {
            let ports: BTreeMap<u64, u16> = [(1, free_port()), (2, free_port()), (3, free_port())]
                .into_iter()
                .collect();
            let (a, _) = start(cfg(1, 2, "tok", &ports), ports[&1]);
            let (b, got_b) = start(cfg(2, 2, "tok", &ports), ports[&2]);
            for shard in 0..2 {
                let mut m = Message::new(MessageKind::Heartbeat, 1, 2, 3);
                m.context = bytes::Bytes::copy_from_slice(&9u64.to_be_bytes());
                a.send(2, shard, m);
            }
            a.flush();
            assert!(
                wait_for(|| got_b.borrow().len() == 2).await,
                "{:?}",
                got_b.borrow()
            );
            assert!(got_b.borrow().iter().all(|(_, m)| m.from == 1 && m.to == 2));
            assert_eq!(
                a.stats.frames_sent.get(),
                1,
                "two groups' beats in one frame"
            );

            // Member 3 believes in another shard count: both sides refuse and say why.
            let (c, _) = start(cfg(3, 4, "tok", &ports), ports[&3]);
            c.send(2, 0, Message::new(MessageKind::Heartbeat, 3, 2, 1));
            c.flush();
            assert!(wait_for(|| b.stats.refused.get() > 0 && c.stats.refused.get() > 0).await);
            let err = b.stats.last_error.borrow().clone().unwrap();
            assert!(err.contains("n2 (2) has 2 shards, n3 (3) has 4"), "{err}");
            assert!(c
                .stats
                .last_error
                .borrow()
                .clone()
                .unwrap()
                .contains("shard count mismatch"));

            // Garbage on the peer port: disconnected, logged, and the listener keeps serving.
            let mut junk = TcpStream::connect(("127.0.0.1", ports[&2])).await.unwrap();
            junk.write_all(&[0xde; 64]).await.unwrap();
            let mut buf = [0u8; 16];
            assert_eq!(
                junk.read(&mut buf).await.unwrap_or(0),
                0,
                "closed on garbage"
            );
            a.send(2, 1, Message::new(MessageKind::RequestVote, 1, 2, 4));
            a.flush();
            assert!(wait_for(|| got_b.borrow().len() == 3).await);
            a.close();
            b.close();
            c.close();
        });
    }

    #[test]
    fn calls_are_answered_on_their_connection_and_a_dead_peer_fails_them() {
        run_local(|| async {
            let ports: BTreeMap<u64, u16> =
                [(1, free_port()), (2, free_port())].into_iter().collect();
            // Member 2 answers every call with its path reversed; member 1 records what comes.
            let listener = TcpListener::bind(("127.0.0.1", ports[&2])).unwrap();
            let b = Transport::start(
                cfg(2, 1, "tok", &ports),
                listener,
                Rc::new(|inbound| {
                    if let Inbound::Call(from, c, replies) = inbound {
                        assert_eq!(from, 1);
                        replies.send(Answer {
                            id: c.id,
                            core: c.core,
                            code: 0,
                            message: String::new(),
                            body: c.path.chars().rev().collect::<String>().into(),
                        });
                    }
                }),
            );
            let got: Rc<RefCell<Vec<String>>> = Rc::default();
            let sink = got.clone();
            let listener = TcpListener::bind(("127.0.0.1", ports[&1])).unwrap();
            let a = Transport::start(
                cfg(1, 1, "tok", &ports),
                listener,
                Rc::new(move |inbound| match inbound {
                    Inbound::Answer(a) => sink.borrow_mut().push(format!(
                        "{} {}",
                        a.id,
                        String::from_utf8_lossy(&a.body)
                    )),
                    Inbound::Lost(to) => sink.borrow_mut().push(format!("lost {to}")),
                    Inbound::Unsent(to, ids) => {
                        sink.borrow_mut().push(format!("unsent {to} {ids:?}"))
                    }
                    _ => {}
                }),
            );
            for (id, path) in [(1, "/a/put"), (2, "/b/txn")] {
                a.call(
                    2,
                    Call {
                        id,
                        core: 0,
                        path: path.into(),
                        body: Bytes::new(),
                    },
                );
            }
            a.flush();
            assert!(
                wait_for(|| got.borrow().len() == 2).await,
                "{:?}",
                got.borrow()
            );
            assert_eq!(*got.borrow(), ["1 tup/a/", "2 nxt/b/"]);
            assert_eq!(a.stats.frames_sent.get(), 1, "both calls in one frame");

            // The answering member goes away: the caller hears that its connection is lost,
            // and a call queued after that, with nobody to dial, never left.
            b.close();
            assert!(
                wait_for(|| got.borrow().len() == 3).await,
                "{:?}",
                got.borrow()
            );
            assert_eq!(got.borrow()[2], "lost 2");
            glommio::timer::sleep(Duration::from_millis(50)).await;
            a.call(
                2,
                Call {
                    id: 3,
                    core: 0,
                    path: "/c".into(),
                    body: Bytes::new(),
                },
            );
            a.flush();
            assert!(
                wait_for(|| got.borrow().len() == 4).await,
                "{:?}",
                got.borrow()
            );
            assert_eq!(got.borrow()[3], "unsent 2 [3]");
            a.close();
        });
    }

    /// Peer TLS for a member with certificate `name` (signed by `issuer`, for 127.0.0.1), which
    /// trusts `ca_pem` and requires the same of members that dial it.
    fn member_tls(
        dir: &std::path::Path,
        name: &str,
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: &str,
    ) -> PeerTls {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, issuer).unwrap();
        let path = |f: &str| dir.join(format!("{name}-{f}"));
        std::fs::write(path("cert.pem"), cert.pem()).unwrap();
        std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(path("ca.pem"), ca_pem).unwrap();
        let files = crate::tls::TlsFiles {
            side: crate::tls::Side::Peer,
            cert_file: Some(path("cert.pem")),
            key_file: Some(path("key.pem")),
            trusted_ca_file: Some(path("ca.pem")),
            client_cert_auth: true,
            self_signed: false,
        };
        PeerTls {
            accept: Some(Arc::new(crate::tls::server_config(&files).unwrap())),
            dial: Some(Arc::new(crate::tls::client_config(&files).unwrap())),
        }
    }

    fn ca(cn: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), rcgen::Issuer::new(p, key))
    }

    #[test]
    fn tls_links_carry_batches_and_refuse_strangers_and_the_wrong_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = ca("peer CA");
        let (_, other) = ca("another CA");
        let tls1 = member_tls(dir.path(), "m1", &issuer, &ca_pem);
        let tls2 = member_tls(dir.path(), "m2", &issuer, &ca_pem);
        // Trusts the cluster's CA, but its own certificate comes from another.
        let tls3 = member_tls(dir.path(), "m3", &other, &ca_pem);
        run_local(|| async move {
            let ports: BTreeMap<u64, u16> = (1..=4).map(|id| (id, free_port())).collect();
            // Members 1-3 listen with TLS, member 4 without; each dials with the scheme it
            // believes in.
            let table = |me: u64, schemes: [&str; 4]| -> PeerConfig {
                let peers = ports
                    .iter()
                    .filter(|(&id, _)| id != me)
                    .map(|(&id, p)| (id, format!("{}://127.0.0.1:{p}", schemes[id as usize - 1])))
                    .collect();
                PeerConfig::new(77, me, 1, &format!("n{me}"), "tok", peers)
            };
            let tls = ["https", "https", "https", "http"];
            let with = |mut c: PeerConfig, t: &PeerTls| {
                c.tls = t.clone();
                c
            };
            // Member 1 also believes member 4 speaks TLS.
            let (a, _) = start(with(table(1, ["https"; 4]), &tls1), ports[&1]);
            let (b, got_b) = start(with(table(2, tls), &tls2), ports[&2]);
            let (c, _) = start(with(table(3, tls), &tls3), ports[&3]);
            // Member 4 dials member 2 in plain TCP.
            let (d, _) = start(table(4, ["http"; 4]), ports[&4]);

            a.send(2, 0, Message::new(MessageKind::Heartbeat, 1, 2, 3));
            a.flush();
            assert!(
                wait_for(|| got_b.borrow().len() == 1).await,
                "mTLS link carries batches"
            );

            // Another CA's certificate: refused at the handshake, logged on both ends.
            c.send(2, 0, Message::new(MessageKind::Heartbeat, 3, 2, 3));
            c.flush();
            assert!(wait_for(|| b.stats.refused.get() > 0 && c.stats.refused.get() > 0).await);
            let err = b.stats.last_error.borrow().clone().unwrap();
            assert!(err.starts_with("refused: TLS"), "{err}");
            let err = c.stats.last_error.borrow().clone().unwrap();
            assert!(
                err.starts_with("refused: TLS") && err.contains("alert"),
                "{err}"
            );

            // Plain TCP on a TLS port is refused by the TLS side.
            let before = b.stats.refused.get();
            d.send(2, 0, Message::new(MessageKind::Heartbeat, 4, 2, 3));
            d.flush();
            assert!(wait_for(|| b.stats.refused.get() > before).await);
            assert!(d.stats.frames_sent.get() == 0 && got_b.borrow().len() == 1);

            // TLS on a plain port is refused at once by the plain side, and the dialer says so.
            a.send(4, 0, Message::new(MessageKind::Heartbeat, 1, 4, 3));
            a.flush();
            assert!(wait_for(|| d.stats.refused.get() > 0 && a.stats.refused.get() > 0).await);
            let err = d.stats.last_error.borrow().clone().unwrap();
            assert!(err.contains("TLS spoken to a plain peer port"), "{err}");
            let err = a.stats.last_error.borrow().clone().unwrap();
            assert!(
                err.starts_with("refused: TLS handshake with https://"),
                "{err}"
            );

            // The good link still works.
            a.send(2, 0, Message::new(MessageKind::Heartbeat, 1, 2, 4));
            a.flush();
            assert!(wait_for(|| got_b.borrow().len() == 2).await);
            for t in [a, b, c, d] {
                t.close();
            }
        });
    }

    #[test]
    fn hello_checks_name_both_sides() {
        let peers: BTreeMap<u64, String> = [(2, String::new())].into_iter().collect();
        let local = PeerConfig::new(1, 1, 2, "n1", "t", peers.clone()).local;
        let mut remote = PeerConfig::new(1, 2, 2, "n2", "t", peers.clone()).local;
        assert_eq!(check_hello(&local, &remote, &peers), Ok(()));
        remote.token = "other".into();
        let e = check_hello(&local, &remote, &peers).unwrap_err();
        assert!(e.contains("\"t\"") && e.contains("\"other\""), "{e}");
        remote.token = "t".into();
        remote.member_id = 9;
        assert!(check_hello(&local, &remote, &peers)
            .unwrap_err()
            .contains("not a member"));
        remote.member_id = 2;
        remote.to_member = 5;
        assert!(check_hello(&local, &remote, &peers)
            .unwrap_err()
            .contains("dialed member 5"));
    }
}

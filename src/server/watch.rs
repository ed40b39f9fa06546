//! etcd's Watch service: one bidirectional stream carries any number of watches.
//!
//! A session task per stream reads requests as they arrive, registers watches with the core's
//! hub (see [`crate::db::Watch`]) and turns the hub's updates into WatchResponses. Every watch of
//! the stream shares one bounded sink, so a client that stops reading only makes its own
//! watches fall back to catching up; it never holds up writers or other streams.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::Stream;
use glommio::timer::Timer;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::auth::Caller;
use super::grpc::{self, Code, GrpcBody, Status};
use super::{convert, Ctx, GRPC_OVERHEAD_BYTES};
use crate::db::{WatchEvent, WatchRequest, WatchUpdate};
use crate::mvcc::EventKind;
use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb;

/// Updates buffered per stream before its watches fall back to catching up from history.
const STREAM_BUFFER: usize = 1024;

/// How often an idle session checks that its client is still there.
const DISCONNECT_CHECK: Duration = Duration::from_secs(1);

/// etcd's error texts for refused creates.
const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";

/// A watch as the stream knows it.
struct StreamWatch {
    hub_id: u64,
    fragment: bool,
    progress_notify: bool,
    /// Events were sent since the last periodic progress check.
    active: bool,
}

/// The gRPC call: requests decoded from the request body's frames, responses gRPC-framed.
pub fn serve(ctx: Rc<Ctx>, body: Incoming, caller: Caller) -> http::Response<GrpcBody> {
    let (req_tx, requests) = flume::bounded(64);
    let limit = ctx.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    glommio::spawn_local(read_requests(body, limit, req_tx)).detach();
    let (out, rx) = flume::bounded::<Frame<Bytes>>(16);
    spawn_session(ctx, caller, requests, out, Ok, true);
    grpc::stream(rx)
}

/// The JSON gateway's `POST /v3/watch`: the body's JSON requests, then a stream of
/// `{"result": ...}` lines, one per response, as etcd's gateway sends them.
pub fn serve_json(
    ctx: Rc<Ctx>,
    reqs: Vec<pb::WatchRequest>,
    caller: Caller,
) -> http::Response<GrpcBody> {
    let (req_tx, requests) = flume::unbounded();
    for r in reqs {
        let _ = req_tx.send(Ok(r));
    }
    drop(req_tx);
    let (out, rx) = flume::bounded::<Frame<Bytes>>(16);
    spawn_session(ctx, caller, requests, out, json_line, false);
    super::gateway::json_stream(rx)
}

/// `responses` encoded back to back, to go out as one frame (`None`: nothing to send), and the
/// error that stopped the encoding, if one did: what was encoded before it still goes out.
fn one_frame(responses: Vec<Response>, encode: Encoder) -> (Option<Bytes>, Option<Status>) {
    let mut frames = Vec::with_capacity(responses.len());
    let mut failed = None;
    for r in responses {
        match encode(r.framed()) {
            Ok(f) => frames.push(f),
            Err(s) => {
                failed = Some(s);
                break;
            }
        }
    }
    let frame = match frames.len() {
        0 => None,
        1 => frames.pop(),
        _ => Some(Bytes::from(frames.concat())),
    };
    (frame, failed)
}

fn json_line(framed: Bytes) -> Result<Bytes, Status> {
    let text = super::gateway::to_json("WatchResponse", framed.slice(5..))?;
    Ok(Bytes::from(format!("{{\"result\":{text}}}\n")))
}

/// Turns a gRPC-framed WatchResponse into what the stream sends.
type Encoder = fn(Bytes) -> Result<Bytes, Status>;

/// A response on its way out.
enum Response {
    Message(pb::WatchResponse),
    /// An events response: `head` carries every field but the events, `events` their
    /// encoding. Events are the last field (11) in encoding order, so the two concatenated are
    /// the message prost would write.
    Events {
        head: pb::WatchResponse,
        events: Bytes,
    },
}

impl Response {
    fn encoded_len(&self) -> usize {
        match self {
            Response::Message(m) => prost::Message::encoded_len(m),
            Response::Events { head, events } => prost::Message::encoded_len(head) + events.len(),
        }
    }

    fn framed(&self) -> Bytes {
        match self {
            Response::Message(m) => grpc::encode_message(m),
            Response::Events { head, events } => grpc::encode_message_then(head, events),
        }
    }
}

/// Batches whose encodings a core keeps: a session may drain several queued batches before the
/// next session drains the same ones, so only remembering the last one would miss.
const ENCODED_BATCHES: usize = 16;

thread_local! {
    /// The event batches encoded last on this core, oldest first. The hub hands every watcher
    /// that wants a whole batch the same allocation, so with many watchers of the same keys a
    /// batch is converted and encoded once, not once per watcher. Each `Weak` keeps its
    /// allocation's address from being reused while it is a key.
    static ENCODED: RefCell<VecDeque<(Weak<[WatchEvent]>, Bytes)>> =
        const { RefCell::new(VecDeque::new()) };
}

/// `events` encoded as WatchResponse field 11, from the core's cache when it holds that batch.
fn encoded_events(events: &Arc<[WatchEvent]>) -> Bytes {
    ENCODED.with(|cached| {
        let mut cached = cached.borrow_mut();
        // A batch nobody holds any more is never asked for again: its bytes go at once rather
        // than staying until newer batches push them out.
        cached.retain(|(batch, _)| batch.strong_count() > 0);
        let batch = Arc::as_ptr(events);
        if let Some((_, bytes)) = cached.iter().find(|(w, _)| std::ptr::eq(w.as_ptr(), batch)) {
            return bytes.clone();
        }
        let only_events = pb::WatchResponse {
            events: events.iter().map(event_message).collect(),
            ..Default::default()
        };
        let bytes = Bytes::from(prost::Message::encode_to_vec(&only_events));
        if cached.len() == ENCODED_BATCHES {
            cached.pop_front();
        }
        cached.push_back((Arc::downgrade(events), bytes.clone()));
        bytes
    })
}

fn event_message(e: &WatchEvent) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            EventKind::Put => mvccpb::event::EventType::Put as i32,
            EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(convert::key_value(e.kv.clone())),
        prev_kv: e.prev_kv.clone().map(convert::key_value),
    }
}

fn spawn_session(
    ctx: Rc<Ctx>,
    caller: Caller,
    requests: flume::Receiver<Result<pb::WatchRequest, Status>>,
    out: flume::Sender<Frame<Bytes>>,
    encode: Encoder,
    trailers: bool,
) {
    glommio::spawn_local(async move {
        let mut session = Session {
            watches: BTreeMap::new(),
            next_id: 0,
            sink_id: ctx.db.new_watch_sink(),
            ctx,
            caller,
        };
        let status = session.run(requests, &out, encode).await;
        for w in session.watches.values() {
            session.ctx.db.watch_cancel(w.hub_id);
        }
        if let (Some(status), true) = (status, trailers) {
            let _ = out
                .send_async(Frame::trailers(grpc::status_trailers(&status)))
                .await;
        }
    })
    .detach();
}

struct Session {
    ctx: Rc<Ctx>,
    /// Who opened the stream (its token is resolved once, when the stream opens).
    caller: Caller,
    watches: BTreeMap<i64, StreamWatch>,
    /// etcd hands out ids from 0 upwards, skipping ids in use.
    next_id: i64,
    sink_id: u64,
}

/// Queued updates are drained into one frame until it holds this much (the last update may take
/// it past): a stream that fell behind catches up in frames of a few updates, not in one buffer
/// holding its whole backlog.
const FRAME_BYTES: usize = 64 * 1024;

enum Input {
    Request(Option<Result<pb::WatchRequest, Status>>),
    Update((i64, WatchUpdate)),
    Tick,
}

impl Session {
    /// Serves until the client goes away (`None`) or sends something invalid (its status).
    async fn run(
        &mut self,
        requests: flume::Receiver<Result<pb::WatchRequest, Status>>,
        out: &flume::Sender<Frame<Bytes>>,
        encode: Encoder,
    ) -> Option<Status> {
        let (sink, updates) = flume::bounded(STREAM_BUFFER);
        let interval = self.ctx.cfg.watch_progress_notify_interval;
        let mut next_progress = Instant::now() + interval;
        // The inputs live across turns: a fresh receive future per channel and a fresh timer
        // per update cost more than encoding the update (about half of a session's CPU with 100
        // busy watchers). The request stream stays registered while updates flow, and the timer
        // is registered once per arming; after that its deadline is only compared.
        let mut requests = Some(requests.into_stream());
        let mut update_stream = updates.stream();
        // Wakes at least every second: a client that went away without a reset is only
        // noticed by looking (its response body was dropped), and its watches must end.
        // The timer and its deadline (at or a hair before the timer's own).
        let next_tick = |next_progress: Instant| {
            let now = Instant::now();
            let wait = next_progress
                .saturating_duration_since(now)
                .min(DISCONNECT_CHECK);
            (Timer::new(wait), now + wait)
        };
        let (mut tick, mut tick_at) = next_tick(next_progress);
        let mut tick_registered = false;
        loop {
            let input = std::future::poll_fn(|cx| {
                if let Some(r) = requests.as_mut() {
                    if let Poll::Ready(req) = Pin::new(r).poll_next(cx) {
                        return Poll::Ready(Some(Input::Request(req)));
                    }
                }
                if let Poll::Ready(u) = Pin::new(&mut update_stream).poll_next(cx) {
                    return Poll::Ready(u.map(Input::Update));
                }
                // The timer wakes this task, whose waker never changes, so one registration per
                // arming is enough.
                let due = if tick_registered {
                    Instant::now() >= tick_at
                } else {
                    tick_registered = true;
                    Pin::new(&mut tick).poll(cx).is_ready()
                };
                if due {
                    return Poll::Ready(Some(Input::Tick));
                }
                Poll::Pending
            })
            .await;
            let responses = match input {
                // The client closed its side: it sends no more requests but still reads.
                Some(Input::Request(None)) => {
                    requests = None;
                    continue;
                }
                Some(Input::Request(Some(Err(status)))) => return Some(status),
                Some(Input::Request(Some(Ok(req)))) => self
                    .request(req, &sink)
                    .into_iter()
                    .map(Response::Message)
                    .collect(),
                Some(Input::Update((tag, update))) => {
                    // Whatever else is queued goes out in the same frame.
                    let mut responses = self.update(tag, update);
                    let mut size: usize = responses.iter().map(Response::encoded_len).sum();
                    while size < FRAME_BYTES {
                        let Ok((tag, update)) = updates.try_recv() else {
                            break;
                        };
                        let more = self.update(tag, update);
                        size += more.iter().map(Response::encoded_len).sum::<usize>();
                        responses.extend(more);
                    }
                    responses
                }
                Some(Input::Tick) => {
                    if out.is_disconnected() {
                        return None;
                    }
                    if Instant::now() >= next_progress {
                        next_progress = Instant::now() + interval;
                        self.tick();
                    }
                    (tick, tick_at) = next_tick(next_progress);
                    tick_registered = false;
                    Vec::new()
                }
                None => return None,
            };
            let (frame, failed) = one_frame(responses, encode);
            if let Some(data) = frame {
                if out.send_async(Frame::data(data)).await.is_err() {
                    return None;
                }
            }
            if failed.is_some() {
                return failed;
            }
        }
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(self.ctx.header(revision))
    }

    fn request(
        &mut self,
        req: pb::WatchRequest,
        sink: &crate::db::WatchSink,
    ) -> Vec<pb::WatchResponse> {
        use pb::watch_request::RequestUnion;
        let current = self.ctx.db.revision();
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                let refused = |reason: &str| pb::WatchResponse {
                    header: self.header(current),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    cancel_reason: reason.into(),
                    ..Default::default()
                };
                // etcd: a range end of "\0" means every key from `key` on; otherwise the end
                // must be above the key.
                if !c.range_end.is_empty() && c.range_end.as_ref() != b"\0" && c.range_end <= c.key
                {
                    return vec![refused(EMPTY_RANGE)];
                }
                if !super::auth::watch_permitted(&self.ctx, &self.caller, &c.key, &c.range_end) {
                    return vec![refused(super::auth::WATCH_DENIED)];
                }
                let id = if c.watch_id != 0 {
                    if self.watches.contains_key(&c.watch_id) {
                        return vec![refused(DUPLICATE_ID)];
                    }
                    c.watch_id
                } else {
                    while self.watches.contains_key(&self.next_id) {
                        self.next_id += 1;
                    }
                    self.next_id += 1;
                    self.next_id - 1
                };
                let filters =
                    |f: pb::watch_create_request::FilterType| c.filters.contains(&(f as i32));
                let wreq = WatchRequest {
                    key: c.key.clone(),
                    range_end: c.range_end.clone(),
                    start_revision: c.start_revision,
                    no_put: filters(pb::watch_create_request::FilterType::Noput),
                    no_delete: filters(pb::watch_create_request::FilterType::Nodelete),
                    prev_kv: c.prev_kv,
                };
                let created = pb::WatchResponse {
                    header: self.header(current),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                };
                let hub_id = self.ctx.db.watch(&wreq, self.sink_id, id, sink.clone());
                self.watches.insert(
                    id,
                    StreamWatch {
                        hub_id,
                        fragment: c.fragment,
                        progress_notify: c.progress_notify,
                        active: false,
                    },
                );
                vec![created]
            }
            Some(RequestUnion::CancelRequest(c)) => match self.watches.remove(&c.watch_id) {
                Some(w) => {
                    self.ctx.db.watch_cancel(w.hub_id);
                    vec![pb::WatchResponse {
                        header: self.header(current),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    }]
                }
                // etcd ignores cancels of unknown watches.
                None => Vec::new(),
            },
            Some(RequestUnion::ProgressRequest(_)) => {
                self.ctx.db.watch_sink_progress(self.sink_id, sink.clone());
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    fn update(&mut self, tag: i64, update: WatchUpdate) -> Vec<Response> {
        if tag == -1 {
            if let WatchUpdate::Progress { revision } = update {
                return vec![Response::Message(pb::WatchResponse {
                    header: self.header(revision),
                    watch_id: -1,
                    ..Default::default()
                })];
            }
            return Vec::new();
        }
        // Updates for a watch cancelled meanwhile are dropped.
        let Some(w) = self.watches.get_mut(&tag) else {
            return Vec::new();
        };
        match update {
            WatchUpdate::Events { revision, events } => {
                w.active = true;
                let fragment = w.fragment;
                let head = pb::WatchResponse {
                    header: self.header(revision),
                    watch_id: tag,
                    ..Default::default()
                };
                let encoded = encoded_events(&events);
                let limit = self.ctx.cfg.max_request_bytes;
                if fragment && prost::Message::encoded_len(&head) + encoded.len() > limit {
                    let whole = pb::WatchResponse {
                        events: events.iter().map(event_message).collect(),
                        ..head
                    };
                    fragments(whole, limit)
                        .into_iter()
                        .map(Response::Message)
                        .collect()
                } else {
                    vec![Response::Events {
                        head,
                        events: encoded,
                    }]
                }
            }
            WatchUpdate::Progress { revision } => vec![Response::Message(pb::WatchResponse {
                header: self.header(revision),
                watch_id: tag,
                ..Default::default()
            })],
            WatchUpdate::Compacted { compact_revision } => {
                self.watches.remove(&tag);
                // etcd leaves the revision of this header at 0.
                vec![Response::Message(pb::WatchResponse {
                    header: self.header(0),
                    watch_id: tag,
                    canceled: true,
                    compact_revision,
                    ..Default::default()
                })]
            }
        }
    }

    /// Periodic progress notices for idle watches that asked for them (etcd's progress_notify).
    fn tick(&mut self) {
        for w in self.watches.values_mut() {
            if w.progress_notify && !std::mem::take(&mut w.active) {
                self.ctx.db.watch_progress(w.hub_id);
            }
        }
    }
}

/// Splits an events response into pieces of at most about `limit` bytes; every piece but the
/// last is marked `fragment` (etcd's clients reassemble them).
fn fragments(resp: pb::WatchResponse, limit: usize) -> Vec<pb::WatchResponse> {
    let mut out = Vec::new();
    let mut piece = pb::WatchResponse {
        events: Vec::new(),
        ..resp.clone()
    };
    let base = prost::Message::encoded_len(&piece);
    let mut size = base;
    for e in resp.events {
        let len = prost::Message::encoded_len(&e) + 8;
        if !piece.events.is_empty() && size + len > limit {
            piece.fragment = true;
            out.push(piece.clone());
            piece.events.clear();
            size = base;
        }
        size += len;
        piece.events.push(e);
    }
    piece.fragment = false;
    out.push(piece);
    out
}

/// Decodes request messages as their frames arrive; ends with `Err` on bad input.
async fn read_requests(
    mut body: Incoming,
    limit: usize,
    tx: flume::Sender<Result<pb::WatchRequest, Status>>,
) {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            // Reset by the client: the stream is over.
            Err(_) => return,
        };
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            let compressed = buf[0];
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > limit {
                let _ = tx.send_async(Err(grpc::too_large(len, limit))).await;
                return;
            }
            if compressed != 0 {
                let _ = tx
                    .send_async(Err(Status::new(
                        Code::Unimplemented,
                        "grpc: compressed messages are not supported",
                    )))
                    .await;
                return;
            }
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len).freeze();
            let decoded = prost::Message::decode(msg).map_err(|e| {
                Status::new(
                    Code::Internal,
                    format!("grpc: error unmarshalling request: {e}"),
                )
            });
            let bad = decoded.is_err();
            if tx.send_async(decoded).await.is_err() || bad {
                return;
            }
        }
    }
}

/// How often idle watches with `progress_notify` hear that they are current (etcd's default).
pub const DEFAULT_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KeyValue;

    fn kv(key: &str, rev: i64, value: &str) -> KeyValue {
        KeyValue {
            key: Bytes::from(key.to_owned()),
            create_revision: 2,
            mod_revision: rev,
            version: rev - 1,
            value: Bytes::from(value.to_owned()),
            lease: 7,
        }
    }

    #[test]
    fn an_events_response_from_shared_bytes_is_the_message_prost_writes() {
        let events: Arc<[WatchEvent]> = vec![
            WatchEvent {
                kind: EventKind::Put,
                kv: kv("a", 3, "x"),
                prev_kv: Some(kv("a", 2, "w")),
            },
            WatchEvent {
                kind: EventKind::Delete,
                kv: kv("b/c", 4, ""),
                prev_kv: None,
            },
        ]
        .into();
        let head = pb::WatchResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 11,
                member_id: 12,
                revision: 4,
                raft_term: 5,
            }),
            watch_id: 9,
            ..Default::default()
        };
        let whole = pb::WatchResponse {
            events: events.iter().map(event_message).collect(),
            ..head.clone()
        };
        let shared = Response::Events {
            head,
            events: encoded_events(&events),
        };
        assert_eq!(shared.framed(), grpc::encode_message(&whole));
    }

    #[test]
    fn queued_responses_leave_as_one_frame_of_whole_messages_in_order() {
        let progress = |rev: i64| {
            Response::Message(pb::WatchResponse {
                header: Some(pb::ResponseHeader {
                    revision: rev,
                    ..Default::default()
                }),
                watch_id: rev,
                ..Default::default()
            })
        };
        let events: Arc<[WatchEvent]> = vec![WatchEvent {
            kind: EventKind::Put,
            kv: kv("a", 3, "x"),
            prev_kv: None,
        }]
        .into();
        let batch = Response::Events {
            head: pb::WatchResponse {
                watch_id: 7,
                ..Default::default()
            },
            events: encoded_events(&events),
        };
        let responses = vec![progress(1), batch, progress(2)];
        let expected: Vec<Bytes> = responses.iter().map(Response::framed).collect();
        for (r, framed) in responses.iter().zip(&expected) {
            assert_eq!(r.encoded_len() + 5, framed.len());
        }
        let events_response = expected[1].clone();
        let (frame, failed) = one_frame(responses, Ok);
        assert!(failed.is_none());
        let frame = frame.expect("something to send");
        // A gRPC reader splits the frame back into the three messages, in order.
        let messages = grpc::decode_messages(frame).expect("whole messages");
        let bodies: Vec<Bytes> = expected.iter().map(|f| f.slice(5..)).collect();
        assert_eq!(messages, bodies);
        let decoded: pb::WatchResponse =
            prost::Message::decode(messages[1].clone()).expect("decodes");
        assert_eq!(decoded.events.len(), 1);
        // One response goes out as it is; none sends nothing.
        let (one, failed) = one_frame(vec![progress(5)], Ok);
        assert_eq!((one, failed.is_none()), (Some(progress(5).framed()), true));
        let (none, failed) = one_frame(Vec::new(), Ok);
        assert_eq!((none, failed.is_none()), (None, true));
        // An encoding that fails partway still hands out what came before it, then the error.
        fn refuse_events(framed: Bytes) -> Result<Bytes, Status> {
            let m: pb::WatchResponse = prost::Message::decode(framed.slice(5..))
                .map_err(|_| Status::new(Code::Internal, "bad"))?;
            if m.events.is_empty() {
                Ok(framed)
            } else {
                Err(Status::new(Code::Internal, "refused"))
            }
        }
        let batch = Response::Events {
            head: pb::WatchResponse {
                watch_id: 7,
                ..Default::default()
            },
            events: encoded_events(&events),
        };
        assert_eq!(batch.framed(), events_response);
        let (before, failed) = one_frame(vec![progress(1), batch, progress(2)], refuse_events);
        assert_eq!(before, Some(progress(1).framed()));
        assert_eq!(failed.map(|s| s.message), Some("refused".to_string()));
    }

    #[test]
    fn a_batch_is_encoded_once_per_core_until_newer_batches_push_it_out() {
        let batch = |v: &str| -> Arc<[WatchEvent]> {
            vec![WatchEvent {
                kind: EventKind::Put,
                kv: kv("k", 3, v),
                prev_kv: None,
            }]
            .into()
        };
        let (one, two) = (batch("1"), batch("2"));
        let first = encoded_events(&one);
        // The same allocation hits the cache: the very same bytes come back, also after
        // another batch was encoded.
        assert_eq!(encoded_events(&one).as_ptr(), first.as_ptr());
        assert_ne!(encoded_events(&two), first);
        assert_eq!(encoded_events(&one).as_ptr(), first.as_ptr());
        // Enough newer batches push it out; it is then encoded again.
        let newer: Vec<_> = (0..ENCODED_BATCHES)
            .map(|i| batch(&i.to_string()))
            .collect();
        for b in &newer {
            encoded_events(b);
        }
        let again = encoded_events(&one);
        assert_eq!(again, first);
        assert_ne!(again.as_ptr(), first.as_ptr());
    }

    #[test]
    fn a_batch_nobody_holds_leaves_the_cache() {
        let cached = || ENCODED.with(|c| c.borrow().len());
        let kept: Arc<[WatchEvent]> = vec![WatchEvent {
            kind: EventKind::Delete,
            kv: kv("kept", 3, ""),
            prev_kv: None,
        }]
        .into();
        let gone: Arc<[WatchEvent]> = vec![WatchEvent {
            kind: EventKind::Put,
            kv: kv("gone", 4, "big value"),
            prev_kv: None,
        }]
        .into();
        encoded_events(&kept);
        encoded_events(&gone);
        let before = cached();
        drop(gone);
        encoded_events(&kept);
        assert_eq!(cached(), before - 1);
    }
}

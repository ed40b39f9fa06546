//! Watches through the proxy, coalesced: clients watching the same range with the same options
//! from "now" (no start revision) share one upstream watch, whose events the proxy copies to
//! each of them under its own watch id. A client that asks for a start revision gets an upstream
//! watch of its own (the shared one may already be past that revision; a private watch replays
//! exactly what the cluster holds from there, compaction included).
//!
//! When an upstream watch breaks (its endpoint died), it is created again on the next endpoint
//! from the revision after the last one it delivered, so its clients miss nothing and see
//! nothing twice. The last client leaving a watch cancels it upstream.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;

use super::namespace;
use super::upstream::{frame, next_message, Headers, Upstream};
use crate::proto::etcdserverpb as pb;
use crate::server::grpc::{status_trailers, Code, Status};

pub const WATCH: &str = "/etcdserverpb.Watch/Watch";

/// Pause before creating a broken upstream watch again.
const RETRY: Duration = Duration::from_millis(100);

/// What makes two watches the same upstream watch: the (namespaced) range, every option, and
/// the caller's credentials (one user's watch is never served to another).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WatchKey {
    key: Bytes,
    range_end: Bytes,
    filters: Vec<i32>,
    prev_kv: bool,
    progress_notify: bool,
    fragment: bool,
    headers: Vec<(String, Vec<u8>)>,
}

impl WatchKey {
    fn of(c: &pb::WatchCreateRequest, headers: &Headers) -> WatchKey {
        WatchKey {
            key: c.key.clone(),
            range_end: c.range_end.clone(),
            filters: c.filters.clone(),
            prev_kv: c.prev_kv,
            progress_notify: c.progress_notify,
            fragment: c.fragment,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }
}

/// One client watch fed by a broadcast.
struct Sub {
    client: u64,
    watch_id: i64,
    tx: flume::Sender<Frame<Bytes>>,
}

/// One upstream watch and the client watches it feeds.
struct Broadcast {
    id: u64,
    shared: Option<WatchKey>,
    create: pb::WatchCreateRequest,
    headers: Headers,
    subs: RefCell<Vec<Sub>>,
    /// The revision to create the watch from again after a failover (0: not yet known).
    next_rev: Cell<i64>,
    /// The header of the upstream's `created` answer, once it came.
    created: RefCell<Option<pb::ResponseHeader>>,
}

struct Entry {
    bc: Rc<Broadcast>,
    /// The task reading the upstream watch; dropping it cancels the watch.
    task: Option<glommio::Task<()>>,
}

/// Every upstream watch of the proxy.
pub struct Hub {
    upstream: Rc<Upstream>,
    prefix: Bytes,
    next_id: Cell<u64>,
    shared: RefCell<HashMap<WatchKey, u64>>,
    entries: RefCell<HashMap<u64, Entry>>,
    me: Weak<Hub>,
}

impl Hub {
    pub fn new(upstream: Rc<Upstream>, prefix: Bytes) -> Rc<Hub> {
        Rc::new_cyclic(|me| Hub {
            upstream,
            prefix,
            next_id: Cell::new(1),
            shared: RefCell::default(),
            entries: RefCell::default(),
            me: me.clone(),
        })
    }

    fn id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Upstream watches open now.
    pub fn upstream_watches(&self) -> usize {
        self.entries.borrow().len()
    }

    /// Client watches served now.
    pub fn client_watches(&self) -> usize {
        self.entries
            .borrow()
            .values()
            .map(|e| e.bc.subs.borrow().len())
            .sum()
    }

    /// Adds a client watch on the (already namespaced) `create`; the broadcast's id.
    fn subscribe(&self, create: pb::WatchCreateRequest, headers: &Headers, sub: Sub) -> u64 {
        let key = WatchKey::of(&create, headers);
        if create.start_revision == 0 {
            let existing = self.shared.borrow().get(&key).copied();
            if let Some(id) = existing {
                if let Some(e) = self.entries.borrow().get(&id) {
                    if let Some(h) = e.bc.created.borrow().as_ref() {
                        let _ = send(&sub.tx, &created(sub.watch_id, *h));
                    }
                    e.bc.subs.borrow_mut().push(sub);
                    return id;
                }
            }
        }
        let id = self.id();
        let shared = (create.start_revision == 0).then_some(key);
        let bc = Rc::new(Broadcast {
            id,
            shared: shared.clone(),
            next_rev: Cell::new(create.start_revision),
            create,
            headers: headers.clone(),
            subs: RefCell::new(vec![sub]),
            created: RefCell::new(None),
        });
        let task = glommio::spawn_local(run(self.me.clone(), Rc::downgrade(&bc)));
        if let Some(k) = shared {
            self.shared.borrow_mut().insert(k, id);
        }
        self.entries.borrow_mut().insert(
            id,
            Entry {
                bc,
                task: Some(task),
            },
        );
        id
    }

    /// Removes a client watch; the last one leaving cancels the upstream watch.
    fn unsubscribe(&self, id: u64, client: u64, watch_id: i64) -> Option<pb::ResponseHeader> {
        let (empty, header) = {
            let entries = self.entries.borrow();
            let e = entries.get(&id)?;
            let mut subs = e.bc.subs.borrow_mut();
            subs.retain(|s| !(s.client == client && s.watch_id == watch_id));
            let header = *e.bc.created.borrow();
            (subs.is_empty(), header)
        };
        if empty {
            self.remove(id);
        }
        header
    }

    /// Forgets broadcast `id`, cancelling its task (unless it is the caller: `detach`).
    fn remove(&self, id: u64) -> Option<Entry> {
        let e = self.entries.borrow_mut().remove(&id)?;
        if let Some(k) = &e.bc.shared {
            let mut shared = self.shared.borrow_mut();
            if shared.get(k) == Some(&id) {
                shared.remove(k);
            }
        }
        Some(e)
    }

    /// A broadcast's own task ended it (cancelled upstream): forget it without cancelling the
    /// task that is running this.
    fn finished(&self, id: u64) {
        if let Some(mut e) = self.remove(id) {
            if let Some(t) = e.task.take() {
                t.detach();
            }
        }
    }
}

fn send(tx: &flume::Sender<Frame<Bytes>>, resp: &pb::WatchResponse) -> bool {
    tx.send(Frame::data(frame(&resp.encode_to_vec()))).is_ok()
}

fn created(watch_id: i64, header: pb::ResponseHeader) -> pb::WatchResponse {
    pb::WatchResponse {
        header: Some(header),
        watch_id,
        created: true,
        ..Default::default()
    }
}

impl Broadcast {
    /// Copies an upstream answer to every client watch; whether the watch ended.
    fn deliver(&self, prefix: &[u8], mut resp: pb::WatchResponse) -> bool {
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if resp.created {
            if self.next_rev.get() == 0 {
                self.next_rev.set(rev + 1);
            }
            if self.created.borrow().is_some() {
                // Created again after a failover: the clients' watches never ended.
                return false;
            }
            *self.created.borrow_mut() = Some(resp.header.unwrap_or_default());
        } else if !resp.canceled {
            match resp.events.last().and_then(|e| e.kv.as_ref()) {
                Some(kv) => self
                    .next_rev
                    .set(self.next_rev.get().max(kv.mod_revision + 1)),
                None if !resp.fragment => self.next_rev.set(self.next_rev.get().max(rev + 1)),
                None => {}
            }
            namespace::watch_response(prefix, &mut resp);
        }
        self.subs.borrow_mut().retain(|s| {
            resp.watch_id = s.watch_id;
            send(&s.tx, &resp)
        });
        resp.canceled
    }

    /// Ends every client watch with `status` as the cancel reason.
    fn cancel_all(&self, status: &Status) {
        let resp = pb::WatchResponse {
            header: *self.created.borrow(),
            canceled: true,
            cancel_reason: status.message.clone(),
            ..Default::default()
        };
        for s in self.subs.borrow().iter() {
            let mut r = resp.clone();
            r.watch_id = s.watch_id;
            if self.created.borrow().is_none() {
                r.created = true;
            }
            let _ = send(&s.tx, &r);
        }
    }
}

/// Reads one upstream watch for as long as it has clients, re-creating it after failures.
async fn run(hub: Weak<Hub>, bc: Weak<Broadcast>) {
    loop {
        let (Some(h), Some(b)) = (hub.upgrade(), bc.upgrade()) else {
            return;
        };
        let (upstream, prefix, id) = (h.upstream.clone(), h.prefix.clone(), b.id);
        let mut create = b.create.clone();
        create.start_revision = b.next_rev.get();
        let headers = b.headers.clone();
        drop((h, b));
        let mut s = match upstream.stream(WATCH, &headers).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e.message, "upstream watch: no endpoint");
                glommio::timer::sleep(RETRY).await;
                continue;
            }
        };
        let req = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
        };
        if s.send(&req.encode_to_vec()).is_err() {
            continue;
        }
        loop {
            match s.recv().await {
                Ok(Some(msg)) => {
                    let Ok(resp) = pb::WatchResponse::decode(msg) else {
                        continue;
                    };
                    let Some(b) = bc.upgrade() else { return };
                    if b.deliver(&prefix, resp) {
                        if let Some(h) = hub.upgrade() {
                            h.finished(id);
                        }
                        return;
                    }
                }
                Err(st) if st.code != Code::Unavailable => {
                    // The cluster refused the watch (auth, say): it will refuse it again.
                    if let Some(b) = bc.upgrade() {
                        b.cancel_all(&st);
                    }
                    if let Some(h) = hub.upgrade() {
                        h.finished(id);
                    }
                    return;
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("upstream watch broke; creating it again");
                    upstream.stream_failed(&s);
                    glommio::timer::sleep(RETRY).await;
                    break;
                }
            }
        }
    }
}

/// Serves one client's Watch call: its create and cancel requests, until it ends the call.
pub fn serve(hub: Rc<Hub>, body: Incoming, headers: Headers) -> flume::Receiver<Frame<Bytes>> {
    let (tx, rx) = flume::unbounded();
    glommio::spawn_local(async move {
        let client = hub.id();
        let mut mine: Vec<(i64, u64)> = Vec::new();
        let mut next_watch_id = 0i64;
        let end = read_requests(
            &hub,
            body,
            &headers,
            &tx,
            client,
            &mut mine,
            &mut next_watch_id,
        )
        .await;
        for (watch_id, id) in mine {
            hub.unsubscribe(id, client, watch_id);
        }
        let status = end.err().unwrap_or_else(|| Status::new(Code::Ok, ""));
        let _ = tx.send(Frame::trailers(status_trailers(&status)));
    })
    .detach();
    rx
}

async fn read_requests(
    hub: &Rc<Hub>,
    mut body: Incoming,
    headers: &Headers,
    tx: &flume::Sender<Frame<Bytes>>,
    client: u64,
    mine: &mut Vec<(i64, u64)>,
    next_watch_id: &mut i64,
) -> Result<(), Status> {
    let mut buf = bytes::BytesMut::new();
    loop {
        while let Some(msg) = next_message(&mut buf)? {
            let req = pb::WatchRequest::decode(msg)
                .map_err(|e| Status::new(Code::InvalidArgument, format!("watch request: {e}")))?;
            use pb::watch_request::RequestUnion as U;
            match req.request_union {
                Some(U::CreateRequest(mut c)) => {
                    let watch_id = if c.watch_id != 0 {
                        c.watch_id
                    } else {
                        while mine.iter().any(|(w, _)| *w == *next_watch_id) {
                            *next_watch_id += 1;
                        }
                        *next_watch_id
                    };
                    if watch_id == *next_watch_id {
                        *next_watch_id += 1;
                    }
                    if !hub.prefix.is_empty() {
                        namespace::watch_create(&hub.prefix, &mut c);
                    }
                    c.watch_id = 0;
                    let sub = Sub {
                        client,
                        watch_id,
                        tx: tx.clone(),
                    };
                    let id = hub.subscribe(c, headers, sub);
                    mine.push((watch_id, id));
                }
                Some(U::CancelRequest(c)) => {
                    if let Some(pos) = mine.iter().position(|(w, _)| *w == c.watch_id) {
                        let (watch_id, id) = mine.remove(pos);
                        let header = hub.unsubscribe(id, client, watch_id);
                        let resp = pb::WatchResponse {
                            header,
                            watch_id,
                            canceled: true,
                            ..Default::default()
                        };
                        if !send(tx, &resp) {
                            return Ok(());
                        }
                    }
                }
                Some(U::ProgressRequest(_)) | None => {}
            }
        }
        match body.frame().await {
            None => return Ok(()),
            Some(Err(_)) => return Ok(()),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
        }
    }
}

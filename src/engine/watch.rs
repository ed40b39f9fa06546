//! Watches: each core runs one hub for the watchers whose consumers live on it.
//!
//! The hub pulls instead of having writers push: whenever the store's read revision moves past
//! what its watchers have seen, it asks the shards for the changes in that window (one request
//! per shard serves every watcher on the core, however many) and hands each watcher its part.
//! Everything at or below the read revision is complete on every shard, so a multi-shard txn's
//! events always arrive together and in order, and writers never wait for watchers.
//!
//! A watcher whose consumer does not keep up (its sink is full) is not blocked on and loses
//! nothing: it drops out of the shared feed and later catches up on its own from the shards'
//! event logs or history, rejoining once it reaches the shared position. Only when compaction
//! removed history it still needs is it cancelled, with the compact revision, as etcd does.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::kv::{KeyRange, KeyValue};
use crate::mvcc::{in_ranges, Event, EventKind};

/// A watch as etcd's WatchCreateRequest describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchRequest {
    pub key: Bytes,
    /// etcd's range forms: empty = just `key`, `"\0"` = every key from `key` on.
    pub range_end: Bytes,
    /// First revision to report; 0 = changes after the current revision.
    pub start_revision: i64,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
}

/// One event as delivered to a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The key before the event, when the watch asked for it and history still had it.
    pub prev_kv: Option<KeyValue>,
}

/// What a watcher's consumer receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    /// Events in revision order; every event of this watch up to `revision` has now been sent.
    /// Shared: every watcher of a core that wants a whole batch gets the same allocation, so
    /// its consumers can encode it once (`server::watch`).
    Events {
        revision: i64,
        events: Arc<[WatchEvent]>,
    },
    /// Nothing pending: every event of this watch (or, for a sink-wide request, of every watch
    /// on the sink) up to `revision` has been sent.
    Progress { revision: i64 },
    /// History the watch still needed was compacted; the watch is gone.
    Compacted { compact_revision: i64 },
}

/// Where a hub delivers: `(tag, update)`, the tag being the consumer's name for the watch (etcd's
/// watch id; `-1` for sink-wide progress). Bounded: a full sink makes its watchers catch up later.
pub type WatchSink = flume::Sender<(i64, WatchUpdate)>;

/// Events fetched per shard per round: bounds the memory and latency of one catch-up step.
pub const MAX_EVENTS_PER_FETCH: usize = 4096;

/// How often a hub with lagging watchers retries even if nothing new was written, so a consumer
/// that drained its sink gets the rest without waiting for the next write.
const CATCH_UP_RETRY: Duration = Duration::from_millis(20);

pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What a hub needs from the store. The engine's core implements it; tests can fake it.
pub trait ChangeSource {
    fn read_revision(&self) -> i64;
    fn compact_revision(&self) -> i64;
    /// Waits until the read revision reaches `rev`.
    fn wait_revision(&self, rev: i64) -> LocalFuture<'_, ()>;
    /// Every event in `ranges` with revision in `(after, upto]` up to the returned revision
    /// (may stop early at a revision boundary), merged across shards in delivery order, with
    /// `prev_kv` filled when `with_prev`.
    fn changes(
        &self,
        ranges: Arc<Vec<KeyRange>>,
        after: i64,
        upto: i64,
        with_prev: bool,
    ) -> LocalFuture<'_, Result<(Vec<WatchEvent>, i64)>>;
}

struct Watcher {
    sink_id: u64,
    tag: i64,
    /// `None`: an empty range, which matches nothing.
    range: Option<KeyRange>,
    /// Every event below this has been delivered (or filtered out).
    next: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    sink: WatchSink,
    /// Served by the shared feed; otherwise catching up on its own.
    synced: bool,
    /// A progress notification was asked for this watch alone.
    progress: bool,
    /// Compacted away; the notice is still to be delivered.
    compacted: Option<i64>,
}

impl Watcher {
    fn wants(&self, e: &WatchEvent) -> bool {
        e.kv.mod_revision >= self.next
            && self.range.as_ref().is_some_and(|r| r.contains(&e.kv.key))
            && match e.kind {
                EventKind::Put => !self.no_put,
                EventKind::Delete => !self.no_delete,
            }
    }

    fn has_room(&self) -> bool {
        self.sink
            .capacity()
            .is_none_or(|c| self.sink.len() < c.div_ceil(2))
    }
}

#[derive(Default)]
struct HubState {
    watchers: BTreeMap<u64, Watcher>,
    next_id: u64,
    next_sink: u64,
    /// Every synced watcher has been given everything below this.
    synced_next: i64,
    /// Sinks waiting for a sink-wide progress notification: sink id → its sender.
    sink_progress: BTreeMap<u64, WatchSink>,
    running: bool,
}

/// One core's watch hub.
pub struct Hub {
    st: RefCell<HubState>,
    kick: event_listener::Event,
}

/// Each update a round sends costs its consumer a few µs of CPU (the session encodes it, HTTP/2
/// frames and writes it), so a busy hub spaces its rounds by this much per update sent, at most
/// [`MAX_ROUND_GAP`]: the writes of the gap share the next round, and fan-out stays a bounded
/// share of the core. With 50 watchers on a core that is 1 ms, which made 100-watcher fan-out
/// about 30% faster at a quarter less CPU for 0.2 ms more median latency (docs/benchmarks.md,
/// "Spacing watch rounds"). A round after a quiet spell runs at once, and a few watchers (a
/// lock's, an election's) wait microseconds. The whole hub waits, so catch-up steps, compaction
/// notices and progress notices may also come up to one gap later.
const ROUND_GAP_PER_UPDATE: Duration = Duration::from_micros(20);
const MAX_ROUND_GAP: Duration = Duration::from_millis(1);

/// When a hub's next shared round may run.
#[derive(Default)]
struct RoundSpacing {
    due: Option<Instant>,
}

impl RoundSpacing {
    /// The last round started at `started` and sent `updates`.
    fn ran(&mut self, started: Instant, updates: usize) {
        let gap = ROUND_GAP_PER_UPDATE
            .saturating_mul(u32::try_from(updates).unwrap_or(u32::MAX))
            .min(MAX_ROUND_GAP);
        self.due = (updates > 0).then(|| started + gap);
    }

    /// `Some(when)` if the next round must wait until then.
    fn next_round(&self, now: Instant) -> Option<Instant> {
        self.due.filter(|&due| due > now)
    }
}

/// How a delivery attempt went.
enum Sent {
    Ok,
    /// Nothing in the window was for this watcher; its position moved on.
    Skipped,
    Full,
    Gone,
}

fn send(sink: &WatchSink, tag: i64, u: WatchUpdate) -> Sent {
    match sink.try_send((tag, u)) {
        Ok(()) => Sent::Ok,
        Err(flume::TrySendError::Full(_)) => Sent::Full,
        Err(flume::TrySendError::Disconnected(_)) => Sent::Gone,
    }
}

impl Hub {
    pub fn new() -> Rc<Hub> {
        Rc::new(Hub {
            st: RefCell::default(),
            kick: event_listener::Event::new(),
        })
    }

    /// Starts a watch; events go to `sink` tagged `tag`. Returns the hub's id for it. A
    /// `start_revision` already compacted gets its Compacted notice through the sink at once.
    pub fn watch(
        self: &Rc<Self>,
        src: Rc<dyn ChangeSource>,
        req: &WatchRequest,
        sink_id: u64,
        tag: i64,
        sink: WatchSink,
    ) -> u64 {
        let read = src.read_revision();
        let compact = src.compact_revision();
        let next = if req.start_revision > 0 {
            req.start_revision
        } else {
            read + 1
        };
        let start = {
            let mut st = self.st.borrow_mut();
            let start = !st.running;
            if start {
                st.running = true;
                st.synced_next = read + 1;
            }
            start
        };
        if start {
            glommio::spawn_local(self.clone().run(src)).detach();
        }
        let mut st = self.st.borrow_mut();
        st.next_id += 1;
        let id = st.next_id;
        let compacted = (req.start_revision > 0 && req.start_revision < compact).then_some(compact);
        st.watchers.insert(
            id,
            Watcher {
                sink_id,
                tag,
                range: KeyRange::from_etcd(&req.key, &req.range_end),
                next,
                no_put: req.no_put,
                no_delete: req.no_delete,
                prev_kv: req.prev_kv,
                sink,
                synced: false,
                progress: false,
                compacted,
            },
        );
        drop(st);
        self.kick.notify(usize::MAX);
        id
    }

    /// A fresh id for a sink (a stream of watches sharing one consumer).
    pub fn new_sink_id(&self) -> u64 {
        let mut st = self.st.borrow_mut();
        st.next_sink += 1;
        st.next_sink
    }

    /// Stops a watch; false if it was not running (already cancelled, or compacted away).
    pub fn cancel(&self, id: u64) -> bool {
        self.st.borrow_mut().watchers.remove(&id).is_some()
    }

    /// Asks for a Progress notice on watch `id` once everything it is owed has been sent.
    pub fn progress(&self, id: u64) {
        if let Some(w) = self.st.borrow_mut().watchers.get_mut(&id) {
            w.progress = true;
        }
        self.kick.notify(usize::MAX);
    }

    /// Asks for one Progress notice (tag -1) on `sink`, covering all its watches.
    pub fn sink_progress(&self, sink_id: u64, sink: WatchSink) {
        self.st.borrow_mut().sink_progress.insert(sink_id, sink);
        self.kick.notify(usize::MAX);
    }

    async fn run(self: Rc<Self>, src: Rc<dyn ChangeSource>) {
        let mut spacing = RoundSpacing::default();
        loop {
            let now = Instant::now();
            if let Some(due) = spacing.next_round(now) {
                glommio::timer::sleep(due - now).await;
            }
            let started = Instant::now();
            let updates = self.shared_round(&*src).await;
            spacing.ran(started, updates);
            let lagging = self.catch_up_round(&*src).await;
            self.progress_round(&*src);
            let next = self.st.borrow().synced_next;
            if src.read_revision() >= next {
                continue;
            }
            let kicked = self.kick.listen();
            if src.read_revision() >= next {
                continue;
            }
            let woken = futures_lite::future::or(src.wait_revision(next), kicked);
            if lagging {
                futures_lite::future::or(woken, async {
                    glommio::timer::sleep(CATCH_UP_RETRY).await;
                })
                .await;
            } else {
                woken.await;
            }
        }
    }

    /// Feeds every synced watcher the window from the shared position to the read revision.
    /// Returns how many updates it sent.
    async fn shared_round(&self, src: &dyn ChangeSource) -> usize {
        let mut updates = 0;
        let read = src.read_revision();
        let (after, ranges, with_prev) = {
            let mut st = self.st.borrow_mut();
            if read < st.synced_next {
                return 0;
            }
            let synced: Vec<&Watcher> = st.watchers.values().filter(|w| w.synced).collect();
            if synced.is_empty() {
                st.synced_next = read + 1;
                return 0;
            }
            let ranges: Vec<KeyRange> = synced.iter().filter_map(|w| w.range.clone()).collect();
            let with_prev = synced.iter().any(|w| w.prev_kv);
            (st.synced_next - 1, ranges, with_prev)
        };
        let fetched = if ranges.is_empty() {
            Ok((Vec::new(), read))
        } else {
            src.changes(Arc::new(ranges), after, read, with_prev).await
        };
        let mut st = self.st.borrow_mut();
        match fetched {
            Ok((events, complete)) => {
                debug_assert!(complete > after, "a fetch made no progress");
                let events: Arc<[WatchEvent]> = events.into();
                let mut gone = Vec::new();
                for (&id, w) in st.watchers.iter_mut().filter(|(_, w)| w.synced) {
                    match deliver(w, &events, complete) {
                        Sent::Ok => updates += 1,
                        Sent::Skipped => {}
                        Sent::Full => w.synced = false,
                        Sent::Gone => gone.push(id),
                    }
                }
                for id in gone {
                    st.watchers.remove(&id);
                }
                st.synced_next = complete + 1;
            }
            Err(e) => {
                // The shared window is never below compaction (watchers there were served
                // already), so this is a failing shard: let everyone retry on their own.
                tracing::warn!(error = %e, "watch feed failed; watchers will retry");
                for w in st.watchers.values_mut() {
                    w.synced = false;
                }
            }
        }
        updates
    }

    /// One catch-up step for every lagging watcher with room in its sink. Returns whether any
    /// watcher is still lagging.
    async fn catch_up_round(&self, src: &dyn ChangeSource) -> bool {
        let ids: Vec<u64> = self
            .st
            .borrow()
            .watchers
            .iter()
            .filter(|(_, w)| !w.synced)
            .map(|(&id, _)| id)
            .collect();
        let mut lagging = false;
        for id in ids {
            let job = {
                let mut st = self.st.borrow_mut();
                let target = st.synced_next - 1;
                let Some(w) = st.watchers.get_mut(&id) else {
                    continue;
                };
                if let Some(compact_revision) = w.compacted {
                    match send(&w.sink, w.tag, WatchUpdate::Compacted { compact_revision }) {
                        Sent::Full => lagging = true,
                        Sent::Ok | Sent::Skipped | Sent::Gone => {
                            st.watchers.remove(&id);
                        }
                    }
                    continue;
                }
                if w.next > target {
                    w.synced = true;
                    continue;
                }
                if !w.has_room() {
                    lagging = true;
                    continue;
                }
                match &w.range {
                    Some(r) => (w.next - 1, target, r.clone(), w.prev_kv),
                    None => {
                        w.next = target + 1;
                        w.synced = true;
                        continue;
                    }
                }
            };
            let (after, target, range, with_prev) = job;
            let fetched = src
                .changes(Arc::new(vec![range]), after, target, with_prev)
                .await;
            let mut st = self.st.borrow_mut();
            let synced_next = st.synced_next;
            let Some(w) = st.watchers.get_mut(&id) else {
                continue;
            };
            if w.next - 1 != after {
                continue; // changed meanwhile (cannot happen today; be safe)
            }
            match fetched {
                Ok((events, complete)) => match deliver(w, &events.into(), complete) {
                    Sent::Ok | Sent::Skipped => {
                        if w.next >= synced_next {
                            w.synced = true;
                        } else {
                            lagging = true;
                        }
                    }
                    Sent::Full => lagging = true,
                    Sent::Gone => {
                        st.watchers.remove(&id);
                    }
                },
                Err(Error::Compacted) => {
                    w.compacted = Some(src.compact_revision());
                    lagging = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch catch-up failed; will retry");
                    lagging = true;
                }
            }
        }
        lagging
    }

    /// Progress notices for synced watchers and sinks that asked.
    fn progress_round(&self, src: &dyn ChangeSource) {
        let mut st = self.st.borrow_mut();
        let shared = st.synced_next - 1;
        for w in st.watchers.values_mut() {
            if w.progress && w.synced {
                let revision = shared.max(w.next - 1);
                if !matches!(
                    send(&w.sink, w.tag, WatchUpdate::Progress { revision }),
                    Sent::Full
                ) {
                    w.progress = false;
                }
            }
        }
        let sinks = std::mem::take(&mut st.sink_progress);
        for (sink_id, sink) in sinks {
            let mut mine = st.watchers.values().filter(|w| w.sink_id == sink_id);
            if mine.clone().any(|w| !w.synced) {
                st.sink_progress.insert(sink_id, sink);
                continue;
            }
            let revision = mine.next().map_or(src.read_revision(), |_| shared).max(0);
            if let Sent::Full = send(&sink, -1, WatchUpdate::Progress { revision }) {
                st.sink_progress.insert(sink_id, sink);
            }
        }
    }
}

/// Gives `w` its share of `events` (all events up to `complete`); on success its position moves
/// past `complete`. A full sink leaves the position where it was.
fn deliver(w: &mut Watcher, events: &Arc<[WatchEvent]>, complete: i64) -> Sent {
    let whole = events
        .iter()
        .all(|e| w.wants(e) && (w.prev_kv || e.prev_kv.is_none()));
    let mine: Arc<[WatchEvent]> = if whole {
        events.clone()
    } else {
        events
            .iter()
            .filter(|e| w.wants(e))
            .map(|e| WatchEvent {
                prev_kv: if w.prev_kv { e.prev_kv.clone() } else { None },
                ..e.clone()
            })
            .collect()
    };
    if mine.is_empty() {
        w.next = w.next.max(complete + 1);
        return Sent::Skipped;
    }
    let sent = send(
        &w.sink,
        w.tag,
        WatchUpdate::Events {
            revision: complete,
            events: mine,
        },
    );
    if let Sent::Ok = sent {
        w.next = w.next.max(complete + 1);
    }
    sent
}

/// One shard's page of changes: events with their `prev_kv` (when asked), and the revision
/// through which the page is complete.
pub type ShardPage = (Vec<(Event, Option<KeyValue>)>, i64);

/// Merges per-shard change pages: keeps what every shard has complete, in delivery order.
pub(crate) fn merge_pages(pages: Vec<ShardPage>) -> (Vec<WatchEvent>, i64) {
    let complete = pages.iter().map(|(_, c)| *c).min().unwrap_or(0);
    let mut all: Vec<(Event, Option<KeyValue>)> = pages
        .into_iter()
        .flat_map(|(evs, _)| evs)
        .filter(|(e, _)| e.revision() <= complete)
        .collect();
    all.sort_by(|a, b| a.0.order_key().cmp(&b.0.order_key()));
    let events = all
        .into_iter()
        .map(|(e, prev_kv)| WatchEvent {
            kind: e.kind,
            kv: e.kv,
            prev_kv,
        })
        .collect();
    (events, complete)
}

/// Whether every range is a single key (then only the keys' own shards need asking).
pub(crate) fn single_keys(ranges: &[KeyRange]) -> bool {
    ranges.iter().all(KeyRange::is_single_key)
}

/// For a shard: the page of changes, with `prev_kv` when asked.
pub(crate) fn shard_page(
    store: &crate::mvcc::ShardStore,
    ranges: &[KeyRange],
    after: i64,
    upto: i64,
    with_prev: bool,
) -> Result<ShardPage> {
    let c = store.changes(ranges, after, upto, MAX_EVENTS_PER_FETCH)?;
    debug_assert!(c.events.iter().all(|e| in_ranges(ranges, &e.kv.key)));
    let events = c
        .events
        .into_iter()
        .map(|e| {
            let prev = if with_prev {
                store.previous(&e.kv.key, e.revision())
            } else {
                None
            };
            (e, prev)
        })
        .collect();
    Ok((events, c.complete_through))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_rounds_are_spaced_by_what_they_sent_and_a_quiet_hub_runs_at_once() {
        let t0 = Instant::now();
        let mut spacing = RoundSpacing::default();
        assert_eq!(spacing.next_round(t0), None, "the first round runs at once");
        // A round that sent nothing (no watcher wanted the window) leaves no gap.
        spacing.ran(t0, 0);
        assert_eq!(spacing.next_round(t0), None);
        // Two updates: 40 µs from the round's start.
        spacing.ran(t0, 2);
        assert_eq!(spacing.next_round(t0), Some(t0 + Duration::from_micros(40)));
        assert_eq!(spacing.next_round(t0 + Duration::from_micros(40)), None);
        // Many updates: capped at 1 ms.
        spacing.ran(t0, 10_000);
        assert_eq!(spacing.next_round(t0), Some(t0 + MAX_ROUND_GAP));
        // Whoever waits past the gap (no write for a while) runs at once.
        assert_eq!(spacing.next_round(t0 + Duration::from_millis(5)), None);
        spacing.ran(t0, usize::MAX);
        assert_eq!(spacing.next_round(t0), Some(t0 + MAX_ROUND_GAP));
    }
}

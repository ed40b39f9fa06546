//! Change events, the watch feed: a bounded in-memory log of recent events per shard, with
//! a fallback to the key index's history for anything older.
//!
//! Watchers that keep up are served from the log at the cost of a binary search; watchers that
//! fall behind (or ask for an old `start_revision`) catch up from the retained history, which is
//! exactly what compaction leaves. The log is never consulted for revisions at or below its
//! `floor`, so evicting from it, or starting it empty after a restart, loses nothing.

use std::collections::VecDeque;

use crate::kv::{KeyRange, KeyValue};

/// etcd's event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a put, the key as it is after the put; for a delete, etcd's tombstone form: the key
    /// and `mod_revision` only.
    pub kv: KeyValue,
    /// Position of the op that caused it among its txn's leaf ops. Orders the events of one
    /// revision across shards as the txn executed them (etcd's sub-revisions); events rebuilt
    /// from history no longer know it and carry 0, which orders them by key.
    pub op: u32,
}

impl Event {
    pub fn revision(&self) -> i64 {
        self.kv.mod_revision
    }

    pub(crate) fn deleted(key: bytes::Bytes, rev: i64, op: u32) -> Event {
        Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key,
                mod_revision: rev,
                ..Default::default()
            },
            op,
        }
    }

    /// The order events are delivered in: by revision, then as the txn executed them.
    pub fn order_key(&self) -> (i64, u32, &[u8]) {
        (self.revision(), self.op, self.kv.key.as_ref())
    }
}

/// A page of changes: every event in the requested ranges with a revision in
/// `(after, complete_through]`, in delivery order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub events: Vec<Event>,
    /// Every event up to this revision is included (may be below the requested `upto` when the
    /// page hit its size limit; never splits a revision).
    pub complete_through: i64,
}

/// Whether `key` is in any of `ranges`.
pub fn in_ranges(ranges: &[KeyRange], key: &[u8]) -> bool {
    ranges.iter().any(|r| r.contains(key))
}

/// Cuts `events` (sorted by revision) after `max` events, at a revision boundary, and returns the
/// last revision kept complete; `upto` when nothing was cut. A single revision larger than `max`
/// is kept whole: a txn's events are never split.
pub(crate) fn cut_at_revision(events: &mut Vec<Event>, max: usize, upto: i64) -> i64 {
    if events.len() <= max {
        return upto;
    }
    let boundary = events[max].revision();
    let first = events[0].revision();
    let keep = if boundary == first {
        events.partition_point(|e| e.revision() <= first)
    } else {
        events.partition_point(|e| e.revision() < boundary)
    };
    events.truncate(keep);
    events.last().map_or(upto, Event::revision)
}

/// The recent-events log of one shard.
#[derive(Debug)]
pub(crate) struct EventLog {
    ring: VecDeque<Event>,
    /// Every event with a revision above this is in `ring`.
    floor: i64,
    capacity: usize,
}

/// Events kept per shard: enough for watchers a few seconds behind a busy shard, small enough
/// that the values it pins stay a bounded cost.
pub const EVENT_LOG_CAPACITY: usize = 64 * 1024;

impl EventLog {
    pub fn new(floor: i64, capacity: usize) -> Self {
        EventLog {
            ring: VecDeque::new(),
            floor,
            capacity: capacity.max(1),
        }
    }

    pub fn floor(&self) -> i64 {
        self.floor
    }

    pub fn push(&mut self, event: Event) {
        debug_assert!(
            self.ring
                .back()
                .is_none_or(|b| b.order_key() < event.order_key()),
            "events out of order"
        );
        if self.ring.len() == self.capacity {
            if let Some(old) = self.ring.pop_front() {
                self.floor = self.floor.max(old.revision());
            }
        }
        self.ring.push_back(event);
    }

    /// Writes at `rev` were applied without being recorded (log replay): nothing at or below it
    /// may be served from the ring any more.
    pub fn skip_to(&mut self, rev: i64) {
        self.floor = self.floor.max(rev);
        self.ring.clear();
    }

    /// Drops the events of the newest revision `rev` (a rolled-back txn part).
    pub fn remove_revision(&mut self, rev: i64) {
        while self.ring.back().is_some_and(|e| e.revision() == rev) {
            self.ring.pop_back();
        }
    }

    /// Events with revisions in `(after, upto]`, for swapping their keys and values for
    /// identical copies held elsewhere (see `ShardStore::adopt_event_values`).
    pub fn between_mut(&mut self, after: i64, upto: i64) -> impl Iterator<Item = &mut Event> {
        let end = self.count_through(upto);
        let start = self.count_through(after).min(end);
        self.ring.range_mut(start..end)
    }

    /// The events of revision `rev` still in the log.
    pub fn revision_mut(&mut self, rev: i64) -> impl Iterator<Item = &mut Event> {
        let end = self.count_through(rev);
        // A revision's events are adjacent: walk back over them rather than search again.
        let mut start = end;
        while start > 0 && self.ring[start - 1].revision() == rev {
            start -= 1;
        }
        self.ring.range_mut(start..end)
    }

    /// How many events have revisions at or below `rev`. Callers mostly ask about the newest
    /// revisions, so the newest few events are looked at first (a binary search over the whole
    /// ring misses the cache on every step; it showed as 2% of a loaded server's CPU). Settling
    /// a log window's writes asks about a few thousand older revisions in a row: those go
    /// straight to the search after one look at the boundary.
    fn count_through(&self, rev: i64) -> usize {
        const NEAR: usize = 32;
        let n = self.ring.len();
        if n > NEAR && self.ring[n - NEAR].revision() > rev {
            return self.ring.partition_point(|e| e.revision() <= rev);
        }
        for back in 0..NEAR.min(n) {
            if self.ring[n - 1 - back].revision() <= rev {
                return n - back;
            }
        }
        if n <= NEAR {
            return 0;
        }
        self.ring.partition_point(|e| e.revision() <= rev)
    }

    pub fn read(&self, ranges: &[KeyRange], after: i64, upto: i64, out: &mut Vec<Event>) {
        debug_assert!(after >= self.floor, "read below the event log's floor");
        let start = self.ring.partition_point(|e| e.revision() <= after);
        out.extend(
            self.ring
                .range(start..)
                .take_while(|e| e.revision() <= upto)
                .filter(|e| in_ranges(ranges, &e.kv.key))
                .cloned(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn put(key: &str, rev: i64, op: u32) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: Bytes::copy_from_slice(key.as_bytes()),
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                ..Default::default()
            },
            op,
        }
    }

    #[test]
    fn cut_keeps_whole_revisions() {
        let mut ev = vec![
            put("a", 2, 0),
            put("b", 2, 1),
            put("c", 3, 0),
            put("d", 4, 0),
        ];
        assert_eq!(cut_at_revision(&mut ev.clone(), 10, 9), 9);
        let mut one = ev.clone();
        assert_eq!(cut_at_revision(&mut one, 1, 9), 2);
        assert_eq!(one.len(), 2);
        assert_eq!(cut_at_revision(&mut ev, 3, 9), 3);
        assert_eq!(ev.len(), 3);
    }

    #[test]
    fn eviction_raises_the_floor() {
        let mut log = EventLog::new(0, 2);
        log.push(put("a", 1, 0));
        log.push(put("b", 2, 0));
        assert_eq!(log.floor(), 0);
        log.push(put("c", 3, 0));
        assert_eq!(log.floor(), 1);
        let mut out = Vec::new();
        log.read(&[KeyRange::all()], 1, 3, &mut out);
        assert_eq!(out.len(), 2);
        log.remove_revision(3);
        out.clear();
        log.read(&[KeyRange::all()], 1, 3, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn counting_from_the_newest_agrees_with_a_binary_search() {
        // Revisions 1..=200 with some revisions holding several events and some missing.
        let mut log = EventLog::new(0, 1 << 10);
        for rev in 1..=200i64 {
            if rev % 7 == 0 {
                continue;
            }
            for op in 0..(rev % 3) as u32 + 1 {
                log.push(put(&format!("k{rev}-{op}"), rev, op));
            }
        }
        for rev in -1..=205 {
            let want = log.ring.partition_point(|e| e.revision() <= rev);
            assert_eq!(log.count_through(rev), want, "revision {rev}");
            let at: Vec<i64> = log.revision_mut(rev).map(|e| e.revision()).collect();
            assert!(at.iter().all(|&r| r == rev), "revision {rev}: {at:?}");
            assert_eq!(
                at.len(),
                log.ring.iter().filter(|e| e.revision() == rev).count()
            );
        }
        assert_eq!(EventLog::new(0, 4).count_through(9), 0);
    }
}

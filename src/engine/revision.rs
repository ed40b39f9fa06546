//! The store-wide revision counter and the read revision.
//!
//! Revisions are handed out by one atomic counter (the timestamp oracle). Writers finish out of
//! order across cores, so readers may not simply read at the counter: each core publishes the lowest
//! revision it has handed out and not yet finished, and the *read revision* is one below the lowest
//! of those (or the counter when nothing is in flight). A multi-shard write stays pending on its
//! coordinating core until every part is durable and applied, so it becomes visible everywhere at
//! once.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::Arc;

use event_listener::Event;

const NONE_PENDING: i64 = i64::MAX;

/// An atomic alone on its cache line (128 bytes covers adjacent-line prefetching).
#[repr(align(128))]
struct Line(AtomicI64);

pub struct RevisionClock {
    counter: AtomicI64,
    compact: AtomicI64,
    /// Per core: lowest unfinished revision it handed out, or `NONE_PENDING`. One cache line
    /// each: every core writes its own on every write it starts and finishes.
    low_pending: Vec<Line>,
    /// The highest [`Self::resolved`] value waiters were woken for. A finish that does not
    /// raise it cannot satisfy anyone (both wait conditions only grow with it; floors and the
    /// counter wake waiters themselves), so it wakes nobody: with two cores, a core finishing
    /// behind the other's older pending writes used to wake every waiter on both for nothing.
    announced: AtomicI64,
    /// Highest read revision ever computed. A core's freshly published lower bound can be stale
    /// (below revisions others already finished), so a later computation may come out lower; the
    /// watermark keeps the read revision monotonic, which is safe because revisions at or below a
    /// value once computed were all finished and stay so.
    visible: AtomicI64,
    /// Signalled whenever a core finishes a revision (or a follower's floor rises).
    advanced: Event,
    /// Set on cluster members: what caps reads while this node does not execute writes.
    follower: std::sync::OnceLock<FollowerReads>,
    /// Highest revision of a record known committed (a write acknowledged as committed here,
    /// or a committed record applied). A read stamp never promises past it: a revision a
    /// deposed leader handed out but never logged may be handed out again by the next leader
    /// node, whose counter starts above every committed revision, not above every finished one.
    committed: AtomicI64,
}

/// A cluster member that does not execute writes applies each shard's log on its own schedule,
/// so the counter (the highest revision applied anywhere) may cover half of a multi-shard
/// write. Its reads are capped at the lowest shard *floor*: every record of shard `s` with a
/// revision at or below `floors[s]` is in this node's store of `s`. A floor rises when the shard
/// applies a record (per shard, revisions only grow along the log) and when the leader's stamp
/// says the shard's log holds nothing more at or below a revision (idle shards).
struct FollowerReads {
    /// Whether every shard executes here: this node is the leader node and needs no cap.
    gate: Arc<crate::engine::replica::NodeGate>,
    floors: Vec<AtomicI64>,
}

impl RevisionClock {
    pub fn new(cores: usize, current: i64, compact: i64) -> Arc<RevisionClock> {
        Arc::new(RevisionClock {
            counter: AtomicI64::new(current),
            compact: AtomicI64::new(compact),
            low_pending: (0..cores)
                .map(|_| Line(AtomicI64::new(NONE_PENDING)))
                .collect(),
            announced: AtomicI64::new(current),
            visible: AtomicI64::new(current),
            advanced: Event::new(),
            follower: std::sync::OnceLock::new(),
            committed: AtomicI64::new(current),
        })
    }

    /// Caps reads at the shards' floors whenever `gate` says this node does not execute every
    /// shard. `floors[s]` starts at the last revision of shard `s`'s recovered store (a
    /// member's store is its checkpoint until its group reports more committed), and nothing
    /// above the lowest is visible yet. Call before anything reads.
    pub fn cap_follower_reads(&self, gate: Arc<crate::engine::replica::NodeGate>, floors: &[i64]) {
        let low = floors.iter().copied().min().unwrap_or(0);
        self.visible.fetch_min(low, SeqCst);
        let _ = self.follower.set(FollowerReads {
            gate,
            floors: floors.iter().map(|&f| AtomicI64::new(f)).collect(),
        });
    }

    /// The write at `rev` is committed.
    pub fn note_committed(&self, rev: i64) {
        self.committed.fetch_max(rev, SeqCst);
    }

    /// What this node may promise in a read stamp: its read revision, but never past a
    /// committed record (see `committed`).
    pub fn stamp_revision(&self) -> i64 {
        let read = self.read_revision();
        read.min(self.committed.load(SeqCst))
    }

    /// Every record of `shard` at or below `rev` is in this node's store of it.
    pub fn raise_floor(&self, shard: u32, rev: i64) {
        let Some(f) = self.follower.get() else { return };
        if let Some(floor) = f.floors.get(shard as usize) {
            if floor.fetch_max(rev, SeqCst) < rev {
                self.advanced.notify(usize::MAX);
            }
        }
    }

    /// A member applied the committed record at `rev` of `shard`: the counter and the shard's
    /// floor move.
    pub fn applied(&self, shard: u32, rev: i64) {
        self.observe(rev);
        self.note_committed(rev);
        self.raise_floor(shard, rev);
    }

    /// Highest revision handed out (possibly not yet visible).
    pub fn current(&self) -> i64 {
        self.counter.load(SeqCst)
    }

    /// Every revision up to this one finished on this node: what this node executed, as
    /// opposed to what its reads may show (`read_revision`, capped on a follower).
    fn resolved(&self) -> i64 {
        // Load the counter first: any revision it covers was registered as pending before it was
        // handed out, so the loads below see it (or see it finished).
        let c = self.counter.load(SeqCst);
        let low = self
            .low_pending
            .iter()
            .map(|a| a.0.load(SeqCst))
            .min()
            .unwrap_or(NONE_PENDING);
        let now = if low == NONE_PENDING {
            c
        } else {
            c.min(low - 1)
        };
        // A core publishing a stale lower bound in `begin` can make one computation come out
        // below an earlier one; what was once announced finished stays finished.
        now.max(self.announced.load(SeqCst))
    }

    /// Every revision up to this one is durable and applied on every shard.
    pub fn read_revision(&self) -> i64 {
        let mut computed = self.resolved();
        if let Some(f) = self.follower.get() {
            if !f.gate.all() {
                let floor = f.floors.iter().map(|a| a.load(SeqCst)).min();
                computed = computed.min(floor.unwrap_or(computed));
            }
        }
        self.visible.fetch_max(computed, SeqCst).max(computed)
    }

    pub fn compact_revision(&self) -> i64 {
        self.compact.load(SeqCst)
    }

    pub fn set_compact_revision(&self, rev: i64) {
        self.compact.fetch_max(rev, SeqCst);
    }

    /// A member that applies writes the leader executed (a follower) moves the counter with them.
    pub fn observe(&self, rev: i64) {
        if self.counter.fetch_max(rev, SeqCst) < rev {
            self.advanced.notify(usize::MAX);
        }
    }

    /// Waits until every revision up to `rev` finished on this node: a writer's wait before it
    /// answers. Unlike [`Self::wait_visible`] it does not wait for a follower's floors, which a
    /// node that just stopped executing (a leadership change) may not raise for a while.
    pub async fn wait_resolved(&self, rev: i64) {
        self.wait_until(|| self.resolved() >= rev).await
    }

    /// Waits until `rev` is visible to readers.
    pub async fn wait_visible(&self, rev: i64) {
        self.wait_until(|| self.read_revision() >= rev).await
    }

    async fn wait_until(&self, done: impl Fn() -> bool) {
        loop {
            if done() {
                return;
            }
            let listener = self.advanced.listen();
            if done() {
                return;
            }
            listener.await;
        }
    }
}

/// One core's view of the clock: hands out revisions and tracks which are still in flight. Lives on
/// the core's thread only.
pub struct CoreRevisions {
    clock: Arc<RevisionClock>,
    core: usize,
    pending: std::cell::RefCell<BTreeSet<i64>>,
}

impl CoreRevisions {
    pub fn new(clock: Arc<RevisionClock>, core: usize) -> CoreRevisions {
        CoreRevisions {
            clock,
            core,
            pending: Default::default(),
        }
    }

    pub fn clock(&self) -> &Arc<RevisionClock> {
        &self.clock
    }

    /// Hands out the next revision and keeps it from becoming visible until [`Self::finish`].
    pub fn begin(&self) -> i64 {
        let mut pending = self.pending.borrow_mut();
        let slot = &self.clock.low_pending[self.core].0;
        if pending.is_empty() {
            // Publish a lower bound before taking the revision, so no reader can see the counter
            // advanced past it without also seeing it pending.
            slot.store(self.clock.counter.load(SeqCst) + 1, SeqCst);
        }
        let rev = self.clock.counter.fetch_add(1, SeqCst) + 1;
        pending.insert(rev);
        slot.store(*pending.first().expect("just inserted"), SeqCst);
        rev
    }

    /// The revision is durable and applied everywhere (or abandoned): let readers past it.
    pub fn finish(&self, rev: i64) {
        let mut pending = self.pending.borrow_mut();
        let was_there = pending.remove(&rev);
        debug_assert!(was_there, "finishing revision {rev} that was not pending");
        let low = pending.first().copied().unwrap_or(NONE_PENDING);
        self.clock.low_pending[self.core].0.store(low, SeqCst);
        drop(pending);
        // After the store: a waiter that checks after this computation sees the store, and one
        // that checked before is listening by now (it listens before it checks).
        let resolved = self.clock.resolved();
        if self.clock.announced.fetch_max(resolved, SeqCst) < resolved {
            self.clock.advanced.notify(usize::MAX);
        }
    }
}

/// A follower's stamps from its shard's leader not yet reached: (index, revision) means every
/// record of the shard at or below `revision` sits at or below `index` in the leader's log, so
/// once this member has applied `index` its floor may rise to `revision`.
#[derive(Default, Debug)]
pub struct ReadStamps {
    pending: std::collections::VecDeque<(u64, i64)>,
}

/// Enough to follow a busy shard: when full, the oldest gives way (a newer stamp says more).
const MAX_STAMPS: usize = 64;

impl ReadStamps {
    /// Takes the leader's stamp; the revision it already allows with `applied`, if any.
    pub fn add(&mut self, index: u64, revision: i64, applied: u64) -> Option<i64> {
        match self.pending.back_mut() {
            // An idle shard's stamps repeat the index with newer revisions.
            Some(last) if last.0 == index => last.1 = last.1.max(revision),
            _ => {
                if self.pending.len() == MAX_STAMPS {
                    self.pending.pop_front();
                }
                self.pending.push_back((index, revision));
            }
        }
        self.reached(applied)
    }

    /// Forgets every stamp (the store was rebuilt: its applied index starts over).
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// The highest revision of the stamps `applied` reached (they are dropped).
    pub fn reached(&mut self, applied: u64) -> Option<i64> {
        let mut best = None;
        while let Some(&(index, rev)) = self.pending.front() {
            if index > applied {
                break;
            }
            best = best.max(Some(rev));
            self.pending.pop_front();
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_revision_waits_for_the_lowest_pending() {
        let clock = RevisionClock::new(2, 10, 0);
        let a = CoreRevisions::new(clock.clone(), 0);
        let b = CoreRevisions::new(clock.clone(), 1);
        assert_eq!(clock.read_revision(), 10);
        let r1 = a.begin();
        let r2 = b.begin();
        let r3 = a.begin();
        assert_eq!((r1, r2, r3), (11, 12, 13));
        assert_eq!(clock.read_revision(), 10);
        b.finish(r2);
        assert_eq!(clock.read_revision(), 10, "11 still pending");
        a.finish(r1);
        assert_eq!(clock.read_revision(), 12);
        a.finish(r3);
        assert_eq!(clock.read_revision(), 13);
        assert_eq!(clock.current(), 13);
    }

    #[test]
    fn observed_revisions_move_the_counter_forward_only() {
        let clock = RevisionClock::new(1, 5, 0);
        clock.observe(9);
        clock.observe(7);
        assert_eq!((clock.current(), clock.read_revision()), (9, 9));
        let a = CoreRevisions::new(clock.clone(), 0);
        assert_eq!(
            a.begin(),
            10,
            "a member that becomes leader continues above what it applied"
        );
    }

    #[test]
    fn concurrent_readers_never_see_unfinished_revisions() {
        let clock = RevisionClock::new(2, 0, 0);
        let finished: Arc<Vec<AtomicI64>> =
            Arc::new((0..20_001).map(|_| AtomicI64::new(0)).collect());
        let mut handles = vec![];
        for core in 0..2 {
            let clock = clock.clone();
            let finished = finished.clone();
            handles.push(std::thread::spawn(move || {
                let revs = CoreRevisions::new(clock, core);
                for _ in 0..10_000 {
                    let r = revs.begin();
                    finished[r as usize].store(1, SeqCst);
                    revs.finish(r);
                }
            }));
        }
        let reader = {
            let clock = clock.clone();
            let finished = finished.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                for _ in 0..200_000 {
                    let rr = clock.read_revision();
                    assert!(rr >= last, "read revision went backwards");
                    for r in (last + 1)..=rr {
                        assert_eq!(
                            finished[r as usize].load(SeqCst),
                            1,
                            "revision {r} visible before finished"
                        );
                    }
                    last = rr;
                }
            })
        };
        for h in handles {
            h.join().unwrap();
        }
        reader.join().unwrap();
        assert_eq!(clock.read_revision(), 20_000);
    }

    #[test]
    fn stamps_allow_their_revision_once_their_index_is_applied() {
        let mut st = ReadStamps::default();
        assert_eq!(st.add(10, 100, 5), None);
        assert_eq!(
            st.add(10, 105, 5),
            None,
            "same index: one stamp, newer revision"
        );
        assert_eq!(st.add(12, 110, 5), None);
        assert_eq!(st.reached(9), None);
        assert_eq!(st.reached(11), Some(105));
        assert_eq!(st.add(12, 120, 12), Some(120));
        assert_eq!(st.reached(100), None);
        for i in 0..200 {
            st.add(1000 + i, 1000 + i as i64, 0);
        }
        assert_eq!(st.pending.len(), MAX_STAMPS);
        assert_eq!(st.reached(u64::MAX), Some(1199));
    }

    #[test]
    fn a_follower_reads_at_its_lowest_shard_floor() {
        let clock = RevisionClock::new(1, 10, 0);
        let gate = crate::engine::replica::NodeGate::new(2);
        clock.cap_follower_reads(gate.clone(), &[10, 10]);
        assert_eq!(clock.read_revision(), 10);
        // Shard 0 applied half of a two-shard write at 12 (and 11 alone); shard 1 has not.
        clock.applied(0, 11);
        clock.applied(0, 12);
        assert_eq!(clock.current(), 12);
        assert_eq!(
            clock.read_revision(),
            10,
            "shard 1 may still hold a part of 11 or 12"
        );
        clock.applied(1, 12);
        assert_eq!(clock.read_revision(), 12);
        // An idle shard rises by the leader's stamp.
        clock.applied(0, 15);
        clock.raise_floor(1, 15);
        assert_eq!(clock.read_revision(), 15);
    }

    #[test]
    fn stamps_never_promise_a_revision_no_record_holds() {
        let clock = RevisionClock::new(1, 10, 0);
        let core = CoreRevisions::new(clock.clone(), 0);
        // A write that failed before it was logged: finished, but nothing holds 11, and the
        // next leader node may hand 11 out again.
        let burned = core.begin();
        core.finish(burned);
        assert_eq!((clock.read_revision(), clock.stamp_revision()), (11, 10));
        let w = core.begin();
        core.finish(w);
        clock.note_committed(w);
        assert_eq!(
            clock.stamp_revision(),
            12,
            "a committed 12 rules out reusing 11"
        );
    }
}

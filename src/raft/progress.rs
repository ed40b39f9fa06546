//! The leader's view of one follower: how far it matches, what to send next, and how much may
//! be in flight. Probe sends one append per round trip until the follower's position is found;
//! Replicate streams appends optimistically (pipelining) up to `max_inflight` messages; Snapshot
//! waits for a snapshot to be installed.

use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    Snapshot,
}

/// Last index of each append still in flight, oldest first.
#[derive(Clone, Debug)]
pub struct Inflights {
    buf: VecDeque<u64>,
    cap: usize,
}

impl Inflights {
    pub fn new(cap: usize) -> Self {
        Inflights {
            buf: VecDeque::with_capacity(cap),
            cap: cap.max(1),
        }
    }
    pub fn add(&mut self, last: u64) {
        debug_assert!(
            self.buf.back().is_none_or(|&b| b <= last),
            "inflights out of order"
        );
        self.buf.push_back(last);
    }
    /// An ack up to `index` frees every append that ended at or before it.
    pub fn free_to(&mut self, index: u64) {
        while self.buf.front().is_some_and(|&f| f <= index) {
            self.buf.pop_front();
        }
    }
    pub fn full(&self) -> bool {
        self.buf.len() >= self.cap
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn reset(&mut self) {
        self.buf.clear();
    }
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub matched: u64,
    pub next: u64,
    pub state: ProgressState,
    /// Probe: an append is outstanding; wait for its answer or the next heartbeat answer.
    pub probe_sent: bool,
    /// Snapshot: the index of the snapshot sent.
    pub pending_snapshot: u64,
    pub inflights: Inflights,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    pub is_learner: bool,
    /// Highest heartbeat round this follower acknowledged in the current term.
    pub acked_round: u64,
    /// Heartbeat answers seen while appends stayed unanswered: lost appends are silent, so
    /// after a few of these the leader falls back to probing.
    pub stalled: u32,
}

impl Progress {
    pub fn new(next: u64, max_inflight: usize, is_learner: bool) -> Self {
        Progress {
            matched: 0,
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            pending_snapshot: 0,
            inflights: Inflights::new(max_inflight),
            recent_active: false,
            is_learner,
            acked_round: 0,
            stalled: 0,
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.state = state;
        self.probe_sent = false;
        self.pending_snapshot = 0;
        self.stalled = 0;
        self.inflights.reset();
    }

    pub fn become_probe(&mut self) {
        let after = if self.state == ProgressState::Snapshot {
            self.pending_snapshot.max(self.matched) + 1
        } else {
            self.matched + 1
        };
        self.reset_state(ProgressState::Probe);
        self.next = after;
    }

    pub fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next = self.matched + 1;
    }

    pub fn become_snapshot(&mut self, index: u64) {
        self.reset_state(ProgressState::Snapshot);
        self.pending_snapshot = index;
    }

    /// An acceptance up to `n`; false if it told us nothing new (stale or duplicate).
    pub fn maybe_update(&mut self, n: u64) -> bool {
        let updated = self.matched < n;
        if updated {
            self.matched = n;
            self.probe_sent = false;
            self.stalled = 0;
        }
        self.next = self.next.max(n + 1);
        updated
    }

    /// A rejection of the append whose prev index was `rejected`; `hint` is where the leader
    /// believes the logs start to differ. False if the rejection is stale.
    pub fn maybe_decr_to(&mut self, rejected: u64, hint: u64) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.matched {
                return false;
            }
            self.next = hint.min(rejected).max(self.matched + 1);
            return true;
        }
        if self.next == 0 || self.next - 1 != rejected {
            return false;
        }
        self.next = hint.min(rejected).max(self.matched + 1).max(1);
        self.probe_sent = false;
        true
    }

    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_free_and_full() {
        let mut f = Inflights::new(2);
        f.add(3);
        f.add(5);
        assert!(f.full());
        f.free_to(4);
        assert!(!f.full());
        f.free_to(10);
        assert!(f.is_empty());
    }

    #[test]
    fn stale_rejections_are_ignored() {
        let mut p = Progress::new(10, 4, false);
        p.matched = 5;
        p.become_replicate();
        p.next = 9;
        assert!(!p.maybe_decr_to(4, 1), "rejection below match is stale");
        assert!(p.maybe_decr_to(8, 7));
        assert_eq!(p.next, 7);
        p.become_probe();
        assert_eq!(p.next, 6);
        assert!(
            !p.maybe_decr_to(3, 1),
            "probe only accepts a rejection of next-1"
        );
        assert!(p.maybe_decr_to(5, 1));
        assert_eq!(p.next, 6, "never below match+1");
    }

    #[test]
    fn update_unpauses_probe() {
        let mut p = Progress::new(4, 4, false);
        p.probe_sent = true;
        assert!(p.is_paused());
        assert!(p.maybe_update(3));
        assert!(!p.is_paused());
        assert!(!p.maybe_update(2));
        assert_eq!(p.next, 4);
    }
}

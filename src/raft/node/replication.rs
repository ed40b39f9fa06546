//! Log replication: the follower accepting appends, heartbeats and snapshots (acknowledging
//! only durable entries), and the leader sending them under flow control and committing.

use bytes::Bytes;

use super::*;
use crate::raft::error::Result;
use crate::raft::message::{Entry, EntryKind, Message, MessageKind, NodeId};
use crate::raft::progress::ProgressState;

impl Raft {
    pub(super) fn ack(&mut self, index: u64) {
        if let Some(l) = self.lead {
            let mut r = Message::new(MessageKind::AppendResponse, self.id, l, self.term);
            r.index = index;
            self.acked_sent = self.acked_sent.max(index);
            self.send(r);
        }
    }

    /// Acknowledge newly durable entries that match the leader.
    pub(super) fn maybe_send_ack(&mut self) {
        let a = self.log.persisted().min(self.leader_matched);
        if self.lead.is_some() && a > self.acked_sent {
            self.ack(a);
        }
    }

    pub(super) fn handle_append(&mut self, m: Message) {
        let committed = self.log.committed();
        if m.index < committed {
            // Everything up to our commit matches any leader; tell it where to resume.
            self.ack(committed.min(self.log.persisted()));
            return;
        }
        match self.log.maybe_append(m.index, m.log_term, &m.entries) {
            Some(last_new) => {
                self.leader_matched = self.leader_matched.max(last_new);
                self.log.commit_to(m.commit.min(last_new));
                if self.log.persisted() >= last_new {
                    self.ack(last_new);
                }
                // Otherwise acknowledged when the caller reports the entries durable.
            }
            None => {
                let (hint, hint_term) = self.log.conflict_hint(m.index);
                let mut r = Message::new(MessageKind::AppendResponse, self.id, m.from, self.term);
                r.reject = true;
                r.index = m.index;
                r.reject_hint = hint;
                r.log_term = hint_term;
                self.send(r);
            }
        }
    }

    pub(super) fn handle_heartbeat(&mut self, m: Message) {
        // The leader caps `commit` at what it knows we durably match.
        self.log.commit_to(m.commit);
        let mut r = Message::new(MessageKind::HeartbeatResponse, self.id, m.from, self.term);
        r.context = m.context;
        self.send(r);
    }

    pub(super) fn handle_snapshot(&mut self, m: Message) {
        let Some(snap) = m.snapshot else { return };
        let (index, term) = (snap.meta.index, snap.meta.term);
        if index <= self.log.committed() {
            self.ack(self.log.committed().min(self.log.persisted()));
            return;
        }
        self.leader_matched = self.leader_matched.max(index);
        if self.log.match_term(index, term) {
            // We already hold that prefix: just learn that it is committed.
            self.log.commit_to(index);
            self.maybe_send_ack();
            return;
        }
        self.conf = snap.meta.conf_state.clone();
        self.conf_history.clear();
        self.conf_changed = true;
        self.log.restore(snap);
        // Acknowledged once the caller reports the snapshot durable.
    }

    pub(super) fn check_can_propose(&self) -> Result<()> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.lead });
        }
        if let Some(t) = self.lead_transferee {
            return Err(Error::TransferInProgress(t));
        }
        Ok(())
    }

    pub(super) fn append_and_broadcast(&mut self, kind: EntryKind, data: Bytes) -> u64 {
        let index = self.log.last_index() + 1;
        self.log.append(Entry {
            term: self.term,
            index,
            kind,
            data,
        });
        // Our own copy counts once the caller acknowledges it durable (see `advance`).
        self.broadcast_append(false);
        index
    }

    pub(super) fn peers(&self) -> Vec<NodeId> {
        self.prs.keys().copied().filter(|&p| p != self.id).collect()
    }

    pub(super) fn broadcast_append(&mut self, send_empty: bool) {
        for p in self.peers() {
            self.send_append(p, send_empty);
        }
    }

    /// Sends the next batch (or a snapshot) to `to` if flow control allows.
    pub(super) fn send_append(&mut self, to: NodeId, send_empty: bool) -> bool {
        let (max_entries, max_bytes) = (self.cfg.max_entries_per_msg, self.cfg.max_bytes_per_msg);
        let (term, id, commit) = (self.term, self.id, self.log.committed());
        let Some(pr) = self.prs.get_mut(&to) else {
            return false;
        };
        if to == id || pr.is_paused() {
            return false;
        }
        let prev = pr.next - 1;
        let msg = match self.log.term(prev) {
            None => {
                let snap = self.log.snapshot().clone();
                pr.become_snapshot(snap.meta.index);
                let mut m = Message::new(MessageKind::Snapshot, id, to, term);
                m.snapshot = Some(snap);
                m
            }
            Some(prev_term) => {
                let ents = self.log.entries_from(pr.next, max_entries, max_bytes);
                if ents.is_empty() && !send_empty {
                    return false;
                }
                match pr.state {
                    ProgressState::Replicate => {
                        if let Some(last) = ents.last() {
                            pr.next = last.index + 1;
                            pr.inflights.add(last.index);
                        }
                    }
                    ProgressState::Probe => pr.probe_sent = true,
                    ProgressState::Snapshot => unreachable!("paused"),
                }
                let mut m = Message::new(MessageKind::Append, id, to, term);
                m.index = prev;
                m.log_term = prev_term;
                m.entries = ents;
                m.commit = commit;
                m
            }
        };
        self.send(msg);
        true
    }

    pub(super) fn broadcast_heartbeat(&mut self) {
        self.round += 1;
        self.round_ticks.push_back((self.round, self.ticks));
        if self.round_ticks.len() > ROUND_HISTORY {
            self.round_ticks.pop_front();
        }
        let ctx = Bytes::copy_from_slice(&self.round.to_be_bytes());
        for p in self.peers() {
            let matched = self.prs.get(&p).map_or(0, |pr| pr.matched);
            let mut m = Message::new(MessageKind::Heartbeat, self.id, p, self.term);
            m.commit = matched.min(self.log.committed());
            m.context = ctx.clone();
            self.send(m);
        }
    }

    pub(super) fn handle_append_response(&mut self, m: Message) {
        let last = self.log.last_index();
        let hint = if m.reject && m.log_term > 0 {
            match self.log.last_index_with_term_at_most(m.index, m.log_term) {
                Some(i) if self.log.term(i) == Some(m.log_term) => i + 1,
                _ => m.reject_hint,
            }
        } else {
            m.reject_hint
        };
        let Some(pr) = self.prs.get_mut(&m.from) else {
            return;
        };
        pr.recent_active = true;
        if m.reject {
            if pr.maybe_decr_to(m.index, hint) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
                self.send_append(m.from, true);
            }
            return;
        }
        let was_paused = pr.is_paused();
        if !pr.maybe_update(m.index) {
            if pr.state == ProgressState::Replicate {
                pr.inflights.free_to(m.index);
            }
            return;
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Snapshot if pr.matched >= pr.pending_snapshot => {
                pr.become_probe();
                pr.become_replicate();
            }
            ProgressState::Snapshot => {}
            ProgressState::Replicate => pr.inflights.free_to(m.index),
        }
        let matched = pr.matched;
        if self.maybe_commit() {
            self.broadcast_append(true);
        } else if was_paused {
            self.send_append(m.from, true);
        }
        // Pipelining: keep the window full.
        while self.send_append(m.from, false) {}
        if self.lead_transferee == Some(m.from) && matched == last {
            self.send_timeout_now(m.from);
        }
    }

    pub(super) fn handle_heartbeat_response(&mut self, m: Message) {
        let last = self.log.last_index();
        let Some(pr) = self.prs.get_mut(&m.from) else {
            return;
        };
        pr.recent_active = true;
        pr.probe_sent = false;
        if let Ok(b) = <[u8; 8]>::try_from(&m.context[..]) {
            pr.acked_round = pr.acked_round.max(u64::from_be_bytes(b));
        }
        // Appends and snapshots may be lost without a word; a follower that keeps answering
        // heartbeats but not them is probed again from its match.
        match pr.state {
            ProgressState::Replicate if !pr.inflights.is_empty() => {
                pr.stalled += 1;
                if pr.stalled >= STALL_HEARTBEATS {
                    pr.become_probe();
                }
            }
            ProgressState::Snapshot => {
                pr.stalled += 1;
                if pr.stalled as u64 >= self.cfg.election_tick {
                    pr.become_probe();
                }
            }
            _ => {}
        }
        if pr.matched < last {
            self.send_append(m.from, true);
        }
        self.advance_reads();
    }

    pub(super) fn send_timeout_now(&mut self, to: NodeId) {
        self.timeout_now_sent = true;
        self.send(Message::new(
            MessageKind::TimeoutNow,
            self.id,
            to,
            self.term,
        ));
    }

    /// Commits the highest index a majority of voters durably hold, if it is of this term.
    pub(super) fn maybe_commit(&mut self) -> bool {
        let matched = self
            .conf
            .voters
            .iter()
            .map(|v| self.prs.get(v).map_or(0, |p| p.matched));
        let Some(candidate) = quorum_index(matched, self.quorum()) else {
            return false;
        };
        if candidate <= self.log.committed() || self.log.term(candidate) != Some(self.term) {
            return false;
        }
        let before = self.log.committed();
        self.log.commit_to(candidate);
        assert!(self.log.committed() >= before, "commit went backwards");
        if !self.reads_awaiting_commit.is_empty() {
            for (ctx, from) in std::mem::take(&mut self.reads_awaiting_commit) {
                self.leader_read(ctx, from);
            }
        }
        true
    }
}

/// The highest index at least `quorum` of `matched` reach (the `quorum`-th largest), without
/// allocating for clusters of up to eight voters: this runs on every acknowledgement.
fn quorum_index(matched: impl ExactSizeIterator<Item = u64>, quorum: usize) -> Option<u64> {
    let n = matched.len();
    if n == 0 || quorum == 0 || quorum > n {
        return None;
    }
    let mut small = [0u64; 8];
    let mut large = Vec::new();
    let all: &mut [u64] = if n <= small.len() {
        for (slot, m) in small.iter_mut().zip(matched) {
            *slot = m;
        }
        &mut small[..n]
    } else {
        large.extend(matched);
        &mut large
    };
    all.sort_unstable_by(|a, b| b.cmp(a));
    Some(all[quorum - 1])
}

#[cfg(test)]
mod quorum_tests {
    use super::quorum_index;

    #[test]
    fn the_quorum_index_is_the_quorum_th_largest_match() {
        assert_eq!(quorum_index([5u64].into_iter(), 1), Some(5));
        assert_eq!(quorum_index([3u64, 9, 7].into_iter(), 2), Some(7));
        assert_eq!(quorum_index([1u64, 2, 3, 4, 5].into_iter(), 3), Some(3));
        let many: Vec<u64> = (1..=11).collect();
        assert_eq!(quorum_index(many.into_iter(), 6), Some(6));
        assert_eq!(quorum_index(std::iter::empty(), 1), None);
        assert_eq!(quorum_index([4u64, 4].into_iter(), 3), None);
    }
}

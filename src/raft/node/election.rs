//! Roles and elections: timeouts, pre-vote and vote rounds, check-quorum, and routing of
//! messages by role.

use bytes::Bytes;

use super::*;
use crate::raft::message::{EntryKind, Message, MessageKind, NodeId};
use crate::raft::progress::Progress;

impl Raft {
    pub(super) fn randomize_timeout(&mut self) {
        let e = self.cfg.election_tick;
        self.randomized_timeout = e + self.rng.below(e);
    }

    pub(super) fn reset(&mut self, term: u64) {
        assert!(
            term >= self.term,
            "term went backwards: {} -> {}",
            self.term,
            term
        );
        if term != self.term {
            self.term = term;
            self.vote = None;
            self.leader_matched = 0;
            self.acked_sent = 0;
        }
        self.lead = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.randomize_timeout();
        self.votes.clear();
        self.lead_transferee = None;
        self.timeout_now_sent = false;
        self.read_queue.clear();
        self.reads_awaiting_commit.clear();
    }

    pub(super) fn become_follower(&mut self, term: u64, lead: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.lead = lead;
        self.prs.clear();
    }

    pub(super) fn become_pre_candidate(&mut self) {
        // No term or vote change: a pre-vote round leaves no trace if it fails.
        self.votes.clear();
        self.lead = None;
        self.role = Role::PreCandidate;
    }

    pub(super) fn become_candidate(&mut self) {
        self.reset(self.term + 1);
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    pub(super) fn become_leader(&mut self) {
        self.reset(self.term);
        self.role = Role::Leader;
        self.lead = Some(self.id);
        self.restart_guard = false;
        let next = self.log.last_index() + 1;
        self.prs.clear();
        for (id, learner) in self.conf.members() {
            self.prs
                .insert(id, Progress::new(next, self.cfg.max_inflight, learner));
        }
        let persisted = self.log.persisted();
        if let Some(pr) = self.prs.get_mut(&self.id) {
            pr.matched = persisted;
            pr.become_replicate();
            pr.next = next;
            pr.recent_active = true;
        }
        // Changes proposed by earlier leaders may still be in the log: wait for them to apply.
        self.pending_conf_index = self.log.last_index();
        // §5.4.2: entries of earlier terms commit only via an entry of the current term.
        self.append_and_broadcast(EntryKind::Normal, Bytes::new());
    }

    pub(super) fn promotable(&self) -> bool {
        self.conf.voters.contains(&self.id)
    }

    pub(super) fn in_lease(&self) -> bool {
        self.cfg.check_quorum
            && (self.lead.is_some() || self.restart_guard)
            && self.election_elapsed < self.cfg.election_tick
    }

    pub(super) fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_tick {
            self.restart_guard = false;
        }
        if self.promotable() && self.election_elapsed >= self.randomized_timeout {
            self.election_elapsed = 0;
            self.hup(false);
        }
    }

    pub(super) fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_tick {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_active() {
                self.become_follower(self.term, None);
                return;
            }
            // A transfer that did not finish within an election timeout is abandoned.
            self.lead_transferee = None;
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    pub(super) fn quorum_active(&mut self) -> bool {
        let id = self.id;
        let active = self
            .conf
            .voters
            .iter()
            .filter(|v| **v == id || self.prs.get(v).is_some_and(|p| p.recent_active))
            .count();
        for (pid, pr) in self.prs.iter_mut() {
            pr.recent_active = *pid == id;
        }
        active >= self.quorum()
    }

    pub(super) fn quorum(&self) -> usize {
        self.conf.voters.len() / 2 + 1
    }

    pub(super) fn hup(&mut self, transfer: bool) {
        if self.role == Role::Leader || !self.promotable() {
            return;
        }
        // Membership not yet applied may exclude us or change the quorum: apply it first.
        let pending_conf = (self.log.applied() + 1..=self.log.committed()).any(|i| {
            self.log
                .entry(i)
                .is_some_and(|e| e.kind == EntryKind::ConfChange)
        });
        if pending_conf {
            return;
        }
        if self.cfg.pre_vote && !transfer {
            self.become_pre_candidate();
            self.record_vote(self.id, true);
            if self.role == Role::PreCandidate {
                self.request_votes(MessageKind::RequestPreVote, self.term + 1, false);
            }
        } else {
            self.become_candidate();
            if self.durable >= (self.term, true) {
                self.record_vote(self.id, true);
            }
            if self.role == Role::Candidate {
                self.request_votes(MessageKind::RequestVote, self.term, transfer);
            }
        }
    }

    pub(super) fn request_votes(&mut self, kind: MessageKind, term: u64, transfer: bool) {
        let voters: Vec<NodeId> = self
            .conf
            .voters
            .iter()
            .copied()
            .filter(|&v| v != self.id)
            .collect();
        for v in voters {
            let mut m = Message::new(kind, self.id, v, term);
            m.index = self.log.last_index();
            m.log_term = self.log.last_term();
            if transfer {
                m.context = Bytes::from_static(TRANSFER_CTX);
            }
            self.send(m);
        }
    }

    pub(super) fn record_vote(&mut self, from: NodeId, granted: bool) {
        self.votes.entry(from).or_insert(granted);
        let (mut yes, mut no) = (0, 0);
        for v in &self.conf.voters {
            match self.votes.get(v) {
                Some(true) => yes += 1,
                Some(false) => no += 1,
                None => {}
            }
        }
        let q = self.quorum();
        if yes >= q {
            if self.role == Role::PreCandidate {
                self.become_candidate();
                if self.durable >= (self.term, true) {
                    self.record_vote(self.id, true);
                }
                if self.role == Role::Candidate {
                    self.request_votes(MessageKind::RequestVote, self.term, false);
                }
            } else if self.role == Role::Candidate {
                self.become_leader();
            }
        } else if self.conf.voters.len() - no < q {
            self.become_follower(self.term, None);
        }
    }

    pub(super) fn handle_vote_request(&mut self, m: Message) {
        let pre = m.kind == MessageKind::RequestPreVote;
        let can_vote = self.vote == Some(m.from)
            || (self.vote.is_none() && self.lead.is_none())
            || (pre && m.term > self.term);
        let kind = if pre {
            MessageKind::RequestPreVoteResponse
        } else {
            MessageKind::RequestVoteResponse
        };
        if can_vote && self.log.is_up_to_date(m.index, m.log_term) {
            // A pre-vote answers in the candidate's future term so it is not taken as stale.
            let r = Message::new(kind, self.id, m.from, m.term);
            if !pre {
                self.election_elapsed = 0;
                self.vote = Some(m.from);
            }
            self.send(r);
        } else {
            let mut r = Message::new(kind, self.id, m.from, self.term);
            r.reject = true;
            self.send(r);
        }
    }

    pub(super) fn step_candidate(&mut self, m: Message) {
        use MessageKind::*;
        match m.kind {
            Append | Heartbeat | Snapshot => {
                self.become_follower(m.term, Some(m.from));
                self.step_follower(m);
            }
            RequestPreVoteResponse if self.role == Role::PreCandidate => {
                self.record_vote(m.from, !m.reject)
            }
            RequestVoteResponse if self.role == Role::Candidate => {
                self.record_vote(m.from, !m.reject)
            }
            _ => {}
        }
    }

    pub(super) fn step_follower(&mut self, m: Message) {
        use MessageKind::*;
        match m.kind {
            Append | Heartbeat | Snapshot => {
                self.election_elapsed = 0;
                self.lead = Some(m.from);
                match m.kind {
                    Append => self.handle_append(m),
                    Heartbeat => self.handle_heartbeat(m),
                    _ => self.handle_snapshot(m),
                }
            }
            TimeoutNow => self.hup(true),
            _ => {}
        }
    }

    pub(super) fn step_leader(&mut self, m: Message) {
        use MessageKind::*;
        match m.kind {
            AppendResponse => self.handle_append_response(m),
            HeartbeatResponse => self.handle_heartbeat_response(m),
            ReadIndex if self.conf.contains(m.from) => self.leader_read(m.context, m.from),
            Append | Heartbeat | Snapshot => {
                debug_assert!(false, "two leaders in term {}", self.term);
            }
            _ => {}
        }
    }
}

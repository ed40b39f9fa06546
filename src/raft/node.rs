//! The Raft state machine: elections, replication, commit, reads, membership and transfer.
//! It performs no IO and reads no clock: time is `tick()`, input is `step()`/`propose()`,
//! output is `ready()`, and durability is whatever the caller acknowledges in `advance()`.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::config::{Config, Rng};
use super::error::{Error, Result};
use super::log::RaftLog;
use super::message::{
    ConfChange, ConfState, Entry, EntryKind, HardState, Message, MessageKind, NodeId, ReadState,
    Snapshot, SnapshotMeta,
};
use super::progress::{Progress, ProgressState};

/// Marks a vote request sent on the leader's behalf (TimeoutNow): voters skip their lease.
const TRANSFER_CTX: &[u8] = b"transfer";
/// Heartbeat answers without progress before a replicating follower is probed again.
const STALL_HEARTBEATS: u32 = 3;
/// Heartbeat rounds remembered for lease bookkeeping.
const ROUND_HISTORY: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// What a node restarts from: exactly what the caller made durable.
#[derive(Clone, Debug, Default)]
pub struct DurableState {
    pub hard_state: HardState,
    pub snapshot: Snapshot,
    pub entries: Vec<Entry>,
}

impl DurableState {
    /// The common starting point of the founding members of a group.
    pub fn bootstrap(voters: impl IntoIterator<Item = NodeId>) -> Self {
        DurableState {
            hard_state: HardState {
                term: 1,
                vote: None,
                commit: 1,
            },
            snapshot: Snapshot::bootstrap(voters),
            entries: Vec::new(),
        }
    }
}

/// Work for the caller. Persist `snapshot`, then `entries` (each write replaces the log from
/// its first index on), then `hard_state`, in that order; acknowledge them with
/// [`Raft::advance`] (e.g. `ready.persisted()`) once durable. `messages` may be sent right away:
/// anything that depends on unacknowledged state is held back until it is acknowledged.
/// Apply `snapshot` and then `committed_entries` to the state machine; serve `read_states` once
/// the applied index reaches theirs.
#[derive(Debug, Default)]
pub struct Ready {
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub messages: Vec<Message>,
    pub committed_entries: Vec<Entry>,
    pub read_states: Vec<ReadState>,
    /// Set when membership changed (by a committed change or a snapshot).
    pub conf_state: Option<ConfState>,
}

impl Ready {
    /// The acknowledgement for everything this `Ready` asked to persist.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            snapshot: self.snapshot.as_ref().map(|s| s.meta.index),
            entries: self.entries.last().map(|e| (e.term, e.index)),
            hard_state: self.hard_state,
        }
    }
}

/// What the caller made durable; writes are acknowledged in the order they were handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Persisted {
    pub snapshot: Option<u64>,
    /// `(term, index)` of the last durable entry.
    pub entries: Option<(u64, u64)>,
    pub hard_state: Option<HardState>,
}

/// (term, voted): what must be durable before a message may leave. Both parts only grow.
type DurableKey = (u64, bool);

#[derive(Debug)]
struct ReadRequest {
    ctx: Bytes,
    from: NodeId,
    index: u64,
    round: u64,
}

#[derive(Debug)]
pub struct Raft {
    cfg: Config,
    id: NodeId,
    term: u64,
    vote: Option<NodeId>,
    lead: Option<NodeId>,
    role: Role,
    log: RaftLog,
    conf: ConfState,
    /// Membership after each applied change since the snapshot: `compact` needs the
    /// membership as of its index.
    conf_history: Vec<(u64, ConfState)>,
    conf_changed: bool,
    prs: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    outbox: VecDeque<(Message, DurableKey)>,
    durable: DurableKey,
    last_hard_state: HardState,
    read_states: Vec<ReadState>,
    read_queue: VecDeque<ReadRequest>,
    /// Reads that arrived before the leader committed an entry of its term: until then its
    /// commit index may be behind the group's.
    reads_awaiting_commit: Vec<(Bytes, NodeId)>,
    round: u64,
    round_ticks: VecDeque<(u64, u64)>,
    ticks: u64,
    election_elapsed: u64,
    heartbeat_elapsed: u64,
    randomized_timeout: u64,
    /// With leases on: after a restart the node may have acknowledged a leader it forgot, so
    /// it refuses votes for one election timeout.
    restart_guard: bool,
    lead_transferee: Option<NodeId>,
    timeout_now_sent: bool,
    pending_conf_index: u64,
    /// Follower: highest index known to match the current leader's log (this term).
    leader_matched: u64,
    /// Follower: highest index acknowledged to the leader in this term.
    acked_sent: u64,
    rng: Rng,
}

impl Raft {
    pub fn new(cfg: Config, state: DurableState) -> Result<Self> {
        cfg.validate()?;
        let DurableState {
            hard_state,
            snapshot,
            entries,
        } = state;
        let conf = snapshot.meta.conf_state.clone();
        let cfg_lease = cfg.lease_ticks > 0;
        let log = RaftLog::restore_durable(snapshot, entries, hard_state.commit);
        let (mut term, mut vote) = (hard_state.term, hard_state.vote);
        if log.last_term() > term {
            // Entries were durable before the hard state naming their term: nothing was sent
            // on behalf of a vote that is not durable, so starting the term fresh is safe.
            term = log.last_term();
            vote = None;
        }
        let mut r = Raft {
            id: cfg.id,
            rng: Rng::new(cfg.seed),
            cfg,
            term,
            vote,
            lead: None,
            role: Role::Follower,
            log,
            conf,
            conf_history: Vec::new(),
            conf_changed: false,
            prs: BTreeMap::new(),
            votes: BTreeMap::new(),
            outbox: VecDeque::new(),
            durable: (hard_state.term, hard_state.vote.is_some()),
            last_hard_state: hard_state,
            read_states: Vec::new(),
            read_queue: VecDeque::new(),
            reads_awaiting_commit: Vec::new(),
            round: 0,
            round_ticks: VecDeque::new(),
            ticks: 0,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_timeout: 0,
            restart_guard: cfg_lease,
            lead_transferee: None,
            timeout_now_sent: false,
            pending_conf_index: 0,
            leader_matched: 0,
            acked_sent: 0,
        };
        r.randomize_timeout();
        Ok(r)
    }

    // ---- accessors -------------------------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.lead
    }
    pub fn commit(&self) -> u64 {
        self.log.committed()
    }
    pub fn applied(&self) -> u64 {
        self.log.applied()
    }
    pub fn persisted(&self) -> u64 {
        self.log.persisted()
    }
    pub fn first_index(&self) -> u64 {
        self.log.first_index()
    }
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }
    /// Term of the entry at `index` if this node still holds it (or it is the snapshot's).
    pub fn term_at(&self, index: u64) -> Option<u64> {
        self.log.term(index)
    }
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        self.log.entry(index)
    }
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        &self.log.snapshot().meta
    }
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }
    pub fn lead_transferee(&self) -> Option<NodeId> {
        self.lead_transferee
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed(),
        }
    }

    // ---- input -----------------------------------------------------------------------------

    /// One unit of logical time.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.tick_election();
        }
    }

    /// Start an election now (pre-vote first if configured).
    pub fn campaign(&mut self) {
        self.hup(false);
    }

    /// Appends `data` if this node leads; returns its index. Commit is not guaranteed: a
    /// leader change may discard it.
    pub fn propose(&mut self, data: Bytes) -> Result<u64> {
        self.check_can_propose()?;
        Ok(self.append_and_broadcast(EntryKind::Normal, data))
    }

    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<u64> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.log.applied() {
            return Err(Error::ConfChangePending);
        }
        let c = &self.conf;
        match cc {
            ConfChange::AddVoter(id) if c.voters.contains(&id) => {
                return Err(Error::InvalidConfChange("already a voter"))
            }
            ConfChange::AddLearner(id) if c.contains(id) => {
                return Err(Error::InvalidConfChange("already a member"))
            }
            ConfChange::PromoteLearner(id) if !c.learners.contains(&id) => {
                return Err(Error::InvalidConfChange("not a learner"))
            }
            ConfChange::Remove(id) if !c.contains(id) => {
                return Err(Error::InvalidConfChange("not a member"))
            }
            ConfChange::Remove(id) if c.voters.len() == 1 && c.voters.contains(&id) => {
                return Err(Error::InvalidConfChange("cannot remove the last voter"))
            }
            _ if cc.node() == 0 => return Err(Error::InvalidConfChange("node id 0")),
            _ => {}
        }
        let index = self.append_and_broadcast(EntryKind::ConfChange, cc.encode());
        self.pending_conf_index = index;
        Ok(index)
    }

    /// Requests a linearizable read identified by `ctx`; the answer is a [`ReadState`] in a
    /// later `Ready`. Followers forward to the leader. A lost read simply never answers.
    pub fn read_index(&mut self, ctx: Bytes) -> Result<()> {
        if self.role == Role::Leader {
            self.leader_read(ctx, self.id);
            return Ok(());
        }
        match self.lead {
            Some(l) => {
                let mut m = Message::new(MessageKind::ReadIndex, self.id, l, self.term);
                m.context = ctx;
                self.send(m);
                Ok(())
            }
            None => Err(Error::NoLeader),
        }
    }

    /// Hands leadership to `to`: bring it up to date, then tell it to campaign at once.
    /// Abandoned if it has not happened within an election timeout.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<()> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.lead });
        }
        if to == self.id || self.lead_transferee == Some(to) {
            return Ok(());
        }
        if !self.conf.voters.contains(&to) {
            return Err(Error::NotVoter(to));
        }
        self.lead_transferee = Some(to);
        self.election_elapsed = 0;
        if self
            .prs
            .get(&to)
            .is_some_and(|p| p.matched == self.log.last_index())
        {
            self.send_timeout_now(to);
        } else {
            self.send_append(to, true);
        }
        Ok(())
    }

    /// Replaces the log up to `index` (at most the applied index) with a snapshot whose
    /// application state is `data`. The caller persists that snapshot itself.
    pub fn compact(&mut self, index: u64, data: Bytes) -> Result<()> {
        let base = self.log.snapshot().meta.index;
        if index <= base {
            return Ok(());
        }
        let (first, applied) = (self.log.first_index(), self.log.applied());
        let term = match self.log.term(index) {
            Some(t) if index <= applied => t,
            _ => {
                return Err(Error::CompactOutOfRange {
                    index,
                    first,
                    applied,
                })
            }
        };
        let conf_state = self.conf_at(index);
        self.log.compact(Snapshot {
            meta: SnapshotMeta {
                index,
                term,
                conf_state,
            },
            data,
        });
        // Keep the last change at or below `index`: it is the snapshot's membership.
        self.conf_history.retain(|(i, _)| *i > index);
        Ok(())
    }

    pub fn step(&mut self, m: Message) {
        if m.to != self.id || m.from == self.id || m.from == 0 {
            return;
        }
        use MessageKind::*;
        if m.term > self.term {
            if matches!(m.kind, RequestVote | RequestPreVote)
                && m.context != TRANSFER_CTX
                && self.in_lease()
            {
                // §4.2.3 / check-quorum: a live leader exists, ignore the disruptive candidate.
                return;
            }
            match m.kind {
                RequestPreVote => {}
                RequestPreVoteResponse if !m.reject => {}
                Append | Heartbeat | Snapshot => self.become_follower(m.term, Some(m.from)),
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.kind {
                Append | Heartbeat if self.cfg.check_quorum || self.cfg.pre_vote => {
                    // Tell the stale leader about the newer term so it steps down.
                    self.send(Message::new(AppendResponse, self.id, m.from, self.term));
                }
                RequestPreVote => {
                    let mut r = Message::new(RequestPreVoteResponse, self.id, m.from, self.term);
                    r.reject = true;
                    self.send(r);
                }
                _ => {}
            }
            return;
        }
        match m.kind {
            RequestVote | RequestPreVote => self.handle_vote_request(m),
            ReadIndexResponse => {
                self.read_states.push(ReadState {
                    index: m.index,
                    ctx: m.context,
                });
            }
            _ => match self.role {
                Role::Leader => self.step_leader(m),
                Role::Candidate | Role::PreCandidate => self.step_candidate(m),
                Role::Follower => self.step_follower(m),
            },
        }
    }

    // ---- output ----------------------------------------------------------------------------

    pub fn has_ready(&self) -> bool {
        self.log.has_unstable()
            || self.log.has_next_committed()
            || self.hard_state() != self.last_hard_state
            || !self.read_states.is_empty()
            || self.conf_changed
            || self.outbox.front().is_some_and(|(_, k)| *k <= self.durable)
    }

    pub fn ready(&mut self) -> Ready {
        let (snapshot, entries) = self.log.take_unstable();
        let committed_entries = self.log.take_committed();
        for e in &committed_entries {
            if e.kind == EntryKind::ConfChange {
                // A malformed change cannot be applied anywhere, so skipping it is uniform.
                if let Ok(cc) = ConfChange::decode(&e.data) {
                    self.apply_conf_change(e.index, cc);
                }
            }
        }
        let hs = self.hard_state();
        let hard_state = (hs != self.last_hard_state).then(|| {
            debug_assert!(hs.term >= self.last_hard_state.term, "term went backwards");
            debug_assert!(
                hs.commit >= self.last_hard_state.commit,
                "commit went backwards"
            );
            self.last_hard_state = hs;
            hs
        });
        let mut messages = Vec::new();
        while self.outbox.front().is_some_and(|(_, k)| *k <= self.durable) {
            if let Some((m, _)) = self.outbox.pop_front() {
                messages.push(m);
            }
        }
        let conf_state = std::mem::take(&mut self.conf_changed).then(|| self.conf.clone());
        Ready {
            snapshot,
            entries,
            hard_state,
            messages,
            committed_entries,
            read_states: std::mem::take(&mut self.read_states),
            conf_state,
        }
    }

    /// Records what the caller made durable. Only now do those entries count towards commit
    /// (leader) or get acknowledged (follower), and only now do votes count.
    pub fn advance(&mut self, p: Persisted) {
        if let Some(i) = p.snapshot {
            self.log.ack_snapshot(i);
        }
        if let Some((t, i)) = p.entries {
            self.log.ack_entries(t, i);
        }
        if let Some(hs) = p.hard_state {
            let key = (hs.term, hs.vote.is_some());
            if key > self.durable {
                self.durable = key;
            }
            if self.role == Role::Candidate
                && self.durable >= (self.term, true)
                && !self.votes.contains_key(&self.id)
            {
                self.record_vote(self.id, true);
            }
        }
        match self.role {
            Role::Leader => {
                let persisted = self.log.persisted();
                if let Some(pr) = self.prs.get_mut(&self.id) {
                    pr.maybe_update(persisted);
                }
                if self.maybe_commit() {
                    self.broadcast_append(true);
                }
            }
            Role::Follower => self.maybe_send_ack(),
            _ => {}
        }
    }

    // ---- roles -----------------------------------------------------------------------------

    fn randomize_timeout(&mut self) {
        let e = self.cfg.election_tick;
        self.randomized_timeout = e + self.rng.below(e);
    }

    fn reset(&mut self, term: u64) {
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

    fn become_follower(&mut self, term: u64, lead: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.lead = lead;
        self.prs.clear();
    }

    fn become_pre_candidate(&mut self) {
        // No term or vote change: a pre-vote round leaves no trace if it fails.
        self.votes.clear();
        self.lead = None;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        self.reset(self.term + 1);
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) {
        self.reset(self.term);
        self.role = Role::Leader;
        self.lead = Some(self.id);
        self.restart_guard = false;
        let next = self.log.last_index() + 1;
        self.prs.clear();
        for (&id, learner) in self
            .conf
            .voters
            .iter()
            .map(|id| (id, false))
            .chain(self.conf.learners.iter().map(|id| (id, true)))
        {
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

    fn promotable(&self) -> bool {
        self.conf.voters.contains(&self.id)
    }

    fn in_lease(&self) -> bool {
        self.cfg.check_quorum
            && (self.lead.is_some() || self.restart_guard)
            && self.election_elapsed < self.cfg.election_tick
    }

    fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_tick {
            self.restart_guard = false;
        }
        if self.promotable() && self.election_elapsed >= self.randomized_timeout {
            self.election_elapsed = 0;
            self.hup(false);
        }
    }

    fn tick_leader(&mut self) {
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

    fn quorum_active(&mut self) -> bool {
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

    fn quorum(&self) -> usize {
        self.conf.voters.len() / 2 + 1
    }

    fn hup(&mut self, transfer: bool) {
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

    fn request_votes(&mut self, kind: MessageKind, term: u64, transfer: bool) {
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

    fn record_vote(&mut self, from: NodeId, granted: bool) {
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

    fn handle_vote_request(&mut self, m: Message) {
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

    fn step_candidate(&mut self, m: Message) {
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

    fn step_follower(&mut self, m: Message) {
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

    fn step_leader(&mut self, m: Message) {
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

    // ---- follower side of replication -------------------------------------------------------

    fn ack(&mut self, index: u64) {
        if let Some(l) = self.lead {
            let mut r = Message::new(MessageKind::AppendResponse, self.id, l, self.term);
            r.index = index;
            self.acked_sent = self.acked_sent.max(index);
            self.send(r);
        }
    }

    /// Acknowledge newly durable entries that match the leader.
    fn maybe_send_ack(&mut self) {
        let a = self.log.persisted().min(self.leader_matched);
        if self.lead.is_some() && a > self.acked_sent {
            self.ack(a);
        }
    }

    fn handle_append(&mut self, m: Message) {
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

    fn handle_heartbeat(&mut self, m: Message) {
        // The leader caps `commit` at what it knows we durably match.
        self.log.commit_to(m.commit);
        let mut r = Message::new(MessageKind::HeartbeatResponse, self.id, m.from, self.term);
        r.context = m.context;
        self.send(r);
    }

    fn handle_snapshot(&mut self, m: Message) {
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

    // ---- leader side of replication ---------------------------------------------------------

    fn check_can_propose(&self) -> Result<()> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.lead });
        }
        if let Some(t) = self.lead_transferee {
            return Err(Error::TransferInProgress(t));
        }
        Ok(())
    }

    fn append_and_broadcast(&mut self, kind: EntryKind, data: Bytes) -> u64 {
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

    fn peers(&self) -> Vec<NodeId> {
        self.prs.keys().copied().filter(|&p| p != self.id).collect()
    }

    fn broadcast_append(&mut self, send_empty: bool) {
        for p in self.peers() {
            self.send_append(p, send_empty);
        }
    }

    /// Sends the next batch (or a snapshot) to `to` if flow control allows.
    fn send_append(&mut self, to: NodeId, send_empty: bool) -> bool {
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

    fn broadcast_heartbeat(&mut self) {
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

    fn handle_append_response(&mut self, m: Message) {
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

    fn handle_heartbeat_response(&mut self, m: Message) {
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

    fn send_timeout_now(&mut self, to: NodeId) {
        self.timeout_now_sent = true;
        self.send(Message::new(
            MessageKind::TimeoutNow,
            self.id,
            to,
            self.term,
        ));
    }

    /// Commits the highest index a majority of voters durably hold, if it is of this term.
    fn maybe_commit(&mut self) -> bool {
        let mut matched: Vec<u64> = self
            .conf
            .voters
            .iter()
            .map(|v| self.prs.get(v).map_or(0, |p| p.matched))
            .collect();
        if matched.is_empty() {
            return false;
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = matched[self.quorum() - 1];
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

    // ---- reads -----------------------------------------------------------------------------

    fn leader_read(&mut self, ctx: Bytes, from: NodeId) {
        let committed = self.log.committed();
        if self.log.term(committed) != Some(self.term) {
            self.reads_awaiting_commit.push((ctx, from));
            return;
        }
        let solo = self.conf.voters.len() == 1 && self.conf.voters.contains(&self.id);
        if solo || self.lease_valid() {
            self.answer_read(ctx, from, committed);
            return;
        }
        // ReadIndex (§6.4): the commit index is current once a majority confirms, after the
        // read arrived, that we still lead.
        self.read_queue.push_back(ReadRequest {
            ctx,
            from,
            index: committed,
            round: self.round + 1,
        });
        self.broadcast_heartbeat();
    }

    fn answer_read(&mut self, ctx: Bytes, from: NodeId, index: u64) {
        if from == self.id {
            self.read_states.push(ReadState { index, ctx });
        } else {
            let mut m = Message::new(MessageKind::ReadIndexResponse, self.id, from, self.term);
            m.index = index;
            m.context = ctx;
            self.send(m);
        }
    }

    fn advance_reads(&mut self) {
        let q = self.quorum();
        while let Some(r) = self.read_queue.front() {
            let acks = self
                .conf
                .voters
                .iter()
                .filter(|v| {
                    **v == self.id || self.prs.get(v).is_some_and(|p| p.acked_round >= r.round)
                })
                .count();
            if acks < q {
                break;
            }
            if let Some(r) = self.read_queue.pop_front() {
                self.answer_read(r.ctx, r.from, r.index);
            }
        }
    }

    /// A majority acknowledged a heartbeat sent within the last `lease_ticks`; none of them
    /// will vote for another candidate until an election timeout after receiving it.
    fn lease_valid(&self) -> bool {
        if self.cfg.lease_ticks == 0 || self.timeout_now_sent || self.lead_transferee.is_some() {
            return false;
        }
        let sent_tick = |round: u64| {
            self.round_ticks
                .iter()
                .find(|(r, _)| *r == round)
                .map(|(_, t)| *t)
        };
        let mut ticks: Vec<u64> = self
            .conf
            .voters
            .iter()
            .map(|v| {
                if *v == self.id {
                    self.ticks
                } else {
                    self.prs
                        .get(v)
                        .and_then(|p| sent_tick(p.acked_round))
                        .unwrap_or(0)
                }
            })
            .collect();
        ticks.sort_unstable_by(|a, b| b.cmp(a));
        let confirmed = ticks.get(self.quorum() - 1).copied().unwrap_or(0);
        confirmed > 0 && confirmed + self.cfg.lease_ticks > self.ticks
    }

    // ---- membership ------------------------------------------------------------------------

    fn conf_at(&self, index: u64) -> ConfState {
        self.conf_history
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or_else(
                || self.log.snapshot().meta.conf_state.clone(),
                |(_, c)| c.clone(),
            )
    }

    fn apply_conf_change(&mut self, index: u64, cc: ConfChange) {
        self.conf.apply(&cc);
        self.conf_history.push((index, self.conf.clone()));
        self.conf_changed = true;
        if self.role != Role::Leader {
            return;
        }
        let next = self.log.last_index() + 1;
        let inflight = self.cfg.max_inflight;
        self.prs.retain(|id, _| self.conf.contains(*id));
        for (&id, learner) in self
            .conf
            .voters
            .iter()
            .map(|id| (id, false))
            .chain(self.conf.learners.iter().map(|id| (id, true)))
        {
            self.prs
                .entry(id)
                .or_insert_with(|| Progress::new(next, inflight, learner))
                .is_learner = learner;
        }
        if !self.conf.voters.contains(&self.id) {
            // Removed: stop leading; the remaining voters elect among themselves.
            self.become_follower(self.term, None);
            return;
        }
        if self
            .lead_transferee
            .is_some_and(|t| !self.conf.voters.contains(&t))
        {
            self.lead_transferee = None;
        }
        if self.maybe_commit() {
            self.broadcast_append(true);
        }
        self.advance_reads();
    }

    fn send(&mut self, m: Message) {
        let key = (self.term, self.vote.is_some());
        self.outbox.push_back((m, key));
    }
}

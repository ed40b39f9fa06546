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
use super::progress::Progress;

mod election;
mod membership;
mod read;
mod replication;

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
    /// Whether a membership change is proposed and not yet applied (a new one is refused).
    pub fn conf_change_pending(&self) -> bool {
        self.pending_conf_index > self.log.applied()
    }

    /// On a leader: the highest index `id` is known to hold, and whether it answered since
    /// the last check-quorum round.
    pub fn progress_of(&self, id: NodeId) -> Option<(u64, bool)> {
        self.prs.get(&id).map(|p| (p.matched, p.recent_active))
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
        self.propose_conf_change_with(cc, &[])
    }

    /// [`Self::propose_conf_change`] with an application context carried in the entry.
    pub fn propose_conf_change_with(&mut self, cc: ConfChange, context: &[u8]) -> Result<u64> {
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
            ConfChange::Remove(id) | ConfChange::Update(id) if !c.contains(id) => {
                return Err(Error::InvalidConfChange("not a member"))
            }
            ConfChange::Remove(id) if c.voters.len() == 1 && c.voters.contains(&id) => {
                return Err(Error::InvalidConfChange("cannot remove the last voter"))
            }
            _ if cc.node() == 0 => return Err(Error::InvalidConfChange("node id 0")),
            _ => {}
        }
        let index = self.append_and_broadcast(EntryKind::ConfChange, cc.encode_with(context));
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
                RequestVote => {
                    // Learning a newer term from a candidate is no reason to wait longer
                    // (only granting a vote is): otherwise a candidate with a stale log and a
                    // faster clock keeps resetting the timer of the node that could win.
                    let elapsed = self.election_elapsed;
                    self.become_follower(m.term, None);
                    self.election_elapsed = elapsed;
                }
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

    fn send(&mut self, m: Message) {
        let key = (self.term, self.vote.is_some());
        self.outbox.push_back((m, key));
    }
}

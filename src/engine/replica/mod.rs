//! The glue between one shard's Raft group and its WAL: the thin IO shell around the pure
//! state machine in `raft`.
//!
//! Every record a shard logs is a Raft proposal. The shard encodes the record once (with the
//! term and index Raft will give it), proposes the encoded bytes, and the same `Bytes` become
//! the Raft log entry and the WAL frame's payload. The WAL's group commit is Raft's
//! persistence: once a durable WAL flush covers an index, `sync` acknowledges it with
//! `advance(Persisted)`, which in a one-member group commits it on the spot, so a write costs
//! what it cost before Raft: one shared durable write. The hard state (term, vote) is a WAL record
//! of its own that takes no log index. Checkpoints are the group's snapshots: writing one
//! compacts the in-memory log up to its index, and the WAL segments below it are dropped.
//!
//! A single node runs a one-member group per shard: at open each shard campaigns, logs its
//! vote, wins, and commits a no-op of its new term before it serves. The leader executes a
//! write before proposing it (the record carries effects, not requests).
//!
//! A group with peers ([`Group`]) elects by ticks ([`Replica::tick`]), receives messages with
//! [`Replica::step`] and leaves Raft's in an outbox the owner drains ([`Replica::take_messages`]).
//! Followers log what
//! the leader sends (a new leader's entries may rewind the log's uncommitted tail) and hand
//! committed records out ([`Replica::take_committed`]) to be applied the way WAL replay applies
//! them. Apply is tracked by index: the store reflects entries up to [`Replica::applied`]; a
//! leader's own proposals count as applied when proposed (it executed them first), so a leader
//! may only execute once it has applied its whole log, including the no-op that committed it
//! ([`Replica::can_execute`]). A leader deposed with executed entries beyond the commit index
//! marks itself stale: its store holds writes that may never commit and must be rebuilt from
//! disk before it serves again.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use event_listener::Event;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::raft::{
    self, ConfState, Config, DurableState, Entry, EntryKind as RaftKind, HardState, Message,
    Persisted, Raft, Role, Snapshot, SnapshotMeta,
};
use crate::wal::{record, EntryKind, LoggedEntry, NoRoom, Recovered, Wal, WalEntry};

/// This node's id in every shard group until clusters assign real member ids.
pub const LOCAL_ID: raft::NodeId = 1;

/// Room kept for the small records (no-op, hard state) a group logs on its own.
pub const RECORD_SLACK: usize = 256;

/// Which of a node's shards may execute writes right now. A node hands out revisions only
/// while it may execute on every shard (it leads them all and has applied their logs), so two
/// nodes never hand out revisions at once except across a leadership change.
#[derive(Debug)]
pub struct NodeGate {
    ready: Vec<std::sync::atomic::AtomicBool>,
}

impl NodeGate {
    pub fn new(shards: u32) -> std::sync::Arc<NodeGate> {
        std::sync::Arc::new(NodeGate {
            ready: (0..shards)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        })
    }

    fn set(&self, shard: u32, ready: bool) {
        if let Some(r) = self.ready.get(shard as usize) {
            r.store(ready, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether every shard of this node may execute.
    pub fn all(&self) -> bool {
        self.ready
            .iter()
            .all(|r| r.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Who is in a shard's group and how fast it ticks.
#[derive(Clone, Debug)]
pub struct Group {
    /// This member's id (a cluster member id, or [`LOCAL_ID`] on a single node).
    pub id: raft::NodeId,
    /// Members as of the snapshot the group starts from.
    pub conf: ConfState,
    /// Ticks without a leader before a follower campaigns (election timeout / tick interval).
    pub election_tick: u64,
    pub heartbeat_tick: u64,
    /// The node-wide gate (groups with peers).
    pub gate: Option<std::sync::Arc<NodeGate>>,
}

impl Group {
    /// The one-member group of a single node.
    pub fn single() -> Group {
        Group {
            id: LOCAL_ID,
            conf: ConfState::new([LOCAL_ID]),
            election_tick: 10,
            heartbeat_tick: 1,
            gate: None,
        }
    }

    /// A cluster member's group runs the peer machinery (ticks, messages, apply) even when
    /// membership changes leave it alone in the group.
    fn has_peers(&self) -> bool {
        self.gate.is_some() || self.conf.members().any(|(id, _)| id != self.id)
    }
}

/// Why a proposal was not logged.
pub enum ProposeError {
    /// No segment has room for the frame: make room and retry (nothing was proposed).
    NoRoom(NoRoom),
    Other(Error),
}

impl From<Error> for ProposeError {
    fn from(e: Error) -> Self {
        ProposeError::Other(e)
    }
}

/// Raft output that waits for room in the log, from entry `from` on.
struct Stalled {
    ready: raft::Ready,
    from: usize,
    need: usize,
}

pub struct Replica {
    shard: u32,
    /// `None` only in the benchmark baseline that bypasses consensus (`Options::bypass_raft`).
    raft: Option<RefCell<Raft>>,
    /// Hard state records appended and not yet durable: (WAL sequence, state).
    pending_hard_state: RefCell<VecDeque<(u64, HardState)>>,
    /// (term, vote) of the newest hard state record appended.
    logged_hard_state: Cell<(u64, Option<raft::NodeId>)>,
    /// WAL sequence of the newest record this replica appended.
    last_seq: Cell<u64>,
    /// Set when a record Raft handed out could not be logged: the shard must stop.
    failed: RefCell<Option<String>>,
    /// Whether the group has members other than this one (then messages flow and followers apply).
    peers: bool,
    /// Raft messages to send, drained by the owner ([`Self::take_messages`]).
    outbox: RefCell<Vec<Message>>,
    outbox_ev: Event,
    /// Highest index whose effects the shard's store holds.
    applied: Cell<u64>,
    /// Committed entries the store does not hold yet, in log order (groups with peers).
    committed: RefCell<VecDeque<Entry>>,
    /// Commit advanced, leadership changed, or the replica failed.
    commit_ev: Event,
    /// Something was appended to the WAL (the sync task waits for it to become durable).
    appended_ev: Event,
    /// Committed entries are waiting in `committed`.
    apply_ev: Event,
    /// Deposed with executed entries past the commit index: the store must be rebuilt.
    stale: Cell<bool>,
    /// While leading: the term, and the highest commit index seen (everything up to it stays).
    led: Cell<Option<(u64, u64)>>,
    gate: Option<std::sync::Arc<NodeGate>>,
    /// Linearizable reads waiting for Raft to confirm leadership: id → confirmed index, once
    /// known.
    reads: RefCell<std::collections::HashMap<u64, Option<u64>>>,
    next_read: Cell<u64>,
    read_ev: Event,
    /// A leader's snapshot Raft accepted and the shard has not installed yet. Raft's output
    /// waits meanwhile: entries after the snapshot may only reach the WAL once it is installed.
    installing: RefCell<Option<Snapshot>>,
    /// Output Raft handed out that did not fit the log yet (see [`Stalled`]).
    stalled: RefCell<Option<Stalled>>,
    /// Ticks since [`Replica::ask_for_leadership`] last campaigned.
    ticks_since_ask: Cell<u64>,
    /// Role and term last noted (role changes are logged).
    last_role: Cell<(Role, u64)>,
    /// Records of a group without peers that Raft holds only as [`UNLOGGED`], until `pump`
    /// hands them to the WAL: (index, record), in index order.
    unlogged: RefCell<VecDeque<(u64, Bytes)>>,
}

/// What the Raft log of a group without peers holds for a write's record: no follower ever
/// reads its entries and recovery reads the WAL, so the record is not kept in memory twice
/// (the store serves the write's values from the log segment once it is durable). Never
/// logged: `pump` logs the record it stands for.
const UNLOGGED: &[u8] = b"\0unlogged write";

impl Replica {
    /// Rebuilds the group's durable state: the checkpoint is the snapshot, the WAL tail the log,
    /// and the newest hard state record the term and vote.
    pub fn recover(
        shard: u32,
        snapshot: (u64, u64),
        recovered: &Recovered,
        bypass: bool,
    ) -> Result<Replica> {
        Self::recover_group(shard, snapshot, recovered, bypass, Group::single())
    }

    /// [`Self::recover`] for a member of `group`. Everything up to the snapshot and, on a
    /// single node, the whole recovered log count as applied (recovery replayed them); a member
    /// with peers replays only what its group commits.
    pub fn recover_group(
        shard: u32,
        snapshot: (u64, u64),
        recovered: &Recovered,
        bypass: bool,
        group: Group,
    ) -> Result<Replica> {
        let (index, term) = snapshot;
        let hard_state = recovered
            .hard_state
            .as_ref()
            .map(|h| HardState {
                term: h.term,
                vote: (h.vote != 0).then_some(h.vote),
                commit: h.commit,
            })
            .unwrap_or_default();
        let entries = recovered.entries.iter().map(raft_entry).collect();
        let state = DurableState {
            hard_state,
            snapshot: Snapshot {
                meta: SnapshotMeta {
                    index,
                    term,
                    conf_state: group.conf.clone(),
                },
                data: Bytes::new(),
            },
            entries,
        };
        let mut cfg = Config::new(group.id);
        cfg.seed = group.id ^ (u64::from(shard) << 32);
        cfg.election_tick = group.election_tick;
        cfg.heartbeat_tick = group.heartbeat_tick;
        let peers = group.has_peers();
        let raft = Raft::new(cfg, state).map_err(|e| raft_error(shard, e))?;
        let applied = if peers {
            index
        } else {
            recovered.last_index.max(index)
        };
        Ok(Replica {
            shard,
            logged_hard_state: Cell::new((raft.term(), raft.vote())),
            raft: (!bypass).then(|| RefCell::new(raft)),
            pending_hard_state: RefCell::new(VecDeque::new()),
            last_seq: Cell::new(0),
            failed: RefCell::new(None),
            peers,
            outbox: RefCell::new(Vec::new()),
            outbox_ev: Event::new(),
            applied: Cell::new(applied),
            committed: RefCell::new(VecDeque::new()),
            commit_ev: Event::new(),
            appended_ev: Event::new(),
            apply_ev: Event::new(),
            stale: Cell::new(false),
            led: Cell::new(None),
            gate: group.gate,
            reads: RefCell::default(),
            next_read: Cell::new(0),
            read_ev: Event::new(),
            installing: RefCell::new(None),
            stalled: RefCell::new(None),
            ticks_since_ask: Cell::new(u64::MAX / 2),
            last_role: Cell::new((Role::Follower, 0)),
            unlogged: RefCell::new(VecDeque::new()),
        })
    }

    /// Whether the group has other members.
    pub fn has_peers(&self) -> bool {
        self.peers
    }

    /// Raft messages produced since the last call, for the transport.
    pub fn take_messages(&self) -> Vec<Message> {
        std::mem::take(&mut *self.outbox.borrow_mut())
    }

    /// Waits until there are messages to send (or the replica failed).
    pub async fn wait_messages(&self) {
        self.wait_for(&self.outbox_ev, || !self.outbox.borrow().is_empty())
            .await
    }

    /// Waits on `ev` until `ready()` holds or the replica failed.
    async fn wait_for(&self, ev: &Event, ready: impl Fn() -> bool) {
        loop {
            let l = ev.listen();
            if ready() || self.failed.borrow().is_some() {
                return;
            }
            l.await;
        }
    }

    pub fn role(&self) -> Role {
        match &self.raft {
            Some(r) => r.borrow().role(),
            None => Role::Leader,
        }
    }

    /// The member this replica believes leads its group.
    pub fn leader(&self) -> Option<raft::NodeId> {
        match &self.raft {
            Some(r) => r.borrow().leader(),
            None => Some(LOCAL_ID),
        }
    }

    /// Index of the last entry in this member's log (durable or not).
    pub fn last_index(&self) -> u64 {
        self.raft.as_ref().map_or(0, |r| r.borrow().last_index())
    }

    pub fn applied(&self) -> u64 {
        self.applied.get()
    }

    /// Deposed with executed but uncommitted entries: the store must be rebuilt from disk.
    pub fn is_stale(&self) -> bool {
        self.stale.get()
    }

    /// Whether this replica may execute writes now: it leads, its term's no-op is committed, and
    /// its store holds every entry of its log.
    pub fn can_execute(&self) -> bool {
        self.can_execute_here() && self.gate.as_ref().is_none_or(|g| g.all())
    }

    /// [`Self::can_execute`] for this group alone.
    fn can_execute_here(&self) -> bool {
        let Some(raft) = &self.raft else {
            return true;
        };
        let r = raft.borrow();
        r.role() == Role::Leader
            && r.term_at(r.commit()) == Some(r.term())
            && self.applied.get() >= r.last_index()
            && !self.stale.get()
            && r.lead_transferee().is_none()
    }

    fn update_gate(&self) {
        if let Some(g) = &self.gate {
            g.set(self.shard, self.can_execute_here());
        }
    }

    /// Starts applying over from `index` (the store was reloaded from a checkpoint there): the
    /// committed entries after it are handed out again, and the replica is no longer stale.
    /// Returns the index the store holds everything up to again once they are applied.
    pub fn reset_applied(&self, index: u64) -> Result<u64> {
        let Some(raft) = &self.raft else {
            return Ok(index);
        };
        let r = raft.borrow();
        if index + 1 < r.first_index() {
            return Err(Error::ShardFailed {
                shard: self.shard,
                reason: format!(
                    "cannot rebuild from index {index}: the log starts at {}",
                    r.first_index()
                ),
            });
        }
        let mut q = self.committed.borrow_mut();
        q.clear();
        // What Raft handed out for apply so far; entries committed later arrive through `pump`.
        let target = r.applied();
        q.extend((index + 1..=target).filter_map(|i| r.entry(i).cloned()));
        drop(r);
        self.applied.set(index);
        self.stale.set(false);
        self.update_gate();
        if !q.is_empty() {
            self.apply_ev.notify(usize::MAX);
        }
        Ok(target)
    }

    /// Committed entries the store must apply, in order; call [`Self::mark_applied`] after.
    pub fn take_committed(&self) -> Vec<Entry> {
        self.committed.borrow_mut().drain(..).collect()
    }

    /// The store now holds every entry up to `index`.
    pub fn mark_applied(&self, index: u64) {
        debug_assert!(index >= self.applied.get(), "applied index went backwards");
        self.applied.set(self.applied.get().max(index));
        self.update_gate();
        self.commit_ev.notify(usize::MAX);
    }

    /// Waits until committed entries are waiting to be applied, or a snapshot to be installed
    /// (or the replica failed).
    pub async fn wait_committed_entries(&self) {
        self.wait_for(&self.apply_ev, || {
            !self.committed.borrow().is_empty() || self.installing.borrow().is_some()
        })
        .await
    }

    /// Position of a leader's snapshot waiting to be installed ([`Self::installed`]).
    pub fn pending_install(&self) -> Option<SnapshotMeta> {
        self.installing.borrow().as_ref().map(|s| s.meta.clone())
    }

    /// The shard installed the pending snapshot (its checkpoint is in place and the WAL
    /// continues after it): the store holds everything up to its index, Raft learns the
    /// snapshot is durable, and its held-back output flows again.
    pub fn installed(&self, wal: &Wal) {
        let Some(snap) = self.installing.borrow_mut().take() else {
            return;
        };
        let index = snap.meta.index;
        self.committed.borrow_mut().retain(|e| e.index > index);
        self.applied.set(self.applied.get().max(index));
        if let Some(raft) = &self.raft {
            raft.borrow_mut().advance(Persisted {
                snapshot: Some(index),
                ..Default::default()
            });
        }
        self.update_gate();
        self.commit_ev.notify(usize::MAX);
        self.pump(wal);
    }

    /// Advances Raft's clock by one tick (heartbeats, election timeouts).
    pub fn tick(&self, wal: &Wal) {
        if let Some(raft) = &self.raft {
            raft.borrow_mut().tick();
            self.ticks_since_ask.set(self.ticks_since_ask.get() + 1);
            self.pump(wal);
        }
    }

    /// Campaigns now (pre-vote first) unless this replica leads or asked within the last
    /// election timeout. The node that won shard 0 asks for the other shards at once rather than
    /// waiting out their election timeouts after a leader died; the pre-vote keeps it from
    /// disturbing a group whose leader is alive (that leader hands the group over instead).
    pub fn ask_for_leadership(&self, wal: &Wal, election_tick: u64) {
        let Some(raft) = &self.raft else { return };
        if self.ticks_since_ask.get() < election_tick || raft.borrow().role() != Role::Follower {
            return;
        }
        self.ticks_since_ask.set(0);
        raft.borrow_mut().campaign();
        self.pump(wal);
    }

    /// Hands Raft a message from a peer.
    pub fn step(&self, wal: &Wal, m: Message) {
        if let Some(raft) = &self.raft {
            raft.borrow_mut().step(m);
            self.pump(wal);
        }
    }

    /// Hands leadership to `to` (Raft's leader transfer).
    pub fn transfer_leader(&self, wal: &Wal, to: raft::NodeId) -> Result<()> {
        if let Some(raft) = &self.raft {
            raft.borrow_mut()
                .transfer_leader(to)
                .map_err(|e| raft_error(self.shard, e))?;
            self.pump(wal);
        }
        Ok(())
    }

    /// Runs for the life of a group with peers: acknowledges to Raft what the WAL made durable
    /// (so a follower answers appends and a leader counts itself towards commit) and sends what
    /// that produces. Ends when the replica fails.
    pub async fn run_sync(&self, wal: &Wal) {
        loop {
            if self.failed.borrow().is_some() || wal.failure().is_some() {
                self.commit_ev.notify(usize::MAX);
                return;
            }
            let listener = self.appended_ev.listen();
            let need = self.stalled.borrow().as_ref().map(|st| st.need);
            if let Some(need) = need {
                if let Err(e) = wal.make_room(need).await {
                    self.stop(format!("no room in the log for the leader's entries: {e}"));
                    continue;
                }
                self.pump(wal);
                continue;
            }
            let seq = self.last_seq.get();
            if seq > wal.durable_seq() {
                if wal.wait_synced(seq).await.is_err() {
                    continue;
                }
            } else if wal.durable_index() <= self.persisted_mark() {
                listener.await;
                continue;
            }
            self.sync(wal);
        }
    }

    fn persisted_mark(&self) -> u64 {
        self.raft.as_ref().map_or(0, |r| r.borrow().persisted())
    }

    /// Campaigns and waits until this node leads with a committed entry of its term, so that
    /// everything before it counts as committed. Runs before the shard serves.
    pub async fn start(&self, wal: &Wal) -> Result<()> {
        // The first segment is prepared before serving (with or without Raft), so the first
        // write does not wait for it.
        wal.make_room(4 * RECORD_SLACK).await?;
        let Some(raft) = &self.raft else {
            return Ok(());
        };
        if self.peers {
            // Elections run on ticks once the transport is up.
            return Ok(());
        }
        raft.borrow_mut().campaign();
        self.pump(wal);
        // A one-member group wins in a few rounds (vote durable, no-op durable); a group that
        // cannot (e.g. a log whose membership excludes this node) must not spin.
        for _ in 0..16 {
            self.ensure_healthy()?;
            {
                let r = raft.borrow();
                if r.role() == Role::Leader && r.term_at(r.commit()) == Some(r.term()) {
                    return Ok(());
                }
            }
            wal.wait_synced(self.last_seq.get()).await?;
            self.sync(wal);
        }
        let r = raft.borrow();
        Err(Error::ShardFailed {
            shard: self.shard,
            reason: format!(
                "could not become leader of its own group (term {}, role {:?}, commit {})",
                r.term(),
                r.role(),
                r.commit()
            ),
        })
    }

    pub fn ensure_healthy(&self) -> Result<()> {
        match &*self.failed.borrow() {
            Some(reason) => Err(Error::ShardFailed {
                shard: self.shard,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The current term (the term new entries get).
    pub fn term(&self) -> u64 {
        match &self.raft {
            Some(r) => r.borrow().term(),
            None => 1,
        }
    }

    /// Term of the entry at `index`, if the in-memory log (or its snapshot) still names it.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        match &self.raft {
            Some(r) => r.borrow().term_at(index),
            None => Some(1),
        }
    }

    /// The hard state to repeat after a checkpoint drops the segments holding the last one.
    pub fn hard_state(&self) -> Option<HardState> {
        self.raft.as_ref().map(|r| r.borrow().hard_state())
    }

    /// Proposes `entry` (its term and index are set here) and queues it in the WAL in the same
    /// synchronous step, so the log keeps the order in which the shard executed. Returns the
    /// index. Nothing is proposed when the WAL has no room for the frame.
    pub fn propose(
        &self,
        wal: &Wal,
        entry: &mut WalEntry,
    ) -> std::result::Result<u64, ProposeError> {
        self.propose_shared(wal, entry).map(|(index, _)| index)
    }

    /// [`Self::propose`], also returning the encoded record the Raft log holds (empty for a
    /// no-op, and without consensus): the shard's store shares its keys and values instead of
    /// keeping copies of its own until the next checkpoint.
    pub fn propose_shared(
        &self,
        wal: &Wal,
        entry: &mut WalEntry,
    ) -> std::result::Result<(u64, Bytes), ProposeError> {
        self.ensure_healthy()?;
        let Some(raft) = &self.raft else {
            entry.term = 1;
            let index = wal.try_append(entry).map_err(ProposeError::NoRoom)?;
            return Ok((index, Bytes::new()));
        };
        if self.peers && !self.can_execute() {
            return Err(ProposeError::Other(if self.leader().is_some() {
                Error::LeaderChanged
            } else {
                Error::NoLeader
            }));
        }
        {
            let r = raft.borrow();
            entry.term = r.term();
            entry.index = r.last_index() + 1;
        }
        let encoded = Bytes::from(record::encode_payload(entry));
        let len = record::frame_len(encoded.len());
        // A no-op is Raft's empty entry (as a new leader's is); `pump` logs it as a Noop record.
        let payload = if entry.kind == EntryKind::Noop {
            Bytes::new()
        } else {
            encoded
        };
        let unlogged = !self.peers && entry.kind == EntryKind::Write;
        if !wal.has_room(len + RECORD_SLACK) {
            return Err(ProposeError::NoRoom(NoRoom {
                frame_len: len + RECORD_SLACK,
            }));
        }
        let proposed = if unlogged {
            Bytes::from_static(UNLOGGED)
        } else {
            payload.clone()
        };
        let index = raft
            .borrow_mut()
            .propose(proposed)
            .map_err(|e| raft_error(self.shard, e))?;
        assert_eq!(index, entry.index, "shard {} proposal index", self.shard);
        if unlogged {
            self.unlogged
                .borrow_mut()
                .push_back((index, payload.clone()));
        }
        // The leader executed this record before proposing it.
        self.applied.set(index);
        self.pump(wal);
        self.ensure_healthy()?;
        Ok((index, payload))
    }

    /// Proposes a decision record (the outcome of a multi-shard write) as this group's leader,
    /// whatever the node's write gate says: the leader's own `Commit` after a write's parts, or
    /// the outcome of a write its predecessor left undecided while its store may still be held
    /// at the part (then the record reaches the store through the apply queue, after the part).
    pub fn propose_decision(&self, wal: &Wal, entry: &mut WalEntry) -> Result<u64> {
        self.ensure_healthy()?;
        let Some(raft) = &self.raft else {
            return Err(Error::NotLeader);
        };
        if !self.leads_settled() {
            return Err(Error::NotLeader);
        }
        {
            let r = raft.borrow();
            entry.term = r.term();
            entry.index = r.last_index() + 1;
        }
        let encoded = Bytes::from(record::encode_payload(entry));
        if !wal.has_room(record::frame_len(encoded.len()) + RECORD_SLACK) {
            return Err(Error::InvalidArgument(
                "no room in the log for a decision record".into(),
            ));
        }
        // A leader whose store holds its whole log counts the record as applied (it has no
        // effects), as its other proposals; one still applying gets it through the apply queue.
        let caught_up = self.applied.get() >= raft.borrow().last_index();
        let index = raft
            .borrow_mut()
            .propose(encoded)
            .map_err(|e| raft_error(self.shard, e))?;
        if caught_up {
            self.applied.set(index);
        }
        self.pump(wal);
        self.ensure_healthy()?;
        Ok(index)
    }

    /// Leads the group with its term's no-op committed: every earlier entry is committed.
    pub fn leads_settled(&self) -> bool {
        self.raft.as_ref().is_some_and(|raft| {
            let r = raft.borrow();
            r.role() == Role::Leader && r.term_at(r.commit()) == Some(r.term())
        })
    }

    /// Calls `f` on every entry of the in-memory log, oldest first.
    pub fn for_each_entry(&self, mut f: impl FnMut(&Entry)) {
        let Some(raft) = &self.raft else { return };
        let r = raft.borrow();
        for i in r.first_index()..=r.last_index() {
            if let Some(e) = r.entry(i) {
                f(e);
            }
        }
    }

    /// The store holds writes that may not commit (an abandoned multi-shard part): rebuild it
    /// from disk before this member executes again.
    pub fn mark_stale(&self) {
        if self.raft.is_some() {
            self.stale.set(true);
            self.update_gate();
        }
    }

    /// Proposes a membership change with the member's record as context. The entry is logged
    /// like any other; it takes effect in Raft, and in the store's membership, once applied.
    pub fn propose_conf_change(
        &self,
        wal: &Wal,
        cc: raft::ConfChange,
        context: &[u8],
    ) -> Result<u64> {
        self.ensure_healthy()?;
        let Some(raft) = &self.raft else {
            return Err(Error::InvalidArgument(
                "membership changes need a cluster".into(),
            ));
        };
        if !self.can_execute_here() {
            return Err(if self.leader().is_some() {
                Error::NotLeader
            } else {
                Error::NoLeader
            });
        }
        if !wal.has_room(record::frame_len(context.len() + 64) + RECORD_SLACK) {
            return Err(Error::Timeout);
        }
        let index = raft
            .borrow_mut()
            .propose_conf_change_with(cc, context)
            .map_err(|e| match e {
                // The previous change is still being applied; the client may retry.
                raft::Error::ConfChangePending => Error::Timeout,
                raft::Error::InvalidConfChange(why) => Error::InvalidArgument(why.to_string()),
                e => raft_error(self.shard, e),
            })?;
        self.pump(wal);
        self.ensure_healthy()?;
        Ok(index)
    }

    /// The group's voters and learners as Raft applies them.
    pub fn conf(&self) -> ConfState {
        match &self.raft {
            Some(r) => r.borrow().conf_state().clone(),
            None => ConfState::new([LOCAL_ID]),
        }
    }

    /// A membership change is proposed in this group and not yet applied.
    pub fn conf_change_pending(&self) -> bool {
        self.raft
            .as_ref()
            .is_some_and(|r| r.borrow().conf_change_pending())
    }

    /// On the leader: what member `id` holds of the log (match index) and whether it answered
    /// lately; plus the leader's own last index.
    pub fn progress_of(&self, id: raft::NodeId) -> Option<(u64, bool, u64)> {
        let r = self.raft.as_ref()?.borrow();
        let (matched, active) = r.progress_of(id)?;
        Some((matched, active, r.last_index()))
    }

    /// Raft's ReadIndex: confirms with a heartbeat round that this member still leads and
    /// returns the commit index a linearizable read must see. Waits at most `patience` (a
    /// read Raft drops, e.g. on a leader change, never answers).
    pub async fn read_index(&self, wal: &Wal, patience: std::time::Duration) -> Result<u64> {
        self.ensure_healthy()?;
        let Some(raft) = &self.raft else {
            return Ok(self.applied.get());
        };
        let id = self.next_read.get() + 1;
        self.next_read.set(id);
        raft.borrow_mut()
            .read_index(Bytes::copy_from_slice(&id.to_be_bytes()))
            .map_err(|_| Error::NoLeader)?;
        self.reads.borrow_mut().insert(id, None);
        self.pump(wal);
        let deadline = std::time::Instant::now() + patience;
        let result = loop {
            let l = self.read_ev.listen();
            if let Some(Some(index)) = self.reads.borrow().get(&id) {
                break Ok(*index);
            }
            if let Err(e) = self.ensure_healthy() {
                break Err(e);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break Err(Error::Timeout);
            }
            futures_lite::future::or(l, glommio::timer::sleep(left)).await;
        };
        self.reads.borrow_mut().remove(&id);
        result
    }

    /// Waits until the entry at `index`, proposed in `term`, is committed.
    pub async fn wait_committed(&self, wal: &Wal, index: u64, term: u64) -> Result<()> {
        wal.wait_durable(index).await?;
        let Some(raft) = &self.raft else {
            return Ok(());
        };
        if self.peers {
            self.sync(wal);
            loop {
                let listener = self.commit_ev.listen();
                self.ensure_healthy()?;
                {
                    let r = raft.borrow();
                    if r.commit() >= index {
                        return match r.term_at(index) {
                            Some(t) if t != term => Err(Error::LeaderChanged),
                            _ => Ok(()),
                        };
                    }
                    if r.term() != term || r.role() != Role::Leader {
                        return Err(Error::LeaderChanged);
                    }
                }
                listener.await;
            }
        }
        self.sync(wal);
        self.ensure_healthy()?;
        let r = raft.borrow();
        // A one-member group commits what is durable.
        if r.commit() < index {
            return Err(Error::ShardFailed {
                shard: self.shard,
                reason: format!("entry {index} is durable but not committed"),
            });
        }
        if r.term_at(index).is_some_and(|t| t != term) {
            return Err(Error::ShardFailed {
                shard: self.shard,
                reason: format!("entry {index} of term {term} was replaced (leader changed)"),
            });
        }
        Ok(())
    }

    /// Acknowledges to Raft whatever the WAL made durable since the last call, and handles
    /// what that produces (commit, and in groups with peers, messages).
    pub fn sync(&self, wal: &Wal) {
        let Some(raft) = &self.raft else {
            return;
        };
        let mut p = Persisted::default();
        let mut durable = wal.durable_index();
        if let Some(st) = self.stalled.borrow().as_ref() {
            // The WAL's durable index may still name an old tail the stalled entries replace.
            if let Some(first) = st.ready.entries.get(st.from) {
                durable = durable.min(first.index - 1);
            }
        }
        {
            // Raft's own persisted mark is what was acknowledged so far.
            let r = raft.borrow();
            if durable > r.persisted() {
                p.entries = r.term_at(durable).map(|t| (t, durable));
            }
        }
        let synced = wal.durable_seq();
        {
            let mut pending = self.pending_hard_state.borrow_mut();
            while pending.front().is_some_and(|(seq, _)| *seq <= synced) {
                p.hard_state = pending.pop_front().map(|(_, hs)| hs);
            }
        }
        if p != Persisted::default() {
            raft.borrow_mut().advance(p);
            self.pump(wal);
        }
    }

    /// Hands Raft's output on: new entries (proposals, a leader's no-op, a leader's entries on a
    /// follower) and changed hard state to the WAL, messages to the outbox, and committed
    /// entries this member did not execute itself to the apply queue (the leader executed its
    /// own before proposing; on a single node recovery replayed the rest).
    fn pump(&self, wal: &Wal) {
        self.pump_ready(wal);
        // Once per pump, whatever the output: also when it stalls or there is none (a leader
        // that steps down by check-quorum keeps its hard state; a deposing message may wait
        // for room in the log). Nothing runs between the output and this, so waiters woken by
        // the output see the role change too.
        self.note_role();
    }

    fn pump_ready(&self, wal: &Wal) {
        let Some(raft) = &self.raft else {
            return;
        };
        loop {
            if self.installing.borrow().is_some() {
                return;
            }
            let stalled = self.stalled.borrow_mut().take();
            let (mut rd, from) = match stalled {
                Some(st) if wal.has_room(st.need) => (st.ready, st.from),
                Some(st) => {
                    // Still no room: `run_sync` prepares a segment and pumps again.
                    *self.stalled.borrow_mut() = Some(st);
                    return;
                }
                None => {
                    let mut r = raft.borrow_mut();
                    if !r.has_ready() {
                        return;
                    }
                    (r.ready(), 0)
                }
            };
            // Taken, so a stalled remainder of this output never installs it a second time.
            if let Some(snap) = rd.snapshot.take() {
                // The shard installs the checkpoint the snapshot names (`Shard::install`); until
                // then nothing after it is logged. A restored log hands out no entries with it.
                debug_assert!(rd.entries.is_empty(), "entries in a snapshot's ready");
                tracing::info!(
                    shard = self.shard,
                    index = snap.meta.index,
                    term = snap.meta.term,
                    "installing the leader's snapshot"
                );
                *self.installing.borrow_mut() = Some(snap);
                self.apply_ev.notify(usize::MAX);
            }
            for (i, e) in rd.entries.iter().enumerate().skip(from) {
                let payload = match e.kind {
                    RaftKind::Normal if e.data.as_ref() == UNLOGGED => {
                        let mut q = self.unlogged.borrow_mut();
                        while q.front().is_some_and(|(at, _)| *at < e.index) {
                            q.pop_front();
                        }
                        match q.front() {
                            Some((at, record)) if *at == e.index => record.clone(),
                            _ => {
                                drop(q);
                                let reason = format!("lost the record of entry {}", e.index);
                                tracing::error!(shard = self.shard, %reason, "shard stops");
                                self.fail(reason);
                                return;
                            }
                        }
                    }
                    RaftKind::Normal if !e.data.is_empty() => e.data.clone(),
                    RaftKind::Normal => encode(WalEntry {
                        term: e.term,
                        index: e.index,
                        kind: EntryKind::Noop,
                        ..Default::default()
                    }),
                    RaftKind::ConfChange => encode(WalEntry {
                        term: e.term,
                        index: e.index,
                        kind: EntryKind::ConfChange,
                        data: e.data.clone(),
                        ..Default::default()
                    }),
                };
                match wal.append_frame(Some(e.index), &payload) {
                    Ok(seq) => {
                        if e.data.as_ref() == UNLOGGED {
                            self.unlogged.borrow_mut().pop_front();
                        }
                        self.last_seq.set(seq);
                        self.appended_ev.notify(usize::MAX);
                    }
                    Err(nr) => {
                        // A leader's burst (or a segment still being prepared) outran the log:
                        // the rest of this output waits, in order, for a prepared segment.
                        tracing::debug!(
                            shard = self.shard,
                            need = nr.frame_len,
                            "Raft output waits for room in the log"
                        );
                        self.stall(rd, i, nr.frame_len);
                        return;
                    }
                }
            }
            if let Some(hs) = rd.hard_state {
                // Commit alone is not logged: a restarted member learns it again.
                let (term, vote) = self.logged_hard_state.get();
                // Newer than what is logged (a checkpoint may have logged a newer one while this
                // output was stalled).
                if (hs.term, hs.vote) != (term, vote)
                    && (hs.term, hs.vote.is_some()) >= (term, vote.is_some())
                {
                    if !wal.has_room(RECORD_SLACK) {
                        let from = rd.entries.len();
                        self.stall(rd, from, RECORD_SLACK);
                        return;
                    }
                    if !self.log_hard_state(wal, hs) {
                        return;
                    }
                }
            }
            if !rd.read_states.is_empty() {
                let mut reads = self.reads.borrow_mut();
                for rs in &rd.read_states {
                    let id = <[u8; 8]>::try_from(rs.ctx.as_ref()).map(u64::from_be_bytes);
                    if let Some(slot) = id.ok().and_then(|id| reads.get_mut(&id)) {
                        *slot = Some(rs.index);
                    }
                }
                self.read_ev.notify(usize::MAX);
            }
            if !rd.messages.is_empty() {
                debug_assert!(self.peers, "a one-member group sends no messages");
                self.outbox.borrow_mut().extend(rd.messages);
                self.outbox_ev.notify(usize::MAX);
            }
            let mut notify = rd.hard_state.is_some();
            if self.peers && !rd.committed_entries.is_empty() {
                let applied = self.applied.get();
                let mut q = self.committed.borrow_mut();
                q.extend(
                    rd.committed_entries
                        .into_iter()
                        .filter(|e| e.index > applied),
                );
                if !q.is_empty() {
                    self.apply_ev.notify(usize::MAX);
                }
                notify = true;
            }
            if notify {
                self.commit_ev.notify(usize::MAX);
            }
        }
    }

    /// Holds the rest of `ready` (from entry `from` on) until the log has room for `need`
    /// bytes; `run_sync` prepares a segment and pumps again.
    fn stall(&self, ready: raft::Ready, from: usize, need: usize) {
        *self.stalled.borrow_mut() = Some(Stalled { ready, from, need });
        self.appended_ev.notify(usize::MAX);
    }

    /// Stops the replica and wakes everyone waiting on it.
    fn fail(&self, reason: String) {
        *self.failed.borrow_mut() = Some(reason);
        for ev in [
            &self.commit_ev,
            &self.apply_ev,
            &self.outbox_ev,
            &self.appended_ev,
        ] {
            ev.notify(usize::MAX);
        }
    }

    /// A leader that loses leadership with executed entries past its commit index goes stale.
    fn note_role(&self) {
        let Some(raft) = &self.raft else { return };
        let r = raft.borrow();
        let leading = r.role() == Role::Leader;
        if self.peers && (r.role(), r.term()) != self.last_role.get() {
            tracing::debug!(shard = self.shard, role = ?r.role(), term = r.term(), leader = ?r.leader(), "role changed");
            self.last_role.set((r.role(), r.term()));
        }
        if let (Some((term, commit)), false) = (self.led.get(), leading) {
            // What it executed past the commit it saw as leader survives only if still in its
            // log (the entry at `applied` still has its term: by log matching so has every
            // entry before it) and committed. The message that deposes it may also replace its
            // tail and commit the new leader's entries past `applied`, so the commit index
            // alone does not tell.
            let applied = self.applied.get();
            if applied > commit && (applied > r.commit() || r.term_at(applied) != Some(term)) {
                tracing::warn!(
                    shard = self.shard,
                    applied,
                    commit = r.commit(),
                    "deposed with uncommitted executed writes; the shard must be rebuilt"
                );
                self.stale.set(true);
            }
            self.commit_ev.notify(usize::MAX);
        }
        self.led.set(leading.then(|| (r.term(), r.commit())));
        drop(r);
        self.update_gate();
    }

    /// Logs the current hard state again (a checkpoint is about to drop the segments that hold
    /// the earlier records); the record's WAL sequence, or `None` without Raft.
    pub fn relog_hard_state(&self, wal: &Wal) -> Option<u64> {
        let hs = self.hard_state()?;
        self.log_hard_state(wal, hs).then(|| self.last_seq.get())
    }

    /// Stops the replica for good: the shard could not do what Raft counts on.
    pub fn stop(&self, reason: String) {
        tracing::error!(shard = self.shard, %reason, "shard stops");
        self.fail(reason);
    }

    /// Appends a hard state record; false if the shard had to stop.
    pub fn log_hard_state(&self, wal: &Wal, hs: HardState) -> bool {
        let payload = encode(WalEntry {
            term: hs.term,
            kind: EntryKind::HardState,
            vote: hs.vote.unwrap_or(0),
            commit: hs.commit,
            ..Default::default()
        });
        if !self.append(wal, None, &payload) {
            return false;
        }
        self.logged_hard_state.set((hs.term, hs.vote));
        self.pending_hard_state
            .borrow_mut()
            .push_back((self.last_seq.get(), hs));
        true
    }

    fn append(&self, wal: &Wal, index: Option<u64>, payload: &[u8]) -> bool {
        match wal.append_frame(index, payload) {
            Ok(seq) => {
                self.last_seq.set(seq);
                self.appended_ev.notify(usize::MAX);
                true
            }
            Err(nr) => {
                // Proposals reserve room for these small records, so this means the log could
                // not take a record Raft already counts on: stop rather than diverge.
                let reason = format!(
                    "the WAL had no room for a {}-byte Raft record",
                    nr.frame_len
                );
                tracing::error!(shard = self.shard, %reason, "shard stops");
                self.fail(reason);
                false
            }
        }
    }

    /// A checkpoint at `index` became the group's snapshot: drop the log up to it.
    pub fn compact(&self, index: u64) -> Result<()> {
        let Some(raft) = &self.raft else {
            return Ok(());
        };
        let mut r = raft.borrow_mut();
        if index <= r.first_index().saturating_sub(1) {
            return Ok(());
        }
        r.compact(index, Bytes::new())
            .map_err(|e| raft_error(self.shard, e))
    }
}

fn encode(entry: WalEntry) -> Bytes {
    Bytes::from(record::encode_payload(&entry))
}

/// The Raft entry a recovered WAL record stands for.
fn raft_entry(l: &LoggedEntry) -> Entry {
    let e = &l.entry;
    let (kind, data) = match e.kind {
        EntryKind::Noop => (RaftKind::Normal, Bytes::new()),
        EntryKind::ConfChange => (RaftKind::ConfChange, e.data.clone()),
        _ => (RaftKind::Normal, l.payload.clone()),
    };
    Entry {
        term: e.term,
        index: e.index,
        kind,
        data,
    }
}

fn raft_error(shard: u32, e: raft::Error) -> Error {
    Error::ShardFailed {
        shard,
        reason: format!("raft: {e}"),
    }
}

#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::rc::Rc;

    use super::*;
    use crate::mvcc::Effect;
    use crate::runtime::run_local;
    use crate::wal::{recover, WalOptions};

    pub(super) fn write(rev: i64) -> WalEntry {
        WalEntry {
            kind: EntryKind::Write,
            revision: rev,
            ops: vec![Effect::Put {
                key: Bytes::from(format!("k{rev}")),
                value: Bytes::from_static(b"v"),
                lease: 0,
            }],
            ..Default::default()
        }
    }

    /// Opens the log in `dir`, starts the group, proposes `n` writes concurrently and returns
    /// (term, first index still in the in-memory log after compacting to the last write).
    fn session(dir: &Path, n: i64) -> (u64, u64) {
        let dir = dir.to_path_buf();
        run_local(move || async move {
            let rec = recover(&dir, 0, 0).unwrap();
            let wal = Wal::open(&dir, 0, WalOptions::default(), &rec)
                .await
                .unwrap();
            let replica = Rc::new(Replica::recover(0, (0, 0), &rec, false).unwrap());
            replica.start(&wal).await.unwrap();
            let mut waits = Vec::new();
            let mut last = 0;
            for i in 0..n {
                let mut e = write(i + 1);
                let index = match replica.propose(&wal, &mut e) {
                    Ok(index) => index,
                    Err(_) => panic!("proposal refused"),
                };
                assert_eq!((e.index, e.term), (index, replica.term()));
                last = index;
                let (wal, replica) = (wal.clone(), replica.clone());
                waits.push(glommio::spawn_local(async move {
                    replica.wait_committed(&wal, index, e.term).await
                }));
            }
            for w in waits {
                w.await.unwrap();
            }
            let commit = replica.raft.as_ref().unwrap().borrow().commit();
            assert_eq!(commit, last, "a one-member group commits what is durable");
            replica.compact(last).unwrap();
            let first = replica.raft.as_ref().unwrap().borrow().first_index();
            let term = replica.term();
            wal.close().await;
            (term, first)
        })
    }

    #[test]
    fn proposals_commit_when_durable_and_terms_grow_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            session(dir.path(), 50),
            (1, 52),
            "no-op at 1, writes 2..=51"
        );
        let rec = recover(dir.path(), 0, 0).unwrap();
        assert_eq!(rec.entries.len(), 51);
        let hs = rec.hard_state.as_ref().unwrap();
        assert_eq!((hs.term, hs.vote), (1, 1));
        // Recovered entries are the Raft log again; the next leader's no-op follows them.
        assert_eq!(session(dir.path(), 5), (2, 58));
        let rec = recover(dir.path(), 0, 0).unwrap();
        let terms: Vec<u64> = rec.entries.iter().map(|l| l.entry.term).collect();
        assert_eq!(&terms[50..], &[1, 2, 2, 2, 2, 2, 2]);
        assert_eq!(rec.entries[51].entry.kind, EntryKind::Noop);
        assert_eq!(rec.hard_state.unwrap().term, 2);
    }
}

//! One shard on its core: the MVCC store, its WAL, and the operations other cores ask of it.
//!
//! Every method runs on the shard's own executor thread. Writes evaluate against the latest state,
//! take a revision, apply to the in-memory index and queue the WAL record in one synchronous step,
//! so each shard's log is in revision order; they are acknowledged after group commit makes the
//! record durable and the read revision has passed them. Readers never see an unfinished revision
//! because they read at the read revision (see `revision`).
//!
//! A multi-shard write locks each participant (ascending shard order, so coordinators cannot
//! deadlock), evaluates, executes its part and makes it durable, and is then committed or aborted
//! by the coordinator; while locked, the shard takes no other write.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use glommio::sync::Semaphore;

use crate::alarm::{Alarm, AlarmOp, Alarms, SharedAlarms};
use crate::auth::{AuthError, AuthOp, AuthReply, AuthStore, SharedAuth};
use crate::engine::checkpoint::{self, CheckpointInfo};
use crate::engine::partition::Partitioner;
use crate::engine::replica::{ProposeError, Replica};
use crate::engine::revision::{CoreRevisions, RevisionClock};
use crate::error::{Error, Result};
use crate::kv::{Compare, RangeRequest, RequestOp, TxnRequest};
use crate::mvcc::lease::SharedLeases;
use crate::mvcc::plan;
use crate::mvcc::{CompareOutcome, OpPartial, ShardRange, ShardStore, TxnPath, Undo};
use crate::runtime::stages::{Stage, Tracer};
use crate::wal::{record, EntryKind, LeaseRecord, Wal, WalEntry};

/// A multi-shard part executed here and durable, awaiting the coordinator's decision.
struct HeldPart {
    revision: i64,
    undo: Undo,
}

/// Size of each buffer the keys of writes served from the log segment are copied to.
const KEY_ARENA: usize = 64 << 10;

/// A logged write not yet served from the log segment: its WAL index and revision, its record,
/// and the record's ops as decoded when it was proposed (slices of `record`).
struct Unsettled {
    index: u64,
    rev: i64,
    record: Bytes,
    logged: std::rc::Rc<[crate::mvcc::Effect]>,
}

pub struct Shard {
    pub id: u32,
    pub dir: PathBuf,
    nshards: u32,
    partitioner: Partitioner,
    pub store: RefCell<ShardStore>,
    pub wal: Wal,
    /// The shard's Raft group: every record is proposed through it.
    pub replica: Replica,
    /// Write permission: one permit; held briefly by single-shard writes and for the whole
    /// protocol by a multi-shard write.
    lock: Semaphore,
    held: RefCell<Option<HeldPart>>,
    /// The coordinator (by its lock token) currently holding `lock` for a multi-shard write.
    lock_owner: Cell<Option<u64>>,
    /// Log index and revision of the last checkpoint.
    pub checkpoint_index: Cell<u64>,
    checkpointing: Cell<bool>,
    /// A rebuild (see [`Shard::rebuild`]) is running.
    pub rebuilding: Cell<bool>,
    /// WAL index of the last write, for checkpoint scheduling.
    last_write_index: Cell<u64>,
    /// Writes logged and not yet served from the log segment: (index, revision, record), in
    /// index order (groups without peers; see [`Shard::settle_logged`]).
    unsettled: RefCell<std::collections::VecDeque<Unsettled>>,
    /// Where keys of writes served from the log segment are copied (the segment's pages are
    /// not read to find or compare keys).
    key_arena: RefCell<bytes::BytesMut>,
    pub checkpoint_every: u64,
    /// Every lease, shared by all cores, so a put checks its lease without a hop.
    leases: SharedLeases,
    /// Leases whose grant this shard's log holds (id → TTL), as of the last append: re-logged
    /// by each checkpoint so that dropping old segments cannot lose them.
    lease_log: RefCell<BTreeMap<i64, i64>>,
    /// Committed entries handed to [`Shard::apply_committed`] and not applied yet: held at a
    /// multi-shard part whose outcome this shard's log has not said yet.
    deferred: RefCell<std::collections::VecDeque<crate::raft::Entry>>,
    /// Outcomes of the newest multi-shard writes this shard took part in (revision → committed).
    decisions: RefCell<BTreeMap<i64, bool>>,
    /// (revision, term) of the last in-doubt decision this shard proposed as leader.
    decision_proposed: Cell<Option<(i64, u64)>>,
    /// Outcome records this shard still has to log as leader (revision → committed).
    pending_records: RefCell<BTreeMap<i64, bool>>,
    /// Raft term when the coordinator took the write permission.
    locked_term: Cell<u64>,
    /// The leader's read stamps this member has not applied far enough for yet.
    stamps: RefCell<crate::engine::revision::ReadStamps>,
    /// After a rebuild: the index the store must apply up to again before it serves reads (the
    /// node's read floors may already cover what it held before).
    replay_to: Cell<u64>,
    /// The node's auth state (every shard gets it when its core starts; shard 0's log carries
    /// the `Auth` records, its checkpoints the whole store).
    auth: RefCell<Option<Arc<SharedAuth>>>,
    /// Shard 0: the node's alarms, which its log records.
    alarms: RefCell<Option<Arc<SharedAlarms>>>,
    /// `Wal::appended_bytes` when the newest checkpoint was cut: the log's records before it
    /// are garbage the checkpoint replaced.
    wal_dead: Cell<u64>,
}

/// Fault injection for tests, in every build: `SPINDLE_FAULT=<point>` in a member's
/// environment makes it fail at that point (read once). The one point, `crash-before-last-part`, kills the process while
/// it prepares the last participant's part of a multi-shard write, after the others logged
/// theirs: the in-doubt write the recovery rule must settle (`tests/indoubt.rs`).
fn fault_armed(point: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT
        .get_or_init(|| std::env::var("SPINDLE_FAULT").ok())
        .as_deref()
        == Some(point)
}

/// The record that says how the multi-shard write at `rev` ended.
fn outcome_record(rev: i64, commit: bool) -> WalEntry {
    WalEntry {
        kind: if commit {
            EntryKind::Commit
        } else {
            EntryKind::Abort
        },
        revision: rev,
        ..Default::default()
    }
}

/// How many multi-shard outcomes a shard remembers (and its checkpoints carry): enough for any
/// write still undecided elsewhere, since a node decides every held write before it writes
/// again.
pub const DECISIONS_KEPT: usize = 4096;

/// Keys a checkpoint exports per step; the executor may serve requests between steps. A step
/// of 4,096 keys (about 3 MB of histories, first touching the values' pages) took 30–40 ms.
const EXPORT_STEP_KEYS: usize = 512;

/// A shard's knowledge of its part of one multi-shard write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartStatus {
    /// Its log (or memory) says the write committed (`true`) or aborted.
    Decided(bool),
    /// Its committed log holds the part, undecided.
    Holds,
    /// Its committed log is complete (it leads with a committed no-op) and never held the part.
    Lacks,
    /// It cannot tell yet (it does not lead its group, or its no-op is not committed).
    Unknown,
}

/// Releases the shard's write permission on drop, so early returns cannot leak it.
struct LockGuard<'a>(&'a Semaphore);

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.0.signal(1);
    }
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u32,
        dir: PathBuf,
        nshards: u32,
        partitioner: Partitioner,
        store: ShardStore,
        wal: Wal,
        replica: Replica,
        checkpoint_index: u64,
        checkpoint_every: u64,
        leases: SharedLeases,
        lease_log: BTreeMap<i64, i64>,
        decisions: BTreeMap<i64, bool>,
    ) -> Rc<Shard> {
        Rc::new(Shard {
            id,
            dir,
            nshards,
            partitioner,
            store: RefCell::new(store),
            wal,
            replica,
            lock: Semaphore::new(1),
            held: RefCell::new(None),
            lock_owner: Cell::new(None),
            checkpoint_index: Cell::new(checkpoint_index),
            checkpointing: Cell::new(false),
            rebuilding: Cell::new(false),
            last_write_index: Cell::new(0),
            unsettled: RefCell::default(),
            key_arena: RefCell::default(),
            checkpoint_every,
            leases,
            lease_log: RefCell::new(lease_log),
            deferred: RefCell::default(),
            stamps: RefCell::default(),
            replay_to: Cell::new(0),
            decisions: RefCell::new(decisions),
            decision_proposed: Cell::new(None),
            pending_records: RefCell::default(),
            locked_term: Cell::new(0),
            auth: RefCell::new(None),
            alarms: RefCell::new(None),
            wal_dead: Cell::new(0),
        })
    }

    /// Gives the shard the node's auth state (called once per shard when its core starts).
    pub fn attach_auth(&self, auth: Arc<SharedAuth>) {
        *self.auth.borrow_mut() = Some(auth);
    }

    fn shared_auth(&self) -> Option<Arc<SharedAuth>> {
        self.auth.borrow().clone()
    }

    /// Bytes of the log's live records: those after the newest checkpoint (what a restart
    /// replays). Status' `dbSize` counts these plus the checkpoint files.
    pub fn live_log_bytes(&self) -> u64 {
        self.wal
            .appended_bytes()
            .saturating_sub(self.wal_dead.get())
    }

    /// Gives the shard the node's alarm set (called with [`Shard::attach_auth`]).
    pub fn attach_alarms(&self, alarms: Arc<SharedAlarms>) {
        *self.alarms.borrow_mut() = Some(alarms);
    }

    fn shared_alarms(&self) -> Option<Arc<SharedAlarms>> {
        self.alarms.borrow().clone()
    }

    /// Shard 0: raises or disarms an alarm through the log (`EntryKind::Alarm`), installing the
    /// change in the same step as the proposal (as [`Shard::log_auth`] does), then waits until
    /// it is committed. An op that changes nothing logs nothing and returns `None`.
    pub async fn log_alarm(&self, op: AlarmOp) -> Result<Option<Alarm>> {
        self.ensure_healthy()?;
        let alarms = self
            .shared_alarms()
            .ok_or_else(|| Error::InvalidArgument("alarm state not attached".into()))?;
        if self.id != 0 {
            return Err(Error::InvalidArgument(format!(
                "alarm records belong in shard 0's log, not shard {}",
                self.id
            )));
        }
        let data = Bytes::from(op.encode());
        let changes = Cell::new(false);
        let proposed = self
            .propose_record(|| {
                let mut probe = alarms.get();
                let changed = probe.apply(&op).is_some();
                changes.set(changed);
                changed.then(|| WalEntry {
                    kind: EntryKind::Alarm,
                    data: data.clone(),
                    ..Default::default()
                })
            })
            .await?;
        if !changes.get() {
            return Ok(None);
        }
        // Same step as the proposal: nothing ran in between.
        let changed = alarms.apply(&op);
        if let Some((index, term)) = proposed {
            self.replica.wait_committed(&self.wal, index, term).await?;
        }
        Ok(changed)
    }

    /// Reloads the alarm set from a checkpoint's extras (shard 0; a rebuild or an install).
    fn reload_alarms(&self, bytes: &[u8]) {
        if self.id != 0 {
            return;
        }
        let Some(alarms) = self.shared_alarms() else {
            return;
        };
        match Alarms::decode(bytes) {
            Ok(set) => alarms.reset(set),
            Err(e) => tracing::error!(error = ?e, "checkpoint holds an undecodable alarm set"),
        }
    }

    /// Shard 0: validates an auth op against the current state and, if it applies, logs it
    /// (`EntryKind::Auth`) and installs the new state in the same step as the proposal, so the
    /// state always mirrors this log's order (as `lease_log` does); then waits until it is
    /// committed. A refused op logs nothing.
    pub async fn log_auth(&self, op: AuthOp) -> Result<std::result::Result<AuthReply, AuthError>> {
        self.ensure_healthy()?;
        let auth = self
            .shared_auth()
            .ok_or_else(|| Error::InvalidArgument("auth state not attached".into()))?;
        if self.id != 0 {
            return Err(Error::InvalidArgument(format!(
                "auth records belong in shard 0's log, not shard {}",
                self.id
            )));
        }
        let data = Bytes::from(op.encode());
        let outcome: RefCell<Option<std::result::Result<(AuthStore, AuthReply), AuthError>>> =
            RefCell::new(None);
        let proposed = self
            .propose_record(|| {
                let tried = auth.try_apply(&op);
                let ok = tried.is_ok();
                *outcome.borrow_mut() = Some(tried);
                ok.then(|| WalEntry {
                    kind: EntryKind::Auth,
                    data: data.clone(),
                    ..Default::default()
                })
            })
            .await?;
        let (next, reply) = match outcome.into_inner() {
            Some(Ok(done)) => done,
            Some(Err(e)) => return Ok(Err(e)),
            None => return Err(Error::Closed),
        };
        // Same step as the proposal: nothing ran in between.
        auth.commit(&op, next);
        if let Some((index, term)) = proposed {
            self.replica.wait_committed(&self.wal, index, term).await?;
        }
        Ok(Ok(reply))
    }

    /// Reloads the auth state from a checkpoint's extras (shard 0; a rebuild or an install).
    fn reload_auth(&self, bytes: &[u8]) {
        if self.id != 0 {
            return;
        }
        let Some(auth) = self.shared_auth() else {
            return;
        };
        let store = if bytes.is_empty() {
            Ok(AuthStore::new())
        } else {
            AuthStore::decode(bytes)
        };
        match store {
            Ok(store) => auth.reset(store),
            Err(e) => tracing::error!(error = ?e, "checkpoint holds an undecodable auth store"),
        }
    }

    fn owns(&self) -> impl Fn(&[u8]) -> bool + '_ {
        move |k: &[u8]| self.partitioner.shard_of(k, self.nshards) == self.id
    }

    async fn acquire(&self) -> Result<LockGuard<'_>> {
        self.lock.acquire(1).await.map_err(|_| Error::Closed)?;
        Ok(LockGuard(&self.lock))
    }

    fn ensure_healthy(&self) -> Result<()> {
        match self.wal.failure() {
            Some(reason) => Err(Error::ShardFailed {
                shard: self.id,
                reason,
            }),
            None => self.replica.ensure_healthy(),
        }
    }

    /// Reads are refused once a failed sync may have left unlogged data in memory, and while
    /// the store holds writes that will not commit (a deposed leader's) or is replaying its
    /// log after a rebuild: the node's read revision may cover more than it holds then. The
    /// refusal is etcd's retryable `leader changed`, which is what just happened.
    pub fn ensure_readable(&self) -> Result<()> {
        self.ensure_healthy()?;
        if self.replica.is_stale()
            || self.rebuilding.get()
            || self.replica.applied() < self.replay_to.get()
        {
            return Err(Error::LeaderChanged);
        }
        Ok(())
    }

    pub fn range(&self, req: &RangeRequest, rev: i64) -> Result<ShardRange> {
        self.ensure_readable()?;
        self.store.borrow().range(req, rev)
    }

    pub fn compare(&self, cmps: &[Compare], rev: i64) -> Result<Vec<CompareOutcome>> {
        self.ensure_healthy()?;
        let store = self.store.borrow();
        cmps.iter().map(|c| store.compare(c, rev)).collect()
    }

    /// Upper bound of the WAL frame the execution along `path` will produce here, so room is made
    /// before a revision is taken (a revision once taken must be written).
    fn frame_estimate(&self, txn: &TxnRequest, path: &TxnPath, rev: i64) -> Result<usize> {
        let store = self.store.borrow();
        let owns = self.owns();
        let mut n = 256;
        for op in plan::leaf_ops(txn, path) {
            match op {
                RequestOp::Put(p) if owns(&p.key) => {
                    n += 96 + p.key.len() + p.value.len();
                    if p.ignore_value {
                        let cur = store.range(&RangeRequest::key(p.key.clone()), rev)?;
                        n += cur.kvs.iter().map(|kv| kv.value.len()).sum::<usize>();
                    }
                }
                RequestOp::DeleteRange(d) => {
                    let req = RangeRequest {
                        key: d.key.clone(),
                        range_end: d.range_end.clone(),
                        keys_only: true,
                        ..Default::default()
                    };
                    n += store
                        .range(&req, rev)?
                        .kvs
                        .iter()
                        .map(|kv| 64 + kv.key.len())
                        .sum::<usize>();
                }
                _ => {}
            }
        }
        // Proposals also keep room for the small records Raft logs on its own.
        Ok(record::frame_len(n) + crate::engine::replica::RECORD_SLACK)
    }

    /// A write whose every key lives on this shard: evaluated, applied and logged here.
    /// Returns the leaf-op partials and the revision the response carries. With a tracer, the
    /// stages from execution to visibility are timed (`runtime::stages`).
    pub async fn write_single(
        self: &Rc<Self>,
        revs: &CoreRevisions,
        txn: &TxnRequest,
        mut trace: Option<&mut Tracer<'_>>,
    ) -> Result<(TxnPath, Vec<OpPartial>, i64)> {
        let clock = revs.clock().clone();
        loop {
            let guard = self.acquire().await?;
            self.ensure_healthy()?;
            let c = clock.current();
            let (path, writes) = {
                let store = self.store.borrow();
                let cmps = plan::all_compares(txn);
                let mut results = Vec::with_capacity(cmps.len());
                for cmp in cmps {
                    results.push(plan::merge_compare(cmp, &[store.compare(cmp, c)?]));
                }
                let path = plan::choose_path(txn, &results);
                let writes = store.check(txn, &path, c, &self.owns())?;
                self.check_leases(txn, &path)?;
                (path, writes)
            };
            if !writes {
                let exec = self.store.borrow_mut().execute(txn, &path, c, &self.owns());
                drop(guard);
                clock.wait_resolved(c).await;
                return Ok((path, exec.partials, c));
            }
            let estimate = self.frame_estimate(txn, &path, c)?;
            if !self.wal.has_room(estimate) {
                drop(guard);
                // Boxed: rare, and inline it would quadruple every write's future.
                Box::pin(self.wal.make_room(estimate)).await?;
                continue;
            }
            let rev = revs.begin();
            let logged = self.execute_and_log(txn, &path, rev, EntryKind::Write, Vec::new());
            let (partials, index, term) = match logged {
                Ok(v) => v,
                Err(e) => {
                    revs.finish(rev);
                    return Err(e);
                }
            };
            drop(guard);
            if let Some(t) = trace.as_deref_mut() {
                t.mark(Stage::Execute);
            }
            let durable = self.replica.wait_committed(&self.wal, index, term).await;
            if let Some(t) = trace.as_deref_mut() {
                if let Some(f) = self.wal.flush_times(index) {
                    t.mark_at(Stage::WalQueue, f.started);
                    t.mark_at(Stage::WalWrite, f.written);
                    t.mark_at(Stage::Fdatasync, f.synced);
                }
                t.mark(Stage::Commit);
            }
            // Finished either way so readers are not held up; after a failed sync this shard
            // refuses every read, so the unlogged write it applied is never seen.
            revs.finish(rev);
            durable?;
            self.settle_logged();
            clock.note_committed(rev);
            clock.wait_resolved(rev).await;
            if let Some(t) = trace.as_deref_mut() {
                t.mark(Stage::Visible);
            }
            self.maybe_checkpoint();
            return Ok((path, partials, rev));
        }
    }

    /// Executes at `rev` and proposes the record (which queues it in the WAL); synchronous, so
    /// nothing interleaves. Returns the partials and the entry's index and term.
    fn execute_and_log(
        &self,
        txn: &TxnRequest,
        path: &TxnPath,
        rev: i64,
        kind: EntryKind,
        participants: Vec<u32>,
    ) -> Result<(Vec<OpPartial>, u64, u64)> {
        let last = self.store.borrow().last_revision();
        assert!(
            rev > last,
            "shard {} revision went backwards: {rev} after {last}",
            self.id
        );
        let exec = self
            .store
            .borrow_mut()
            .execute(txn, path, rev, &self.owns());
        let mut entry = WalEntry {
            kind,
            revision: rev,
            participants,
            ops: exec.effects,
            ..Default::default()
        };
        match self.replica.propose_shared(&self.wal, &mut entry) {
            Ok((index, record)) => {
                self.last_write_index.set(index);
                // The Raft log holds the record until the next checkpoint: the store's keys
                // and values of this write become slices of it instead of second copies.
                if let Some(logged) = (!record.is_empty())
                    .then(|| crate::wal::record::decode_payload(&record))
                    .flatten()
                {
                    self.store.borrow_mut().share_record(&logged.ops, rev);
                    if kind == EntryKind::Write && !self.replica.has_peers() {
                        self.unsettled.borrow_mut().push_back(Unsettled {
                            index,
                            rev,
                            record,
                            logged: logged.ops.into(),
                        });
                    }
                }
                if kind == EntryKind::Part {
                    *self.held.borrow_mut() = Some(HeldPart {
                        revision: rev,
                        undo: exec.undo,
                    });
                }
                Ok((exec.partials, index, entry.term))
            }
            Err(e) => {
                // Nothing was proposed; undo so memory matches the log. The revision stays
                // unused (a gap), which readers tolerate.
                self.store.borrow_mut().rollback(exec.undo);
                Err(match e {
                    ProposeError::NoRoom(no_room) => Error::InvalidArgument(format!(
                        "write of {} bytes does not fit the log segment",
                        no_room.frame_len
                    )),
                    ProposeError::Other(e) => e,
                })
            }
        }
    }

    /// Durable writes whose part of the log segment is written for good are served from it:
    /// their values in the store and the watch feed become slices of the segment's mapping
    /// (`Wal::settled_payload`), their keys copies in a small arena, and the record's heap
    /// buffer is freed (the Raft log of a group without peers does not hold it). Writes still
    /// in the segment's last window wait for a later call. A later checkpoint re-points them
    /// to its own mapping as every other value.
    fn settle_logged(&self) {
        loop {
            // Peek at the index only: most calls find the front write's window still open.
            let Some(index) = self.unsettled.borrow().front().map(|u| u.index) else {
                return;
            };
            let mapped = match self.wal.settled_payload(index) {
                crate::wal::Settled::NotYet => return,
                crate::wal::Settled::Never => None,
                crate::wal::Settled::At(m) => Some(m),
            };
            let Some(Unsettled {
                rev,
                record,
                logged,
                ..
            }) = self.unsettled.borrow_mut().pop_front()
            else {
                return;
            };
            let Some(mapped) = mapped.filter(|m| m.len() == record.len()) else {
                continue;
            };
            let base = record.as_ptr() as usize;
            let at = |b: &Bytes| {
                if b.is_empty() {
                    return Bytes::new();
                }
                let off = b.as_ptr() as usize - base;
                mapped.slice(off..off + b.len())
            };
            let mut arena = self.key_arena.borrow_mut();
            let mut copy = |k: &Bytes| {
                if arena.capacity() - arena.len() < k.len() {
                    *arena = bytes::BytesMut::with_capacity(KEY_ARENA.max(k.len()));
                }
                arena.extend_from_slice(k);
                arena.split().freeze()
            };
            let ops = crate::mvcc::SharedOp::of_effects(&logged, &mut copy, at);
            drop(arena);
            self.store.borrow_mut().share(&ops, rev);
        }
    }

    /// Proposes `make()`'s record, making room in the log as needed, and returns the entry's
    /// index and term. `make` runs in the same step as the proposal, so the record reflects the
    /// state at the moment it enters the log.
    async fn propose_record(
        &self,
        mut make: impl FnMut() -> Option<WalEntry>,
    ) -> Result<Option<(u64, u64)>> {
        loop {
            let Some(mut entry) = make() else {
                return Ok(None);
            };
            match self.replica.propose(&self.wal, &mut entry) {
                Ok(index) => {
                    self.last_write_index.set(index);
                    return Ok(Some((index, entry.term)));
                }
                Err(ProposeError::NoRoom(nr)) => self.wal.make_room(nr.frame_len).await?,
                Err(ProposeError::Other(e)) => return Err(e),
            }
        }
    }

    /// Proposes a record and waits until it is committed.
    async fn log_record(&self, entry: WalEntry) -> Result<()> {
        if let Some((index, term)) = self.propose_record(|| Some(entry.clone())).await? {
            self.replica.wait_committed(&self.wal, index, term).await?;
        }
        Ok(())
    }

    // ---- multi-shard protocol (the coordinator drives these in order) ----

    /// Takes the shard's write permission for the coordinator identified by `token`.
    pub async fn lock_for_coordinator(&self, token: u64) -> Result<()> {
        self.lock.acquire(1).await.map_err(|_| Error::Closed)?;
        self.lock_owner.set(Some(token));
        self.locked_term.set(self.replica.term());
        if let Err(e) = self.ensure_healthy() {
            self.unlock_coordinator(token);
            return Err(e);
        }
        Ok(())
    }

    /// Releases the permission if `token` holds it; a stale or repeated unlock is ignored.
    pub fn unlock_coordinator(&self, token: u64) {
        if self.lock_owner.get() == Some(token) {
            debug_assert!(
                self.held.borrow().is_none(),
                "unlock with an undecided part"
            );
            self.lock_owner.set(None);
            self.lock.signal(1);
        }
    }

    /// Puts along the path may only name live leases (etcd checks the key first, then the lease).
    /// Runs under the write permit, in the same step as the write, so a revoke that gathers the
    /// lease's keys under the permit afterwards sees every key this put attaches.
    fn check_leases(&self, txn: &TxnRequest, path: &TxnPath) -> Result<()> {
        let owns = self.owns();
        // The table's lock is only taken for puts that name a lease.
        let unknown = plan::leaf_ops(txn, path).into_iter().any(|op| {
            matches!(op, RequestOp::Put(p) if p.lease != 0 && owns(&p.key) && !self.lease_is_live(p.lease))
        });
        if unknown {
            return Err(Error::LeaseNotFound);
        }
        Ok(())
    }

    pub fn check(&self, txn: &TxnRequest, path: &TxnPath, rev: i64) -> Result<bool> {
        self.ensure_healthy()?;
        let writes = self.store.borrow().check(txn, path, rev, &self.owns())?;
        self.check_leases(txn, path)?;
        Ok(writes)
    }

    /// Executes a read-only part (no writes on this shard) while locked.
    pub fn execute_read(&self, txn: &TxnRequest, path: &TxnPath, rev: i64) -> Vec<OpPartial> {
        self.store
            .borrow_mut()
            .execute(txn, path, rev, &self.owns())
            .partials
    }

    /// Executes this shard's part at `rev`, logs it as a `Part` naming all participants, and waits
    /// until it is durable. The shard stays locked until `commit` or `abort`.
    pub async fn prepare(
        &self,
        txn: &TxnRequest,
        path: &TxnPath,
        rev: i64,
        participants: Vec<u32>,
    ) -> Result<Vec<OpPartial>> {
        debug_assert!(self.lock_owner.get().is_some());
        if participants.len() > 1
            && participants.last() == Some(&self.id)
            && self.replica.has_peers()
            && fault_armed("crash-before-last-part")
        {
            // Lets the other participants log their parts, then dies before this one does.
            glommio::timer::sleep(std::time::Duration::from_millis(300)).await;
            tracing::error!(
                revision = rev,
                "fault point crash-before-last-part: aborting"
            );
            std::process::abort();
        }
        let estimate = self.frame_estimate(txn, path, rev)?;
        if !self.wal.has_room(estimate) {
            self.wal.make_room(estimate).await?;
        }
        if rev <= self.store.borrow().last_revision()
            || self.replica.term() != self.locked_term.get()
        {
            // Leadership moved (and maybe came back) since the lock was taken: another leader
            // may have handed out this revision meanwhile, on this shard or another.
            return Err(Error::LeaderChanged);
        }
        let (partials, index, term) =
            self.execute_and_log(txn, path, rev, EntryKind::Part, participants)?;
        match self.replica.wait_committed(&self.wal, index, term).await {
            Ok(()) => Ok(partials),
            // Proposed, but not known to be committed: the part may still commit.
            Err(_) if self.replica.has_peers() => Err(Error::PartInDoubt),
            Err(e) => Err(e),
        }
    }

    pub fn commit(self: &Rc<Self>, rev: i64, token: u64) {
        if self.lock_owner.get() != Some(token) {
            return;
        }
        let held = self.held.borrow_mut().take();
        debug_assert!(
            held.as_ref().is_some_and(|h| h.revision == rev),
            "commit of an unknown part"
        );
        if self.replica.has_peers() {
            // Members apply a part only once their shard's log says how its write ended; the
            // record is retried on ticks until it is logged (`log_pending_records`).
            self.decided(rev, true);
            self.pending_records.borrow_mut().insert(rev, true);
            self.log_pending_records();
        }
        self.unlock_coordinator(token);
    }

    /// The coordinator gave up on a multi-shard write whose outcome is not known here (a part
    /// proposed and not committed when leadership moved): the executed part is undone, and the
    /// shard rebuilds from its checkpoint and committed log, holding at the part until the
    /// write is decided (see [`Shard::apply_committed`]).
    pub fn abandon(&self, rev: i64, token: u64) {
        if self.lock_owner.get() != Some(token) {
            return;
        }
        if let Some(h) = self.held.borrow_mut().take() {
            if h.revision == rev {
                self.store.borrow_mut().rollback(h.undo);
            }
        }
        self.replica.mark_stale();
        tracing::warn!(
            shard = self.id,
            revision = rev,
            "multi-shard write left undecided by a leadership change"
        );
        self.unlock_coordinator(token);
    }

    /// Undoes a prepared part and records the abort durably (recovery must not resurrect it).
    pub async fn abort(&self, rev: i64, token: u64) -> Result<()> {
        if self.lock_owner.get() != Some(token) {
            return Ok(());
        }
        let held = self.held.borrow_mut().take();
        let result = match held {
            Some(h) if h.revision == rev => {
                self.store.borrow_mut().rollback(h.undo);
                let logged = self.log_abort(rev).await;
                if logged.is_err() && self.replica.has_peers() {
                    // The part stays in the log without its Abort: rebuild, hold at it, and let
                    // the next leader decide from every participant's log.
                    self.replica.mark_stale();
                }
                logged
            }
            other => {
                *self.held.borrow_mut() = other;
                Ok(())
            }
        };
        self.unlock_coordinator(token);
        result
    }

    pub async fn log_abort(&self, rev: i64) -> Result<()> {
        self.log_marker(EntryKind::Abort, rev).await
    }

    /// Logs a record without effects (abort, compaction) and waits until it is committed.
    async fn log_marker(&self, kind: EntryKind, rev: i64) -> Result<()> {
        self.log_record(WalEntry {
            kind,
            revision: rev,
            ..Default::default()
        })
        .await
    }

    /// Durably records and applies a compaction at `rev`.
    pub async fn compact(&self, rev: i64) -> Result<()> {
        let _guard = self.acquire().await?;
        self.ensure_healthy()?;
        if rev <= self.store.borrow().compact_revision() {
            return Ok(());
        }
        self.log_marker(EntryKind::Compact, rev).await?;
        self.store.borrow_mut().compact(rev);
        Ok(())
    }

    fn lease_is_live(&self, id: i64) -> bool {
        self.leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_live(id)
    }

    /// Durably logs a lease grant (`Some(ttl)`) or revoke (`None`) in this shard's log.
    pub async fn log_lease(&self, id: i64, grant: Option<i64>) -> Result<()> {
        self.ensure_healthy()?;
        let entry = WalEntry {
            kind: if grant.is_some() {
                EntryKind::LeaseGrant
            } else {
                EntryKind::LeaseRevoke
            },
            lease: LeaseRecord {
                id,
                ttl: grant.unwrap_or(0),
            },
            ..Default::default()
        };
        let proposed = self.propose_record(|| Some(entry.clone())).await?;
        // Updated in the same step as the proposal, so `lease_log` always mirrors the log's order.
        match grant {
            Some(ttl) => self.lease_log.borrow_mut().insert(id, ttl),
            None => self.lease_log.borrow_mut().remove(&id),
        };
        if let Some((index, term)) = proposed {
            self.replica.wait_committed(&self.wal, index, term).await?;
        }
        Ok(())
    }

    /// Keys of this shard attached to `lease`. Taken under the write permit: every put that
    /// passed its lease check before the lease stopped being live has been applied by then.
    pub async fn lease_keys(&self, lease: i64) -> Result<Vec<bytes::Bytes>> {
        let _guard = self.acquire().await?;
        self.ensure_healthy()?;
        Ok(self.store.borrow().lease_keys(lease))
    }

    /// Re-logs what segments up to a checkpoint hold and later records do not repeat: a grant
    /// for every live lease and the Raft hard state (followed by a no-op entry, so the segment
    /// holding it also holds an entry past the checkpoint and is kept). Each grant reads
    /// `lease_log` in the same step as its proposal, so a revoke logged meanwhile is never
    /// followed by a stale re-grant.
    async fn relog_after_checkpoint(&self) -> Result<()> {
        let ids: Vec<i64> = self.lease_log.borrow().keys().copied().collect();
        let mut last = None;
        for id in ids {
            let grant = self
                .propose_record(|| {
                    let ttl = self.lease_log.borrow().get(&id).copied()?;
                    Some(WalEntry {
                        kind: EntryKind::LeaseGrant,
                        lease: LeaseRecord { id, ttl },
                        ..Default::default()
                    })
                })
                .await?;
            last = grant.or(last);
        }
        if let Some(hs) = self.replica.hard_state() {
            self.wal.make_room(4096).await?;
            self.replica.log_hard_state(&self.wal, hs);
            self.ensure_healthy()?;
            last = self.propose_record(|| Some(WalEntry::default())).await?;
        }
        if let Some((index, term)) = last {
            self.replica.wait_committed(&self.wal, index, term).await?;
        }
        Ok(())
    }

    /// The leader's stamp for this shard: every record at or below `rev` is at or below
    /// `index` in its log (see `RevisionClock::raise_floor`).
    pub fn note_stamp(&self, index: u64, rev: i64, clock: &RevisionClock) {
        if self.replica.is_stale() || self.rebuilding.get() {
            // Its applied index still counts writes the leader's log replaced.
            return;
        }
        let applied = self.replica.applied();
        if let Some(rev) = self.stamps.borrow_mut().add(index, rev, applied) {
            clock.raise_floor(self.id, rev);
        }
    }

    /// Applies records its group committed that this member did not execute itself (a
    /// follower's path, and a new leader's catch-up), the way WAL replay does. A multi-shard
    /// part is applied only once this shard's log says how its write ended (a `Commit` or an
    /// `Abort` after it); until then the shard's apply holds there and later entries wait, so
    /// a member never shows a part that may yet be aborted. Returns the part it holds at:
    /// (revision, participants).
    pub fn apply_committed(
        &self,
        entries: &[crate::raft::Entry],
        clock: &RevisionClock,
    ) -> Result<Option<(i64, Vec<u32>)>> {
        self.deferred.borrow_mut().extend(entries.iter().cloned());
        loop {
            let Some(e) = self.deferred.borrow().front().cloned() else {
                return Ok(None);
            };
            if e.kind == crate::raft::EntryKind::Normal && !e.data.is_empty() {
                let rec = record::decode_payload(&e.data).ok_or_else(|| Error::ShardFailed {
                    shard: self.id,
                    reason: format!("committed entry {} is not a valid record", e.index),
                })?;
                match rec.kind {
                    EntryKind::Part if rec.participants.len() > 1 => {
                        let remembered = self.decision(rec.revision);
                        let outcome = remembered.or_else(|| {
                            self.deferred.borrow().iter().skip(1).find_map(|l| {
                                if l.kind != crate::raft::EntryKind::Normal || l.data.is_empty() {
                                    return None;
                                }
                                let r = record::decode_payload(&l.data)?;
                                match r.kind {
                                    EntryKind::Commit if r.revision == rec.revision => Some(true),
                                    EntryKind::Abort if r.revision == rec.revision => Some(false),
                                    _ => None,
                                }
                            })
                        });
                        if let Some(c) = remembered {
                            // Known from memory (a checkpoint's, or this leader's own): the log
                            // may still lack the record its followers wait for.
                            self.pending_records.borrow_mut().insert(rec.revision, c);
                        }
                        match outcome {
                            Some(true) => self.store.borrow_mut().apply(&rec.ops, rec.revision),
                            // Skipped; the revision is still never handed out again.
                            Some(false) => {}
                            None => return Ok(Some((rec.revision, rec.participants))),
                        }
                        clock.applied(self.id, rec.revision);
                    }
                    EntryKind::Write | EntryKind::Part => {
                        self.store.borrow_mut().apply(&rec.ops, rec.revision);
                        clock.applied(self.id, rec.revision);
                    }
                    EntryKind::Commit => {
                        self.decided(rec.revision, true);
                        self.pending_records.borrow_mut().remove(&rec.revision);
                    }
                    EntryKind::Abort => {
                        self.decided(rec.revision, false);
                        self.pending_records.borrow_mut().remove(&rec.revision);
                    }
                    EntryKind::Compact => {
                        self.store.borrow_mut().compact(rec.revision);
                        clock.set_compact_revision(rec.revision);
                    }
                    EntryKind::LeaseGrant => {
                        if let Ok(mut t) = self.leases.write() {
                            t.restore(rec.lease.id, rec.lease.ttl, std::time::Instant::now());
                        }
                        self.lease_log
                            .borrow_mut()
                            .insert(rec.lease.id, rec.lease.ttl);
                    }
                    EntryKind::LeaseRevoke => {
                        if let Ok(mut t) = self.leases.write() {
                            t.finish_revoke(rec.lease.id);
                        }
                        self.lease_log.borrow_mut().remove(&rec.lease.id);
                    }
                    EntryKind::Alarm => match (self.shared_alarms(), AlarmOp::decode(&rec.data)) {
                        (Some(alarms), Ok(op)) => {
                            alarms.apply(&op);
                        }
                        (_, Err(err)) => {
                            return Err(Error::ShardFailed {
                                shard: self.id,
                                reason: format!(
                                    "committed alarm record {} does not decode: {err:?}",
                                    e.index
                                ),
                            })
                        }
                        (None, _) => {}
                    },
                    EntryKind::Auth => match (self.shared_auth(), AuthOp::decode(&rec.data)) {
                        (Some(auth), Ok(op)) => auth.apply(&op),
                        (_, Err(err)) => {
                            return Err(Error::ShardFailed {
                                shard: self.id,
                                reason: format!(
                                    "committed auth record {} does not decode: {err:?}",
                                    e.index
                                ),
                            })
                        }
                        (None, _) => {}
                    },
                    _ => {}
                }
            }
            self.deferred.borrow_mut().pop_front();
            self.last_write_index.set(e.index);
            self.replica.mark_applied(e.index);
            if let Some(rev) = self.stamps.borrow_mut().reached(e.index) {
                clock.raise_floor(self.id, rev);
            }
        }
    }

    /// How the multi-shard write at `rev` ended, as far as this shard's log said.
    fn decision(&self, rev: i64) -> Option<bool> {
        self.decisions.borrow().get(&rev).copied()
    }

    /// Remembers a multi-shard outcome (the newest [`DECISIONS_KEPT`], which checkpoints carry).
    fn decided(&self, rev: i64, committed: bool) {
        let mut d = self.decisions.borrow_mut();
        d.insert(rev, committed);
        while d.len() > DECISIONS_KEPT {
            d.pop_first();
        }
    }

    /// What this shard can say about its part of the multi-shard write at `rev`, for a leader
    /// deciding a write its predecessor left undecided.
    pub fn part_status(&self, rev: i64) -> PartStatus {
        if let Some(c) = self.decision(rev) {
            return PartStatus::Decided(c);
        }
        // Entries before this leader's committed no-op are all committed, and nothing new is
        // proposed while a part is undecided (the node's write gate stays shut), so the
        // in-memory log is this group's whole committed log past the checkpoint.
        if !self.replica.leads_settled() {
            return PartStatus::Unknown;
        }
        let mut holds = false;
        let mut said = None;
        self.replica.for_each_entry(|e| {
            if e.kind != crate::raft::EntryKind::Normal || e.data.is_empty() {
                return;
            }
            if let Some(r) = record::decode_payload(&e.data).filter(|r| r.revision == rev) {
                match r.kind {
                    EntryKind::Part => holds = true,
                    EntryKind::Commit => said = Some(true),
                    EntryKind::Abort => said = Some(false),
                    _ => {}
                }
            }
        });
        match (said, holds) {
            (Some(c), _) => PartStatus::Decided(c),
            (None, true) => PartStatus::Holds,
            // A part folded into the checkpoint was decided there, and checkpoints carry the
            // newest decisions; one that is neither logged nor decided never existed.
            (None, false) => PartStatus::Lacks,
        }
    }

    /// Whether the leader of this shard may decide the write it holds at now.
    pub fn may_decide(&self) -> bool {
        self.replica.leads_settled()
    }

    /// The leader's decision for the part this shard holds at: a `Commit` or `Abort` record in
    /// this group (proposed once per term; if it does not commit, the next leader decides the
    /// same way).
    pub async fn decide_in_doubt(&self, rev: i64, commit: bool) -> Result<()> {
        let term = self.replica.term();
        if self.decision_proposed.get() == Some((rev, term)) {
            return Ok(());
        }
        self.wal.make_room(4096).await?;
        let mut entry = outcome_record(rev, commit);
        self.replica.propose_decision(&self.wal, &mut entry)?;
        self.decision_proposed.set(Some((rev, term)));
        tracing::warn!(
            shard = self.id,
            revision = rev,
            commit,
            "decided a multi-shard write a leadership change left undecided"
        );
        Ok(())
    }

    /// Logs the outcome records this shard owes its followers (a leader's `Commit` that could
    /// not be proposed at once, or an outcome it applied from memory), if it leads its group;
    /// called after each multi-shard commit and on every tick until they are logged.
    pub fn log_pending_records(&self) {
        if self.pending_records.borrow().is_empty() || !self.replica.leads_settled() {
            return;
        }
        let pending: Vec<(i64, bool)> = self
            .pending_records
            .borrow()
            .iter()
            .map(|(&r, &c)| (r, c))
            .collect();
        for (rev, commit) in pending {
            let mut entry = outcome_record(rev, commit);
            match self.replica.propose_decision(&self.wal, &mut entry) {
                Ok(_) => {
                    self.pending_records.borrow_mut().remove(&rev);
                }
                Err(e) => {
                    tracing::debug!(shard = self.id, revision = rev, error = %e, "outcome record not logged yet");
                    return;
                }
            }
        }
    }

    /// Throws away what this shard executed and reloads it from its newest checkpoint; the
    /// group's committed entries after it are applied again. A leader deposed with executed but
    /// uncommitted writes does this before it may serve writes again.
    pub async fn rebuild(&self) -> Result<()> {
        // Not under a checkpoint being written from the store about to be replaced.
        while self.checkpointing.replace(true) {
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        let result = self.rebuild_inner().await;
        self.checkpointing.set(false);
        result
    }

    async fn rebuild_inner(&self) -> Result<()> {
        let _guard = self.acquire().await?;
        let newest = checkpoint::load_newest(&self.dir, self.id)?;
        let index = newest.index;
        *self.store.borrow_mut() = newest.store;
        // The committed log after the checkpoint is applied again, auth records included.
        self.reload_auth(&newest.extras.auth);
        self.reload_alarms(&newest.extras.alarms);
        self.deferred.borrow_mut().clear();
        self.stamps.borrow_mut().clear();
        let target = self.replica.reset_applied(index)?;
        self.replay_to.set(target);
        tracing::info!(
            shard = self.id,
            from = index,
            "rebuilt the shard from its checkpoint and committed log"
        );
        Ok(())
    }

    /// Installs the leader's checkpoint that Raft accepted as this group's snapshot (received
    /// whole at [`checkpoint::received_path`] and verified): it becomes the shard's newest
    /// checkpoint (the install's point of no return), the log continues after it, and the store
    /// and this shard's leases are reloaded from it. `take_membership` gets the checkpoint's
    /// membership record (empty but in shard 0) before the install commits.
    pub async fn install(
        &self,
        meta: &crate::raft::SnapshotMeta,
        clock: &RevisionClock,
        take_membership: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<()> {
        // One at a time with checkpoints: a checkpoint of the store being replaced must not
        // land under the installed one's name.
        while self.checkpointing.replace(true) {
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        let result = self.install_inner(meta, clock, take_membership).await;
        self.checkpointing.set(false);
        result
    }

    async fn install_inner(
        &self,
        meta: &crate::raft::SnapshotMeta,
        clock: &RevisionClock,
        take_membership: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let recv = checkpoint::received_path(&self.dir);
        let loaded = checkpoint::load(&recv, self.id)?;
        if (loaded.info.index, loaded.info.term) != (meta.index, meta.term) {
            return Err(Error::corrupt(
                &recv,
                16,
                format!(
                    "received checkpoint is at index {} term {}, the snapshot at {} term {}",
                    loaded.info.index, loaded.info.term, meta.index, meta.term
                ),
            ));
        }
        let index = meta.index;
        // The membership first: once the checkpoint is in place, the conf changes it covers
        // are gone from the log a restart would replay.
        take_membership(&loaded.extras.membership)?;
        let target = self.dir.join(checkpoint::file_name(index));
        std::fs::rename(&recv, &target).map_err(|e| Error::io(&target, e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&self.dir, e))?;
        for (i, old) in checkpoint::list(&self.dir)? {
            if i < index {
                std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
            }
        }
        // Recovery knows an install finished by this entry at the checkpoint's index and term;
        // without it, it drops whatever old tail follows the checkpoint.
        self.wal.anchor(index, meta.term).await?;
        let store = crate::mvcc::ShardStore::from_histories(
            loaded.histories,
            loaded.info.last_revision,
            loaded.info.compact_revision,
        );
        clock.applied(self.id, store.last_revision());
        clock.set_compact_revision(store.compact_revision());
        *self.store.borrow_mut() = store;
        let leases: BTreeMap<i64, i64> = loaded.extras.leases.iter().copied().collect();
        if let Ok(mut t) = self.leases.write() {
            let now = std::time::Instant::now();
            for id in self.lease_log.borrow().keys() {
                if !leases.contains_key(id) {
                    t.finish_revoke(*id);
                }
            }
            for (&id, &ttl) in &leases {
                t.restore(id, ttl, now);
            }
        }
        *self.lease_log.borrow_mut() = leases;
        self.reload_auth(&loaded.extras.auth);
        self.reload_alarms(&loaded.extras.alarms);
        self.checkpoint_index.set(index);
        self.last_write_index.set(index);
        self.deferred.borrow_mut().retain(|e| e.index > index);
        for &(rev, c) in &loaded.extras.decisions {
            self.decided(rev, c);
        }
        self.replica.installed(&self.wal);
        tracing::info!(
            shard = self.id,
            index,
            revision = loaded.info.last_revision,
            "installed the leader's checkpoint"
        );
        Ok(())
    }

    fn maybe_checkpoint(self: &Rc<Self>) {
        let since = self
            .last_write_index
            .get()
            .saturating_sub(self.checkpoint_index.get());
        // Cluster members keep their whole log until they cut checkpoints at a committed index
        // (see `checkpoint`), so they do not try.
        if self.checkpoint_every > 0
            && since >= self.checkpoint_every
            && !self.checkpointing.get()
            && !self.replica.has_peers()
        {
            let shard = self.clone();
            glommio::spawn_local(async move {
                if let Err(e) = shard.checkpoint().await {
                    tracing::warn!(error = %e, "background checkpoint failed; the WAL keeps everything");
                }
            })
            .detach();
        }
    }

    /// Serves the values a durable checkpoint holds (revisions up to `upto`) from its mapping
    /// instead of the heap, and its keys from compact arenas: without this, every value written
    /// stays on the heap until a restart, and every key costs two small allocations.
    /// Runs in chunks, yielding between them; the checkpoint is already in place, so a failure
    /// only leaves values on the heap. Runs while the shard is marked as checkpointing, so no
    /// rebuild or install swaps the store meanwhile (it would still be correct: see
    /// `ShardStore::adopt`).
    async fn adopt_values(&self, path: &std::path::Path, upto: i64) {
        let owned = path.to_path_buf();
        let cached = glommio::executor()
            .spawn_blocking(move || checkpoint::read_into_page_cache(&owned))
            .await;
        if let Err(e) = cached {
            tracing::debug!(error = %e, path = %path.display(), "checkpoint not read ahead; its pages fault in");
        }
        let mut scan = match checkpoint::ValueScan::open(path) {
            Ok(scan) => scan,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint not mapped; its values stay on the heap");
                return;
            }
        };
        let pacer = crate::runtime::Pacer::new();
        loop {
            pacer.pace().await;
            let mut store = self.store.borrow_mut();
            let step = scan.step(1024, |key, puts| {
                debug_assert!(puts.iter().all(|(rev, _)| *rev <= upto));
                store.adopt(key, puts);
            });
            match step {
                Ok(checkpoint::Scanned::Done) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "checkpoint not adopted; its values stay on the heap");
                    return;
                }
            }
        }
        let mut after = 0;
        loop {
            pacer.pace().await;
            let step = self
                .store
                .borrow_mut()
                .adopt_event_values(after, upto, 4096);
            match step {
                Some(next) => after = next,
                None => break,
            }
        }
        checkpoint::release_free_memory();
    }

    /// Writes a checkpoint of this shard at its current log position, then drops WAL segments it
    /// covers. Writes continue while it runs.
    pub async fn checkpoint(self: Rc<Self>) -> Result<CheckpointInfo> {
        self.checkpoint_with(Bytes::new).await
    }

    /// [`Self::checkpoint`]; `membership` gives shard 0's membership record as of the
    /// checkpoint, for a cluster member (it is the shard's snapshot a lagging member installs).
    pub async fn checkpoint_with(
        self: Rc<Self>,
        membership: impl FnOnce() -> Bytes,
    ) -> Result<CheckpointInfo> {
        if self.checkpointing.replace(true) {
            return Err(Error::InvalidArgument(format!(
                "shard {} is already writing a checkpoint",
                self.id
            )));
        }
        let result = self.checkpoint_inner(membership).await;
        self.checkpointing.set(false);
        result
    }

    /// Whether enough log accumulated since the last checkpoint that a member should cut one.
    pub fn wants_checkpoint(&self) -> bool {
        let since = self
            .replica
            .applied()
            .saturating_sub(self.checkpoint_index.get());
        self.checkpoint_every > 0
            && since >= self.checkpoint_every
            && !self.checkpointing.get()
            && self.replica.pending_install().is_none()
    }

    async fn checkpoint_inner(&self, membership: impl FnOnce() -> Bytes) -> Result<CheckpointInfo> {
        let member = self.replica.has_peers();
        // Capture a position with no undecided multi-shard part, so everything at or below it is
        // final. A follower's store holds exactly what it applied, all of it committed; a
        // leader's holds what it executed, which must commit before the checkpoint may stand
        // for it.
        let (index, upto, leases, auth, alarms, appended) = {
            let _guard = self.acquire().await?;
            self.ensure_healthy()?;
            if self.replica.pending_install().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "shard {} is installing a snapshot",
                    self.id
                )));
            }
            if member && !self.pending_records.borrow().is_empty() {
                // The part such a record decides would be folded into the checkpoint while the
                // record exists only in memory: log it first.
                return Err(Error::InvalidArgument(format!(
                    "shard {} has outcome records to log first",
                    self.id
                )));
            }
            if self.replica.is_stale() || self.rebuilding.get() {
                // The store holds writes that may not commit, or is being replaced.
                return Err(Error::InvalidArgument(format!(
                    "shard {} is being rebuilt",
                    self.id
                )));
            }
            // A member's store holds exactly what it applied (a leader counts its own
            // proposals as applied; a new leader may still be applying its predecessor's).
            let index = if member {
                self.replica.applied()
            } else {
                self.wal.next_index() - 1
            };
            let leases: Vec<(i64, i64)> = self
                .lease_log
                .borrow()
                .iter()
                .map(|(&id, &ttl)| (id, ttl))
                .collect();
            // Shard 0's auth state mirrors its log (changes are installed in the same step as
            // their proposal, or applied in log order), so it is taken in this same step.
            let auth = match (self.id, self.shared_auth()) {
                (0, Some(a)) if a.read(|s| *s != AuthStore::new()) => Bytes::from(a.encode()),
                _ => Bytes::new(),
            };
            // The alarm set mirrors the log the same way.
            let alarms = match (self.id, self.shared_alarms()) {
                (0, Some(a)) => a.get(),
                _ => Alarms::default(),
            };
            let alarms = if alarms.is_empty() {
                Bytes::new()
            } else {
                Bytes::from(alarms.encode())
            };
            let appended = self.wal.appended_bytes();
            (
                index,
                self.store.borrow().last_revision(),
                leases,
                auth,
                alarms,
                appended,
            )
        };
        let term = self
            .replica
            .term_at(index)
            .ok_or_else(|| Error::ShardFailed {
                shard: self.id,
                reason: format!("checkpoint index {index} is no longer in the Raft log"),
            })?;
        if member {
            // Members carry their leases in the checkpoint (a follower cannot re-log them).
            self.replica.wait_committed(&self.wal, index, term).await?;
        } else {
            self.wal.wait_durable(index).await?;
            self.replica.sync(&self.wal);
            // Recovery replays only entries after `index`: grants at or below it must be
            // repeated after it before the checkpoint can replace them.
            self.relog_after_checkpoint().await?;
        }
        // A snapshot installed (or a rebuild) meanwhile replaced what this checkpoint was cut
        // from: the index must still name the same entry, and nothing may be installing.
        if self.replica.term_at(index) != Some(term) || self.replica.pending_install().is_some() {
            return Err(Error::InvalidArgument(format!(
                "shard {}: the log changed under the checkpoint at {index}",
                self.id
            )));
        }
        let extras = checkpoint::Extras {
            decisions: self
                .decisions
                .borrow()
                .iter()
                .map(|(&r, &c)| (r, c))
                .collect(),
            leases,
            auth,
            alarms,
            membership: if member && self.id == 0 {
                membership()
            } else {
                Bytes::new()
            },
        };
        let compact = self.store.borrow().compact_revision();
        let info = CheckpointInfo {
            shard: self.id,
            index,
            term,
            last_revision: upto,
            compact_revision: compact,
            key_count: 0,
        };
        let after: RefCell<Option<bytes::Bytes>> = RefCell::new(None);
        let done = Cell::new(false);
        let pacer = crate::runtime::Pacer::new();
        let path = checkpoint::write(&self.dir, info, &extras, || async {
            if done.get() {
                return None;
            }
            pacer.pace().await;
            let chunk = {
                let store = self.store.borrow();
                let a = after.borrow();
                store.export_keys(a.as_deref(), EXPORT_STEP_KEYS, upto)
            };
            if chunk.len() < EXPORT_STEP_KEYS {
                done.set(true);
            }
            let last = chunk.last()?.key.clone();
            *after.borrow_mut() = Some(last);
            let mut bytes = Vec::new();
            checkpoint::encode_histories(&chunk, &mut bytes);
            Some((bytes, chunk.len() as u64))
        })
        .await?;
        self.checkpoint_index.set(index);
        self.replica.compact(index)?;
        if member {
            // The segments about to go may hold the newest hard state record: log it again and
            // keep the segment it lands in.
            self.wal.make_room(4096).await?;
            if let Some(seq) = self.replica.relog_hard_state(&self.wal) {
                let keep = self.wal.append_segment().unwrap_or(0);
                self.wal.wait_synced(seq).await?;
                self.wal.drop_through_keeping(index, keep)?;
            }
        } else {
            self.wal.drop_through(index)?;
        }
        for (i, old) in checkpoint::list(&self.dir)? {
            if i < index {
                std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
            }
        }
        tracing::debug!(shard = self.id, index, revision = upto, path = %path.display(), "checkpoint written");
        self.wal_dead.set(appended);
        self.adopt_values(&path, upto).await;
        // The export read the values still served from the log segment.
        self.wal.release_pages();
        Ok(info)
    }
}

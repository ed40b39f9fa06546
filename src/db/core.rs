//! The per-core loop: the messages a core's inbox carries, and the executor task that owns a
//! core's shards and serves them (shard ops, client requests, watch feeds).
//!
//! Separate from the handle in `mod.rs` because everything here runs inside one pinned glommio
//! executor and is not `Send`; the handle only sends messages to it.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::recover::RecoveredShard;
use super::route::Shared;
use super::{lease, wait_async, CoreHook, LocalDb, Status};
use crate::engine::checkpoint::CheckpointInfo;
use crate::engine::revision::CoreRevisions;
use crate::engine::shard::Shard;
use crate::engine::watch::{self, ChangeSource, Hub, WatchEvent, WatchRequest, WatchSink};
use crate::error::{Error, Result};
use crate::kv::*;
use crate::mvcc::{CompareOutcome, OpPartial, ShardRange, TxnPath};
use crate::runtime::stages::{Stage, Tracer};
use crate::wal::{Wal, WalOptions};

pub(super) type Reply<T> = flume::Sender<Result<T>>;

pub(super) fn oneshot<T>() -> (Reply<T>, flume::Receiver<Result<T>>) {
    flume::bounded(1)
}

/// A client request as it reaches a core.
pub(super) enum ClientReq {
    Range(RangeRequest, Reply<RangeResponse>),
    Txn(Arc<TxnRequest>, Reply<TxnResponse>),
    /// A single-shard write timed by stage (`runtime::stages`): sent at the instant given; the
    /// reply carries the instant the owning core finished, where the hop back starts.
    TracedWrite(Arc<TxnRequest>, Instant, Reply<(TxnResponse, Instant)>),
    Compact(CompactionRequest, Reply<CompactionResponse>),
    Checkpoint(Reply<Vec<CheckpointInfo>>),
    Status(Reply<Status>),
    /// Start a watch for an embedding thread (see [`Db::watch`](super::Db::watch)).
    Watch(Box<WatchRequest>, WatchSink, Reply<u64>),
    WatchCancel(u64),
}

/// What one core asks of a shard it does not own.
pub(super) enum ShardOp {
    Range(Arc<RangeRequest>, i64, Reply<ShardRange>),
    Write(Arc<TxnRequest>, Reply<(TxnPath, Vec<OpPartial>, i64)>),
    /// Lock for a coordinator, then evaluate compares (and, when the path is already known, check
    /// the part) at the latest state.
    LockEval(
        u64,
        Arc<TxnRequest>,
        Arc<Vec<Compare>>,
        Option<Arc<TxnPath>>,
        Reply<LockEval>,
    ),
    Compare(Arc<Vec<Compare>>, i64, Reply<Vec<CompareOutcome>>),
    Check(Arc<TxnRequest>, Arc<TxnPath>, i64, Reply<bool>),
    /// Validate and execute a part that writes nothing on this shard.
    ReadExec(Arc<TxnRequest>, Arc<TxnPath>, i64, Reply<Vec<OpPartial>>),
    Prepare(
        Arc<TxnRequest>,
        Arc<TxnPath>,
        i64,
        Vec<u32>,
        Reply<Vec<OpPartial>>,
    ),
    Commit(i64, u64, Reply<()>),
    Abort(i64, u64, Reply<()>),
    /// Undo a part whose write leadership left undecided, and rebuild (`Shard::abandon`).
    Abandon(i64, u64, Reply<()>),
    /// What this shard knows of its part of the multi-shard write at a revision.
    PartStatus(i64, Reply<crate::engine::shard::PartStatus>),
    Unlock(u64, Reply<()>),
    Compact(i64, Reply<()>),
    Checkpoint(Reply<CheckpointInfo>),
    Stats(Reply<(u64, u64, u64, crate::wal::SyncStats)>),
    /// The shard's changes in some ranges between two revisions (watch feed).
    Changes(Arc<Vec<KeyRange>>, i64, i64, bool, Reply<watch::ShardPage>),
    /// Up to `max` key histories after a key, revisions up to a bound (snapshots, hashes).
    Export(
        Option<bytes::Bytes>,
        usize,
        i64,
        Reply<Vec<crate::mvcc::KeyHistory>>,
    ),
    /// Lease logging and attached keys (see `db::lease`).
    Lease(lease::LeaseOp),
    /// Hand the shard's leadership to a member (MoveLeader).
    Transfer(u64, Reply<()>),
    /// Confirm with Raft's ReadIndex that this member still leads (shard 0 only).
    ReadIndex(Reply<u64>),
    /// This leader's read stamp for the shard at a revision (a follower's read barrier).
    Stamp(i64, Reply<crate::peer::ReadStamp>),
    /// A membership change (shard 0 only, see `db::members`); replies with the member's id.
    Member(super::members::MemberOp, Reply<u64>),
}

/// What a shard reports once locked for a coordinator.
pub(super) struct LockEval {
    /// Revision the evaluation saw (everything applied on the shard is at or below it).
    pub(super) latest: i64,
    pub(super) compares: Result<Vec<CompareOutcome>>,
    /// Whether the part writes, when the path was known up front.
    pub(super) writes: Option<Result<bool>>,
}

pub(super) enum Msg {
    Client(ClientReq),
    Shard(u32, ShardOp),
    /// A Raft message from a peer for a shard this core owns (it arrived on another core).
    Peer(u32, crate::raft::Message),
    /// A leader's read stamp for a shard this core owns (it arrived on another core).
    Stamp(crate::peer::ReadStamp),
    Shutdown,
}

pub(super) struct Core {
    pub(super) id: usize,
    pub(super) shared: Arc<Shared>,
    pub(super) revs: CoreRevisions,
    pub(super) shards: BTreeMap<u32, Rc<Shard>>,
    tokens: std::cell::Cell<u64>,
    /// This core's peer transport (cluster members only).
    pub(super) transport: std::cell::RefCell<Option<Rc<crate::peer::Transport>>>,
    /// Watches whose consumers live on this core.
    pub(super) hub: Rc<Hub>,
    /// Snapshot transfers to and from this core's shards (cluster members).
    pub(super) catchup: Rc<super::catchup::Catchup>,
    /// When each member last spoke in shard 0's group (on the core owning shard 0).
    pub(super) heard: std::cell::RefCell<std::collections::HashMap<u64, std::time::Instant>>,
    /// Client calls relayed to or from the leader node through this core's transport.
    pub(super) relay: super::relay::Relay,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run_core(
    id: usize,
    shared: Arc<Shared>,
    inbox: flume::Receiver<Msg>,
    recovered: Vec<RecoveredShard>,
    wal_opts: WalOptions,
    checkpoint_every: u64,
    ready: Reply<()>,
    after_recovery: Option<fn()>,
    hook: Option<CoreHook>,
) {
    let mut shards = BTreeMap::new();
    for r in recovered {
        let opened = async {
            let wal = Wal::open(&r.dir.join("wal"), r.id, wal_opts.clone(), &r.wal).await?;
            if let Some((index, term)) = r.anchor {
                wal.anchor(index, term).await?;
                wal.wait_durable(index).await?;
            }
            let shard = Shard::new(
                r.id,
                r.dir.clone(),
                shared.nshards,
                shared.partitioner,
                r.store,
                wal,
                r.replica,
                r.checkpoint_index,
                checkpoint_every,
                shared.leases.clone(),
                r.leases,
                r.decisions,
            );
            shard.replica.start(&shard.wal).await?;
            if shard.replica.has_peers() {
                // Its records stay in the Raft log for followers: none is settled from the log.
                shard.wal.stop_placing();
            }
            shared
                .raft_term
                .fetch_max(shard.replica.term(), Ordering::Relaxed);
            for rev in r.aborts {
                shard.log_abort(rev).await?;
            }
            Ok::<_, Error>(shard)
        }
        .await;
        match opened {
            Ok(shard) => {
                shards.insert(r.id, shard);
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                for s in shards.values() {
                    s.wal.close().await;
                }
                return;
            }
        }
    }
    let core = Rc::new(Core {
        id,
        revs: CoreRevisions::new(shared.clock.clone(), id),
        shared,
        shards,
        tokens: Default::default(),
        transport: Default::default(),
        catchup: Default::default(),
        hub: Hub::new(),
        heard: Default::default(),
        relay: Default::default(),
    });
    if let Err(e) = super::cluster::start(&core) {
        let _ = ready.send(Err(e));
        for s in core.shards.values() {
            s.wal.close().await;
        }
        return;
    }
    if let Some(f) = after_recovery {
        f();
    }
    let _ = ready.send(Ok(()));
    if id == 0 {
        glommio::spawn_local(lease::expiry_loop(LocalDb { core: core.clone() })).detach();
    }
    if let Some(hook) = hook {
        hook(LocalDb { core: core.clone() });
    }
    while let Ok(msg) = inbox.recv_async().await {
        match msg {
            Msg::Shutdown => break,
            Msg::Client(req) => {
                let core = core.clone();
                glommio::spawn_local(async move { core.client(req).await }).detach();
            }
            Msg::Shard(shard, op) => {
                let core = core.clone();
                glommio::spawn_local(async move { core.shard_op(shard, op).await }).detach();
            }
            Msg::Peer(shard, m) => core.peer_message(shard, m),
            Msg::Stamp(st) => core.peer_stamp(st),
        }
    }
    if let Some(t) = core.transport.borrow_mut().take() {
        t.close();
    }
    for s in core.shards.values() {
        s.wal.close().await;
    }
    tracing::debug!(core = core.id, "core stopped");
}

impl Core {
    /// A lock token unique across cores: core id in the high bits, a per-core counter below.
    pub(super) fn next_token(&self) -> u64 {
        let n = self.tokens.get() + 1;
        self.tokens.set(n);
        ((self.id as u64) << 48) | n
    }

    /// Runs `op` on `shard`, locally or by message to its core, and awaits the reply.
    pub(super) async fn call<T>(
        self: &Rc<Self>,
        shard: u32,
        make: impl FnOnce(Reply<T>) -> ShardOp,
    ) -> Result<T> {
        let (tx, rx) = oneshot();
        let op = make(tx);
        let core = self.shared.core_of(shard);
        if core == self.id {
            self.clone().shard_op(shard, op).await;
        } else {
            self.send_remote(core, shard, op);
        }
        wait_async(rx).await
    }

    fn send_remote(&self, core: usize, shard: u32, op: ShardOp) {
        if let Err(flume::SendError(Msg::Shard(_, op))) =
            self.shared.inboxes[core].send(Msg::Shard(shard, op))
        {
            reply_err(op, || Error::Closed);
        }
    }

    /// Starts `op` on `shard` now and returns where its reply will arrive, so that operations on
    /// several shards run concurrently.
    pub(super) fn dispatch<T>(
        self: &Rc<Self>,
        shard: u32,
        make: impl FnOnce(Reply<T>) -> ShardOp,
    ) -> flume::Receiver<Result<T>> {
        let (tx, rx) = oneshot();
        let op = make(tx);
        let core = self.shared.core_of(shard);
        if core == self.id {
            let me = self.clone();
            glommio::spawn_local(async move { me.shard_op(shard, op).await }).detach();
        } else {
            self.send_remote(core, shard, op);
        }
        rx
    }

    /// Runs an op on every shard in `shards` concurrently; results in the same order.
    pub(super) async fn call_all<T>(
        self: &Rc<Self>,
        shards: &[u32],
        make: impl Fn(Reply<T>) -> ShardOp,
    ) -> Vec<Result<T>> {
        let pending: Vec<_> = shards.iter().map(|&s| self.dispatch(s, &make)).collect();
        let mut out = Vec::with_capacity(pending.len());
        for rx in pending {
            out.push(wait_async(rx).await);
        }
        out
    }

    /// Sends an op whose reply nobody waits for (commit, unlock).
    pub(super) fn tell(self: &Rc<Self>, shards: &[u32], make: impl Fn(Reply<()>) -> ShardOp) {
        for &s in shards {
            drop(self.dispatch(s, &make));
        }
    }

    /// Every request that hops to this core is spawned as this future, so its size is paid per
    /// request: the rare, large operations are boxed and only the hot ones stay inline.
    async fn shard_op(self: Rc<Self>, id: u32, op: ShardOp) {
        let Some(shard) = self.shards.get(&id).cloned() else {
            let core = self.id;
            reply_err(op, || {
                Error::InvalidArgument(format!("shard {id} is not on core {core}"))
            });
            return;
        };
        match op {
            ShardOp::Range(req, rev, r) => {
                let _ = r.send(shard.range(&req, rev));
            }
            ShardOp::Write(txn, r) => {
                let _ = r.send(shard.write_single(&self.revs, &txn, None).await);
            }
            ShardOp::LockEval(token, txn, cmps, path, r) => {
                if let Err(e) = shard.lock_for_coordinator(token).await {
                    let _ = r.send(Err(e));
                    return;
                }
                let latest = self.shared.clock.current();
                let eval = LockEval {
                    latest,
                    compares: shard.compare(&cmps, latest),
                    writes: path.map(|p| shard.check(&txn, &p, latest)),
                };
                let _ = r.send(Ok(eval));
            }
            ShardOp::Compare(cmps, rev, r) => {
                let _ = r.send(shard.compare(&cmps, rev));
            }
            ShardOp::Check(txn, path, rev, r) => {
                let _ = r.send(shard.check(&txn, &path, rev));
            }
            ShardOp::ReadExec(txn, path, rev, r) => {
                let res = shard
                    .check(&txn, &path, rev)
                    .map(|_| shard.execute_read(&txn, &path, rev));
                let _ = r.send(res);
            }
            ShardOp::Prepare(txn, path, rev, parts, r) => {
                let _ = r.send(Box::pin(shard.prepare(&txn, &path, rev, parts)).await);
            }
            ShardOp::Commit(rev, token, r) => {
                shard.commit(rev, token);
                let _ = r.send(Ok(()));
            }
            ShardOp::Abandon(rev, token, r) => {
                shard.abandon(rev, token);
                let _ = r.send(Ok(()));
            }
            ShardOp::PartStatus(rev, r) => {
                let _ = r.send(Ok(shard.part_status(rev)));
            }
            ShardOp::Abort(rev, token, r) => {
                let _ = r.send(Box::pin(shard.abort(rev, token)).await);
            }
            ShardOp::Unlock(token, r) => {
                shard.unlock_coordinator(token);
                let _ = r.send(Ok(()));
            }
            ShardOp::Compact(rev, r) => {
                let _ = r.send(Box::pin(shard.compact(rev)).await);
            }
            ShardOp::Checkpoint(r) => {
                let shared = self.shared.clone();
                let _ = r.send(
                    Box::pin(
                        shard
                            .clone()
                            .checkpoint_with(move || shared.membership_record()),
                    )
                    .await,
                );
            }
            ShardOp::Changes(ranges, after, upto, with_prev, r) => {
                let page = shard.ensure_readable().and_then(|()| {
                    watch::shard_page(&shard.store.borrow(), &ranges, after, upto, with_prev)
                });
                let _ = r.send(page);
            }
            ShardOp::Export(after, max, upto, r) => {
                let out = match shard.ensure_readable() {
                    Ok(()) => Ok(shard
                        .store
                        .borrow()
                        .export_keys(after.as_deref(), max, upto)),
                    Err(e) => Err(e),
                };
                let _ = r.send(out);
            }
            ShardOp::Stats(r) => {
                let keys = shard.store.borrow().key_count() as u64;
                // The shard's data: its checkpoint files and the log's records after the newest
                // checkpoint (not the log's preallocated segments, nor records a checkpoint
                // replaced, whose space the log reuses as it retires segments).
                let wal_dir = shard.dir.join("wal");
                let bytes = dir_bytes(&shard.dir).saturating_sub(dir_bytes(&wal_dir))
                    + shard.live_log_bytes();
                let _ = r.send(Ok((
                    keys,
                    bytes,
                    shard.wal.next_index() - 1,
                    shard.wal.sync_stats(),
                )));
            }
            ShardOp::Lease(op) => Box::pin(op.run(&shard)).await,
            ShardOp::Transfer(to, r) => {
                let _ = r.send(shard.replica.transfer_leader(&shard.wal, to));
            }
            ShardOp::ReadIndex(r) => {
                let _ = r.send(Box::pin(self.confirm_read(&shard)).await);
            }
            ShardOp::Stamp(revision, r) => {
                let _ = r.send(if shard.replica.role() == crate::raft::Role::Leader {
                    Ok(crate::peer::ReadStamp {
                        shard: id,
                        index: shard.replica.last_index(),
                        revision,
                    })
                } else {
                    Err(Error::LeaderChanged)
                });
            }
            ShardOp::Member(op, r) => {
                let _ = r.send(Box::pin(self.member_change(&shard, op)).await);
            }
        }
    }

    pub(super) async fn client(self: Rc<Self>, req: ClientReq) {
        match req {
            ClientReq::Watch(req, sink, r) => {
                let sink_id = self.hub.new_sink_id();
                let id = self
                    .hub
                    .watch(Rc::new(Feed(self.clone())), &req, sink_id, 0, sink);
                let _ = r.send(Ok(id));
            }
            ClientReq::WatchCancel(id) => {
                self.hub.cancel(id);
            }
            ClientReq::Range(req, r) => {
                let _ = r.send(self.range(req).await);
            }
            ClientReq::Txn(txn, r) => {
                let _ = r.send(self.txn(txn).await);
            }
            ClientReq::TracedWrite(txn, sent, r) => {
                let mut trace = Tracer::new(self.shared.stages.core(self.id), sent);
                trace.mark(Stage::HopToOwner);
                let res = self.txn_traced(txn, Some(&mut trace)).await;
                let _ = r.send(res.map(|resp| (resp, trace.last())));
            }
            ClientReq::Compact(req, r) => {
                let _ = r.send(Box::pin(self.compact(req)).await);
            }
            ClientReq::Checkpoint(r) => {
                let mut out = Vec::new();
                let mut res = Ok(());
                for s in 0..self.shared.nshards {
                    match self.call(s, ShardOp::Checkpoint).await {
                        Ok(i) => out.push(i),
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                let _ = r.send(res.map(|_| out));
            }
            ClientReq::Status(r) => {
                let mut st = Status {
                    revision: self.shared.clock.read_revision(),
                    compact_revision: self.shared.clock.compact_revision(),
                    shards: self.shared.nshards,
                    cores: self.shared.inboxes.len(),
                    ..Default::default()
                };
                let mut res = Ok(());
                for s in 0..self.shared.nshards {
                    match self.call(s, ShardOp::Stats).await {
                        Ok((k, b, i, sync)) => {
                            st.keys += k;
                            st.disk_bytes += b;
                            st.log_index = st.log_index.max(i);
                            st.fsyncs += sync.fsyncs;
                            st.fsync_seconds += sync.seconds;
                            st.fsync_buckets.resize(sync.buckets.len(), 0);
                            for (t, b) in st.fsync_buckets.iter_mut().zip(sync.buckets) {
                                *t += b;
                            }
                            st.queue_depths.push(sync.queued);
                        }
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                let _ = r.send(res.map(|_| st));
            }
        }
    }
}

/// The core as its watch hub's source of changes.
pub(super) struct Feed(pub(super) Rc<Core>);

impl ChangeSource for Feed {
    fn read_revision(&self) -> i64 {
        self.0.shared.clock.read_revision()
    }

    fn compact_revision(&self) -> i64 {
        self.0.shared.clock.compact_revision()
    }

    fn wait_revision(&self, rev: i64) -> watch::LocalFuture<'_, ()> {
        Box::pin(self.0.shared.clock.wait_visible(rev))
    }

    fn changes(
        &self,
        ranges: Arc<Vec<KeyRange>>,
        after: i64,
        upto: i64,
        with_prev: bool,
    ) -> watch::LocalFuture<'_, Result<(Vec<WatchEvent>, i64)>> {
        Box::pin(async move {
            let shared = &self.0.shared;
            let shards: Vec<u32> = if watch::single_keys(&ranges) {
                let set: std::collections::BTreeSet<u32> =
                    ranges.iter().map(|r| shared.shard_of(&r.start)).collect();
                set.into_iter().collect()
            } else {
                (0..shared.nshards).collect()
            };
            let pages = self
                .0
                .call_all(&shards, |r| {
                    ShardOp::Changes(ranges.clone(), after, upto, with_prev, r)
                })
                .await;
            let pages = pages.into_iter().collect::<Result<Vec<_>>>()?;
            Ok(watch::merge_pages(pages))
        })
    }
}

/// Answers `op` with an error without running it (shard missing, store closing).
fn reply_err(op: ShardOp, err: impl Fn() -> Error) {
    match op {
        ShardOp::Range(_, _, r) => drop(r.send(Err(err()))),
        ShardOp::Write(_, r) => drop(r.send(Err(err()))),
        ShardOp::LockEval(_, _, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::Commit(_, _, r)
        | ShardOp::Abort(_, _, r)
        | ShardOp::Abandon(_, _, r)
        | ShardOp::Unlock(_, r)
        | ShardOp::Transfer(_, r)
        | ShardOp::Compact(_, r) => drop(r.send(Err(err()))),
        ShardOp::Compare(_, _, r) => drop(r.send(Err(err()))),
        ShardOp::Check(_, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::ReadExec(_, _, _, r) | ShardOp::Prepare(_, _, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::Checkpoint(r) => drop(r.send(Err(err()))),
        ShardOp::PartStatus(_, r) => drop(r.send(Err(err()))),
        ShardOp::Member(_, r) => drop(r.send(Err(err()))),
        ShardOp::ReadIndex(r) => drop(r.send(Err(err()))),
        ShardOp::Stamp(_, r) => drop(r.send(Err(err()))),
        ShardOp::Stats(r) => drop(r.send(Err(err()))),
        ShardOp::Export(_, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::Lease(op) => op.reply_err(err()),
        ShardOp::Changes(_, _, _, _, r) => drop(r.send(Err(err()))),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir)
}

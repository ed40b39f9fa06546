//! `Db`: the engine as an embeddable, thread-safe handle.
//!
//! `Db::open` recovers every shard (newest checkpoint + WAL tail, multi-shard revisions resolved
//! across shards), then starts one pinned glommio executor per core, each owning its shards. The
//! handle routes each request to a core by message: single-key requests straight to the owning
//! shard's core, everything else to a core that coordinates the shards involved. Methods come in a
//! blocking form (any non-executor thread) and an `_async` form (any async runtime, including
//! another glommio executor).

mod catchup;
mod cluster;
mod core;
mod lease;
mod members;
mod recover;
mod relay;
mod route;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use self::cluster::ClusterOptions;
use self::cluster::ClusterState;
use self::core::{oneshot, run_core, ClientReq, Core, Feed, Msg, Reply, ShardOp};
use self::recover::{recover_all, recovered_leases, RecoveredShard};
pub use self::relay::{CallHandler, CallResult, RelayError};
use self::route::Shared;
use crate::engine::checkpoint::{self, CheckpointInfo};
use crate::engine::meta;
use crate::engine::revision::RevisionClock;
// Not used here: `lease` takes this module's names through `use super::*`.
use crate::engine::shard::Shard;
pub use crate::engine::watch::{WatchEvent, WatchRequest, WatchSink, WatchUpdate};
use crate::error::{Error, Result};
use crate::kv::*;
use crate::mvcc::plan;
use crate::runtime::stages::{Stage, StageSnapshot, Tracer};
use crate::wal::WalOptions;

pub use crate::engine::partition::Partitioner;

/// Appends `histories` (from [`LocalDb::export`]) in the checkpoint record encoding: the body of
/// spindle's snapshot stream and the input of its Hash/HashKV, so equal stores encode equally.
pub fn encode_export(histories: &[crate::mvcc::KeyHistory], out: &mut Vec<u8>) {
    checkpoint::encode_histories(histories, out)
}

/// Options for [`Db::open`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Executors (cores) to run; default: every CPU this process may use.
    pub cores: usize,
    /// Shards for a new data dir (default: `cores`); an existing data dir keeps its own count.
    pub shards: Option<u32>,
    /// Key-to-shard mapping for a new data dir.
    pub partitioner: Partitioner,
    /// Pin executors to CPUs when they use every CPU the process may (`runtime::core_placements`);
    /// off for tests that run many stores at once.
    pub pin: bool,
    pub wal_segment_size: u64,
    /// Write a checkpoint after this many log entries per shard (0 = only on demand).
    pub checkpoint_every: u64,
    /// etcd's `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// Run as a member of a cluster (etcd's cluster flags); `None` is a single node.
    pub cluster: Option<ClusterOptions>,
    /// Runs on each core's thread once its shards are recovered, before `Db::open` returns. The
    /// `spindle` binary has its allocator return what recovery freed here: mimalloc keeps a
    /// thread's freed memory until that thread allocates again, which an idle server's cores
    /// may not do for a long time.
    pub after_recovery: Option<fn()>,
    /// Benchmark baseline only: log records straight to the WAL without the shards' Raft
    /// groups (same log format, no consensus), to measure what Raft costs. Never for data.
    #[doc(hidden)]
    pub bypass_raft: bool,
}

impl Default for Options {
    fn default() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Options {
            cores,
            shards: None,
            partitioner: Partitioner::Directory,
            pin: true,
            wal_segment_size: WalOptions::default().segment_size,
            checkpoint_every: 100_000,
            max_txn_ops: plan::DEFAULT_MAX_TXN_OPS,
            cluster: None,
            after_recovery: None,
            bypass_raft: false,
        }
    }
}

/// Store-wide facts for status reporting.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    pub revision: i64,
    pub compact_revision: i64,
    pub shards: u32,
    pub cores: usize,
    pub keys: u64,
    /// Bytes of live data on disk: checkpoint files and the WAL's records after the newest
    /// checkpoint (not preallocated segment space, nor records a checkpoint replaced). Status
    /// reports it as `dbSize`; the quota is checked against it.
    pub disk_bytes: u64,
    /// Highest WAL index over shards (a stand-in for etcd's raft index on a single node).
    pub log_index: u64,
    /// WAL durable flushes (O_DSYNC writes), their total time and latency histogram (`runtime::LATENCY_BUCKETS`).
    pub fsyncs: u64,
    pub fsync_seconds: f64,
    pub fsync_buckets: Vec<u64>,
    /// Per shard: WAL records queued and not yet durable.
    pub queue_depths: Vec<u64>,
}

struct DbInner {
    shared: Arc<Shared>,
    next: AtomicUsize,
    closed: AtomicBool,
    threads: Mutex<Vec<glommio::ExecutorJoinHandle<()>>>,
    path: PathBuf,
    _lock: meta::DirLock,
}

/// An open store. Cheap to clone; every clone talks to the same executors.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

impl Db {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>, opts: Options) -> Result<Db> {
        Self::open_with(path, opts, None)
    }

    /// Opens the store and runs `hook` on every core once it serves: the network server starts
    /// its per-core listeners this way, so connections live on the cores that own the data.
    pub fn open_with(path: impl AsRef<Path>, opts: Options, hook: Option<CoreHook>) -> Result<Db> {
        let path = path.as_ref().to_path_buf();
        if opts.cores == 0 {
            return Err(Error::InvalidArgument("cores must be at least 1".into()));
        }
        // Before the lock creates anything: a newer spindle's dir is left as it is.
        meta::check_version(&path)?;
        let lock = meta::lock(&path)?;
        let wanted_shards = opts.shards.unwrap_or(opts.cores as u32);
        let cluster = match &opts.cluster {
            Some(c) => {
                let existing = meta::load(&path)?.map(|m| m.shards);
                Some(ClusterState::resolve(
                    &path,
                    c,
                    existing.unwrap_or(wanted_shards),
                )?)
            }
            None => None,
        };
        let identity = cluster.as_ref().map(|c| (c.cluster_id, c.member_id));
        let meta = meta::load_or_create(&path, wanted_shards, opts.partitioner, identity)?;
        let group = cluster.as_ref().map(|c| c.group());
        let (shards, current, compact) =
            recover_all(&path, meta.shards, opts.bypass_raft, group.as_ref())?;
        // etcd's store starts at revision 1 (its first write is revision 2); clients compare
        // revisions across servers, so an empty spindle starts there too.
        let current = current.max(1);
        let clock = RevisionClock::new(opts.cores, current, compact);
        if let Some(c) = &cluster {
            // A member that does not execute reads only what every shard has whole.
            let mut floors = vec![0; meta.shards as usize];
            for s in &shards {
                if let Some(f) = floors.get_mut(s.id as usize) {
                    *f = s.store.last_revision();
                }
            }
            clock.cap_follower_reads(c.gate.clone(), &floors);
        }
        let leases = recovered_leases(&shards);
        let auth = Arc::new(crate::auth::SharedAuth::new(
            shards
                .iter()
                .find(|s| s.id == 0)
                .map(|s| s.auth.clone())
                .unwrap_or_default(),
        ));
        let alarms = Arc::new(crate::alarm::SharedAlarms::new(
            shards
                .iter()
                .find(|s| s.id == 0)
                .map(|s| s.alarms.clone())
                .unwrap_or_default(),
        ));

        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..opts.cores {
            let (tx, rx) = flume::unbounded();
            senders.push(tx);
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            inboxes: senders,
            clock,
            partitioner: meta.partitioner,
            nshards: meta.shards,
            max_txn_ops: opts.max_txn_ops,
            cluster_id: meta.cluster_id,
            member_id: meta.member_id,
            leases,
            auth,
            alarms,
            raft_term: std::sync::atomic::AtomicU64::new(0),
            cluster,
            closing: AtomicBool::new(false),
            stages: crate::runtime::stages::PutStages::new(opts.cores),
        });
        let mut per_core: Vec<Vec<RecoveredShard>> = (0..opts.cores).map(|_| Vec::new()).collect();
        for s in shards {
            per_core[shared.core_of(s.id)].push(s);
        }
        let placements = crate::runtime::core_placements(opts.cores, opts.pin);
        let mut threads = Vec::new();
        let mut ready = Vec::new();
        for (core, ((rx, mine), placement)) in receivers
            .into_iter()
            .zip(per_core)
            .zip(placements)
            .enumerate()
        {
            let shared = shared.clone();
            let (ready_tx, ready_rx) = oneshot::<()>();
            let wal_opts = WalOptions {
                segment_size: opts.wal_segment_size,
            };
            let every = opts.checkpoint_every;
            let after_recovery = opts.after_recovery;
            let hook = hook.clone();
            let handle = crate::runtime::builder(placement, &format!("spindle-core-{core}"))
                .spawn(move || async move {
                    run_core(
                        core,
                        shared,
                        rx,
                        mine,
                        wal_opts,
                        every,
                        ready_tx,
                        after_recovery,
                        hook,
                    )
                    .await
                })
                .map_err(|e| Error::Executor(e.to_string()))?;
            threads.push(handle);
            ready.push(ready_rx);
        }
        let inner = DbInner {
            shared,
            next: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            threads: Mutex::new(threads),
            path,
            _lock: lock,
        };
        let db = Db {
            inner: Arc::new(inner),
        };
        for r in ready {
            if let Err(e) = r.recv().map_err(|_| Error::Closed).and_then(|r| r) {
                db.shutdown();
                return Err(e);
            }
        }
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `(cluster id, member id)`, fixed when the data dir was created.
    pub fn identity(&self) -> (u64, u64) {
        (self.inner.shared.cluster_id, self.inner.shared.member_id)
    }

    /// Whether this cluster member applied its own removal (MemberRemove).
    pub fn is_removed(&self) -> bool {
        self.inner
            .shared
            .cluster
            .as_ref()
            .is_some_and(|c| c.is_removed())
    }

    /// The highest Raft term of the shard groups.
    pub fn raft_term(&self) -> u64 {
        self.inner.shared.raft_term.load(Ordering::Relaxed)
    }

    fn send(&self, core: usize, msg: Msg) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.inner.shared.inboxes[core]
            .send(msg)
            .map_err(|_| Error::Closed)
    }

    fn any_core(&self) -> usize {
        self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.shared.inboxes.len()
    }

    fn submit_range(&self, req: RangeRequest) -> Result<flume::Receiver<Result<RangeResponse>>> {
        plan::validate_range(&req)?;
        let core = self
            .inner
            .shared
            .range_core(&req)
            .unwrap_or_else(|| self.any_core());
        let (tx, rx) = oneshot();
        self.send(core, Msg::Client(ClientReq::Range(req, tx)))?;
        Ok(rx)
    }

    fn submit_txn(&self, txn: TxnRequest) -> Result<flume::Receiver<Result<TxnResponse>>> {
        let core = self
            .inner
            .shared
            .txn_core(&txn)
            .unwrap_or_else(|| self.any_core());
        let (tx, rx) = oneshot();
        self.send(core, Msg::Client(ClientReq::Txn(Arc::new(txn), tx)))?;
        Ok(rx)
    }

    fn submit_compact(
        &self,
        req: CompactionRequest,
    ) -> Result<flume::Receiver<Result<CompactionResponse>>> {
        let (tx, rx) = oneshot();
        self.send(self.any_core(), Msg::Client(ClientReq::Compact(req, tx)))?;
        Ok(rx)
    }

    pub fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        wait(self.submit_range(req)?)
    }

    pub async fn range_async(&self, req: RangeRequest) -> Result<RangeResponse> {
        wait_async(self.submit_range(req)?).await
    }

    pub fn put(&self, req: PutRequest) -> Result<PutResponse> {
        plan::validate_put(&req)?;
        put_response(wait(self.submit_txn(single_op_txn(RequestOp::Put(req)))?)?)
    }

    pub async fn put_async(&self, req: PutRequest) -> Result<PutResponse> {
        plan::validate_put(&req)?;
        put_response(wait_async(self.submit_txn(single_op_txn(RequestOp::Put(req)))?).await?)
    }

    pub fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        plan::validate_delete(&req)?;
        delete_response(wait(
            self.submit_txn(single_op_txn(RequestOp::DeleteRange(req)))?,
        )?)
    }

    pub async fn delete_range_async(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        plan::validate_delete(&req)?;
        delete_response(
            wait_async(self.submit_txn(single_op_txn(RequestOp::DeleteRange(req)))?).await?,
        )
    }

    pub fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        plan::validate_txn(&req, self.inner.shared.max_txn_ops)?;
        wait(self.submit_txn(req)?)
    }

    pub async fn txn_async(&self, req: TxnRequest) -> Result<TxnResponse> {
        plan::validate_txn(&req, self.inner.shared.max_txn_ops)?;
        wait_async(self.submit_txn(req)?).await
    }

    pub fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse> {
        wait(self.submit_compact(req)?)
    }

    pub async fn compact_async(&self, req: CompactionRequest) -> Result<CompactionResponse> {
        wait_async(self.submit_compact(req)?).await
    }

    /// Writes a checkpoint of every shard now (etcd's defragment maps here).
    pub fn checkpoint(&self) -> Result<Vec<CheckpointInfo>> {
        let (tx, rx) = oneshot();
        self.send(self.any_core(), Msg::Client(ClientReq::Checkpoint(tx)))?;
        wait(rx)
    }

    pub fn status(&self) -> Result<Status> {
        let (tx, rx) = oneshot();
        self.send(self.any_core(), Msg::Client(ClientReq::Status(tx)))?;
        wait(rx)
    }

    /// The revision every reader currently sees.
    pub fn revision(&self) -> i64 {
        self.inner.shared.clock.read_revision()
    }

    /// Starts a watch with etcd's semantics: every change in the range from `start_revision`
    /// (or from now) on, in revision order, a multi-shard txn's events together. Dropping the
    /// [`Watch`] cancels it. A consumer that falls behind loses nothing; it catches up from
    /// history unless compaction removed it, which ends the watch with
    /// [`WatchUpdate::Compacted`].
    pub fn watch(&self, req: WatchRequest) -> Result<Watch> {
        let (sink, rx) = flume::bounded(WATCH_BUFFER);
        let (tx, reply) = oneshot();
        let core = self.any_core();
        self.send(core, Msg::Client(ClientReq::Watch(Box::new(req), sink, tx)))?;
        let id = wait(reply)?;
        Ok(Watch {
            rx,
            id,
            core,
            db: self.clone(),
        })
    }

    /// Flushes and stops the executors. Other clones then return [`Error::Closed`].
    pub fn close(self) {
        self.shutdown();
    }

    fn shutdown(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.shared.closing.store(true, Ordering::Relaxed);
        for inbox in &self.inner.shared.inboxes {
            let _ = inbox.send(Msg::Shutdown);
        }
        let threads =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            if let Err(e) = t.join() {
                tracing::error!(error = ?e, "executor thread ended abnormally");
            }
        }
    }
}

impl Drop for DbInner {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            for inbox in &self.shared.inboxes {
                let _ = inbox.send(Msg::Shutdown);
            }
            for t in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner())) {
                let _ = t.join();
            }
        }
    }
}

/// Updates a [`Watch`] buffers before its watcher falls back to catching up from history.
const WATCH_BUFFER: usize = 1024;

/// A running watch from [`Db::watch`].
pub struct Watch {
    rx: flume::Receiver<(i64, WatchUpdate)>,
    id: u64,
    core: usize,
    db: Db,
}

impl Watch {
    /// Waits for the next update; `Err(Closed)` once the store closed.
    pub fn recv(&self) -> Result<WatchUpdate> {
        self.rx.recv().map(|(_, u)| u).map_err(|_| Error::Closed)
    }

    /// Like [`Self::recv`], giving up after `timeout` with `Ok(None)`.
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Result<Option<WatchUpdate>> {
        match self.rx.recv_timeout(timeout) {
            Ok((_, u)) => Ok(Some(u)),
            Err(flume::RecvTimeoutError::Timeout) => Ok(None),
            Err(flume::RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    pub async fn recv_async(&self) -> Result<WatchUpdate> {
        self.rx
            .recv_async()
            .await
            .map(|(_, u)| u)
            .map_err(|_| Error::Closed)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self
            .db
            .send(self.core, Msg::Client(ClientReq::WatchCancel(self.id)));
    }
}

/// Called on every core once it serves (see [`Db::open_with`]).
pub type CoreHook = Arc<dyn Fn(LocalDb) + Send + Sync>;

/// The engine seen from inside one of its executors: a request for data this core owns runs
/// here without a hop; anything else goes to the owning core by message. Not `Send`.
#[derive(Clone)]
pub struct LocalDb {
    core: Rc<Core>,
}

impl LocalDb {
    pub fn core_id(&self) -> usize {
        self.core.id
    }

    pub fn cores(&self) -> usize {
        self.core.shared.inboxes.len()
    }

    /// `(cluster id, member id)`, fixed when the data dir was created.
    pub fn identity(&self) -> (u64, u64) {
        (self.core.shared.cluster_id, self.core.shared.member_id)
    }

    /// The highest Raft term of the shard groups (what response headers report).
    pub fn raft_term(&self) -> u64 {
        self.core.shared.raft_term.load(Ordering::Relaxed)
    }

    /// Whether this store is a member of a cluster (then another member may lead).
    pub fn is_cluster_member(&self) -> bool {
        self.core.shared.cluster.is_some()
    }

    /// The cluster's members (`None` on a single node).
    pub fn members(&self) -> Option<Vec<crate::cluster::Member>> {
        let cl = self.core.shared.cluster.as_ref()?;
        let info = cl.peer_info.read().ok();
        Some(
            cl.membership()
                .members
                .into_values()
                .map(|mut m| {
                    // A member added at run time is unnamed in the record until it starts;
                    // once it has connected, its handshake says who it is.
                    if let Some(i) = info.as_ref().and_then(|u| u.get(&m.id)) {
                        m.client_urls = i.client_urls.clone();
                        if m.name.is_empty() {
                            m.name = i.name.clone();
                        }
                    }
                    m
                })
                .collect(),
        )
    }

    /// The member leading the cluster (the leader of shard 0) as this node last saw it; 0 when
    /// there is none. A single node leads itself.
    pub fn leader(&self) -> u64 {
        match &self.core.shared.cluster {
            Some(cl) => cl.leader_node(),
            None => self.core.shared.member_id,
        }
    }

    /// On a cluster member, before a linearizable read: see `Core::confirm_read`. Nothing on a
    /// single node.
    async fn confirm_leadership(&self) -> Result<()> {
        if self.core.shared.cluster.is_none() {
            return Ok(());
        }
        self.core.call(0, ShardOp::ReadIndex).await.map(drop)
    }

    /// The current compaction revision.
    pub fn compact_revision(&self) -> i64 {
        self.core.shared.clock.compact_revision()
    }

    /// The revision every reader currently sees.
    pub fn revision(&self) -> i64 {
        self.core.shared.clock.read_revision()
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        plan::validate_range(&req)?;
        if !req.serializable {
            self.confirm_leadership().await?;
        }
        match self.core.shared.range_core(&req) {
            Some(c) if c != self.core.id => {
                let (tx, rx) = oneshot();
                self.forward(c, ClientReq::Range(req, tx))?;
                wait_async(rx).await
            }
            _ => self.core.range(req).await,
        }
    }

    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        plan::validate_txn(&req, self.core.shared.max_txn_ops)?;
        self.txn_unchecked(req).await
    }

    async fn txn_unchecked(&self, req: TxnRequest) -> Result<TxnResponse> {
        if !plan::txn_has_writes(&req) {
            // A write confirms leadership by committing; a read-only txn asks Raft.
            self.confirm_leadership().await?;
        }
        match self.core.shared.txn_core(&req) {
            Some(c) if c != self.core.id => {
                let (tx, rx) = oneshot();
                self.forward(c, ClientReq::Txn(Arc::new(req), tx))?;
                wait_async(rx).await
            }
            _ => self.core.txn(Arc::new(req)).await,
        }
    }

    pub async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        plan::validate_put(&req)?;
        put_response(
            self.txn_unchecked(single_op_txn(RequestOp::Put(req)))
                .await?,
        )
    }

    /// A tracer timing a put that arrived on this core at `started` (see [`Self::put_traced`]).
    pub fn put_tracer(&self, started: Instant) -> Tracer<'_> {
        Tracer::new(self.core.shared.stages.core(self.core.id), started)
    }

    /// [`Self::put`], timing its stages from the tracer's last mark: routing here, then either
    /// the hop to the owning core, the owner's stages and the hop back, or the owner's stages
    /// here. The caller marks what comes before and after.
    pub async fn put_traced(&self, req: PutRequest, trace: &mut Tracer<'_>) -> Result<PutResponse> {
        plan::validate_put(&req)?;
        let txn = Arc::new(single_op_txn(RequestOp::Put(req)));
        match self.core.shared.txn_core(&txn) {
            Some(c) if c != self.core.id => {
                let (tx, rx) = oneshot();
                trace.mark(Stage::Route);
                self.forward(c, ClientReq::TracedWrite(txn, trace.last(), tx))?;
                let (resp, done) = wait_async(rx).await?;
                trace.skip_to(done);
                trace.mark(Stage::HopBack);
                put_response(resp)
            }
            _ => {
                trace.mark(Stage::Route);
                put_response(self.core.txn_traced(txn, Some(trace)).await?)
            }
        }
    }

    /// Every core's put stage histograms, merged.
    pub fn put_stages(&self) -> Vec<StageSnapshot> {
        self.core.shared.stages.snapshot()
    }

    pub async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        plan::validate_delete(&req)?;
        delete_response(
            self.txn_unchecked(single_op_txn(RequestOp::DeleteRange(req)))
                .await?,
        )
    }

    pub async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse> {
        self.core.compact(req).await
    }

    pub async fn status(&self) -> Result<Status> {
        let (tx, rx) = oneshot();
        self.core.clone().client(ClientReq::Status(tx)).await;
        wait_async(rx).await
    }

    /// Writes a checkpoint of every shard now (what etcd's Defragment maps to).
    pub async fn checkpoint(&self) -> Result<Vec<CheckpointInfo>> {
        let (tx, rx) = oneshot();
        self.core.clone().client(ClientReq::Checkpoint(tx)).await;
        wait_async(rx).await
    }

    pub fn shards(&self) -> u32 {
        self.core.shared.nshards
    }

    /// Up to `max` key histories of `shard` after `after`, with revisions up to `upto`: a
    /// consistent cut when every shard is read with the same `upto` at or below the read revision.
    pub async fn export(
        &self,
        shard: u32,
        after: Option<bytes::Bytes>,
        max: usize,
        upto: i64,
    ) -> Result<Vec<crate::mvcc::KeyHistory>> {
        self.core
            .call(shard, |r| ShardOp::Export(after, max, upto, r))
            .await
    }

    /// Starts a watch delivering to `sink` as `(tag, update)` (see [`crate::engine::watch::Hub`]).
    /// `sink_id` groups the watches of one consumer (from [`Self::new_watch_sink`]).
    pub fn watch(&self, req: &WatchRequest, sink_id: u64, tag: i64, sink: WatchSink) -> u64 {
        let feed = Rc::new(Feed(self.core.clone()));
        self.core.hub.watch(feed, req, sink_id, tag, sink)
    }

    pub fn new_watch_sink(&self) -> u64 {
        self.core.hub.new_sink_id()
    }

    /// Stops a watch; false if it was not running.
    pub fn watch_cancel(&self, id: u64) -> bool {
        self.core.hub.cancel(id)
    }

    /// Asks for a progress notice on one watch.
    pub fn watch_progress(&self, id: u64) {
        self.core.hub.progress(id)
    }

    /// Asks for one progress notice (tag -1) covering every watch of a sink.
    pub fn watch_sink_progress(&self, sink_id: u64, sink: WatchSink) {
        self.core.hub.sink_progress(sink_id, sink)
    }

    fn forward(&self, core: usize, req: ClientReq) -> Result<()> {
        self.core.shared.inboxes[core]
            .send(Msg::Client(req))
            .map_err(|_| Error::Closed)
    }
}

fn wait<T>(rx: flume::Receiver<Result<T>>) -> Result<T> {
    rx.recv().map_err(|_| Error::Closed)?
}

async fn wait_async<T>(rx: flume::Receiver<Result<T>>) -> Result<T> {
    rx.recv_async().await.map_err(|_| Error::Closed)?
}

fn single_op_txn(op: RequestOp) -> TxnRequest {
    TxnRequest {
        compare: vec![],
        success: vec![op],
        failure: vec![],
    }
}

fn put_response(t: TxnResponse) -> Result<PutResponse> {
    match t.responses.into_iter().next() {
        Some(ResponseOp::Put(mut p)) => {
            p.header = t.header;
            Ok(p)
        }
        _ => Err(Error::InvalidArgument(
            "internal: put produced no put response".into(),
        )),
    }
}

fn delete_response(t: TxnResponse) -> Result<DeleteRangeResponse> {
    match t.responses.into_iter().next() {
        Some(ResponseOp::DeleteRange(mut d)) => {
            d.header = t.header;
            Ok(d)
        }
        _ => Err(Error::InvalidArgument(
            "internal: delete produced no delete response".into(),
        )),
    }
}

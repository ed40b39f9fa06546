//! `Db`: the engine as an embeddable, thread-safe handle.
//!
//! `Db::open` recovers every shard (newest checkpoint + WAL tail, multi-shard revisions resolved
//! across shards), then starts one pinned glommio executor per core, each owning its shards. The
//! handle routes each request to a core by message: single-key requests straight to the owning
//! shard's core, everything else to a core that coordinates the shards involved. Methods come in a
//! blocking form (any non-executor thread) and an `_async` form (any async runtime, including
//! another glommio executor).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use glommio::Placement;

use crate::engine::checkpoint::{self, CheckpointInfo};
use crate::engine::meta;
use crate::engine::replica::Replica;
use crate::engine::revision::{CoreRevisions, RevisionClock};
use crate::engine::shard::Shard;
use crate::engine::watch::{self, ChangeSource, Hub};
pub use crate::engine::watch::{WatchEvent, WatchRequest, WatchSink, WatchUpdate};
use crate::error::{Error, Result};
use crate::kv::*;
use crate::mvcc::plan;
use crate::mvcc::{CompareOutcome, OpPartial, ShardRange, ShardStore, TxnPath};
use crate::wal::{self, EntryKind, Wal, WalOptions};

mod lease;

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
    /// Pin executor `i` to CPU `i % available`; off for tests that run many stores at once.
    pub pin: bool,
    pub wal_segment_size: u64,
    /// Write a checkpoint after this many log entries per shard (0 = only on demand).
    pub checkpoint_every: u64,
    /// etcd's `--max-txn-ops`.
    pub max_txn_ops: usize,
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
    /// Bytes in WAL segments and checkpoints.
    pub disk_bytes: u64,
    /// Highest WAL index over shards (a stand-in for etcd's raft index on a single node).
    pub log_index: u64,
    /// WAL fdatasync calls, their total time and latency histogram (`runtime::LATENCY_BUCKETS`).
    pub fsyncs: u64,
    pub fsync_seconds: f64,
    pub fsync_buckets: Vec<u64>,
    /// Per shard: WAL records queued and not yet durable.
    pub queue_depths: Vec<u64>,
}

type Reply<T> = flume::Sender<Result<T>>;

fn oneshot<T>() -> (Reply<T>, flume::Receiver<Result<T>>) {
    flume::bounded(1)
}

/// A client request as it reaches a core.
enum ClientReq {
    Range(RangeRequest, Reply<RangeResponse>),
    Txn(Arc<TxnRequest>, Reply<TxnResponse>),
    Compact(CompactionRequest, Reply<CompactionResponse>),
    Checkpoint(Reply<Vec<CheckpointInfo>>),
    Status(Reply<Status>),
    /// Start a watch for an embedding thread (see [`Db::watch`]).
    Watch(Box<WatchRequest>, WatchSink, Reply<u64>),
    WatchCancel(u64),
}

/// What one core asks of a shard it does not own.
enum ShardOp {
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
}

/// What a shard reports once locked for a coordinator.
struct LockEval {
    /// Revision the evaluation saw (everything applied on the shard is at or below it).
    latest: i64,
    compares: Result<Vec<CompareOutcome>>,
    /// Whether the part writes, when the path was known up front.
    writes: Option<Result<bool>>,
}

enum Msg {
    Client(ClientReq),
    Shard(u32, ShardOp),
    Shutdown,
}

/// Immutable routing facts shared by the handle and every core.
struct Shared {
    inboxes: Vec<flume::Sender<Msg>>,
    clock: Arc<RevisionClock>,
    partitioner: Partitioner,
    nshards: u32,
    max_txn_ops: usize,
    cluster_id: u64,
    member_id: u64,
    leases: crate::mvcc::lease::SharedLeases,
    /// Highest Raft term of any shard group (response headers carry it).
    raft_term: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn shard_of(&self, key: &[u8]) -> u32 {
        self.partitioner.shard_of(key, self.nshards)
    }
    fn core_of(&self, shard: u32) -> usize {
        shard as usize % self.inboxes.len()
    }

    /// The core that should run a range: the owner for a single key, any (`None`) otherwise.
    fn range_core(&self, req: &RangeRequest) -> Option<usize> {
        let single =
            KeyRange::from_etcd(&req.key, &req.range_end).is_some_and(|r| r.is_single_key());
        single.then(|| self.core_of(self.shard_of(&req.key)))
    }

    /// The core that should run a txn: the owner when it touches one shard, any otherwise.
    fn txn_core(&self, txn: &TxnRequest) -> Option<usize> {
        match plan::shards_touched(txn, &|k| self.shard_of(k), self.nshards).as_slice() {
            [one] => Some(self.core_of(*one)),
            _ => None,
        }
    }
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

/// What recovery hands each shard's core.
struct RecoveredShard {
    id: u32,
    dir: PathBuf,
    store: ShardStore,
    wal: wal::Recovered,
    replica: crate::engine::replica::Replica,
    checkpoint_index: u64,
    /// Last revision the checkpoint reflects (0 without one).
    checkpoint_revision: i64,
    /// Multi-shard revisions to record as aborted before serving.
    aborts: Vec<i64>,
    /// Leases this shard's log grants (id → TTL), after replaying its revokes.
    leases: BTreeMap<i64, i64>,
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
        let lock = meta::lock(&path)?;
        let meta = meta::load_or_create(
            &path,
            opts.shards.unwrap_or(opts.cores as u32),
            opts.partitioner,
        )?;
        let (shards, current, compact) = recover_all(&path, meta.shards, opts.bypass_raft)?;
        // etcd's store starts at revision 1 (its first write is revision 2); clients compare
        // revisions across servers, so an empty spindle starts there too.
        let current = current.max(1);
        let clock = RevisionClock::new(opts.cores, current, compact);
        let leases = recovered_leases(&shards);

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
            raft_term: std::sync::atomic::AtomicU64::new(0),
        });
        let mut per_core: Vec<Vec<RecoveredShard>> = (0..opts.cores).map(|_| Vec::new()).collect();
        for s in shards {
            per_core[shared.core_of(s.id)].push(s);
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let mut threads = Vec::new();
        let mut ready = Vec::new();
        for (core, (rx, mine)) in receivers.into_iter().zip(per_core).enumerate() {
            let placement = if opts.pin && std::env::var_os("SPINDLE_NO_PIN").is_none() {
                Placement::Fixed(core % cpus)
            } else {
                Placement::Unbound
            };
            let shared = shared.clone();
            let (ready_tx, ready_rx) = oneshot::<()>();
            let wal_opts = WalOptions {
                segment_size: opts.wal_segment_size,
            };
            let every = opts.checkpoint_every;
            let hook = hook.clone();
            let handle = crate::runtime::builder(placement, &format!("spindle-core-{core}"))
                .spawn(move || async move {
                    run_core(core, shared, rx, mine, wal_opts, every, ready_tx, hook).await
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

/// Sets the txn's header revision and its nested responses' headers as etcd does: a response
/// produced before the txn changed anything reports the revision before it (`rev - 1`), later
/// ones `rev`. A txn that wrote nothing reports `rev` (the read revision) everywhere.
fn stamp(resp: &mut TxnResponse, rev: i64) {
    fn wrote(t: &TxnResponse) -> bool {
        t.responses.iter().any(|r| match r {
            ResponseOp::Put(_) => true,
            ResponseOp::DeleteRange(d) => d.deleted > 0,
            ResponseOp::Txn(n) => wrote(n),
            ResponseOp::Range(_) => false,
        })
    }
    resp.header.revision = rev;
    let mut changed = !wrote(resp);
    stamp_nested(resp, rev, &mut changed);
}

fn stamp_nested(resp: &mut TxnResponse, rev: i64, changed: &mut bool) {
    for r in &mut resp.responses {
        match r {
            ResponseOp::Range(x) => x.header.revision = if *changed { rev } else { rev - 1 },
            ResponseOp::Put(x) => {
                *changed = true;
                x.header.revision = rev;
            }
            ResponseOp::DeleteRange(x) => {
                *changed |= x.deleted > 0;
                x.header.revision = if *changed { rev } else { rev - 1 };
            }
            ResponseOp::Txn(x) => stamp_nested(x, rev, changed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recovery

/// Loads every shard and settles multi-shard revisions: one is committed iff every participant
/// logged its part and none logged an abort. Returns the shards, current and compact revision.
fn recover_all(
    path: &Path,
    nshards: u32,
    bypass_raft: bool,
) -> Result<(Vec<RecoveredShard>, i64, i64)> {
    type Loaded = (ShardStore, wal::Recovered, Replica, u64, PathBuf);
    // Shards recover independently (checkpoint load + WAL scan), in parallel.
    let loaded: Vec<Result<Loaded>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..nshards)
            .map(|id| {
                s.spawn(move || -> Result<_> {
                    let dir = meta::shard_dir(path, id);
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    let (store, index, term) = match checkpoint::list(&dir)?.last() {
                        Some((_, file)) => {
                            let c = checkpoint::load(file, id)?;
                            let store = ShardStore::from_histories(
                                c.histories,
                                c.info.last_revision,
                                c.info.compact_revision,
                            );
                            (store, c.info.index, c.info.term)
                        }
                        None => (ShardStore::new(), 0, 0),
                    };
                    let wal = wal::recover(&dir.join("wal"), id, index)?;
                    let replica = Replica::recover(id, (index, term), &wal, bypass_raft)?;
                    Ok((store, wal, replica, index, dir))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Closed)))
            .collect()
    });
    let mut shards = Vec::new();
    for (id, r) in loaded.into_iter().enumerate() {
        let (store, wal, replica, checkpoint_index, dir) = r?;
        let checkpoint_revision = store.last_revision();
        if let Some((file, offset)) = &wal.truncated {
            tracing::warn!(file = %file.display(), offset, "truncated a torn WAL tail (unacknowledged writes)");
        }
        shards.push(RecoveredShard {
            id: id as u32,
            dir,
            store,
            wal,
            replica,
            checkpoint_index,
            checkpoint_revision,
            aborts: vec![],
            leases: BTreeMap::new(),
        });
    }

    // Multi-shard decisions.
    let mut parts: HashMap<i64, (Vec<u32>, HashSet<u32>)> = HashMap::new();
    let mut aborted: HashSet<i64> = HashSet::new();
    let mut current = 0i64;
    let mut compact = 0i64;
    for s in &shards {
        current = current.max(s.store.last_revision());
        compact = compact.max(s.store.compact_revision());
        for e in s.wal.entries.iter().map(|l| &l.entry) {
            match e.kind {
                EntryKind::Part => {
                    let p = parts
                        .entry(e.revision)
                        .or_insert_with(|| (e.participants.clone(), HashSet::new()));
                    p.1.insert(s.id);
                }
                EntryKind::Abort => {
                    aborted.insert(e.revision);
                }
                EntryKind::Compact => compact = compact.max(e.revision),
                _ => {}
            }
            if e.kind != EntryKind::Compact {
                current = current.max(e.revision);
            }
        }
    }
    // A participant's part may already be folded into its checkpoint (and its log entry dropped).
    // A checkpoint is only taken while the shard holds no undecided part, and a shard's log is in
    // revision order, so `rev <= checkpoint revision` means its part was decided, and kept only
    // if committed; an aborted part also leaves an Abort record on every shard that logged it.
    let checkpointed: Vec<i64> = shards.iter().map(|s| s.checkpoint_revision).collect();
    let committed = |rev: i64| {
        !aborted.contains(&rev)
            && parts.get(&rev).is_some_and(|(want, have)| {
                want.iter().all(|p| {
                    have.contains(p) || checkpointed.get(*p as usize).is_some_and(|&c| rev <= c)
                })
            })
    };
    for s in &mut shards {
        let entries = std::mem::take(&mut s.wal.entries);
        for e in entries.iter().map(|l| &l.entry) {
            match e.kind {
                EntryKind::Write => s.store.apply(&e.ops, e.revision),
                EntryKind::Part if committed(e.revision) => s.store.apply(&e.ops, e.revision),
                EntryKind::Part if !aborted.contains(&e.revision) => s.aborts.push(e.revision),
                EntryKind::Compact => s.store.compact(e.revision),
                EntryKind::LeaseGrant => {
                    s.leases.insert(e.lease.id, e.lease.ttl);
                }
                EntryKind::LeaseRevoke => {
                    s.leases.remove(&e.lease.id);
                }
                _ => {}
            }
        }
        if !s.aborts.is_empty() {
            tracing::warn!(shard = s.id, revisions = ?s.aborts, "aborting incomplete multi-shard writes");
        }
    }
    // A compaction interrupted after some shards logged it is completed on all of them.
    for s in &mut shards {
        s.store.compact(compact);
    }
    Ok((shards, current, compact))
}

/// The lease table after recovery. Every lease gets its full TTL again from now, as etcd does
/// when a new leader takes over (downtime must not expire leases whose holders could not renew).
fn recovered_leases(shards: &[RecoveredShard]) -> crate::mvcc::lease::SharedLeases {
    // Generated ids start from the clock so a restarted store does not hand out recent ids again.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_millis() as u64) << 16)
        .unwrap_or(1);
    let mut table = crate::mvcc::lease::LeaseTable::new(seed);
    let now = std::time::Instant::now();
    for s in shards {
        for (&id, &ttl) in &s.leases {
            table.restore(id, ttl, now);
        }
    }
    Arc::new(std::sync::RwLock::new(table))
}

// ---------------------------------------------------------------------------------------------
// Cores

struct Core {
    id: usize,
    shared: Arc<Shared>,
    revs: CoreRevisions,
    shards: BTreeMap<u32, Rc<Shard>>,
    tokens: std::cell::Cell<u64>,
    /// Watches whose consumers live on this core.
    hub: Rc<Hub>,
}

#[allow(clippy::too_many_arguments)]
async fn run_core(
    id: usize,
    shared: Arc<Shared>,
    inbox: flume::Receiver<Msg>,
    recovered: Vec<RecoveredShard>,
    wal_opts: WalOptions,
    checkpoint_every: u64,
    ready: Reply<()>,
    hook: Option<CoreHook>,
) {
    let mut shards = BTreeMap::new();
    for r in recovered {
        let opened = async {
            let wal = Wal::open(&r.dir.join("wal"), r.id, wal_opts.clone(), &r.wal).await?;
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
            );
            shard.replica.start(&shard.wal).await?;
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
        hub: Hub::new(),
    });
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
        }
    }
    for s in core.shards.values() {
        s.wal.close().await;
    }
    tracing::debug!(core = core.id, "core stopped");
}

impl Core {
    /// A lock token unique across cores: core id in the high bits, a per-core counter below.
    fn next_token(&self) -> u64 {
        let n = self.tokens.get() + 1;
        self.tokens.set(n);
        ((self.id as u64) << 48) | n
    }

    /// Runs `op` on `shard`, locally or by message to its core, and awaits the reply.
    async fn call<T>(
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
    fn dispatch<T>(
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
    async fn call_all<T>(
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
    fn tell(self: &Rc<Self>, shards: &[u32], make: impl Fn(Reply<()>) -> ShardOp) {
        for &s in shards {
            drop(self.dispatch(s, &make));
        }
    }

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
                let _ = r.send(shard.write_single(&self.revs, &txn).await);
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
                let _ = r.send(shard.prepare(&txn, &path, rev, parts).await);
            }
            ShardOp::Commit(rev, token, r) => {
                shard.commit(rev, token);
                let _ = r.send(Ok(()));
            }
            ShardOp::Abort(rev, token, r) => {
                let _ = r.send(shard.abort(rev, token).await);
            }
            ShardOp::Unlock(token, r) => {
                shard.unlock_coordinator(token);
                let _ = r.send(Ok(()));
            }
            ShardOp::Compact(rev, r) => {
                let _ = r.send(shard.compact(rev).await);
            }
            ShardOp::Checkpoint(r) => {
                let _ = r.send(shard.checkpoint().await);
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
                let bytes = dir_bytes(&shard.dir);
                let _ = r.send(Ok((
                    keys,
                    bytes,
                    shard.wal.next_index() - 1,
                    shard.wal.sync_stats(),
                )));
            }
            ShardOp::Lease(op) => op.run(&shard).await,
        }
    }

    async fn client(self: Rc<Self>, req: ClientReq) {
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
            ClientReq::Compact(req, r) => {
                let _ = r.send(self.compact(req).await);
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

    /// Resolves the revision a read uses: the read revision, or an explicit one once visible.
    async fn read_at(&self, requested: i64) -> Result<(i64, i64)> {
        let clock = &self.shared.clock;
        if requested > 0 {
            if requested > clock.current() {
                return Err(Error::FutureRevision);
            }
            if requested < clock.compact_revision() {
                return Err(Error::Compacted);
            }
            clock.wait_visible(requested).await;
            return Ok((requested, clock.read_revision()));
        }
        let rr = clock.read_revision();
        Ok((rr, rr))
    }

    async fn range(self: &Rc<Self>, req: RangeRequest) -> Result<RangeResponse> {
        let (rev, header) = self.read_at(req.revision).await?;
        let Some(kr) = KeyRange::from_etcd(&req.key, &req.range_end) else {
            return Ok(RangeResponse {
                header: ResponseHeader { revision: header },
                ..Default::default()
            });
        };
        let req = Arc::new(req);
        let parts = if kr.is_single_key() {
            let s = self.shared.shard_of(&req.key);
            vec![
                self.call(s, |r| ShardOp::Range(req.clone(), rev, r))
                    .await?,
            ]
        } else {
            let all: Vec<u32> = (0..self.shared.nshards).collect();
            let results = self
                .call_all(&all, |r| ShardOp::Range(req.clone(), rev, r))
                .await;
            results.into_iter().collect::<Result<Vec<_>>>()?
        };
        let mut resp = plan::merge_range(&req, parts);
        resp.header.revision = header;
        Ok(resp)
    }

    async fn txn(self: &Rc<Self>, txn: Arc<TxnRequest>) -> Result<TxnResponse> {
        let shared = &self.shared;
        let touched = plan::shards_touched(&txn, &|k| shared.shard_of(k), shared.nshards);
        if !plan::txn_has_writes(&txn) || touched.is_empty() {
            return self.read_txn(txn, &touched).await;
        }
        if let [only] = touched.as_slice() {
            let (path, partials, rev) =
                self.call(*only, |r| ShardOp::Write(txn.clone(), r)).await?;
            return Ok(self.assemble(&txn, path, vec![partials], rev));
        }
        self.multi_shard_write(txn, touched).await
    }

    /// Compares over every touched shard merged into one result per compare.
    fn merge_compares(cmps: &[Compare], per_shard: Vec<Vec<CompareOutcome>>) -> Vec<bool> {
        let mut columns: Vec<Vec<CompareOutcome>> = vec![Vec::new(); cmps.len()];
        for outcomes in per_shard {
            for (i, o) in outcomes.into_iter().enumerate() {
                if let Some(c) = columns.get_mut(i) {
                    c.push(o);
                }
            }
        }
        cmps.iter()
            .zip(&columns)
            .map(|(c, o)| plan::merge_compare(c, o))
            .collect()
    }

    /// A txn without puts or deletes reads a consistent snapshot at the read revision; no locks.
    async fn read_txn(
        self: &Rc<Self>,
        txn: Arc<TxnRequest>,
        touched: &[u32],
    ) -> Result<TxnResponse> {
        let rev = self.shared.clock.read_revision();
        let cmps: Arc<Vec<Compare>> =
            Arc::new(plan::all_compares(&txn).into_iter().cloned().collect());
        let mut results = Vec::new();
        if !cmps.is_empty() {
            let outcomes = self
                .call_all(touched, |r| ShardOp::Compare(cmps.clone(), rev, r))
                .await;
            results = Self::merge_compares(&cmps, outcomes.into_iter().collect::<Result<_>>()?);
        }
        let path = Arc::new(plan::choose_path(&txn, &results));
        let parts = self
            .call_all(touched, |r| {
                ShardOp::ReadExec(txn.clone(), path.clone(), rev, r)
            })
            .await;
        let per_shard = parts.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(self.assemble(&txn, (*path).clone(), per_shard, rev))
    }

    /// The multi-shard write protocol (see docs/design.md, "Write paths").
    async fn multi_shard_write(
        self: &Rc<Self>,
        txn: Arc<TxnRequest>,
        touched: Vec<u32>,
    ) -> Result<TxnResponse> {
        let cmps: Arc<Vec<Compare>> =
            Arc::new(plan::all_compares(&txn).into_iter().cloned().collect());
        // Without compares the path is known now, so each shard can check its part while locking.
        let known = cmps
            .is_empty()
            .then(|| Arc::new(plan::choose_path(&txn, &[])));
        let token = self.next_token();
        // Lock in ascending shard order; every coordinator does the same, so none can deadlock.
        let mut evals = Vec::with_capacity(touched.len());
        for &s in &touched {
            let op = |r| ShardOp::LockEval(token, txn.clone(), cmps.clone(), known.clone(), r);
            match self.call(s, op).await {
                Ok(e) => evals.push(e),
                Err(e) => {
                    self.tell(&touched[..evals.len()], |r| ShardOp::Unlock(token, r));
                    return Err(e);
                }
            }
        }
        let result = self
            .locked_write(token, &txn, &touched, &cmps, known, evals)
            .await;
        if result.is_err() {
            // Shards that already committed or aborted under this token ignore the unlock.
            self.tell(&touched, |r| ShardOp::Unlock(token, r));
        }
        result
    }

    /// Runs with every touched shard locked; commit/unlock release them on success.
    #[allow(clippy::too_many_arguments)]
    async fn locked_write(
        self: &Rc<Self>,
        token: u64,
        txn: &Arc<TxnRequest>,
        touched: &[u32],
        cmps: &Arc<Vec<Compare>>,
        known: Option<Arc<TxnPath>>,
        evals: Vec<LockEval>,
    ) -> Result<TxnResponse> {
        let latest = evals.iter().map(|e| e.latest).max().unwrap_or(0);
        let mut outcomes = Vec::with_capacity(evals.len());
        let mut writes = Vec::with_capacity(evals.len());
        for e in evals {
            outcomes.push(e.compares?);
            writes.push(e.writes);
        }
        let path = match known {
            Some(p) => p,
            None => Arc::new(plan::choose_path(
                txn,
                &Self::merge_compares(cmps, outcomes),
            )),
        };
        let writes: Vec<bool> = if writes.iter().all(Option::is_some) {
            writes.into_iter().flatten().collect::<Result<_>>()?
        } else {
            let checks = self
                .call_all(touched, |r| {
                    ShardOp::Check(txn.clone(), path.clone(), latest, r)
                })
                .await;
            checks.into_iter().collect::<Result<_>>()?
        };
        let writers: Vec<u32> = touched
            .iter()
            .zip(&writes)
            .filter(|(_, w)| **w)
            .map(|(s, _)| *s)
            .collect();
        let readers: Vec<u32> = touched
            .iter()
            .zip(&writes)
            .filter(|(_, w)| !**w)
            .map(|(s, _)| *s)
            .collect();
        if writers.is_empty() {
            let parts = self
                .call_all(touched, |r| {
                    ShardOp::ReadExec(txn.clone(), path.clone(), latest, r)
                })
                .await;
            self.tell(touched, |r| ShardOp::Unlock(token, r));
            let per_shard = parts.into_iter().collect::<Result<Vec<_>>>()?;
            self.shared.clock.wait_visible(latest).await;
            return Ok(self.assemble(txn, (*path).clone(), per_shard, latest));
        }
        let rev = self.revs.begin();
        // Writers log their parts (their fsyncs overlap) while readers execute theirs.
        let prepares: Vec<_> = writers
            .iter()
            .map(|&s| {
                self.dispatch(s, |r| {
                    ShardOp::Prepare(txn.clone(), path.clone(), rev, writers.clone(), r)
                })
            })
            .collect();
        let reads: Vec<_> = readers
            .iter()
            .map(|&s| self.dispatch(s, |r| ShardOp::ReadExec(txn.clone(), path.clone(), rev, r)))
            .collect();
        let mut by_shard: HashMap<u32, Vec<OpPartial>> = HashMap::new();
        let mut prepared = Vec::new();
        let mut failure = None;
        for (&s, rx) in writers.iter().zip(prepares) {
            match wait_async(rx).await {
                Ok(p) => {
                    prepared.push(s);
                    by_shard.insert(s, p);
                }
                Err(e) => failure = Some(e),
            }
        }
        for (&s, rx) in readers.iter().zip(reads) {
            match wait_async(rx).await {
                Ok(p) => {
                    by_shard.insert(s, p);
                }
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            for res in self
                .call_all(&prepared, |r| ShardOp::Abort(rev, token, r))
                .await
            {
                if let Err(abort_err) = res {
                    tracing::error!(error = %abort_err, revision = rev, "abort of a prepared part failed");
                }
            }
            // The revision stays unused; it must still stop blocking readers.
            self.revs.finish(rev);
            return Err(e);
        }
        self.tell(&writers, |r| ShardOp::Commit(rev, token, r));
        self.tell(&readers, |r| ShardOp::Unlock(token, r));
        self.revs.finish(rev);
        self.shared.clock.wait_visible(rev).await;
        let per_shard = touched
            .iter()
            .map(|s| by_shard.remove(s).unwrap_or_default())
            .collect();
        Ok(self.assemble(txn, (*path).clone(), per_shard, rev))
    }

    fn assemble(
        &self,
        txn: &TxnRequest,
        path: TxnPath,
        per_shard: Vec<Vec<OpPartial>>,
        rev: i64,
    ) -> TxnResponse {
        let ops = plan::leaf_ops(txn, &path);
        let mut columns: Vec<Vec<OpPartial>> = (0..ops.len()).map(|_| Vec::new()).collect();
        for partials in per_shard {
            for (i, p) in partials.into_iter().enumerate() {
                if let Some(c) = columns.get_mut(i) {
                    c.push(p);
                }
            }
        }
        let merged = ops
            .iter()
            .zip(columns)
            .map(|(op, parts)| plan::merge_op(op, parts))
            .collect();
        let mut resp = plan::assemble_txn(txn, &path, merged);
        stamp(&mut resp, rev);
        resp
    }

    async fn compact(self: &Rc<Self>, req: CompactionRequest) -> Result<CompactionResponse> {
        let clock = &self.shared.clock;
        if req.revision > clock.current() {
            return Err(Error::FutureRevision);
        }
        if req.revision <= clock.compact_revision() {
            return Err(Error::Compacted);
        }
        clock.wait_visible(req.revision).await;
        for s in 0..self.shared.nshards {
            self.call(s, |r| ShardOp::Compact(req.revision, r)).await?;
        }
        clock.set_compact_revision(req.revision);
        Ok(CompactionResponse {
            header: ResponseHeader {
                revision: clock.read_revision(),
            },
        })
    }
}

/// Answers `op` with an error without running it (shard missing, store closing).
/// The core as its watch hub's source of changes.
struct Feed(Rc<Core>);

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

fn reply_err(op: ShardOp, err: impl Fn() -> Error) {
    match op {
        ShardOp::Range(_, _, r) => drop(r.send(Err(err()))),
        ShardOp::Write(_, r) => drop(r.send(Err(err()))),
        ShardOp::LockEval(_, _, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::Commit(_, _, r)
        | ShardOp::Abort(_, _, r)
        | ShardOp::Unlock(_, r)
        | ShardOp::Compact(_, r) => drop(r.send(Err(err()))),
        ShardOp::Compare(_, _, r) => drop(r.send(Err(err()))),
        ShardOp::Check(_, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::ReadExec(_, _, _, r) | ShardOp::Prepare(_, _, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::Checkpoint(r) => drop(r.send(Err(err()))),
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

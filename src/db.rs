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

use crate::checkpoint::{self, CheckpointInfo};
use crate::error::{Error, Result};
use crate::kv::*;
use crate::meta;
use crate::mvcc::{CompareOutcome, OpPartial, ShardRange, ShardStore, TxnPath};
use crate::partition::Partitioner;
use crate::plan;
use crate::revision::{CoreRevisions, RevisionClock};
use crate::shard::Shard;
use crate::wal::{self, EntryKind, Wal, WalOptions};

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
        }
    }
}

/// Store-wide facts for status reporting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
}

/// What one core asks of a shard it does not own.
enum ShardOp {
    Range(Arc<RangeRequest>, i64, Reply<ShardRange>),
    Write(Arc<TxnRequest>, Reply<(TxnPath, Vec<OpPartial>, i64)>),
    Lock(Reply<()>),
    Compare(Vec<Compare>, i64, Reply<Vec<CompareOutcome>>),
    Check(Arc<TxnRequest>, Arc<TxnPath>, i64, Reply<bool>),
    ReadExec(Arc<TxnRequest>, Arc<TxnPath>, i64, Reply<Vec<OpPartial>>),
    Prepare(
        Arc<TxnRequest>,
        Arc<TxnPath>,
        i64,
        Vec<u32>,
        Reply<Vec<OpPartial>>,
    ),
    Commit(i64, Reply<()>),
    Abort(i64, Reply<()>),
    Unlock(Reply<()>),
    Compact(i64, Reply<()>),
    Checkpoint(Reply<CheckpointInfo>),
    Stats(Reply<(u64, u64, u64)>),
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
}

impl Shared {
    fn shard_of(&self, key: &[u8]) -> u32 {
        self.partitioner.shard_of(key, self.nshards)
    }
    fn core_of(&self, shard: u32) -> usize {
        shard as usize % self.inboxes.len()
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
    checkpoint_index: u64,
    /// Last revision the checkpoint reflects (0 without one).
    checkpoint_revision: i64,
    /// Multi-shard revisions to record as aborted before serving.
    aborts: Vec<i64>,
}

impl Db {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: impl AsRef<Path>, opts: Options) -> Result<Db> {
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
        let (shards, current, compact) = recover_all(&path, meta.shards)?;
        let clock = RevisionClock::new(opts.cores, current, compact);

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
            let placement = if opts.pin {
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
            let handle = crate::rt::builder(placement, &format!("spindle-core-{core}"))
                .spawn(move || async move {
                    run_core(core, shared, rx, mine, wal_opts, every, ready_tx).await
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

    fn key_core(&self, key: &[u8]) -> usize {
        let s = &self.inner.shared;
        s.core_of(s.shard_of(key))
    }

    fn submit_range(&self, req: RangeRequest) -> Result<flume::Receiver<Result<RangeResponse>>> {
        plan::validate_range(&req)?;
        let single =
            KeyRange::from_etcd(&req.key, &req.range_end).is_some_and(|r| r.is_single_key());
        let core = if single {
            self.key_core(&req.key)
        } else {
            self.any_core()
        };
        let (tx, rx) = oneshot();
        self.send(core, Msg::Client(ClientReq::Range(req, tx)))?;
        Ok(rx)
    }

    fn submit_txn(&self, txn: TxnRequest) -> Result<flume::Receiver<Result<TxnResponse>>> {
        let s = &self.inner.shared;
        let touched = plan::shards_touched(&txn, &|k| s.shard_of(k), s.nshards);
        let core = match touched.as_slice() {
            [one] => s.core_of(*one),
            _ => self.any_core(),
        };
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

/// Sets `rev` on the txn's header and, as etcd does, on every nested response's header.
fn stamp(resp: &mut TxnResponse, rev: i64) {
    resp.header.revision = rev;
    for r in &mut resp.responses {
        match r {
            ResponseOp::Range(x) => x.header.revision = rev,
            ResponseOp::Put(x) => x.header.revision = rev,
            ResponseOp::DeleteRange(x) => x.header.revision = rev,
            ResponseOp::Txn(x) => stamp(x, rev),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recovery

/// Loads every shard and settles multi-shard revisions: one is committed iff every participant
/// logged its part and none logged an abort. Returns the shards, current and compact revision.
fn recover_all(path: &Path, nshards: u32) -> Result<(Vec<RecoveredShard>, i64, i64)> {
    // Shards recover independently (checkpoint load + WAL scan), in parallel.
    let loaded: Vec<Result<(ShardStore, wal::Recovered, u64, PathBuf)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..nshards)
            .map(|id| {
                s.spawn(move || -> Result<_> {
                    let dir = meta::shard_dir(path, id);
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    let (store, index) = match checkpoint::list(&dir)?.last() {
                        Some((_, file)) => {
                            let c = checkpoint::load(file, id)?;
                            let store = ShardStore::from_histories(
                                c.histories,
                                c.info.last_revision,
                                c.info.compact_revision,
                            );
                            (store, c.info.index)
                        }
                        None => (ShardStore::new(), 0),
                    };
                    let wal = wal::recover(&dir.join("wal"), id, index)?;
                    Ok((store, wal, index, dir))
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
        let (store, wal, checkpoint_index, dir) = r?;
        let checkpoint_revision = store.last_revision();
        if let Some((file, offset)) = &wal.truncated {
            tracing::warn!(file = %file.display(), offset, "truncated a torn WAL tail (unacknowledged writes)");
        }
        shards.push(RecoveredShard {
            id: id as u32,
            dir,
            store,
            wal,
            checkpoint_index,
            checkpoint_revision,
            aborts: vec![],
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
        for e in &s.wal.entries {
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
        for e in &entries {
            match e.kind {
                EntryKind::Write => s.store.apply(&e.ops, e.revision),
                EntryKind::Part if committed(e.revision) => s.store.apply(&e.ops, e.revision),
                EntryKind::Part if !aborted.contains(&e.revision) => s.aborts.push(e.revision),
                EntryKind::Compact => s.store.compact(e.revision),
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

// ---------------------------------------------------------------------------------------------
// Cores

struct Core {
    id: usize,
    shared: Arc<Shared>,
    revs: CoreRevisions,
    shards: BTreeMap<u32, Rc<Shard>>,
}

async fn run_core(
    id: usize,
    shared: Arc<Shared>,
    inbox: flume::Receiver<Msg>,
    recovered: Vec<RecoveredShard>,
    wal_opts: WalOptions,
    checkpoint_every: u64,
    ready: Reply<()>,
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
                r.checkpoint_index,
                checkpoint_every,
            );
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
    });
    let _ = ready.send(Ok(()));
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
    fn shard(&self, id: u32) -> Result<&Rc<Shard>> {
        self.shards
            .get(&id)
            .ok_or_else(|| Error::InvalidArgument(format!("shard {id} is not on core {}", self.id)))
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
            self.shared.inboxes[core]
                .send(Msg::Shard(shard, op))
                .map_err(|_| Error::Closed)?;
        }
        wait_async(rx).await
    }

    async fn shard_op(self: Rc<Self>, id: u32, op: ShardOp) {
        let shard = match self.shard(id) {
            Ok(s) => s.clone(),
            Err(e) => {
                reply_err(op, e);
                return;
            }
        };
        match op {
            ShardOp::Range(req, rev, r) => {
                let _ = r.send(shard.range(&req, rev));
            }
            ShardOp::Write(txn, r) => {
                let _ = r.send(shard.write_single(&self.revs, &txn).await);
            }
            ShardOp::Lock(r) => {
                let _ = r.send(shard.lock_for_coordinator().await);
            }
            ShardOp::Compare(cmps, rev, r) => {
                let _ = r.send(shard.compare(&cmps, rev));
            }
            ShardOp::Check(txn, path, rev, r) => {
                let _ = r.send(shard.check(&txn, &path, rev));
            }
            ShardOp::ReadExec(txn, path, rev, r) => {
                let _ = r.send(Ok(shard.execute_read(&txn, &path, rev)));
            }
            ShardOp::Prepare(txn, path, rev, parts, r) => {
                let _ = r.send(shard.prepare(&txn, &path, rev, parts).await);
            }
            ShardOp::Commit(rev, r) => {
                shard.commit(rev);
                let _ = r.send(Ok(()));
            }
            ShardOp::Abort(rev, r) => {
                let _ = r.send(shard.abort(rev).await);
            }
            ShardOp::Unlock(r) => {
                shard.unlock_coordinator();
                let _ = r.send(Ok(()));
            }
            ShardOp::Compact(rev, r) => {
                let _ = r.send(shard.compact(rev).await);
            }
            ShardOp::Checkpoint(r) => {
                let _ = r.send(shard.checkpoint().await);
            }
            ShardOp::Stats(r) => {
                let keys = shard.store.borrow().key_count() as u64;
                let bytes = dir_bytes(&shard.dir);
                let _ = r.send(Ok((keys, bytes, shard.wal.next_index() - 1)));
            }
        }
    }

    async fn client(self: Rc<Self>, req: ClientReq) {
        match req {
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
                        Ok((k, b, i)) => {
                            st.keys += k;
                            st.disk_bytes += b;
                            st.log_index = st.log_index.max(i);
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
        let targets: Vec<u32> = if kr.is_single_key() {
            vec![self.shared.shard_of(&req.key)]
        } else {
            (0..self.shared.nshards).collect()
        };
        let req = Arc::new(req);
        let mut parts = Vec::with_capacity(targets.len());
        if targets.len() == 1 {
            parts.push(
                self.call(targets[0], |r| ShardOp::Range(req.clone(), rev, r))
                    .await?,
            );
        } else {
            let futs: Vec<_> = targets
                .iter()
                .map(|&s| {
                    let req = req.clone();
                    self.call(s, move |r| ShardOp::Range(req, rev, r))
                })
                .collect();
            for f in futs {
                parts.push(f.await?);
            }
        }
        let mut resp = plan::merge_range(&req, parts);
        resp.header.revision = header;
        Ok(resp)
    }

    async fn txn(self: &Rc<Self>, txn: Arc<TxnRequest>) -> Result<TxnResponse> {
        let shared = &self.shared;
        let touched = plan::shards_touched(&txn, &|k| shared.shard_of(k), shared.nshards);
        if !plan::txn_has_writes(&txn) {
            return self.read_txn(txn, &touched).await;
        }
        if let [only] = touched.as_slice() {
            let (path, partials, rev) =
                self.call(*only, |r| ShardOp::Write(txn.clone(), r)).await?;
            return Ok(self.assemble(&txn, path, vec![partials], rev));
        }
        self.multi_shard_write(txn, touched).await
    }

    /// A txn without puts or deletes reads a consistent snapshot at the read revision; no locks.
    async fn read_txn(
        self: &Rc<Self>,
        txn: Arc<TxnRequest>,
        touched: &[u32],
    ) -> Result<TxnResponse> {
        let rev = self.shared.clock.read_revision();
        let cmps: Vec<Compare> = plan::all_compares(&txn).into_iter().cloned().collect();
        let mut results = vec![true; cmps.len()];
        if !cmps.is_empty() {
            let mut outcomes: Vec<Vec<CompareOutcome>> =
                (0..cmps.len()).map(|_| Vec::new()).collect();
            for &s in touched {
                let o = self
                    .call(s, |r| ShardOp::Compare(cmps.clone(), rev, r))
                    .await?;
                for (i, oc) in o.into_iter().enumerate() {
                    outcomes[i].push(oc);
                }
            }
            for (i, c) in cmps.iter().enumerate() {
                results[i] = plan::merge_compare(c, &outcomes[i]);
            }
        }
        let path = Arc::new(plan::choose_path(&txn, &results));
        for &s in touched {
            self.call(s, |r| ShardOp::Check(txn.clone(), path.clone(), rev, r))
                .await?;
        }
        let mut per_shard = Vec::new();
        for &s in touched {
            per_shard.push(
                self.call(s, |r| ShardOp::ReadExec(txn.clone(), path.clone(), rev, r))
                    .await?,
            );
        }
        Ok(self.assemble(&txn, (*path).clone(), per_shard, rev))
    }

    async fn multi_shard_write(
        self: &Rc<Self>,
        txn: Arc<TxnRequest>,
        touched: Vec<u32>,
    ) -> Result<TxnResponse> {
        // Lock in ascending shard order; every coordinator does the same, so none can deadlock.
        let mut locked = Vec::new();
        for &s in &touched {
            match self.call(s, ShardOp::Lock).await {
                Ok(()) => locked.push(s),
                Err(e) => {
                    self.unlock(&locked).await;
                    return Err(e);
                }
            }
        }
        let result = self.locked_write(&txn, &touched).await;
        if result.is_err() {
            self.unlock(&locked).await;
        }
        result
    }

    async fn unlock(self: &Rc<Self>, shards: &[u32]) {
        for &s in shards {
            let _ = self.call(s, ShardOp::Unlock).await;
        }
    }

    /// Runs with every touched shard locked. On success all locks are released by commit/unlock.
    async fn locked_write(
        self: &Rc<Self>,
        txn: &Arc<TxnRequest>,
        touched: &[u32],
    ) -> Result<TxnResponse> {
        let latest = self.shared.clock.current();
        let cmps: Vec<Compare> = plan::all_compares(txn).into_iter().cloned().collect();
        let mut outcomes: Vec<Vec<CompareOutcome>> = (0..cmps.len()).map(|_| Vec::new()).collect();
        if !cmps.is_empty() {
            for &s in touched {
                let o = self
                    .call(s, |r| ShardOp::Compare(cmps.clone(), latest, r))
                    .await?;
                for (i, oc) in o.into_iter().enumerate() {
                    outcomes[i].push(oc);
                }
            }
        }
        let results: Vec<bool> = cmps
            .iter()
            .zip(&outcomes)
            .map(|(c, o)| plan::merge_compare(c, o))
            .collect();
        let path = Arc::new(plan::choose_path(txn, &results));
        let mut writers = Vec::new();
        for &s in touched {
            if self
                .call(s, |r| ShardOp::Check(txn.clone(), path.clone(), latest, r))
                .await?
            {
                writers.push(s);
            }
        }
        if writers.is_empty() {
            let mut per_shard = Vec::new();
            for &s in touched {
                per_shard.push(
                    self.call(s, |r| {
                        ShardOp::ReadExec(txn.clone(), path.clone(), latest, r)
                    })
                    .await?,
                );
            }
            self.unlock(touched).await;
            self.shared.clock.wait_visible(latest).await;
            return Ok(self.assemble(txn, (*path).clone(), per_shard, latest));
        }
        let rev = self.revs.begin();
        let mut per_shard = Vec::new();
        let mut prepared = Vec::new();
        let mut failure = None;
        // Prepare every writer concurrently: their fsyncs overlap.
        let futs: Vec<_> = writers
            .iter()
            .map(|&s| {
                let (txn, path, parts) = (txn.clone(), path.clone(), writers.clone());
                (
                    s,
                    self.call(s, move |r| ShardOp::Prepare(txn, path, rev, parts, r)),
                )
            })
            .collect();
        let mut by_shard: HashMap<u32, Vec<OpPartial>> = HashMap::new();
        for (s, f) in futs {
            match f.await {
                Ok(p) => {
                    prepared.push(s);
                    by_shard.insert(s, p);
                }
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            for &s in &prepared {
                let _ = self.call(s, |r| ShardOp::Abort(rev, r)).await;
            }
            let others: Vec<u32> = touched
                .iter()
                .copied()
                .filter(|s| !prepared.contains(s))
                .collect();
            self.unlock(&others).await;
            // The revision stays unused; it must still stop blocking readers.
            self.revs.finish(rev);
            return Err(e);
        }
        for &s in touched {
            match by_shard.remove(&s) {
                Some(p) => per_shard.push(p),
                None => per_shard.push(
                    self.call(s, |r| ShardOp::ReadExec(txn.clone(), path.clone(), rev, r))
                        .await?,
                ),
            }
        }
        for &s in &writers {
            self.call(s, |r| ShardOp::Commit(rev, r)).await?;
        }
        let readers: Vec<u32> = touched
            .iter()
            .copied()
            .filter(|s| !writers.contains(s))
            .collect();
        self.unlock(&readers).await;
        self.revs.finish(rev);
        self.shared.clock.wait_visible(rev).await;
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

fn reply_err(op: ShardOp, e: Error) {
    let msg = e.to_string();
    let err = || Error::InvalidArgument(msg.clone());
    match op {
        ShardOp::Range(_, _, r) => drop(r.send(Err(err()))),
        ShardOp::Write(_, r) => drop(r.send(Err(err()))),
        ShardOp::Lock(r)
        | ShardOp::Commit(_, r)
        | ShardOp::Abort(_, r)
        | ShardOp::Unlock(r)
        | ShardOp::Compact(_, r) => drop(r.send(Err(err()))),
        ShardOp::Compare(_, _, r) => drop(r.send(Err(err()))),
        ShardOp::Check(_, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::ReadExec(_, _, _, r) | ShardOp::Prepare(_, _, _, _, r) => drop(r.send(Err(err()))),
        ShardOp::Checkpoint(r) => drop(r.send(Err(err()))),
        ShardOp::Stats(r) => drop(r.send(Err(err()))),
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

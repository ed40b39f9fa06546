//! Request routing and coordination: which core and shards a request goes to, and how the
//! coordinating core runs a read or write across the shards involved.
//!
//! Separate from the per-core loop because this is the multi-shard protocol (compares in one
//! round, lock in shard order, prepare/commit or abort), not the plumbing that carries messages.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::core::{Core, LockEval, Msg, ShardOp};
use super::wait_async;
use crate::engine::partition::Partitioner;
use crate::engine::revision::RevisionClock;
use crate::error::{Error, Result};
use crate::kv::*;
use crate::mvcc::plan;
use crate::mvcc::{CompareOutcome, OpPartial, TxnPath};
use crate::runtime::stages::{PutStages, Tracer};

/// Immutable routing facts shared by the handle and every core.
pub(super) struct Shared {
    pub(super) inboxes: Vec<flume::Sender<Msg>>,
    pub(super) clock: Arc<RevisionClock>,
    pub(super) partitioner: Partitioner,
    pub(super) nshards: u32,
    pub(super) max_txn_ops: usize,
    pub(super) cluster_id: u64,
    pub(super) member_id: u64,
    pub(super) leases: crate::mvcc::lease::SharedLeases,
    /// The node's auth state (shard 0's log and checkpoints persist it).
    pub(super) auth: Arc<crate::auth::SharedAuth>,
    /// The node's alarms (shard 0's log and checkpoints persist them).
    pub(super) alarms: Arc<crate::alarm::SharedAlarms>,
    /// Highest Raft term of any shard group (response headers carry it).
    pub(super) raft_term: std::sync::atomic::AtomicU64,
    /// Set for a cluster member.
    pub(super) cluster: Option<super::cluster::ClusterState>,
    /// The store is shutting down (background loops stop).
    pub(super) closing: std::sync::atomic::AtomicBool,
    /// Where puts' time goes, one slot per core.
    pub(super) stages: PutStages,
}

impl Shared {
    /// The membership record (JSON) a cluster member's shard-0 checkpoint carries; empty on a
    /// single node.
    pub(super) fn membership_record(&self) -> bytes::Bytes {
        self.cluster
            .as_ref()
            .map(|c| bytes::Bytes::from(c.membership().encode()))
            .unwrap_or_default()
    }

    pub(super) fn shard_of(&self, key: &[u8]) -> u32 {
        self.partitioner.shard_of(key, self.nshards)
    }
    pub(super) fn core_of(&self, shard: u32) -> usize {
        shard as usize % self.inboxes.len()
    }

    /// The core that should run a range: the owner for a single key, any (`None`) otherwise.
    pub(super) fn range_core(&self, req: &RangeRequest) -> Option<usize> {
        let single =
            KeyRange::from_etcd(&req.key, &req.range_end).is_some_and(|r| r.is_single_key());
        single.then(|| self.core_of(self.shard_of(&req.key)))
    }

    /// The core that should run a txn: the owner when it touches one shard, any otherwise.
    pub(super) fn txn_core(&self, txn: &TxnRequest) -> Option<usize> {
        match plan::shards_touched(txn, &|k| self.shard_of(k), self.nshards).as_slice() {
            [one] => Some(self.core_of(*one)),
            _ => None,
        }
    }
}

impl Core {
    /// Waits until readers see `rev`, at most `patience`, then etcd's `request timed out`: a
    /// follower's floors rise only with its leader's stamps, and a cut-off one never gets there.
    pub(super) async fn wait_visible_within(&self, rev: i64, patience: Duration) -> Result<()> {
        let clock = &self.shared.clock;
        let waited = futures_lite::future::or(
            async {
                clock.wait_visible(rev).await;
                true
            },
            async {
                glommio::timer::sleep(patience).await;
                false
            },
        )
        .await;
        if waited {
            Ok(())
        } else {
            Err(Error::Timeout)
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
            match self.shared.cluster.as_ref() {
                // A follower's floors rise with its leader's stamps; cut off from the leader,
                // it answers with etcd's timeout rather than hold the read forever.
                Some(cl) => self.wait_visible_within(requested, cl.patience()).await?,
                None => clock.wait_visible(requested).await,
            }
            return Ok((requested, clock.read_revision()));
        }
        let rr = clock.read_revision();
        Ok((rr, rr))
    }

    pub(super) async fn range(self: &Rc<Self>, req: RangeRequest) -> Result<RangeResponse> {
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

    pub(super) async fn txn(self: &Rc<Self>, txn: Arc<TxnRequest>) -> Result<TxnResponse> {
        self.txn_traced(txn, None).await
    }

    /// [`Core::txn`], timing the stages of a single-shard write this core owns.
    pub(super) async fn txn_traced(
        self: &Rc<Self>,
        txn: Arc<TxnRequest>,
        trace: Option<&mut Tracer<'_>>,
    ) -> Result<TxnResponse> {
        let shared = &self.shared;
        let touched = plan::shards_touched(&txn, &|k| shared.shard_of(k), shared.nshards);
        if !plan::txn_has_writes(&txn) || touched.is_empty() {
            return self.read_txn(txn, &touched).await;
        }
        self.wait_writable().await?;
        if let [only] = touched.as_slice() {
            let (path, partials, rev) = match (trace, self.shards.get(only)) {
                // The same as the local `ShardOp::Write`, with the tracer passed along.
                (Some(t), Some(shard)) => shard.write_single(&self.revs, &txn, Some(t)).await?,
                _ => self.call(*only, |r| ShardOp::Write(txn.clone(), r)).await?,
            };
            return Ok(self.assemble(&txn, path, vec![partials], rev));
        }
        // Boxed: a single-shard write (the common case) should not carry its size.
        Box::pin(self.multi_shard_write(txn, touched)).await
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
            self.shared.clock.wait_resolved(latest).await;
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
        let mut failures = Vec::new();
        for (&s, rx) in writers.iter().zip(prepares) {
            match wait_async(rx).await {
                Ok(p) => {
                    prepared.push(s);
                    by_shard.insert(s, p);
                }
                Err(e) => {
                    failures.push(matches!(e, Error::PartInDoubt));
                    failure = Some(e);
                }
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
            // A part that was proposed but not committed when leadership moved (`PartInDoubt`)
            // may still commit. If every failure is of that kind, nobody here can say how the
            // write ends: the parts are undone and their shards rebuilt, and the next leader
            // decides by the recovery rule. Otherwise some participant never logged its part,
            // so the write can never commit and the prepared parts are aborted for good.
            let definite = failures.iter().any(|in_doubt| !in_doubt) || failures.is_empty();
            let undecided: Vec<u32> = writers
                .iter()
                .copied()
                .filter(|s| !definite || !prepared.contains(s))
                .collect();
            if definite {
                for res in self
                    .call_all(&prepared, |r| ShardOp::Abort(rev, token, r))
                    .await
                {
                    if let Err(abort_err) = res {
                        tracing::error!(error = %abort_err, revision = rev, "abort of a prepared part failed");
                    }
                }
            }
            let _ = self
                .call_all(&undecided, |r| ShardOp::Abandon(rev, token, r))
                .await;
            // The revision stays unused; it must still stop blocking readers.
            self.revs.finish(rev);
            return Err(match e {
                Error::PartInDoubt => Error::LeaderChanged,
                e => e,
            });
        }
        self.tell(&writers, |r| ShardOp::Commit(rev, token, r));
        self.tell(&readers, |r| ShardOp::Unlock(token, r));
        self.shared.clock.note_committed(rev);
        self.revs.finish(rev);
        self.shared.clock.wait_resolved(rev).await;
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

    pub(super) async fn compact(
        self: &Rc<Self>,
        req: CompactionRequest,
    ) -> Result<CompactionResponse> {
        self.wait_writable().await?;
        let clock = &self.shared.clock;
        if req.revision > clock.current() {
            return Err(Error::FutureRevision);
        }
        if req.revision <= clock.compact_revision() {
            return Err(Error::Compacted);
        }
        clock.wait_resolved(req.revision).await;
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

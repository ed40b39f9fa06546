//! Recovery at open: loading every shard (newest checkpoint + WAL tail) in parallel, settling
//! multi-shard revisions across shards, and rebuilding the lease table.
//!
//! Separate because it runs once, on the opening thread, before any core exists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::checkpoint;
use crate::engine::meta;
use crate::engine::replica::Replica;
use crate::error::{Error, Result};
use crate::mvcc::ShardStore;
use crate::wal::{self, EntryKind};

/// What recovery hands each shard's core.
pub(super) struct RecoveredShard {
    pub(super) id: u32,
    pub(super) dir: PathBuf,
    pub(super) store: ShardStore,
    pub(super) wal: wal::Recovered,
    pub(super) replica: crate::engine::replica::Replica,
    pub(super) checkpoint_index: u64,
    /// Last revision the checkpoint reflects (0 without one).
    checkpoint_revision: i64,
    /// Multi-shard revisions to record as aborted before serving.
    pub(super) aborts: Vec<i64>,
    /// Leases this shard's log grants (id → TTL), after replaying its revokes.
    pub(super) leases: BTreeMap<i64, i64>,
    /// (index, term) of the checkpoint whose install a crash cut short: its anchor entry must
    /// be logged before anything else, or the next recovery would drop the new tail too.
    pub(super) anchor: Option<(u64, u64)>,
    /// Multi-shard outcomes the checkpoint remembers (revision → committed).
    pub(super) decisions: BTreeMap<i64, bool>,
    /// Shard 0: the auth store of its checkpoint, with (on a single node) the `Auth` records
    /// of its log tail applied. A cluster member applies those as its group commits them.
    pub(super) auth: crate::auth::AuthStore,
    /// Shard 0: the alarms of its checkpoint, with (on a single node) its log's `Alarm`
    /// records applied.
    pub(super) alarms: crate::alarm::Alarms,
}

/// Loads every shard and settles multi-shard revisions: one is committed iff every participant
/// logged its part and none logged an abort. Returns the shards, current and compact revision.
/// With `group` (a cluster member), the log's records are not applied here: which of them are
/// committed is the group's to say, and they are applied as it does.
pub(super) fn recover_all(
    path: &Path,
    nshards: u32,
    bypass_raft: bool,
    group: Option<&crate::engine::replica::Group>,
) -> Result<(Vec<RecoveredShard>, i64, i64)> {
    type Loaded = (
        ShardStore,
        wal::Recovered,
        Replica,
        u64,
        PathBuf,
        BTreeMap<i64, i64>,
        Option<(u64, u64)>,
        BTreeMap<i64, bool>,
        crate::auth::AuthStore,
        crate::alarm::Alarms,
    );
    // Shards recover independently (checkpoint load + WAL scan), in parallel.
    let loaded: Vec<Result<Loaded>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..nshards)
            .map(|id| {
                s.spawn(move || -> Result<_> {
                    let dir = meta::shard_dir(path, id);
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    checkpoint::discard_received(&dir)?;
                    let newest = checkpoint::load_newest(&dir, id)?;
                    let (index, term) = (newest.index, newest.term);
                    let mut wal = wal::recover(&dir.join("wal"), id, index)?;
                    let dropped = wal.term_at_after.is_some_and(|t| t != term);
                    if dropped {
                        // An install of the leader's checkpoint stopped before its anchor entry:
                        // what follows in the log is an old tail the leader does not share.
                        tracing::warn!(
                            shard = id,
                            index,
                            "dropping a log tail an installed snapshot replaced"
                        );
                        wal.entries.clear();
                        wal.last_index = index;
                    }
                    let replica = match group {
                        Some(g) => {
                            Replica::recover_group(id, (index, term), &wal, bypass_raft, g.clone())?
                        }
                        None => Replica::recover(id, (index, term), &wal, bypass_raft)?,
                    };
                    let leases = newest.extras.leases.iter().copied().collect();
                    let anchor = dropped.then_some((index, term));
                    let decisions = newest.extras.decisions.iter().copied().collect();
                    let auth = if newest.extras.auth.is_empty() {
                        crate::auth::AuthStore::new()
                    } else {
                        crate::auth::AuthStore::decode(&newest.extras.auth).map_err(|e| {
                            Error::corrupt(
                                &dir,
                                0,
                                format!("the newest checkpoint's auth store: {e:?}"),
                            )
                        })?
                    };
                    let alarms =
                        crate::alarm::Alarms::decode(&newest.extras.alarms).map_err(|e| {
                            Error::corrupt(
                                &dir,
                                0,
                                format!("the newest checkpoint's alarm set: {e:?}"),
                            )
                        })?;
                    Ok((
                        newest.store,
                        wal,
                        replica,
                        index,
                        dir,
                        leases,
                        anchor,
                        decisions,
                        auth,
                        alarms,
                    ))
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
        let (store, wal, replica, checkpoint_index, dir, leases, anchor, decisions, auth, alarms) =
            r?;
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
            leases,
            anchor,
            decisions,
            auth,
            alarms,
        });
    }

    if group.is_some() {
        let current = shards.iter().map(|s| s.store.last_revision()).max();
        let compact = shards.iter().map(|s| s.store.compact_revision()).max();
        for s in &mut shards {
            s.wal.entries.clear();
            s.wal.release_pages();
        }
        return Ok((shards, current.unwrap_or(0), compact.unwrap_or(0)));
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
                EntryKind::Alarm => {
                    let op = crate::alarm::AlarmOp::decode(&e.data).map_err(|err| {
                        Error::corrupt(
                            &s.dir,
                            e.index,
                            format!("alarm record {} does not decode: {err:?}", e.index),
                        )
                    })?;
                    s.alarms.apply(&op);
                }
                EntryKind::Auth => {
                    let op = crate::auth::AuthOp::decode(&e.data).map_err(|err| {
                        Error::corrupt(
                            &s.dir,
                            e.index,
                            format!("auth record {} does not decode: {err:?}", e.index),
                        )
                    })?;
                    // Logged ops were validated against this same state: an error changes
                    // nothing.
                    let _ = s.auth.apply(&op);
                }
                _ => {}
            }
        }
        if !s.aborts.is_empty() {
            tracing::warn!(shard = s.id, revisions = ?s.aborts, "aborting incomplete multi-shard writes");
        }
        // The replayed values and keys are slices of the mapped segments; let the pages the
        // scan and the replay touched go.
        s.wal.release_pages();
    }
    // A compaction interrupted after some shards logged it is completed on all of them.
    for s in &mut shards {
        s.store.compact(compact);
    }
    // The scan's decoded records are gone; their memory lies between the index's.
    crate::engine::checkpoint::release_free_memory();
    Ok((shards, current, compact))
}

/// The lease table after recovery. Every lease gets its full TTL again from now, as etcd does
/// when a new leader takes over (downtime must not expire leases whose holders could not renew).
pub(super) fn recovered_leases(shards: &[RecoveredShard]) -> crate::mvcc::lease::SharedLeases {
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

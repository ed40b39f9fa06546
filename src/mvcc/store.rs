//! [`ShardStore`]: one shard's key index plus the read, txn, compaction and checkpoint operations.

use std::ops::Bound;

use bytes::Bytes;

use super::events::{cut_at_revision, Changes, Event, EventKind, EventLog, EVENT_LOG_CAPACITY};
use super::index::Index;
use super::key_index::{KeyHistory, KeyIndex, Visible};
use super::query::{compare_holds, keeps_values_for_merge, RangePlan};
use super::{CompareOutcome, Effect, Execution, OpPartial, ShardRange, TxnPath, Undo};
use crate::error::Error;
use crate::kv::{
    Compare, DeleteRangeRequest, KeyRange, KeyValue, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use crate::mvcc::lease::LeaseKeys;

/// Reads at this revision see the latest state, including writes of a txn being executed.
const LATEST: i64 = i64::MAX;

/// The MVCC state of one shard: every retained revision of the keys it owns.
pub struct ShardStore {
    index: Index,
    last_revision: i64,
    /// 0 = never compacted.
    compact_revision: i64,
    /// Keys live at the latest revision, kept up to date by every write so `key_count` is O(1).
    live: usize,
    /// Live keys by their lease, kept up to date by every write (revoke deletes these keys).
    lease_keys: LeaseKeys,
    /// Recent changes, for watchers.
    events: EventLog,
}

/// One op of a logged write for [`ShardStore::share`]: the key to find the entry by, the copy
/// of it to keep, and for a put the copy of its value to keep.
pub struct SharedOp {
    pub probe: Bytes,
    pub key: Bytes,
    pub value: Option<Bytes>,
}

impl SharedOp {
    /// The ops of a logged write's `effects`, each found by its own key and keeping the copies
    /// `key` and `value` make of its key and value.
    pub fn of_effects(
        effects: &[super::Effect],
        mut key: impl FnMut(&Bytes) -> Bytes,
        mut value: impl FnMut(&Bytes) -> Bytes,
    ) -> Vec<SharedOp> {
        effects
            .iter()
            .map(|op| match op {
                super::Effect::Put {
                    key: k, value: v, ..
                } => SharedOp {
                    probe: k.clone(),
                    key: key(k),
                    value: Some(value(v)),
                },
                super::Effect::Delete { key: k } => SharedOp {
                    probe: k.clone(),
                    key: key(k),
                    value: None,
                },
            })
            .collect()
    }
}

// By hand rather than derived, so the index type needs neither Debug nor Default.
impl Default for ShardStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore")
            .field("last_revision", &self.last_revision)
            .field("compact_revision", &self.compact_revision)
            .field("live_keys", &self.live)
            .field("indexed_keys", &self.index.len())
            .finish()
    }
}

impl ShardStore {
    pub fn new() -> Self {
        ShardStore {
            index: Index::new(),
            last_revision: 0,
            compact_revision: 0,
            live: 0,
            lease_keys: LeaseKeys::default(),
            events: EventLog::new(0, EVENT_LOG_CAPACITY),
        }
    }

    /// Highest write revision applied (0 if none); restored from checkpoints too.
    pub fn last_revision(&self) -> i64 {
        self.last_revision
    }

    /// 0 if never compacted.
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// Live keys at the latest revision.
    pub fn key_count(&self) -> usize {
        self.live
    }

    /// Keys with any retained history, live or not (index size, for metrics).
    pub fn indexed_keys(&self) -> usize {
        self.index.len()
    }

    /// etcd Range at revision `rev` (resolved by the caller; `rev <= 0` reads the latest state).
    /// `req.revision` is ignored in favour of `rev`. Fails with `Compacted` if `rev` is below the
    /// compact revision; future revisions are the caller's to reject.
    ///
    /// Follows etcd's pipeline: with sort_order != NONE or any min/max filter, every key is
    /// fetched, filtered (0 = unset, bounds inclusive), sorted, then cut to `limit`; otherwise
    /// the first `limit + 1` keys are fetched in key order and, when the target is not KEY, sorted
    /// ascending by it (see [`super::prefetch_window`]). Ties sort by key ascending.
    /// `keys_only` empties values after sorting, except under a VALUE sort where a merge still
    /// needs them ([`super::keeps_values_for_merge`]); `count_only` returns only `count`.
    pub fn range(&self, req: &RangeRequest, rev: i64) -> Result<ShardRange, Error> {
        let rev = self.read_revision(rev)?;
        Ok(self.range_at(req, rev))
    }

    /// etcd's compare over this shard's keys in the compare's key/range at `rev` (`<= 0` =
    /// latest). See [`CompareOutcome`] for how a missing key counts.
    pub fn compare(&self, cmp: &Compare, rev: i64) -> Result<CompareOutcome, Error> {
        let rev = self.read_revision(rev)?;
        let mut out = CompareOutcome {
            matched: 0,
            all_true: true,
        };
        if let Some(kr) = KeyRange::from_etcd(&cmp.key, &cmp.range_end) {
            for v in self.visible_in(&kr, rev) {
                out.matched += 1;
                out.all_true &= compare_holds(cmp, Some(&v));
            }
        }
        if out.matched == 0 {
            out.all_true = compare_holds(cmp, None);
        }
        Ok(out)
    }

    /// Does executing `txn` along `path` write anything on this shard at the latest state, and do
    /// the puts' preconditions hold?
    ///
    /// As etcd, before anything executes: a put owned here with `ignore_value`/`ignore_lease` on a
    /// key that does not exist at the latest revision fails with `KeyNotFound`; a range op with an
    /// explicit revision above `latest_rev` fails with `FutureRevision`, and below the compact
    /// revision with `Compacted` (before any compaction etcd's floor is -1, so only revisions
    /// below -1 are "compacted" then). Put errors win over range errors, each in path order; a
    /// merger should likewise prefer `KeyNotFound` from any shard over another shard's range
    /// error. A path that does not fit the txn is `InvalidArgument`.
    ///
    /// Writes: every owned put, and a delete range with at least one live key here.
    pub fn check(
        &self,
        txn: &TxnRequest,
        path: &TxnPath,
        latest_rev: i64,
        owns: &dyn Fn(&[u8]) -> bool,
    ) -> Result<bool, Error> {
        let mut writes = false;
        let mut put_err = None;
        let mut range_err = None;
        for_each_leaf(txn, &path.0, &mut |op| match op {
            RequestOp::Put(p) if owns(&p.key) => {
                writes = true;
                if (p.ignore_value || p.ignore_lease) && put_err.is_none() && !self.is_live(&p.key)
                {
                    put_err = Some(Error::KeyNotFound);
                }
            }
            RequestOp::DeleteRange(d) if !writes => {
                writes = KeyRange::from_etcd(&d.key, &d.range_end)
                    .is_some_and(|kr| self.visible_in(&kr, LATEST).next().is_some());
            }
            RequestOp::Range(r) if r.revision != 0 && range_err.is_none() => {
                if r.revision > latest_rev {
                    range_err = Some(Error::FutureRevision);
                } else if r.revision < self.first_revision() {
                    range_err = Some(Error::Compacted);
                }
            }
            _ => {}
        })?;
        match put_err.or(range_err) {
            Some(e) => Err(e),
            None => Ok(writes),
        }
    }

    /// Executes the leaf ops along `path` at write revision `rev`, returning partials, effects and
    /// the undo log. Call only after [`Self::check`] succeeded.
    ///
    /// Range ops read at their explicit revision, or at `rev` (so they see earlier writes of the
    /// same txn, as etcd). Puts on keys owned elsewhere yield `NotOwned`. `ignore_value` /
    /// `ignore_lease` take the existing value / lease (should the key be gone by then, which
    /// duplicate-key validation rules out, the request's own are used). A delete range tombstones
    /// the live keys in range at `rev`. For a read-only path `rev` is the read revision and nothing
    /// changes; a path that writes nothing here leaves the store (and `last_revision`) unchanged.
    ///
    /// Panics if this would write at a revision not above `last_revision`.
    pub fn execute(
        &mut self,
        txn: &TxnRequest,
        path: &TxnPath,
        rev: i64,
        owns: &dyn Fn(&[u8]) -> bool,
    ) -> Execution {
        let mut ex = Execution {
            partials: Vec::new(),
            effects: Vec::new(),
            undo: Undo {
                rev,
                prev_last_revision: self.last_revision,
                keys: Vec::new(),
            },
        };
        // Reject a mismatched path before touching anything (check() reports it as an error).
        if let Err(e) = for_each_leaf(txn, &path.0, &mut |_| {}) {
            debug_assert!(false, "execute() on a path check() rejects: {e}");
            return ex;
        }
        let walked = for_each_leaf(txn, &path.0, &mut |op| {
            let partial = match op {
                RequestOp::Range(r) => self.txn_range(r, rev),
                RequestOp::Put(p) if !owns(&p.key) => OpPartial::NotOwned,
                RequestOp::Put(p) => {
                    let op = ex.partials.len() as u32;
                    self.txn_put(p, rev, op, &mut ex.effects, &mut ex.undo.keys)
                }
                RequestOp::DeleteRange(d) => {
                    let op = ex.partials.len() as u32;
                    self.txn_delete(d, rev, op, &mut ex.effects, &mut ex.undo.keys)
                }
                RequestOp::Txn(_) => return, // never a leaf
            };
            ex.partials.push(partial);
        });
        debug_assert!(walked.is_ok(), "path validated above");
        if ex.wrote() {
            self.last_revision = rev;
        }
        ex
    }

    /// Exactly reverses an [`Self::execute`] (a multi-shard txn aborted after this shard ran its
    /// part). Must be called before any later write or a compaction at or above the txn's
    /// revision; panics on a later write.
    pub fn rollback(&mut self, undo: Undo) {
        if undo.keys.is_empty() {
            return;
        }
        assert_eq!(
            self.last_revision, undo.rev,
            "rollback of revision {} after a later write",
            undo.rev
        );
        debug_assert!(
            self.compact_revision < undo.rev,
            "rollback after compacting the txn"
        );
        for key in &undo.keys {
            self.strip(key, undo.rev);
        }
        self.events.remove_revision(undo.rev);
        self.last_revision = undo.prev_last_revision;
    }

    /// Replays effects at `rev` (WAL recovery); produces exactly the state `execute` produced.
    /// An empty list is a no-op. Panics if `rev` is not above `last_revision`.
    pub fn apply(&mut self, effects: &[Effect], rev: i64) {
        if effects.is_empty() {
            return;
        }
        for effect in effects {
            match effect {
                Effect::Put { key, value, lease } => {
                    self.write_put(key, value.clone(), *lease, rev);
                }
                Effect::Delete { key } => {
                    let deleted = self.write_delete(key, rev);
                    debug_assert!(deleted, "replayed delete of a key that is not live");
                }
            }
        }
        self.last_revision = rev;
        // Replay does not know the ops' positions; watchers read these from history.
        self.events.skip_to(rev);
    }

    /// etcd compaction at `rev`: reads at any revision `>= rev` are unchanged, history below is
    /// dropped (reads below `rev` then fail with `Compacted`), and keys whose last event at or
    /// below `rev` is a delete, with nothing after, disappear. Compacting at or below the current
    /// compact revision is a no-op. `rev` may exceed this shard's `last_revision` (revisions are
    /// global), but later writes must be above it.
    pub fn compact(&mut self, rev: i64) {
        if rev <= self.compact_revision {
            return;
        }
        self.compact_revision = rev;
        self.index.retain(|_, ki| ki.compact(rev));
    }

    /// For checkpoints: the histories of up to `max` keys in key order, starting after `after`
    /// (`None` = from the first key), restricted to revisions `<= upto` (keys with nothing that old
    /// are skipped). Page with `after` = the last key returned. `upto` should be at least the
    /// compact revision, as older history is gone.
    pub fn export_keys(&self, after: Option<&[u8]>, max: usize, upto: i64) -> Vec<KeyHistory> {
        let lo = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.index
            .range(lo, Bound::Unbounded)
            .filter_map(|(key, ki)| ki.export(key, upto))
            .take(max)
            .collect()
    }

    /// Rebuilds a store from exported histories, bulk-loading the index. Input must be in strictly
    /// increasing key order and well formed ([`KeyHistory::is_well_formed`]); histories out of
    /// order or without generations are dropped (debug builds panic on them).
    pub fn from_histories(
        histories: impl IntoIterator<Item = KeyHistory>,
        last_revision: i64,
        compact_revision: i64,
    ) -> Self {
        let mut live = 0;
        let mut prev: Option<Bytes> = None;
        let entries = histories.into_iter().filter_map(|h| {
            let ordered = prev.as_ref().is_none_or(|p| h.key > *p);
            debug_assert!(ordered, "histories out of key order");
            debug_assert!(h.is_well_formed(), "malformed history for {:?}", h.key);
            if !ordered || h.generations.is_empty() {
                return None;
            }
            prev = Some(h.key.clone());
            let ki = KeyIndex::from_generations(h.generations);
            debug_assert!(
                ki.max_revision() <= last_revision,
                "history above last_revision"
            );
            live += usize::from(ki.is_live());
            Some((h.key, ki))
        });
        let index = Index::from_sorted_iter(entries);
        let mut lease_keys = LeaseKeys::default();
        for (key, ki) in index.range(Bound::<&[u8]>::Unbounded, Bound::Unbounded) {
            if let Some(v) = ki.at(key, LATEST).filter(|v| v.lease != 0) {
                lease_keys.moved(key, 0, v.lease);
            }
        }
        ShardStore {
            index,
            last_revision,
            compact_revision: compact_revision.max(0),
            live,
            lease_keys,
            events: EventLog::new(last_revision, EVENT_LOG_CAPACITY),
        }
    }

    /// Serves `key` and the values of its puts at the given revisions from the buffers passed
    /// in: identical copies that cost less than the index's own (a compact arena of keys, slices
    /// of a durable checkpoint's mapping), so the index's copies are freed once nothing else
    /// holds them. Reads return the same bytes either way. Matching values by revision is exact:
    /// a shard never has two different puts of one key at one revision, and a checkpoint holds
    /// only committed ones. Returns how many values were taken (puts compacted away meanwhile,
    /// or a key no longer indexed, take none).
    pub fn adopt(&mut self, key: Bytes, values: &[(i64, Bytes)]) -> usize {
        match self.index.replace_key(key) {
            Some(ki) => values.iter().filter(|(rev, v)| ki.adopt(*rev, v)).count(),
            None => 0,
        }
    }

    /// The write at `rev` was logged: its keys and values in the index and in the watch feed
    /// take the copies `ops` gives (slices of the logged record, or of the mapped log segment
    /// and a key arena), so the copies the write was executed with can be freed. Entries are
    /// found by each op's `probe` (an equal key whose memory may be read), so the new copies
    /// are not read here. Puts the store does not hold at `rev` as logged are left alone.
    pub fn share(&mut self, ops: &[SharedOp], rev: i64) {
        /// Up to this many ops, each event scans them (no map to build on the hot path).
        const SCAN_OPS: usize = 8;
        for op in ops {
            if let Some(value) = &op.value {
                if let Some(ki) = self.index.replace_key_by(op.probe.as_ref(), op.key.clone()) {
                    ki.adopt(rev, value);
                }
            }
        }
        // A delete-range of many keys has as many ops as events: look them up by key rather
        // than scanning the ops for every event. The first op of a key wins, as in a scan.
        let by_key: Option<std::collections::HashMap<(bool, &[u8]), &SharedOp>> =
            (ops.len() > SCAN_OPS).then(|| {
                ops.iter()
                    .rev()
                    .map(|op| ((op.value.is_some(), op.probe.as_ref()), op))
                    .collect()
            });
        for event in self.events.revision_mut(rev) {
            let put = event.kind == super::EventKind::Put;
            let fits = |op: &&SharedOp| {
                op.value
                    .as_ref()
                    .is_none_or(|v| v.len() == event.kv.value.len())
            };
            let shared = match &by_key {
                Some(m) => m.get(&(put, event.kv.key.as_ref())).copied().filter(fits),
                None => ops
                    .iter()
                    .find(|op| op.value.is_some() == put && op.probe == event.kv.key && fits(op)),
            };
            if let Some(op) = shared {
                event.kv.key = op.key.clone();
                if let Some(v) = &op.value {
                    event.kv.value = v.clone();
                }
            }
        }
    }

    /// [`Self::share`] with the logged record's own keys and values (`record`: its ops,
    /// decoded so every key and value is a slice of the record's buffer).
    pub fn share_record(&mut self, record: &[super::Effect], rev: i64) {
        let ops = SharedOp::of_effects(record, Bytes::clone, Bytes::clone);
        self.share(&ops, rev);
    }

    /// After [`Self::adopt`] up to revision `upto`: recent events at or below it take the
    /// index's copy of their key and (puts) value, so the watch feed does not keep the heap
    /// copies, or whole logged records, alive. In steps, so that an executor can serve between
    /// them (the event log holds up to 64k events, tens of milliseconds of lookups): handles
    /// the events with revisions in `(after, upto]`, stopping once `budget` are done and a
    /// revision is complete. Returns the revision to go on after, or `None` once done.
    pub fn adopt_event_values(&mut self, after: i64, upto: i64, budget: usize) -> Option<i64> {
        let index = &mut self.index;
        let (mut done, mut last) = (0, after);
        for event in self.events.between_mut(after, upto) {
            let rev = event.revision();
            if done >= budget && rev != last {
                return Some(last);
            }
            done += 1;
            last = rev;
            let kv = &mut event.kv;
            if event.kind != super::EventKind::Put {
                // A delete's key may be a slice of its logged record: take the index's key
                // (its tombstone keeps it), or an exact copy once compaction dropped it.
                kv.key = match index.get_key_value_mut(kv.key.as_ref()) {
                    Some((k, _)) => k.clone(),
                    None => Bytes::copy_from_slice(&kv.key),
                };
                continue;
            }
            // The key too: it may be a slice of a logged record the next compaction frees.
            if let Some((k, ki)) = index.get_key_value_mut(kv.key.as_ref()) {
                kv.key = k.clone();
                if let Some(v) = ki
                    .value_at(kv.mod_revision)
                    .filter(|v| v.len() == kv.value.len())
                {
                    debug_assert_eq!(v, &kv.value, "event value differs from the index");
                    kv.value = v.clone();
                }
            }
        }
        None
    }

    /// Live keys attached to `lease`, in key order.
    pub fn lease_keys(&self, lease: i64) -> Vec<Bytes> {
        self.lease_keys.keys(lease)
    }

    /// The lease of `key` at the latest revision (0 if none or not live).
    fn live_lease(&self, key: &[u8]) -> i64 {
        let k = Bytes::new(); // only labels the view; the lease is all we read
        self.index
            .get(key)
            .and_then(|ki| ki.at(&k, LATEST).map(|v| v.lease))
            .unwrap_or(0)
    }

    /// The changes in `ranges` with revisions in `(after, upto]`, at most about `max` events
    /// (a revision is never split). Recent changes come from the event log; older ones are
    /// rebuilt from the retained history, which fails with `Compacted` once compaction dropped
    /// revisions the caller still needs (`after + 1 < compact revision`). `upto` must not
    /// exceed what the caller knows to be resolved store-wide.
    pub fn changes(
        &self,
        ranges: &[KeyRange],
        after: i64,
        upto: i64,
        max: usize,
    ) -> Result<Changes, Error> {
        let mut events = Vec::new();
        let floor = self.events.floor();
        let mut complete = upto;
        if after < floor {
            if after + 1 < self.compact_revision {
                return Err(Error::Compacted);
            }
            let hist_upto = upto.min(floor);
            // Overlapping ranges (many watchers) must not scan, and so report, a key twice.
            for kr in &merge_ranges(ranges) {
                let hi = kr
                    .end
                    .as_ref()
                    .map_or(Bound::Unbounded, |e| Bound::Excluded(e.as_ref()));
                for (key, ki) in self.index.range(Bound::Included(kr.start.as_ref()), hi) {
                    ki.events_between(key, after, hist_upto, &mut events);
                }
            }
            // Stable: a key's events at one revision keep their history order.
            events.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
            complete = cut_at_revision(&mut events, max, hist_upto);
            if complete < hist_upto || upto <= floor {
                return Ok(Changes {
                    events,
                    complete_through: complete,
                });
            }
        }
        if upto > floor {
            self.events
                .read(ranges, after.max(floor), upto, &mut events);
            complete = cut_at_revision(&mut events, max, upto);
        }
        Ok(Changes {
            events,
            complete_through: complete,
        })
    }

    /// A store whose event log keeps only `capacity` events, so tests reach the history path.
    #[cfg(test)]
    pub(crate) fn with_event_capacity(capacity: usize) -> Self {
        ShardStore {
            events: EventLog::new(0, capacity),
            ..Self::new()
        }
    }

    /// Revisions at or below this are served from history, not the event log.
    pub fn event_floor(&self) -> i64 {
        self.events.floor()
    }

    /// The key as it was just before `rev` (a watcher's `prev_kv`); `None` if it did not exist or
    /// that history was compacted away.
    pub fn previous(&self, key: &[u8], rev: i64) -> Option<crate::kv::KeyValue> {
        if rev - 1 < self.compact_revision {
            return None;
        }
        let (k, ki) = self
            .index
            .range(Bound::Included(key), Bound::Included(key))
            .next()?;
        ki.at(k, rev - 1).map(|v| v.to_kv(false))
    }

    // ---- internals ----

    /// Maps a read revision to the one to use, rejecting compacted ones.
    fn read_revision(&self, rev: i64) -> Result<i64, Error> {
        if rev <= 0 {
            Ok(LATEST)
        } else if rev < self.compact_revision {
            Err(Error::Compacted)
        } else {
            Ok(rev)
        }
    }

    /// The lowest revision an explicit txn range may name: etcd's compactMainRev, -1 until the
    /// first compaction.
    fn first_revision(&self) -> i64 {
        if self.compact_revision > 0 {
            self.compact_revision
        } else {
            -1
        }
    }

    fn is_live(&self, key: &[u8]) -> bool {
        self.index.get(key).is_some_and(KeyIndex::is_live)
    }

    /// Keys of `kr` that exist at `rev`, in key order.
    fn visible_in<'a>(
        &'a self,
        kr: &'a KeyRange,
        rev: i64,
    ) -> impl Iterator<Item = Visible<'a>> + 'a {
        let hi = kr
            .end
            .as_ref()
            .map_or(Bound::Unbounded, |e| Bound::Excluded(e.as_ref()));
        self.index
            .range(Bound::Included(kr.start.as_ref()), hi)
            .filter_map(move |(key, ki)| ki.at(key, rev))
    }

    fn range_at(&self, req: &RangeRequest, rev: i64) -> ShardRange {
        let mut out = ShardRange::default();
        let Some(kr) = KeyRange::from_etcd(&req.key, &req.range_end) else {
            return out;
        };
        let plan = RangePlan::new(req);
        let mut entries = Vec::new();
        for v in self.visible_in(&kr, rev) {
            out.count += 1;
            if req.count_only || !plan.passes(&v) {
                continue;
            }
            out.filtered += 1;
            if plan.collect.is_none_or(|c| entries.len() < c) {
                entries.push(v);
            }
        }
        plan.sort_and_cut(&mut entries);
        let keys_only = req.keys_only && !keeps_values_for_merge(req);
        out.kvs = entries.into_iter().map(|v| v.to_kv(keys_only)).collect();
        out
    }

    fn txn_range(&self, r: &RangeRequest, rev: i64) -> OpPartial {
        // etcd reads a revision <= 0 at the txn's own revision; check() rejected bad explicit ones.
        let at = if r.revision > 0 { r.revision } else { rev };
        match self.range(r, at) {
            Ok(sr) => OpPartial::Range(sr),
            Err(e) => {
                debug_assert!(false, "txn range failed after check(): {e}");
                OpPartial::Range(ShardRange::default())
            }
        }
    }

    fn txn_put(
        &mut self,
        p: &PutRequest,
        rev: i64,
        op: u32,
        effects: &mut Vec<Effect>,
        touched: &mut Vec<Bytes>,
    ) -> OpPartial {
        let needs_prev = p.prev_kv || p.ignore_value || p.ignore_lease;
        let prev = if needs_prev {
            self.index
                .get(p.key.as_ref())
                .and_then(|ki| ki.at(&p.key, LATEST))
                .map(|v| v.to_kv(false))
        } else {
            None
        };
        let value = match &prev {
            Some(kv) if p.ignore_value => kv.value.clone(),
            _ => p.value.clone(),
        };
        let lease = match &prev {
            Some(kv) if p.ignore_lease => kv.lease,
            _ => p.lease,
        };
        let (create_revision, version) = self.write_put(&p.key, value.clone(), lease, rev);
        self.events.push(Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: p.key.clone(),
                create_revision,
                mod_revision: rev,
                version,
                value: value.clone(),
                lease,
            },
            op,
        });
        effects.push(Effect::Put {
            key: p.key.clone(),
            value,
            lease,
        });
        touched.push(p.key.clone());
        OpPartial::Put {
            prev_kv: if p.prev_kv { prev } else { None },
        }
    }

    fn txn_delete(
        &mut self,
        d: &DeleteRangeRequest,
        rev: i64,
        op: u32,
        effects: &mut Vec<Effect>,
        touched: &mut Vec<Bytes>,
    ) -> OpPartial {
        let mut prev_kvs = Vec::new();
        let mut victims = Vec::new();
        if let Some(kr) = KeyRange::from_etcd(&d.key, &d.range_end) {
            for v in self.visible_in(&kr, LATEST) {
                victims.push(v.key.clone());
                if d.prev_kv {
                    prev_kvs.push(v.to_kv(false));
                }
            }
        }
        for key in &victims {
            let deleted = self.write_delete(key, rev);
            debug_assert!(deleted, "victim was live");
            self.events.push(Event::deleted(key.clone(), rev, op));
            effects.push(Effect::Delete { key: key.clone() });
        }
        let deleted = victims.len() as i64;
        touched.extend(victims);
        OpPartial::DeleteRange { deleted, prev_kvs }
    }

    /// Every mutation goes through here: revisions only move forward.
    fn assert_write_revision(&self, rev: i64) {
        assert!(
            rev > self.last_revision,
            "write at revision {rev} not above last revision {}",
            self.last_revision
        );
        debug_assert!(rev > self.compact_revision, "write at a compacted revision");
    }

    /// Puts `key` at `rev` with one descent of the index (the put path is dominated by those
    /// cache-missing descents); returns the key's new create revision and version.
    fn write_put(&mut self, key: &Bytes, value: Bytes, lease: i64, rev: i64) -> (i64, i64) {
        self.assert_write_revision(rev);
        let (old_lease, now) = match self.index.get_mut(key.as_ref()) {
            Some(ki) => {
                let old_lease = ki.at(key, LATEST).map_or(0, |v| v.lease);
                if !ki.is_live() {
                    self.live += 1;
                }
                ki.put(rev, value, lease);
                let now = ki
                    .at(key, rev)
                    .expect("a key is visible at the revision it was just put at");
                (old_lease, (now.create_revision, now.version))
            }
            None => {
                self.index
                    .insert(key.clone(), KeyIndex::created(rev, value, lease));
                self.live += 1;
                (0, (rev, 1))
            }
        };
        self.lease_keys.moved(key, old_lease, lease);
        now
    }

    /// Tombstones `key` at `rev`; false if it was not live.
    fn write_delete(&mut self, key: &[u8], rev: i64) -> bool {
        self.assert_write_revision(rev);
        let old = self.live_lease(key);
        if old != 0 {
            self.lease_keys.moved(&Bytes::copy_from_slice(key), old, 0);
        }
        let deleted = self.index.get_mut(key).is_some_and(|ki| ki.delete(rev));
        if deleted {
            self.live -= 1;
        }
        deleted
    }

    /// Removes the events at `rev` (the newest) from `key`, dropping the key if nothing is left.
    fn strip(&mut self, key: &[u8], rev: i64) {
        let before = self.live_lease(key);
        let Some(ki) = self.index.get_mut(key) else {
            return;
        };
        let was_live = ki.is_live();
        ki.strip(rev);
        let now_live = ki.is_live();
        let empty = ki.is_empty();
        match (was_live, now_live) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
        if empty {
            self.index.remove(key);
        }
        let after = self.live_lease(key);
        self.lease_keys
            .moved(&Bytes::copy_from_slice(key), before, after);
    }
}

/// The union of `ranges` as disjoint ranges in key order.
fn merge_ranges(ranges: &[KeyRange]) -> Vec<KeyRange> {
    let mut sorted: Vec<KeyRange> = ranges.to_vec();
    sorted.sort_by(|a, b| a.start.cmp(&b.start));
    let mut out: Vec<KeyRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        if let Some(last) = out.last_mut() {
            // `None` = unbounded; overlapping or touching ranges merge.
            let overlaps = last.end.as_ref().is_none_or(|e| r.start <= *e);
            if overlaps {
                last.end = match (&last.end, &r.end) {
                    (None, _) | (_, None) => None,
                    (Some(a), Some(b)) => Some(a.max(b).clone()),
                };
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// Calls `f` on each leaf op (Range/Put/DeleteRange) of `txn` along `path`, in execution order.
/// Fails if `path` is shorter or longer than the txn nodes it meets.
fn for_each_leaf<'t>(
    txn: &'t TxnRequest,
    path: &[bool],
    f: &mut dyn FnMut(&'t RequestOp),
) -> Result<(), Error> {
    fn walk<'t>(
        txn: &'t TxnRequest,
        path: &[bool],
        pos: &mut usize,
        f: &mut dyn FnMut(&'t RequestOp),
    ) -> Result<(), Error> {
        let Some(&branch) = path.get(*pos) else {
            return Err(Error::InvalidArgument(
                "txn path shorter than the txn".into(),
            ));
        };
        *pos += 1;
        let ops = if branch { &txn.success } else { &txn.failure };
        for op in ops {
            match op {
                RequestOp::Txn(nested) => walk(nested, path, pos, f)?,
                leaf => f(leaf),
            }
        }
        Ok(())
    }
    let mut pos = 0;
    walk(txn, path, &mut pos, f)?;
    if pos != path.len() {
        return Err(Error::InvalidArgument(
            "txn path longer than the txn".into(),
        ));
    }
    Ok(())
}

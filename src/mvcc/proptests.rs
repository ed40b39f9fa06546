//! Property tests: random histories of puts, deletes, delete-ranges, nested txns, aborted txns
//! (rollback), compactions and gaps (revisions taken by other shards), checked against a naive
//! model that keeps every event of every key and replays them on each read.
//!
//! Checked after every step: txn check/partials/effects/compare outcomes against the model, a
//! replica fed only `apply(effects)` + `compact` is structurally identical, rollback restores the
//! exact structure, `last_revision`/`key_count`. At the end of each history: reads at every
//! revision (compacted ones must fail) and checkpoint export + rebuild round-trips.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::error::Error;
use crate::kv::{
    Compare, CompareResult, CompareTarget, DeleteRangeRequest, KeyRange, KeyValue, PutRequest,
    RangeRequest, RequestOp, SortOrder, SortTarget, TargetUnion, TxnRequest,
};

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Ev {
    Put(Bytes, i64),
    Del,
}

#[derive(Clone, Debug, Default)]
struct Model {
    /// Every event of every key, in order (several may share a revision within one txn).
    hist: BTreeMap<Bytes, Vec<(i64, Ev)>>,
    /// Last revision this shard wrote at.
    last: i64,
    /// Last revision allocated globally (this shard or others).
    global: i64,
    compact: i64,
}

/// What the model expects from a range: the per-shard contract and etcd's literal answer.
#[derive(Debug)]
struct Expected {
    shard: ShardRange,
    etcd_kvs: Vec<KeyValue>,
    etcd_more: bool,
}

fn in_range(k: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        k == start
    } else if end == b"\0" {
        k >= start
    } else {
        k >= start && k < end
    }
}

fn has_filters(r: &RangeRequest) -> bool {
    r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
}

fn passes(r: &RangeRequest, kv: &KeyValue) -> bool {
    !((r.max_mod_revision != 0 && kv.mod_revision > r.max_mod_revision)
        || (r.min_mod_revision != 0 && kv.mod_revision < r.min_mod_revision)
        || (r.max_create_revision != 0 && kv.create_revision > r.max_create_revision)
        || (r.min_create_revision != 0 && kv.create_revision < r.min_create_revision))
}

/// etcd's sort on a key-ordered list; a *stable* sort on the target alone leaves ties in key order.
fn etcd_sort(r: &RangeRequest, kvs: &mut [KeyValue]) {
    let mut order = r.sort_order;
    if order == SortOrder::None && r.sort_target != SortTarget::Key {
        order = SortOrder::Ascend;
    }
    if order == SortOrder::None {
        return;
    }
    let target = r.sort_target;
    kvs.sort_by(|a, b| {
        let o = match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            o.reverse()
        } else {
            o
        }
    });
}

fn strip_values(kvs: &mut [KeyValue]) {
    for kv in kvs {
        kv.value = Bytes::new();
    }
}

fn cmp_holds(c: &Compare, kv: &KeyValue) -> bool {
    let ord = match (c.target, &c.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => kv.value.as_ref().cmp(v.as_ref()),
        (CompareTarget::Value, _) => kv.value.as_ref().cmp(&b""[..]),
        (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.version.cmp(v),
        (CompareTarget::Version, _) => kv.version.cmp(&0),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => kv.create_revision.cmp(v),
        (CompareTarget::Create, _) => kv.create_revision.cmp(&0),
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
        (CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
        (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => kv.lease.cmp(v),
        (CompareTarget::Lease, _) => kv.lease.cmp(&0),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// Which error check() should give, as a comparable tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CheckErr {
    KeyNotFound,
    Future,
    Compacted,
}

fn tag(e: &Error) -> CheckErr {
    match e {
        Error::KeyNotFound => CheckErr::KeyNotFound,
        Error::FutureRevision => CheckErr::Future,
        Error::Compacted => CheckErr::Compacted,
        other => panic!("unexpected check error {other}"),
    }
}

/// The key after one more event at revision `r`.
fn step_kv(cur: Option<KeyValue>, key: &Bytes, r: i64, ev: &Ev) -> Option<KeyValue> {
    match ev {
        Ev::Del => None,
        Ev::Put(v, l) => Some(match cur {
            Some(kv) => KeyValue {
                mod_revision: r,
                version: kv.version + 1,
                value: v.clone(),
                lease: *l,
                ..kv
            },
            None => KeyValue {
                key: key.clone(),
                create_revision: r,
                mod_revision: r,
                version: 1,
                value: v.clone(),
                lease: *l,
            },
        }),
    }
}

impl Model {
    /// Replays the key's events up to `rev`.
    fn kv_at(&self, key: &Bytes, rev: i64) -> Option<KeyValue> {
        let mut cur: Option<KeyValue> = None;
        for (r, ev) in self.hist.get(key)? {
            if *r > rev {
                break;
            }
            cur = step_kv(cur, key, *r, ev);
        }
        cur
    }

    fn live(&self, start: &[u8], end: &[u8], rev: i64) -> Vec<KeyValue> {
        self.hist
            .keys()
            .filter(|k| in_range(k, start, end))
            .filter_map(|k| self.kv_at(k, rev))
            .collect()
    }

    fn live_count(&self) -> usize {
        self.live(b"", b"\0", i64::MAX).len()
    }

    /// `rev <= 0` = latest. `None` = compacted.
    fn range(&self, r: &RangeRequest, rev: i64) -> Option<Expected> {
        if rev > 0 && rev < self.compact {
            return None;
        }
        let rev = if rev <= 0 { i64::MAX } else { rev };
        let all = self.live(&r.key, &r.range_end, rev);
        let count = all.len() as i64;
        let limit = usize::try_from(r.limit).unwrap_or(0);

        // etcd literally: fetch limit+1 unless sorting/filtering, prune, sort, truncate.
        let fetch = if r.sort_order != SortOrder::None || has_filters(r) {
            0
        } else {
            limit
        };
        let mut etcd_kvs: Vec<KeyValue> = if r.count_only {
            vec![]
        } else if fetch > 0 {
            all.iter().take(fetch + 1).cloned().collect()
        } else {
            all.clone()
        };
        etcd_kvs.retain(|kv| passes(r, kv));
        etcd_sort(r, &mut etcd_kvs);
        let etcd_more = limit > 0 && etcd_kvs.len() > limit;
        if limit > 0 {
            etcd_kvs.truncate(limit);
        }

        // The per-shard contract.
        let shard = if r.count_only {
            ShardRange {
                kvs: vec![],
                filtered: 0,
                count,
            }
        } else {
            let passing: Vec<KeyValue> = all.iter().filter(|kv| passes(r, kv)).cloned().collect();
            let filtered = passing.len() as i64;
            let window = r.sort_order == SortOrder::None
                && r.sort_target != SortTarget::Key
                && !has_filters(r)
                && limit > 0;
            let kvs = if window {
                let mut w: Vec<KeyValue> = all.iter().take(limit + 1).cloned().collect();
                etcd_sort(r, &mut w);
                w
            } else {
                let mut p = passing;
                etcd_sort(r, &mut p);
                if limit > 0 {
                    p.truncate(limit);
                }
                p
            };
            ShardRange {
                kvs,
                filtered,
                count,
            }
        };
        let mut out = Expected {
            shard,
            etcd_kvs,
            etcd_more,
        };
        if r.keys_only {
            if r.sort_target != SortTarget::Value {
                strip_values(&mut out.shard.kvs);
            }
            strip_values(&mut out.etcd_kvs);
        }
        Some(out)
    }

    fn compare(&self, c: &Compare) -> CompareOutcome {
        let hits = self.live(&c.key, &c.range_end, i64::MAX);
        if hits.is_empty() {
            CompareOutcome {
                matched: 0,
                all_true: cmp_holds(c, &KeyValue::default()),
            }
        } else {
            CompareOutcome {
                matched: hits.len() as u64,
                all_true: hits.iter().all(|kv| cmp_holds(c, kv)),
            }
        }
    }

    /// Chooses the txn path as etcd: every compare at the pre-txn state, depth-first along the
    /// chosen ops. Also checks the store's per-shard compare outcomes against the model's.
    fn path(&self, t: &TxnRequest, store: &ShardStore, out: &mut Vec<bool>) {
        let mut ok = true;
        for c in &t.compare {
            let m = self.compare(c);
            let s = store.compare(c, 0).expect("compare at latest");
            assert_eq!(s, m, "compare {c:?}");
            // etcd: a VALUE compare over no keys fails.
            ok &= if m.matched == 0 && c.target == CompareTarget::Value {
                false
            } else {
                m.all_true
            };
        }
        out.push(ok);
        for op in if ok { &t.success } else { &t.failure } {
            if let RequestOp::Txn(n) = op {
                self.path(n, store, out);
            }
        }
    }

    fn leaves<'t>(
        t: &'t TxnRequest,
        path: &mut std::slice::Iter<bool>,
        out: &mut Vec<&'t RequestOp>,
    ) {
        let ok = *path.next().expect("path fits");
        for op in if ok { &t.success } else { &t.failure } {
            match op {
                RequestOp::Txn(n) => Self::leaves(n, path, out),
                leaf => out.push(leaf),
            }
        }
    }

    fn check(&self, ops: &[&RequestOp]) -> Result<bool, CheckErr> {
        let mut writes = false;
        let mut put_err = None;
        let mut range_err = None;
        for op in ops {
            match op {
                RequestOp::Put(p) => {
                    writes = true;
                    if (p.ignore_value || p.ignore_lease)
                        && self.kv_at(&p.key, i64::MAX).is_none()
                        && put_err.is_none()
                    {
                        put_err = Some(CheckErr::KeyNotFound);
                    }
                }
                RequestOp::DeleteRange(d) => {
                    writes |= !self.live(&d.key, &d.range_end, i64::MAX).is_empty();
                }
                RequestOp::Range(r) if r.revision != 0 && range_err.is_none() => {
                    let floor = if self.compact > 0 { self.compact } else { -1 };
                    if r.revision > self.global {
                        range_err = Some(CheckErr::Future);
                    } else if r.revision < floor {
                        range_err = Some(CheckErr::Compacted);
                    }
                }
                _ => {}
            }
        }
        match put_err.or(range_err) {
            Some(e) => Err(e),
            None => Ok(writes),
        }
    }

    /// Executes leaves at `rev`, appending events; returns partials and effects.
    fn execute(&mut self, ops: &[&RequestOp], rev: i64) -> (Vec<OpPartial>, Vec<Effect>) {
        let mut partials = vec![];
        let mut effects = vec![];
        for op in ops {
            match op {
                RequestOp::Range(r) => {
                    let at = if r.revision > 0 { r.revision } else { rev };
                    let e = self.range(r, at).expect("checked revision");
                    partials.push(OpPartial::Range(e.shard));
                }
                RequestOp::Put(p) => {
                    let prev = self.kv_at(&p.key, i64::MAX);
                    let value = match &prev {
                        Some(kv) if p.ignore_value => kv.value.clone(),
                        _ => p.value.clone(),
                    };
                    let lease = match &prev {
                        Some(kv) if p.ignore_lease => kv.lease,
                        _ => p.lease,
                    };
                    self.hist
                        .entry(p.key.clone())
                        .or_default()
                        .push((rev, Ev::Put(value.clone(), lease)));
                    effects.push(Effect::Put {
                        key: p.key.clone(),
                        value,
                        lease,
                    });
                    partials.push(OpPartial::Put {
                        prev_kv: if p.prev_kv { prev } else { None },
                    });
                }
                RequestOp::DeleteRange(d) => {
                    let victims = self.live(&d.key, &d.range_end, i64::MAX);
                    for kv in &victims {
                        self.hist
                            .get_mut(&kv.key)
                            .expect("live key has history")
                            .push((rev, Ev::Del));
                        effects.push(Effect::Delete {
                            key: kv.key.clone(),
                        });
                    }
                    partials.push(OpPartial::DeleteRange {
                        deleted: victims.len() as i64,
                        prev_kvs: if d.prev_kv { victims } else { vec![] },
                    });
                }
                RequestOp::Txn(_) => unreachable!("leaves only"),
            }
        }
        (partials, effects)
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by steps and the end of a history
// ---------------------------------------------------------------------------------------------

fn all_keys(_: &[u8]) -> bool {
    true
}

fn dump(s: &ShardStore) -> (Vec<KeyHistory>, i64, i64, usize) {
    (
        s.export_keys(None, usize::MAX, i64::MAX),
        s.last_revision(),
        s.compact_revision(),
        s.key_count(),
    )
}

/// Histories are well formed and hold nothing compaction should have dropped: no generation
/// tombstoned at or below the compact revision, and at most one put at or below it (reads cannot
/// tell, memory can).
fn assert_compacted_shape(s: &ShardStore) {
    let c = s.compact_revision();
    for h in s.export_keys(None, usize::MAX, i64::MAX) {
        assert!(h.is_well_formed(), "{h:?}");
        assert!(
            h.generations
                .iter()
                .all(|g| g.tombstone.is_none_or(|t| t > c)),
            "{h:?}"
        );
        let old_puts = h.generations[0]
            .puts
            .iter()
            .filter(|p| p.revision <= c)
            .count();
        assert!(c == 0 || old_puts <= 1, "{h:?}");
    }
}

/// The store's range equals the model's, and the documented merge rule (cut to limit,
/// more = filtered > limit) yields etcd's literal answer.
fn assert_range(store: &ShardStore, model: &Model, r: &RangeRequest, rev: i64) {
    let got = store.range(r, rev);
    match model.range(r, rev) {
        None => assert!(matches!(got, Err(Error::Compacted)), "rev {rev}: {got:?}"),
        Some(want) => {
            let got = got.expect("not compacted");
            assert_eq!(got, want.shard, "range {r:?} at {rev}");
            // The planner's merge of this one shard must give etcd's literal answer.
            let merged = crate::mvcc::plan::merge_range(r, vec![got]);
            assert_eq!(merged.kvs, want.etcd_kvs, "etcd kvs for {r:?} at {rev}");
            assert_eq!(merged.more, want.etcd_more, "more for {r:?} at {rev}");
        }
    }
}

/// A fixed battery of ranges exercising every sort, filter and limit shape.
fn battery() -> Vec<RangeRequest> {
    let mut v = vec![
        RangeRequest::range(Bytes::new(), Bytes::from_static(b"\0")),
        RangeRequest::range(Bytes::from_static(b"a"), Bytes::from_static(b"b")),
        RangeRequest::key(Bytes::from_static(b"ab")),
        RangeRequest::range(Bytes::from_static(b"b"), Bytes::from_static(b"a")),
    ];
    for order in [SortOrder::None, SortOrder::Ascend, SortOrder::Descend] {
        for target in [
            SortTarget::Key,
            SortTarget::Version,
            SortTarget::Create,
            SortTarget::Mod,
            SortTarget::Value,
        ] {
            let mut r = RangeRequest::range(Bytes::new(), Bytes::from_static(b"\0"));
            r.sort_order = order;
            r.sort_target = target;
            r.limit = 2;
            v.push(r.clone());
            r.min_mod_revision = 3;
            v.push(r);
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

const KEYS: &[&[u8]] = &[b"a", b"a\0", b"ab", b"b", b"ba", b"c", b"d"];
const ENDS: &[&[u8]] = &[b"", b"", b"\0", b"a", b"ab", b"b", b"bb", b"c", b"e"];
const VALUES: &[&[u8]] = &[b"", b"x", b"xy", b"y"];

fn key() -> impl Strategy<Value = Bytes> {
    prop::sample::select(KEYS).prop_map(Bytes::from_static)
}

fn end() -> impl Strategy<Value = Bytes> {
    prop::sample::select(ENDS).prop_map(Bytes::from_static)
}

fn value() -> impl Strategy<Value = Bytes> {
    prop::sample::select(VALUES).prop_map(Bytes::from_static)
}

fn rev_filter() -> impl Strategy<Value = i64> {
    prop_oneof![5 => Just(0i64), 1 => -1i64..14]
}

fn put() -> impl Strategy<Value = RequestOp> {
    (key(), value(), 0i64..3, any::<bool>(), 0u8..10, 0u8..10).prop_map(
        |(key, value, lease, prev_kv, iv, il)| {
            RequestOp::Put(PutRequest {
                key,
                value,
                lease,
                prev_kv,
                ignore_value: iv == 0,
                ignore_lease: il == 0,
            })
        },
    )
}

fn delete() -> impl Strategy<Value = RequestOp> {
    (key(), end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| {
        RequestOp::DeleteRange(DeleteRangeRequest {
            key,
            range_end,
            prev_kv,
        })
    })
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    let shape = (
        prop_oneof![4 => key(), 1 => Just(Bytes::new())],
        end(),
        -1i64..4,
        prop_oneof![8 => Just(0i64), 1 => -2i64..1, 2 => 1i64..24],
    );
    let sort = (
        prop::sample::select(vec![SortOrder::None, SortOrder::Ascend, SortOrder::Descend]),
        prop::sample::select(vec![
            SortTarget::Key,
            SortTarget::Version,
            SortTarget::Create,
            SortTarget::Mod,
            SortTarget::Value,
        ]),
        any::<bool>(),
        prop::bool::weighted(0.1),
    );
    let filters = (rev_filter(), rev_filter(), rev_filter(), rev_filter());
    (shape, sort, filters).prop_map(
        |((key, range_end, limit, revision), (so, st, keys_only, count_only), (a, b, c, d))| {
            RangeRequest {
                key,
                range_end,
                limit,
                revision,
                sort_order: so,
                sort_target: st,
                serializable: false,
                keys_only,
                count_only,
                min_mod_revision: a,
                max_mod_revision: b,
                min_create_revision: c,
                max_create_revision: d,
            }
        },
    )
}

fn compare() -> impl Strategy<Value = Compare> {
    (
        key(),
        prop_oneof![3 => Just(Bytes::new()), 1 => end()],
        prop::sample::select(vec![
            CompareTarget::Version,
            CompareTarget::Create,
            CompareTarget::Mod,
            CompareTarget::Value,
            CompareTarget::Lease,
        ]),
        prop::sample::select(vec![
            CompareResult::Equal,
            CompareResult::NotEqual,
            CompareResult::Greater,
            CompareResult::Less,
        ]),
        0u8..6,
        0i64..8,
        value(),
    )
        .prop_map(|(key, range_end, target, result, operand, n, v)| {
            let target_union = match (operand, target) {
                (4, _) => None,
                (5, CompareTarget::Lease) => Some(TargetUnion::Version(n)),
                (5, _) => Some(TargetUnion::Lease(n)),
                (_, CompareTarget::Version) => Some(TargetUnion::Version(n)),
                (_, CompareTarget::Create) => Some(TargetUnion::CreateRevision(n)),
                (_, CompareTarget::Mod) => Some(TargetUnion::ModRevision(n)),
                (_, CompareTarget::Value) => Some(TargetUnion::Value(v)),
                (_, CompareTarget::Lease) => Some(TargetUnion::Lease(n)),
            };
            Compare {
                result,
                target,
                key,
                range_end,
                target_union,
            }
        })
}

fn leaf() -> BoxedStrategy<RequestOp> {
    prop_oneof![3 => put(), 2 => delete(), 2 => range_req().prop_map(RequestOp::Range)].boxed()
}

fn txn(depth: u32) -> BoxedStrategy<TxnRequest> {
    let op = if depth == 0 {
        leaf()
    } else {
        prop_oneof![5 => leaf(), 1 => txn(depth - 1).prop_map(RequestOp::Txn)].boxed()
    };
    (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(op.clone(), 0..4),
        prop::collection::vec(op, 0..3),
    )
        .prop_map(|(compare, success, failure)| TxnRequest {
            compare,
            success,
            failure,
        })
        .boxed()
}

#[derive(Clone, Debug)]
enum Step {
    /// Execute `txn`; if `abort`, roll it back afterwards (another shard failed).
    Txn(TxnRequest, bool),
    /// Compact at a point between the current compact revision and the global revision.
    Compact(u16),
    /// Other shards take `n` revisions.
    Gap(u8),
    /// A read at a chosen revision (0 = latest, possibly compacted or past the last write).
    Read(RangeRequest, u16),
}

fn single(op: RequestOp) -> TxnRequest {
    TxnRequest {
        compare: vec![],
        success: vec![op],
        failure: vec![],
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => put().prop_map(|op| Step::Txn(single(op), false)),
        2 => delete().prop_map(|op| Step::Txn(single(op), false)),
        3 => (txn(1), prop::bool::weighted(0.4)).prop_map(|(t, abort)| Step::Txn(t, abort)),
        2 => any::<u16>().prop_map(Step::Compact),
        1 => (1u8..4).prop_map(Step::Gap),
        3 => (range_req(), any::<u16>()).prop_map(|(r, rev)| Step::Read(r, rev)),
    ]
}

// ---------------------------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------------------------

struct World {
    store: ShardStore,
    replica: ShardStore,
    model: Model,
}

impl World {
    fn step(&mut self, s: &Step) {
        match s {
            Step::Txn(t, abort) => self.txn(t, *abort),
            Step::Compact(pick) => {
                let lo = self.model.compact.max(0);
                let span = (self.model.global - lo + 1).max(1);
                let at = lo + i64::from(*pick) % span;
                self.store.compact(at);
                self.replica.compact(at);
                self.model.compact = self.model.compact.max(at);
            }
            Step::Gap(n) => self.model.global += i64::from(*n),
            Step::Read(r, pick) => {
                let rev = i64::from(*pick) % (self.model.global + 2);
                assert_range(&self.store, &self.model, r, rev);
            }
        }
        assert_eq!(self.store.last_revision(), self.model.last);
        assert_eq!(self.store.compact_revision(), self.model.compact);
        assert_eq!(self.store.key_count(), self.model.live_count());
        assert_eq!(dump(&self.replica), dump(&self.store), "replica diverged");
        assert_compacted_shape(&self.store);
    }

    fn txn(&mut self, t: &TxnRequest, abort: bool) {
        let mut bits = vec![];
        self.model.path(t, &self.store, &mut bits);
        let path = TxnPath(bits);
        let mut it = path.0.iter();
        let mut ops = vec![];
        Model::leaves(t, &mut it, &mut ops);

        let got = self
            .store
            .check(t, &path, self.model.global, &all_keys)
            .map_err(|e| tag(&e));
        let want = self.model.check(&ops);
        assert_eq!(got, want, "check of {t:?}");
        let Ok(writes) = want else { return };

        let rev = if writes {
            self.model.global + 1
        } else {
            self.model.global
        };
        let before = dump(&self.store);
        let saved = self.model.clone();
        let ex = self.store.execute(t, &path, rev, &all_keys);
        let (partials, effects) = self.model.execute(&ops, rev);
        assert_eq!(ex.partials, partials, "partials of {t:?}");
        assert_eq!(ex.effects, effects, "effects of {t:?}");
        assert_eq!(ex.wrote(), writes);
        if !writes {
            assert_eq!(dump(&self.store), before, "read-only txn changed the store");
            return;
        }
        if abort {
            self.store.rollback(ex.undo);
            assert_eq!(dump(&self.store), before, "rollback not exact");
            self.model = saved;
        } else {
            self.replica.apply(&ex.effects, rev);
            self.model.global = rev;
            self.model.last = rev;
        }
    }

    /// End of history: every revision, and checkpoint round trips.
    fn finish(&self, page: usize, upto_pick: u16) {
        self.check_changes(page);
        let (store, model) = (&self.store, &self.model);
        let reqs = battery();
        for rev in 0..=model.global + 1 {
            for r in &reqs {
                assert_range(store, model, r, rev);
            }
        }

        // Full export in pages rebuilds a structurally identical store.
        let mut hs: Vec<KeyHistory> = vec![];
        loop {
            let after = hs.last().map(|h| h.key.clone());
            let batch = store.export_keys(after.as_deref(), page, i64::MAX);
            assert!(batch.len() <= page);
            if batch.is_empty() {
                break;
            }
            hs.extend(batch);
        }
        assert!(hs.iter().all(KeyHistory::is_well_formed));
        let copy = ShardStore::from_histories(hs, store.last_revision(), store.compact_revision());
        assert_eq!(dump(&copy), dump(store));

        // Export as of an older revision: same reads at every revision in [compact, upto].
        let lo = model.compact.max(1);
        let upto = lo + i64::from(upto_pick) % (model.global - lo + 1).max(1);
        let old = ShardStore::from_histories(
            store.export_keys(None, usize::MAX, upto),
            upto.min(store.last_revision()),
            store.compact_revision(),
        );
        for rev in lo..=upto {
            for r in &reqs {
                assert_eq!(
                    old.range(r, rev).ok(),
                    store.range(r, rev).ok(),
                    "upto {upto} rev {rev}"
                );
            }
        }
        assert_eq!(old.key_count(), model.live(b"", b"\0", upto).len());

        // Values up to `upto` swapped for copies held elsewhere (as a checkpoint's mapping
        // holds them) leave the structure and every read unchanged.
        let mut adopted = ShardStore::from_histories(
            store.export_keys(None, usize::MAX, i64::MAX),
            store.last_revision(),
            store.compact_revision(),
        );
        for h in store.export_keys(None, usize::MAX, upto) {
            for p in h.generations.iter().flat_map(|g| &g.puts) {
                let copy = Bytes::copy_from_slice(&p.value);
                let key = Bytes::copy_from_slice(&h.key);
                adopted.adopt(key.clone(), &[(p.revision, copy)]);
                let longer = Bytes::from(vec![0; p.value.len() + 1]);
                assert_eq!(adopted.adopt(key, &[(p.revision, longer)]), 0);
            }
        }
        // In small steps, as a checkpoint does between serving requests.
        let mut after = 0;
        while let Some(next) = adopted.adopt_event_values(after, upto, 2) {
            assert!(next > after, "no progress after {after}");
            after = next;
        }
        assert_eq!(dump(&adopted), dump(store));
        for rev in lo..=model.global + 1 {
            for r in &reqs {
                assert_eq!(
                    adopted.range(r, rev).ok(),
                    store.range(r, rev).ok(),
                    "adopted, rev {rev}"
                );
            }
        }
    }
}

impl Model {
    /// Every event in `[start, end)` with revision in `(after, upto]`, by (revision, key); a
    /// key's events within one revision stay in execution order.
    fn events(&self, start: &[u8], end: &[u8], after: i64, upto: i64) -> Vec<Event> {
        let mut out = vec![];
        for (key, hist) in self.hist.iter().filter(|(k, _)| in_range(k, start, end)) {
            // Replayed event by event: a txn may put one key twice at one revision.
            let mut cur: Option<KeyValue> = None;
            for (r, ev) in hist {
                cur = step_kv(cur, key, *r, ev);
                if *r <= after || *r > upto {
                    continue;
                }
                out.push(match &cur {
                    None => Event::deleted(key.clone(), *r, 0),
                    Some(kv) => Event {
                        kind: EventKind::Put,
                        kv: kv.clone(),
                        op: 0,
                    },
                });
            }
        }
        out.sort_by(|a, b| (a.revision(), &a.kv.key).cmp(&(b.revision(), &b.kv.key)));
        out
    }
}

impl World {
    /// Watch feed: every window at or above the compact revision, paged, from the event log
    /// (`store`) and from history alone (`replica`, rebuilt by replay), equals the model's events.
    fn check_changes(&self, page: usize) {
        // Each case: the ranges asked for (overlapping ones, as many watchers produce), and
        // the single range equal to their union that the model answers for.
        type Case<'a> = (Vec<(&'a [u8], &'a [u8])>, (&'a [u8], &'a [u8]));
        let cases: [Case; 4] = [
            (vec![(b"", b"\0")], (b"", b"\0")),
            (vec![(b"b", b"d")], (b"b", b"d")),
            (vec![(b"c", b"")], (b"c", b"")),
            (vec![(b"c", b""), (b"b", b"d"), (b"ba", b"c")], (b"b", b"d")),
        ];
        let model = &self.model;
        let range = |(start, end): (&[u8], &[u8])| {
            KeyRange::from_etcd(&Bytes::copy_from_slice(start), &Bytes::copy_from_slice(end))
                .expect("non-empty range")
        };
        for (asked, (start, end)) in cases {
            let krs: Vec<KeyRange> = asked.into_iter().map(range).collect();
            for after in 0..=model.global {
                let upto = model.global;
                for (name, s) in [("store", &self.store), ("replica", &self.replica)] {
                    if after < model.compact {
                        if after + 1 < model.compact && after < s.event_floor() {
                            assert!(matches!(
                                s.changes(&krs, after, upto, page),
                                Err(Error::Compacted)
                            ));
                        }
                        continue;
                    }
                    let mut got = vec![];
                    let mut from = after;
                    while from < upto {
                        let c = s
                            .changes(&krs, from, upto, page)
                            .expect("window above compaction");
                        assert!(c.complete_through > from, "{name}: no progress");
                        assert!(c.events.iter().all(|e| e.revision() <= c.complete_through));
                        assert!(
                            c.events
                                .windows(2)
                                .all(|w| w[0].order_key() <= w[1].order_key()),
                            "{name}: events out of order"
                        );
                        got.extend(c.events);
                        from = c.complete_through;
                    }
                    for e in &mut got {
                        e.op = 0;
                    }
                    got.sort_by(|a, b| (a.revision(), &a.kv.key).cmp(&(b.revision(), &b.kv.key)));
                    assert_eq!(
                        got,
                        model.events(start, end, after, upto),
                        "{name}: changes after {after}, floor {}, compact {}, {:?}",
                        s.event_floor(),
                        model.compact,
                        dump(s)
                    );
                }
            }
        }
    }
}

proptest! {
    // No regression files: they would land outside src/mvcc. Failures print the minimal case.
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..40), page in 1usize..4, upto in any::<u16>()) {
        let mut w = World { store: ShardStore::with_event_capacity(page + 1), replica: ShardStore::new(), model: Model::default() };
        for s in &steps {
            w.step(s);
        }
        w.finish(page, upto);
    }
}

// ---------------------------------------------------------------------------------------------
// Sharded: the per-shard contracts compose into the single-store answer
// ---------------------------------------------------------------------------------------------
//
// The same history runs on one store owning every key and on two shards splitting the keys. A
// reference merge written only from the documented contracts (ShardRange, CompareOutcome,
// prefetch_window, cmp_kvs, check errors) must reproduce the single store, which the model
// property above pins to etcd.

fn owner(k: &[u8]) -> usize {
    k.first().map_or(0, |b| usize::from(b % 2))
}

fn owns0(k: &[u8]) -> bool {
    owner(k) == 0
}

fn owns1(k: &[u8]) -> bool {
    owner(k) == 1
}

const OWNS: [fn(&[u8]) -> bool; 2] = [owns0, owns1];

/// etcd's (kvs, more, count) from shard parts, following the ShardRange docs.
fn merge_range(r: &RangeRequest, parts: &[ShardRange]) -> (Vec<KeyValue>, bool, i64) {
    let limit = usize::try_from(r.limit).unwrap_or(0);
    let (order, target) = effective_sort(r);
    let mut kvs: Vec<KeyValue> = parts.iter().flat_map(|p| p.kvs.iter().cloned()).collect();
    if let Some(window) = prefetch_window(r) {
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        kvs.truncate(window);
    }
    kvs.sort_by(|a, b| cmp_kvs(a, b, order, target));
    if limit > 0 {
        kvs.truncate(limit);
    }
    if r.keys_only {
        strip_values(&mut kvs);
    }
    let filtered: i64 = parts.iter().map(|p| p.filtered).sum();
    (
        kvs,
        limit > 0 && filtered > r.limit,
        parts.iter().map(|p| p.count).sum(),
    )
}

fn single_answer(r: &RangeRequest, s: &ShardRange) -> (Vec<KeyValue>, bool, i64) {
    merge_range(r, std::slice::from_ref(s))
}

/// A compare's etcd result from shard outcomes, following the CompareOutcome docs.
fn merge_compare(c: &Compare, parts: &[CompareOutcome]) -> bool {
    let matched: u64 = parts.iter().map(|p| p.matched).sum();
    if matched == 0 {
        c.target != CompareTarget::Value && parts[0].all_true
    } else {
        parts.iter().filter(|p| p.matched > 0).all(|p| p.all_true)
    }
}

struct Sharded {
    single: ShardStore,
    shards: [ShardStore; 2],
    global: i64,
}

impl Sharded {
    fn path(&self, t: &TxnRequest, out: &mut Vec<bool>) {
        let mut ok = true;
        for c in &t.compare {
            let one = self.single.compare(c, 0).expect("latest");
            let parts = self
                .shards
                .each_ref()
                .map(|s| s.compare(c, 0).expect("latest"));
            let merged = merge_compare(c, &parts);
            assert_eq!(merge_compare(c, &[one]), merged, "compare {c:?}");
            ok &= merged;
        }
        out.push(ok);
        for op in if ok { &t.success } else { &t.failure } {
            if let RequestOp::Txn(n) = op {
                self.path(n, out);
            }
        }
    }

    fn txn(&mut self, t: &TxnRequest) {
        let mut bits = vec![];
        self.path(t, &mut bits);
        let path = TxnPath(bits);
        let want = self
            .single
            .check(t, &path, self.global, &all_keys)
            .map_err(|e| tag(&e));
        let parts: Vec<_> = (0..2)
            .map(|i| {
                self.shards[i]
                    .check(t, &path, self.global, &OWNS[i])
                    .map_err(|e| tag(&e))
            })
            .collect();
        // Put errors win across shards as within one.
        let merged = if parts.contains(&Err(CheckErr::KeyNotFound)) {
            Err(CheckErr::KeyNotFound)
        } else if let Some(Err(e)) = parts.iter().find(|p| p.is_err()) {
            Err(*e)
        } else {
            Ok(parts.contains(&Ok(true)))
        };
        assert_eq!(merged, want, "check of {t:?}");
        let Ok(writes) = want else { return };
        let rev = if writes { self.global + 1 } else { self.global };
        let one = self.single.execute(t, &path, rev, &all_keys);
        let exs = [0, 1].map(|i| self.shards[i].execute(t, &path, rev, &OWNS[i]));
        for (i, ex) in exs.iter().enumerate() {
            assert_eq!(ex.partials.len(), one.partials.len());
            let mine: Vec<_> = one
                .effects
                .iter()
                .filter(|e| match e {
                    Effect::Put { key, .. } | Effect::Delete { key } => OWNS[i](key),
                })
                .cloned()
                .collect();
            assert_eq!(ex.effects, mine, "shard {i} effects");
        }
        for (n, want) in one.partials.iter().enumerate() {
            let (a, b) = (&exs[0].partials[n], &exs[1].partials[n]);
            match (want, a, b) {
                (OpPartial::Range(w), OpPartial::Range(a), OpPartial::Range(b)) => {
                    let RequestOp::Range(r) = leaf_at(t, &path, n) else {
                        panic!("leaf {n} is not a range")
                    };
                    let (a, b) = (a.clone(), b.clone());
                    assert_eq!(merge_range(r, &[a, b]), single_answer(r, w));
                }
                (OpPartial::Put { .. }, OpPartial::NotOwned, p)
                | (OpPartial::Put { .. }, p, OpPartial::NotOwned) => assert_eq!(p, want),
                (
                    OpPartial::DeleteRange { deleted, prev_kvs },
                    OpPartial::DeleteRange {
                        deleted: d0,
                        prev_kvs: p0,
                    },
                    OpPartial::DeleteRange {
                        deleted: d1,
                        prev_kvs: p1,
                    },
                ) => {
                    assert_eq!(d0 + d1, *deleted);
                    let mut all = [p0.clone(), p1.clone()].concat();
                    all.sort_by(|x, y| x.key.cmp(&y.key));
                    assert_eq!(&all, prev_kvs);
                }
                other => panic!("partials do not line up: {other:?}"),
            }
        }
        if writes {
            self.global = rev;
        }
    }

    fn read(&self, r: &RangeRequest, rev: i64) {
        let one = self.single.range(r, rev);
        let parts: Vec<_> = self.shards.iter().map(|s| s.range(r, rev)).collect();
        match one {
            Err(_) => assert!(parts.iter().all(|p| matches!(p, Err(Error::Compacted)))),
            Ok(one) => {
                let parts: Vec<ShardRange> = parts.into_iter().map(|p| p.expect("ok")).collect();
                assert_eq!(
                    merge_range(r, &parts),
                    single_answer(r, &one),
                    "{r:?} at {rev}"
                );
            }
        }
    }
}

/// The `n`th leaf op along `path`.
fn leaf_at<'t>(t: &'t TxnRequest, path: &TxnPath, n: usize) -> &'t RequestOp {
    let mut ops = vec![];
    Model::leaves(t, &mut path.0.iter(), &mut ops);
    ops[n]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn shards_merge_to_the_single_store(steps in prop::collection::vec(step(), 1..40)) {
        let mut w = Sharded { single: ShardStore::new(), shards: [ShardStore::new(), ShardStore::new()], global: 0 };
        for s in &steps {
            match s {
                // Aborts are covered above; gaps are implicit (each shard skips the other's revisions).
                Step::Txn(t, _) => w.txn(t),
                Step::Gap(_) => {}
                Step::Compact(pick) => {
                    let at = i64::from(*pick) % (w.global + 1);
                    w.single.compact(at);
                    w.shards.iter_mut().for_each(|s| s.compact(at));
                }
                Step::Read(r, pick) => w.read(r, i64::from(*pick) % (w.global + 2)),
            }
            let live: usize = w.shards.iter().map(ShardStore::key_count).sum();
            prop_assert_eq!(live, w.single.key_count());
        }
        for rev in 0..=w.global + 1 {
            for r in &battery() {
                w.read(r, rev);
            }
        }
    }
}

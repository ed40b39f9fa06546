//! Pure helpers shared by reads: etcd's range plan (filter / sort / limit), the result order, and
//! compare evaluation. Public ones are meant for the planner, so merged multi-shard results use
//! exactly the order and window each shard used.

use std::cmp::Ordering;

use bytes::Bytes;

use super::key_index::Visible;
use crate::kv::{Compare, KeyValue, RangeRequest, SortOrder, SortTarget};

/// The sort etcd applies: `sort_order` NONE with a target other than KEY sorts ascending.
pub fn effective_sort(req: &RangeRequest) -> (SortOrder, SortTarget) {
    if req.sort_order == SortOrder::None && req.sort_target != SortTarget::Key {
        (SortOrder::Ascend, req.sort_target)
    } else {
        (req.sort_order, req.sort_target)
    }
}

/// True when any min/max mod/create revision filter is set (0 = unset).
pub fn has_revision_filters(req: &RangeRequest) -> bool {
    req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
}

/// etcd's prefetch window: `Some(limit + 1)` when etcd reads only the first `limit + 1` keys in
/// key order and sorts just those (sort_order NONE, a non-KEY target, no filters, limit > 0).
///
/// etcd decides whether to fetch everything from the *requested* sort_order, but sorts by the
/// *effective* one, so such a request returns the first `limit + 1` keys sorted by the target and
/// truncated to `limit`, not the global top `limit`. In that case a shard returns its whole window
/// (up to `limit + 1` kvs, sorted), and an exact multi-shard merge must order the shards' kvs by
/// key, keep the first `limit + 1`, sort those with [`cmp_kvs`], then truncate to `limit`.
pub fn prefetch_window(req: &RangeRequest) -> Option<usize> {
    let windowed = req.sort_order == SortOrder::None
        && req.sort_target != SortTarget::Key
        && !has_revision_filters(req)
        && req.limit > 0;
    windowed.then(|| limit_of(req).saturating_add(1))
}

/// Whether a shard keeps values despite `keys_only`: when sorting by VALUE, a multi-shard merge
/// needs them to order the kvs, so shards leave them and the merger empties them afterwards.
/// (A merger that always empties values for `keys_only` after merging is correct either way.)
pub fn keeps_values_for_merge(req: &RangeRequest) -> bool {
    req.keys_only && req.sort_target == SortTarget::Value
}

/// `req.limit` as a count; only call when `limit > 0`.
fn limit_of(req: &RangeRequest) -> usize {
    usize::try_from(req.limit).unwrap_or(usize::MAX)
}

/// Fields a result is ordered by; implemented for stored and materialized key-values.
pub(crate) trait SortFields {
    fn key(&self) -> &[u8];
    fn version(&self) -> i64;
    fn create_revision(&self) -> i64;
    fn mod_revision(&self) -> i64;
    fn value(&self) -> &[u8];
}

impl SortFields for KeyValue {
    fn key(&self) -> &[u8] {
        &self.key
    }
    fn version(&self) -> i64 {
        self.version
    }
    fn create_revision(&self) -> i64 {
        self.create_revision
    }
    fn mod_revision(&self) -> i64 {
        self.mod_revision
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
}

impl SortFields for Visible<'_> {
    fn key(&self) -> &[u8] {
        self.key
    }
    fn version(&self) -> i64 {
        self.version
    }
    fn create_revision(&self) -> i64 {
        self.create_revision
    }
    fn mod_revision(&self) -> i64 {
        self.mod_revision
    }
    fn value(&self) -> &[u8] {
        self.value
    }
}

/// The order of a range result under an *effective* sort (see [`effective_sort`]): by `target`
/// in `order`, ties broken by key ascending whatever the order. etcd's Go sort leaves tie order
/// unspecified; fixing it makes results deterministic and mergeable across shards. With
/// `SortOrder::None` this is key order.
pub fn cmp_kvs(a: &KeyValue, b: &KeyValue, order: SortOrder, target: SortTarget) -> Ordering {
    cmp_sorted(a, b, order, target)
}

pub(crate) fn cmp_sorted<T: SortFields>(
    a: &T,
    b: &T,
    order: SortOrder,
    target: SortTarget,
) -> Ordering {
    let primary = match target {
        SortTarget::Key => a.key().cmp(b.key()),
        SortTarget::Version => a.version().cmp(&b.version()),
        SortTarget::Create => a.create_revision().cmp(&b.create_revision()),
        SortTarget::Mod => a.mod_revision().cmp(&b.mod_revision()),
        SortTarget::Value => a.value().cmp(b.value()),
    };
    let primary = match order {
        SortOrder::Descend => primary.reverse(),
        SortOrder::Ascend => primary,
        SortOrder::None => Ordering::Equal,
    };
    primary.then_with(|| a.key().cmp(b.key()))
}

/// What a range does on one shard, derived once from the request.
pub(crate) struct RangePlan {
    pub order: SortOrder,
    pub target: SortTarget,
    /// Stop collecting after this many kvs pass (etcd's limit + 1 fetch); `None` = collect all.
    pub collect: Option<usize>,
    /// Length kvs are cut to after sorting.
    pub keep: Option<usize>,
    min_mod: i64,
    max_mod: i64,
    min_create: i64,
    max_create: i64,
}

impl RangePlan {
    pub fn new(req: &RangeRequest) -> Self {
        let (order, target) = effective_sort(req);
        let limit = (req.limit > 0).then(|| limit_of(req));
        let fetch_all = req.sort_order != SortOrder::None || has_revision_filters(req);
        let window = prefetch_window(req);
        RangePlan {
            order,
            target,
            collect: if fetch_all {
                None
            } else {
                limit.map(|l| l.saturating_add(1))
            },
            keep: window.or(limit),
            min_mod: req.min_mod_revision,
            max_mod: req.max_mod_revision,
            min_create: req.min_create_revision,
            max_create: req.max_create_revision,
        }
    }

    /// etcd's min/max filters: 0 = unset, bounds inclusive.
    pub fn passes<T: SortFields>(&self, kv: &T) -> bool {
        let m = kv.mod_revision();
        let c = kv.create_revision();
        (self.max_mod == 0 || m <= self.max_mod)
            && (self.min_mod == 0 || m >= self.min_mod)
            && (self.max_create == 0 || c <= self.max_create)
            && (self.min_create == 0 || c >= self.min_create)
    }

    /// Sorts `entries` (collected in key order) and cuts them to `keep`.
    pub fn sort_and_cut<T: SortFields>(&self, entries: &mut Vec<T>) {
        let (order, target) = (self.order, self.target);
        let cmp = |a: &T, b: &T| cmp_sorted(a, b, order, target);
        if order == SortOrder::None {
            // Already in key order.
            if let Some(k) = self.keep {
                entries.truncate(k);
            }
            return;
        }
        if let Some(k) = self.keep.filter(|&k| k < entries.len()) {
            if k == 0 {
                entries.clear();
                return;
            }
            entries.select_nth_unstable_by(k - 1, cmp);
            entries.truncate(k);
        }
        entries.sort_unstable_by(cmp);
    }
}

/// etcd's compare of one key-value (`None` = the key does not exist, compared as a zero
/// KeyValue). The operand is read from `target_union` only if its variant matches `target`.
pub(crate) fn compare_holds(cmp: &Compare, kv: Option<&Visible<'_>>) -> bool {
    // One definition of etcd's compare semantics serves shards and the planner's zero-KV rule.
    let kv = kv
        .map(|v| KeyValue {
            key: Bytes::new(),
            create_revision: v.create_revision,
            mod_revision: v.mod_revision,
            version: v.version,
            value: v.value.clone(),
            lease: v.lease,
        })
        .unwrap_or_default();
    crate::mvcc::plan::compare_kv(cmp, &kv)
}

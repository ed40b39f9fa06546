//! Tests of range results: per-shard slices merged against an independent reference.

use proptest::prelude::*;

use super::*;
use crate::kv::{RangeResponse, SortOrder, SortTarget};

// ---- range merge -------------------------------------------------------------------------

/// key, version, create, mod, value — chosen so every target has ties and a distinct order.
fn sample() -> Vec<KeyValue> {
    vec![
        kv("a", 2, 5, 9, "m"),
        kv("b", 1, 3, 3, "z"),
        kv("c", 2, 1, 7, "a"),
        kv("d", 3, 5, 4, "m"),
        kv("e", 1, 2, 9, "b"),
    ]
}

/// Splits the sample over three shards (a,d | b,e | c) and merges.
fn split_merge(req: &RangeRequest) -> RangeResponse {
    let s = sample();
    let parts = vec![
        local_range(req, vec![s[0].clone(), s[3].clone()]),
        local_range(req, vec![s[1].clone(), s[4].clone()]),
        local_range(req, vec![s[2].clone()]),
    ];
    merge_range(req, parts)
}

fn req(order: SortOrder, target: SortTarget, limit: i64) -> RangeRequest {
    RangeRequest {
        key: b("a"),
        range_end: b("\0"),
        limit,
        sort_order: order,
        sort_target: target,
        ..Default::default()
    }
}

#[test]
fn range_merge_orders() {
    use SortOrder::*;
    use SortTarget::*;
    let cases: &[(SortOrder, SortTarget, &[&str])] = &[
        (None, Key, &["a", "b", "c", "d", "e"]),
        (Ascend, Key, &["a", "b", "c", "d", "e"]),
        (Descend, Key, &["e", "d", "c", "b", "a"]),
        // versions 2,1,2,3,1
        (None, Version, &["b", "e", "a", "c", "d"]),
        (Ascend, Version, &["b", "e", "a", "c", "d"]),
        (Descend, Version, &["d", "a", "c", "b", "e"]),
        // create 5,3,1,5,2
        (None, Create, &["c", "e", "b", "a", "d"]),
        (Descend, Create, &["a", "d", "b", "e", "c"]),
        // mod 9,3,7,4,9
        (Ascend, Mod, &["b", "d", "c", "a", "e"]),
        (Descend, Mod, &["a", "e", "c", "d", "b"]),
        // values m,z,a,m,b
        (None, Value, &["c", "e", "a", "d", "b"]),
        (Ascend, Value, &["c", "e", "a", "d", "b"]),
        (Descend, Value, &["b", "a", "d", "e", "c"]),
    ];
    for &(order, target, want) in cases {
        let r = split_merge(&req(order, target, 0));
        assert_eq!(keys(&r.kvs), want, "{order:?} {target:?}");
        assert_eq!((r.count, r.more), (5, false), "{order:?} {target:?}");
        for limit in 1..=6 {
            let r = split_merge(&req(order, target, limit));
            let n = want.len().min(limit as usize);
            // NONE with another target: etcd sorts only the first limit+1 keys (a..e order).
            let window: Vec<&str> = if order == None && target != Key {
                let first = ["a", "b", "c", "d", "e"];
                let w = &first[..first.len().min(limit as usize + 1)];
                want.iter()
                    .copied()
                    .filter(|k| w.contains(k))
                    .take(n)
                    .collect()
            } else {
                want[..n].to_vec()
            };
            assert_eq!(keys(&r.kvs), window, "{order:?} {target:?} limit {limit}");
            assert_eq!(r.more, limit < 5, "{order:?} {target:?} limit {limit}");
            assert_eq!(r.count, 5);
        }
    }
}

#[test]
fn range_merge_filters_count_and_more() {
    // Filters shrink `more`'s base but never `count`.
    let mut r = req(SortOrder::None, SortTarget::Key, 2);
    r.min_mod_revision = 4; // drops b (mod 3)
    r.max_create_revision = 4; // drops a, d (create 5)
    let got = split_merge(&r);
    assert_eq!(keys(&got.kvs), ["c", "e"]);
    assert_eq!((got.count, got.more), (5, false));
    r.limit = 1;
    let got = split_merge(&r);
    assert_eq!(keys(&got.kvs), ["c"]);
    assert_eq!((got.count, got.more), (5, true));
    let mut r = req(SortOrder::None, SortTarget::Key, 0);
    r.max_mod_revision = 4;
    r.min_create_revision = 4;
    assert_eq!(keys(&split_merge(&r).kvs), ["d"]);

    // Negative limit means no limit.
    let got = split_merge(&req(SortOrder::None, SortTarget::Key, -1));
    assert_eq!((got.kvs.len(), got.more), (5, false));

    // count_only: no kvs, no more, full count.
    let mut r = req(SortOrder::None, SortTarget::Key, 1);
    r.count_only = true;
    let got = split_merge(&r);
    assert_eq!((got.kvs.len(), got.more, got.count), (0, false, 5));

    // No shards at all.
    let got = merge_range(&req(SortOrder::None, SortTarget::Key, 3), vec![]);
    assert_eq!(got, RangeResponse::default());
}

#[test]
fn keys_only_still_sorts_by_value() {
    let mut r = req(SortOrder::Descend, SortTarget::Value, 3);
    r.keys_only = true;
    let got = split_merge(&r);
    assert_eq!(keys(&got.kvs), ["b", "a", "d"]);
    assert!(got.kvs.iter().all(|kv| kv.value.is_empty()));
    let mut r = req(SortOrder::None, SortTarget::Key, 0);
    r.keys_only = true;
    let got = split_merge(&r);
    assert!(got.kvs.iter().all(|kv| kv.value.is_empty()) && got.kvs.len() == 5);
}

// ---- properties --------------------------------------------------------------------------

/// Independent reference: etcd's range post-processing over the whole key set, with ties
/// broken by key (a key-ordered input sorted stably by the target).
fn reference(r: &RangeRequest, all: &[KeyValue]) -> RangeResponse {
    let count = all.len() as i64;
    if r.count_only {
        return RangeResponse {
            count,
            ..Default::default()
        };
    }
    let mut kvs: Vec<KeyValue> = all
        .iter()
        .filter(|kv| r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
        .filter(|kv| r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
        .filter(|kv| r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
        .filter(|kv| r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
        .cloned()
        .collect();
    kvs.sort_by(|a, b| a.key.cmp(&b.key));
    let windowed = r.sort_order == SortOrder::None
        && r.sort_target != SortTarget::Key
        && r.min_mod_revision == 0
        && r.max_mod_revision == 0
        && r.min_create_revision == 0
        && r.max_create_revision == 0
        && r.limit > 0;
    if windowed {
        kvs.truncate(r.limit as usize + 1);
    }
    let field = |kv: &KeyValue| -> (i64, Bytes) {
        match r.sort_target {
            SortTarget::Key => (0, kv.key.clone()),
            SortTarget::Version => (kv.version, Bytes::new()),
            SortTarget::Create => (kv.create_revision, Bytes::new()),
            SortTarget::Mod => (kv.mod_revision, Bytes::new()),
            SortTarget::Value => (0, kv.value.clone()),
        }
    };
    match r.sort_order {
        SortOrder::Descend => kvs.sort_by_key(|kv| std::cmp::Reverse(field(kv))),
        _ => kvs.sort_by_key(|kv| field(kv)),
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() as i64 > r.limit {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    RangeResponse {
        kvs,
        more,
        count,
        ..Default::default()
    }
}

fn arb_kvs() -> impl Strategy<Value = Vec<(KeyValue, u32)>> {
    let key = prop::collection::vec(b'a'..=b'd', 1..4);
    let val = prop::collection::vec(b'x'..=b'z', 0..3);
    prop::collection::btree_map(key, (1i64..4, 1i64..6, 0i64..4, val, any::<u32>()), 0..30)
        .prop_map(|m| {
            m.into_iter()
                .map(|(k, (version, create, dmod, value, shard))| {
                    let kv = KeyValue {
                        key: Bytes::from(k),
                        create_revision: create,
                        mod_revision: create + dmod,
                        version,
                        value: Bytes::from(value),
                        lease: 0,
                    };
                    (kv, shard)
                })
                .collect()
        })
}

fn arb_req() -> impl Strategy<Value = RangeRequest> {
    let order = prop_oneof![
        Just(SortOrder::None),
        Just(SortOrder::Ascend),
        Just(SortOrder::Descend)
    ];
    let target = prop_oneof![
        Just(SortTarget::Key),
        Just(SortTarget::Version),
        Just(SortTarget::Create),
        Just(SortTarget::Mod),
        Just(SortTarget::Value),
    ];
    let bound = prop_oneof![3 => Just(0i64), 1 => 1i64..9];
    (
        order,
        target,
        -1i64..8,
        [bound.clone(), bound.clone(), bound.clone(), bound],
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(sort_order, sort_target, limit, [a, b2, c, d], keys_only, count_only)| RangeRequest {
                key: Bytes::from_static(b"a"),
                range_end: Bytes::from_static(b"\0"),
                limit,
                sort_order,
                sort_target,
                keys_only,
                count_only,
                min_mod_revision: a,
                max_mod_revision: b2,
                min_create_revision: c,
                max_create_revision: d,
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn split_then_merge_equals_whole(kvs in arb_kvs(), r in arb_req(), nshards in 1u32..6) {
        let all: Vec<KeyValue> = kvs.iter().map(|(kv, _)| kv.clone()).collect();
        let mut per: Vec<Vec<KeyValue>> = vec![Vec::new(); nshards as usize];
        for (kv, s) in kvs {
            per[(s % nshards) as usize].push(kv);
        }
        let parts = per.into_iter().map(|in_range| local_range(&r, in_range)).collect();
        prop_assert_eq!(merge_range(&r, parts), reference(&r, &all));
    }
}

//! Unit and property tests of the B+tree, against `std::collections::BTreeMap` as the model.
//!
//! In their own file because they outweigh the code they test.

use super::node::{search, search_exact};
use super::*;
use proptest::collection::vec;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::mem;
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

/// Tiny nodes: a few hundred keys already give a four-level tree.
type Small<K> = Tree<K, u32, 4>;

fn in_bounds<K: Ord>(k: &K, lo: &Bound<K>, hi: &Bound<K>) -> bool {
    let above = match lo {
        Included(l) => k >= l,
        Excluded(l) => k > l,
        Unbounded => true,
    };
    let below = match hi {
        Included(h) => k <= h,
        Excluded(h) => k < h,
        Unbounded => true,
    };
    above && below
}

/// Pulls from the front (`true`) or back (`false`) following `pattern` cyclically until the
/// range is exhausted, and returns the entries in ascending order.
fn drain_pattern<'a, K, V>(mut r: Range<'a, K, V>, pattern: &[bool]) -> Vec<(&'a K, &'a V)> {
    let (mut front, mut back) = (Vec::new(), Vec::new());
    for &from_front in pattern.iter().cycle() {
        let item = if from_front { r.next() } else { r.next_back() };
        match item {
            Some(x) if from_front => front.push(x),
            Some(x) => back.push(x),
            None => break,
        }
    }
    assert!(r.next().is_none() && r.next_back().is_none(), "not fused");
    front.extend(back.into_iter().rev());
    front
}

/// Insert/remove orders that stress different split and merge paths.
fn orders(n: u32) -> Vec<Vec<u32>> {
    let ascending: Vec<u32> = (0..n).collect();
    let descending = ascending.iter().rev().copied().collect();
    // 7 is coprime with the sizes used, so this is a permutation.
    let scattered = (0..n).map(|i| i * 7 % n).collect();
    let outside_in = (0..n / 2).flat_map(|i| [i, n - 1 - i]).collect();
    vec![ascending, descending, scattered, outside_in]
}

/// Orders by `.0` only, so the tag shows which instance of an equal key the tree kept.
#[derive(Clone, Debug)]
struct Tagged(u32, &'static str);
impl PartialEq for Tagged {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Tagged {}
impl PartialOrd for Tagged {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Tagged {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

#[test]
fn search_matches_std() {
    for len in 0..40u32 {
        let keys: Vec<u32> = (0..len).map(|k| k * 2).collect();
        for probe in 0..=2 * len + 1 {
            let want = keys.partition_point(|&k| k <= probe);
            assert_eq!(search(&keys, |&k| k <= probe), want);
            assert_eq!(search_exact(&keys, &probe), keys.binary_search(&probe));
        }
    }
}

#[test]
fn empty_tree() {
    let mut t: BPlusTree<u32, u32> = BPlusTree::new();
    t.check_invariants();
    assert!(t.is_empty());
    assert_eq!(t.len(), 0);
    assert_eq!(t.get(&1), None);
    assert_eq!(t.get_mut(&1), None);
    assert!(!t.contains_key(&1));
    assert_eq!(t.remove(&1), None);
    assert_eq!(t.iter().next(), None);
    assert_eq!(t.iter().next_back(), None);
    for lo in [Unbounded, Included(&1), Excluded(&1)] {
        for hi in [Unbounded, Included(&2), Excluded(&2), Included(&0)] {
            assert_eq!(t.range(lo, hi).count(), 0);
        }
    }
    assert_eq!(t.first_key_value(), None);
    assert_eq!(t.last_key_value(), None);
    t.retain(|_, _| panic!("an empty tree has nothing to visit"));
    t.check_invariants();
    assert_eq!(format!("{t:?}"), "{}");
    assert!(BPlusTree::<u32, u32>::default().is_empty());
}

#[test]
fn single_entry() {
    let mut t = BPlusTree::new();
    assert_eq!(t.insert(7u32, "a"), None);
    t.check_invariants();
    assert_eq!((t.len(), t.get(&7), t.get(&6)), (1, Some(&"a"), None));
    assert_eq!(t.first_key_value(), Some((&7, &"a")));
    assert_eq!(t.last_key_value(), Some((&7, &"a")));
    *t.get_mut(&7).unwrap() = "b";
    assert_eq!(t.insert(7, "c"), Some("b"));
    assert_eq!(t.len(), 1);
    assert_eq!(
        t.range(Included(&7), Included(&7)).collect::<Vec<_>>(),
        [(&7, &"c")]
    );
    assert_eq!(t.range(Excluded(&7), Unbounded).count(), 0);
    assert_eq!(t.range(Unbounded, Excluded(&7)).count(), 0);
    assert_eq!(t.iter().rev().collect::<Vec<_>>(), [(&7, &"c")]);
    assert_eq!(t.remove(&6), None);
    assert_eq!(t.remove(&7), Some("c"));
    t.check_invariants();
    assert!(t.is_empty() && t.tree.leaves.is_empty());
    // Usable again after emptying.
    assert_eq!(t.insert(1, "d"), None);
    t.check_invariants();
}

#[test]
fn insert_replaces_value_but_keeps_key() {
    let mut t = BPlusTree::new();
    t.insert(Tagged(1, "first"), 10);
    assert_eq!(t.insert(Tagged(1, "second"), 20), Some(10));
    let (k, v) = t.first_key_value().unwrap();
    assert_eq!((k.1, *v), ("first", 20));
}

#[test]
fn borrowed_lookups() {
    let mut t: BPlusTree<String, u32> =
        ["a", "b", "c"].iter().map(|s| (s.to_string(), 0)).collect();
    assert!(t.contains_key("b"));
    *t.get_mut("b").unwrap() = 5;
    let mid: Vec<_> = t.range::<str>(Excluded("a"), Included("b")).collect();
    assert_eq!(mid, [(&"b".to_string(), &5)]);
    assert_eq!(t.remove("b"), Some(5));
    let mut t: BPlusTree<Vec<u8>, ()> = BPlusTree::new();
    t.insert(b"key".to_vec(), ());
    assert_eq!(t.get(&b"key"[..]), Some(&()));
    assert_eq!(t.range::<[u8]>(Included(b"k"), Excluded(b"l")).count(), 1);
}

#[test]
fn splits_at_capacity() {
    let mut t = BPlusTree::new();
    for k in 0..NODE_CAPACITY as u32 {
        t.insert(k, k);
    }
    t.check_invariants();
    assert_eq!((t.tree.height, t.tree.leaves.len()), (0, 1));
    t.insert(NODE_CAPACITY as u32, 0);
    t.check_invariants();
    assert_eq!((t.tree.height, t.tree.leaves.len()), (1, 2));
    let mut k = NODE_CAPACITY as u32;
    while t.tree.height < 2 {
        k += 1;
        t.insert(k, k);
    }
    t.check_invariants();
    assert_eq!(t.len(), k as usize + 1);

    for order in orders(500) {
        let mut s = Small::new();
        for &k in &order {
            assert_eq!(s.insert(k, k), None);
            s.check_invariants();
        }
        assert!(s.height >= 4);
        assert!(s.iter().map(|(k, _)| *k).eq(0..500));
    }
}

/// Entries per leaf slot, over all live leaves.
fn leaf_fill<K: Ord, V, const B: usize>(t: &Tree<K, V, B>) -> f64 {
    let live = t.leaves.len() - t.free_leaves_len();
    t.len as f64 / (live * B) as f64
}

#[test]
fn ascending_inserts_fill_leaves() {
    // Splits alone would leave every leaf but the last half full.
    let mut t = BPlusTree::new();
    for k in 0..100_000u32 {
        t.insert(k, k);
    }
    t.check_invariants();
    assert!(leaf_fill(&t.tree) > 0.95, "fill {}", leaf_fill(&t.tree));
    // Descending inserts shift nothing (the full leaf is always the leftmost) but stay correct.
    let mut d = BPlusTree::new();
    for k in (0..10_000u32).rev() {
        d.insert(k, k);
    }
    d.check_invariants();
    assert!(d.iter().map(|(k, _)| *k).eq(0..10_000));
    // Scattered inserts end up a little fuller than the ~69% (ln 2) splits alone give.
    let mut r = BPlusTree::new();
    for k in 0..100_000u32 {
        r.insert(k.wrapping_mul(2_654_435_761), k);
    }
    r.check_invariants();
    assert!(leaf_fill(&r.tree) > 0.72, "fill {}", leaf_fill(&r.tree));
    for order in orders(300) {
        let mut s = Small::new();
        for &k in &order {
            s.insert(k, k);
            s.check_invariants();
        }
        assert!(s.iter().map(|(k, _)| *k).eq(0..300));
    }
}

#[test]
fn replace_key_swaps_every_copy() {
    use bytes::Bytes;
    let key = |i: u32| Bytes::from(format!("key{i:05}"));
    let mut t = BPlusTree::new();
    for i in 0..5_000 {
        t.insert(key(i), i);
    }
    let arena = Bytes::from(
        (0..5_000)
            .flat_map(|i| key(i).to_vec())
            .collect::<Vec<u8>>(),
    );
    let in_arena = |k: &Bytes| {
        let (p, a) = (k.as_ptr() as usize, arena.as_ptr() as usize);
        (a..a + arena.len()).contains(&p)
    };
    for i in 0..5_000u32 {
        let at = i as usize * 8;
        let v = t.replace_key(arena.slice(at..at + 8)).expect("present");
        assert_eq!(*v, i);
    }
    assert!(t.replace_key(Bytes::from_static(b"absent")).is_none());
    t.check_invariants();
    assert!(t.iter().all(|(k, _)| in_arena(k)));
    // Separators too: no branch still holds a key buffer of its own.
    assert!(t.tree.height > 0);
    assert!(t.tree.branches.iter().flat_map(|b| &b.keys).all(in_arena));
    assert!(t.iter().map(|(_, v)| *v).eq(0..5_000));
}

#[test]
fn merges_down_to_empty() {
    for order in orders(500) {
        let mut t = Small::from_sorted((0..500).map(|k| (k, k)));
        for &k in &order {
            assert_eq!(t.remove(&k), Some(k));
            assert_eq!(t.get(&k), None);
            t.check_invariants();
        }
        assert!(
            t.leaves.is_empty() && t.branches.is_empty(),
            "memory not released"
        );
    }
}

#[test]
fn large_tree_default_capacity() {
    let n = 100_000u32;
    let mut t = BPlusTree::from_sorted_iter((0..n).map(|k| (k, k)));
    t.check_invariants();
    assert_eq!(t.tree.height, 2);
    // 48271 is coprime with n, so this visits every key once in scattered order.
    let key = |i: u32| (u64::from(i) * 48271 % u64::from(n)) as u32;
    for i in 0..n {
        assert_eq!(t.remove(&key(i)), Some(key(i)));
        if i % 9_999 == 0 {
            t.check_invariants();
        }
    }
    t.check_invariants();
    assert!(t.is_empty());
}

#[test]
fn range_bounds_exhaustive() {
    let model: BTreeMap<i32, u32> = (0..=40).step_by(2).map(|k| (k, k as u32)).collect();
    let small = Tree::<i32, u32, 4>::from_sorted(model.iter().map(|(k, v)| (*k, *v)));
    let big = BPlusTree::from_sorted_iter(model.iter().map(|(k, v)| (*k, *v)));
    let bounds = |v: i32| [Unbounded, Included(v), Excluded(v)];
    for lo in -1..=42 {
        for hi in -1..=42 {
            for lb in bounds(lo) {
                for hb in bounds(hi) {
                    let want: Vec<_> = model
                        .iter()
                        .filter(|(k, _)| in_bounds(*k, &lb, &hb))
                        .collect();
                    let (l, h) = (lb.as_ref(), hb.as_ref());
                    assert_eq!(small.range(l, h).collect::<Vec<_>>(), want, "{lb:?} {hb:?}");
                    assert!(small.range(l, h).rev().eq(want.iter().rev().copied()));
                    assert_eq!(big.range(l, h).collect::<Vec<_>>(), want, "{lb:?} {hb:?}");
                }
            }
        }
    }
    // The cases std panics on yield nothing here.
    assert_eq!(big.range(Included(&30), Included(&10)).count(), 0);
    assert_eq!(big.range(Excluded(&10), Excluded(&10)).count(), 0);
    assert_eq!(big.range(Included(&10), Excluded(&10)).count(), 0);
    assert_eq!(big.range(Excluded(&10), Excluded(&12)).count(), 0);
    assert_eq!(big.range(Excluded(&9), Excluded(&11)).count(), 1);
}

#[test]
fn double_ended_meets_in_the_middle() {
    let t = Small::from_sorted((0..1000u32).map(|k| (k, k)));
    for pattern in [
        &[true, false][..],
        &[false],
        &[true, true, false],
        &[false, false, true],
    ] {
        let r = t.range(Included(&100), Excluded(&900));
        let got: Vec<u32> = drain_pattern(r, pattern)
            .into_iter()
            .map(|(k, _)| *k)
            .collect();
        assert!(got.into_iter().eq(100..900));
    }
    let mut r = t.iter();
    let mut copy = r.clone();
    assert_eq!(r.next(), Some((&0, &0)));
    assert_eq!(copy.next_back(), Some((&999, &999)));
    assert_eq!(
        format!("{:?}", t.range(Included(&3), Excluded(&5))),
        "[(3, 3), (4, 4)]"
    );
}

#[test]
fn from_sorted_iter_sizes() {
    let b = NODE_CAPACITY as u32;
    let fill = Tree::<u32, u32, NODE_CAPACITY>::BULK_FILL as u32;
    for n in [
        0,
        1,
        2,
        b / 2 - 1,
        b / 2,
        b - 1,
        b,
        b + 1,
        b + b / 2,
        2 * b + 1,
        fill,
        fill + 1,
        2 * fill + 6,
        b * b,
        b * b + 1,
        70_000,
    ] {
        let t = BPlusTree::from_sorted_iter((0..n).map(|k| (k, k * 2)));
        t.check_invariants();
        assert_eq!(t.len(), n as usize);
        assert!(t
            .iter()
            .map(|(k, v)| (*k, *v))
            .eq((0..n).map(|k| (k, k * 2))));
        assert_bulk_filled(&t.tree);
    }
    for n in 0..200u32 {
        let small = Small::from_sorted((0..n).map(|k| (k, k)));
        small.check_invariants();
        assert_bulk_filled(&small);
        let odd = Tree::<u32, u32, 5>::from_sorted((0..n).map(|k| (k, k)));
        odd.check_invariants();
        assert_bulk_filled(&odd);
        // With 16 the short last leaf is merged for some `n` and shared for others.
        let mid = Tree::<u32, u32, 16>::from_sorted((0..n).map(|k| (k, k)));
        mid.check_invariants();
        assert_bulk_filled(&mid);
    }
}

/// Leaves of a freshly bulk-loaded tree: all but the last two hold exactly `BULK_FILL`.
fn assert_bulk_filled<K, V, const B: usize>(t: &Tree<K, V, B>) {
    let mut sizes = Vec::new();
    let mut id = t.head();
    while id != NIL {
        sizes.push(t.leaves[id as usize].keys.len());
        id = t.leaves[id as usize].next;
    }
    let full = sizes.len().saturating_sub(2);
    assert!(sizes[..full]
        .iter()
        .all(|&n| n == Tree::<K, V, B>::BULK_FILL));
    assert!(sizes.len() <= t.len.div_ceil(Tree::<K, V, B>::BULK_FILL));
}

#[test]
fn bulk_loaded_leaves_absorb_inserts() {
    let fill = Tree::<u32, u32, NODE_CAPACITY>::BULK_FILL as u32;
    let n = fill * 100;
    // Even keys, so there is room for new keys between any two.
    let mut t = BPlusTree::from_sorted_iter((0..n).map(|k| (2 * k, k)));
    let leaves = t.tree.leaves.len();
    // A few new keys in every leaf, up to capacity: no leaf splits.
    for leaf in 0..n / fill {
        for j in 0..(NODE_CAPACITY as u32 - fill) {
            t.insert(2 * (leaf * fill + j) + 1, 0);
        }
    }
    t.check_invariants();
    assert_eq!(t.tree.leaves.len(), leaves);
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "strictly ascending")]
fn from_sorted_iter_rejects_duplicates() {
    BPlusTree::from_sorted_iter([(1, ()), (2, ()), (2, ())]);
}

#[test]
fn from_iter_last_duplicate_wins() {
    let input = vec![(3, 'a'), (1, 'b'), (3, 'c'), (2, 'd'), (1, 'e'), (3, 'f')];
    let t: BPlusTree<_, _> = input.iter().copied().collect();
    let model: BTreeMap<_, _> = input.into_iter().collect();
    t.check_invariants();
    assert!(t.iter().eq(model.iter()));
}

#[test]
fn retain_sparse_keeps_structure_dense_repacks() {
    let n = 64 * 64 * 2;
    let mut t = BPlusTree::from_sorted_iter((0..n).map(|k| (k, k)));
    let leaves = t.tree.leaves.len();
    // One entry in 64: leaves stay above half full, so no rebuild.
    t.retain(|k, v| {
        *v += 1;
        k % 64 != 5
    });
    t.check_invariants();
    assert_eq!((t.len(), t.tree.leaves.len()), (n as usize - 128, leaves));
    assert_eq!(t.get(&6), Some(&7));
    // Each leaf loses its first key, which most separators copy: the shape stands, the
    // separators must follow.
    let firsts: BTreeSet<u32> = t.tree.leaves.iter().map(|l| l.keys[0]).collect();
    let len = t.len();
    t.retain(|k, _| !firsts.contains(k));
    t.check_invariants();
    assert_eq!((t.len(), t.tree.leaves.len()), (len - leaves, leaves));
    // Most entries go: leaves underflow and the tree is repacked.
    t.retain(|k, _| k % 8 == 0);
    t.check_invariants();
    let want = (0..n).step_by(8).filter(|k| !firsts.contains(k));
    assert!(t.iter().map(|(k, _)| *k).eq(want));
    assert_bulk_filled(&t.tree);
    t.retain(|_, _| false);
    t.check_invariants();
    assert!(t.is_empty() && t.tree.leaves.is_empty());
}

#[test]
fn retain_panic_leaves_tree_intact() {
    let mut t = BPlusTree::from_sorted_iter((0..1000u32).map(|k| (k, k)));
    let result = catch_unwind(AssertUnwindSafe(|| {
        t.retain(|k, _| {
            if *k == 700 {
                panic!("compaction bug")
            } else {
                k % 2 == 0
            }
        })
    }));
    assert!(result.is_err());
    t.check_invariants();
    assert!(t.iter().map(|(k, _)| *k).eq(0..1000));
}

#[test]
fn values_dropped_exactly_once() {
    let token = Rc::new(());
    {
        let mut t = Tree::<u32, Rc<()>, 4>::new();
        for k in 0..300u32 {
            t.insert(k, Rc::clone(&token));
        }
        t.insert(5, Rc::clone(&token));
        for k in (0..300).step_by(3) {
            t.remove(&k);
        }
        t.retain(|k, _| k % 5 != 0);
        t.check_invariants();
        assert_eq!(Rc::strong_count(&token), t.len + 1);
    }
    assert_eq!(Rc::strong_count(&token), 1);
}

#[derive(Debug, Clone)]
enum Op<K> {
    Insert(K, u32),
    Remove(K),
    Get(K),
    GetMut(K, u32),
    /// Bounds plus a front/back pull pattern.
    Range(Bound<K>, Bound<K>, Vec<bool>),
    /// Keeps entries whose value + salt is not a multiple of modulus, bumping every value.
    Retain(u32, u32),
}

fn ops<K: Debug + Clone + 'static>(
    key: impl Strategy<Value = K> + Clone + 'static,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Op<K>>> {
    let bound = prop_oneof![
        Just(Unbounded),
        key.clone().prop_map(Included),
        key.clone().prop_map(Excluded)
    ];
    let op = prop_oneof![
        6 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
        4 => key.clone().prop_map(Op::Remove),
        1 => key.clone().prop_map(Op::Get),
        1 => (key, any::<u32>()).prop_map(|(k, v)| Op::GetMut(k, v)),
        2 => (bound.clone(), bound, vec(any::<bool>(), 1..6))
            .prop_map(|(l, h, p)| Op::Range(l, h, p)),
        1 => (1u32..40, any::<u32>()).prop_map(|(m, s)| Op::Retain(m, s)),
    ];
    vec(op, len)
}

/// Replays `ops` on a tree and on `BTreeMap`, comparing every result and the invariants.
fn run<K: Ord + Clone + Debug, const B: usize>(
    initial: Vec<(K, u32)>,
    ops: Vec<Op<K>>,
) -> Result<(), TestCaseError> {
    let mut model: BTreeMap<K, u32> = initial.into_iter().collect();
    let mut tree = Tree::<K, u32, B>::from_sorted(model.clone());
    tree.check_invariants();
    for op in ops {
        match op {
            Op::Insert(k, v) => prop_assert_eq!(tree.insert(k.clone(), v), model.insert(k, v)),
            Op::Remove(k) => prop_assert_eq!(tree.remove(&k), model.remove(&k)),
            Op::Get(k) => {
                prop_assert_eq!(tree.get(&k), model.get(&k));
                prop_assert_eq!(tree.find(&k).is_some(), model.contains_key(&k));
            }
            Op::GetMut(k, v) => prop_assert_eq!(
                tree.get_mut(&k).map(|x| mem::replace(x, v)),
                model.get_mut(&k).map(|x| mem::replace(x, v))
            ),
            Op::Range(lo, hi, pattern) => {
                let want: Vec<_> = model
                    .iter()
                    .filter(|(k, _)| in_bounds(*k, &lo, &hi))
                    .collect();
                let got = drain_pattern(tree.range(lo.as_ref(), hi.as_ref()), &pattern);
                prop_assert_eq!(got, want);
            }
            Op::Retain(modulus, salt) => {
                let keep = move |_: &K, v: &mut u32| {
                    let keep = v.wrapping_add(salt) % modulus != 0;
                    *v = v.wrapping_add(1);
                    keep
                };
                tree.retain(keep);
                model.retain(keep);
            }
        }
        tree.check_invariants();
        prop_assert_eq!(tree.len, model.len());
        prop_assert_eq!(tree.first_key_value(), model.first_key_value());
        prop_assert_eq!(tree.last_key_value(), model.last_key_value());
    }
    prop_assert!(tree.iter().eq(model.iter()));
    prop_assert!(tree.iter().rev().eq(model.iter().rev()));
    Ok(())
}

fn bytes_key() -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(0u8..4, 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn prop_u16_small_nodes(
        initial in vec((0u16..400, any::<u32>()), 0..300),
        ops in ops(0u16..400, 1..300),
    ) {
        run::<u16, 4>(initial, ops)?;
    }

    #[test]
    fn prop_u16_odd_nodes(
        initial in vec((0u16..400, any::<u32>()), 0..300),
        ops in ops(0u16..400, 1..300),
    ) {
        run::<u16, 5>(initial, ops)?;
    }

    #[test]
    fn prop_bytes_small_nodes(
        initial in vec((bytes_key(), any::<u32>()), 0..60),
        ops in ops(bytes_key(), 1..300),
    ) {
        run::<Vec<u8>, 4>(initial, ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn prop_u16_default_nodes(
        initial in vec((0u16..12_000, any::<u32>()), 0..6_000),
        ops in ops(0u16..12_000, 1..200),
    ) {
        run::<u16, NODE_CAPACITY>(initial, ops)?;
    }

    #[test]
    fn prop_from_iter_matches_btreemap(entries in vec((0u16..3_000, any::<u32>()), 0..4_000)) {
        let t: BPlusTree<u16, u32> = entries.iter().copied().collect();
        let model: BTreeMap<u16, u32> = entries.into_iter().collect();
        t.check_invariants();
        prop_assert!(t.iter().eq(model.iter()));
        let small = Small::from_sorted(model.clone());
        small.check_invariants();
        prop_assert!(small.iter().rev().eq(model.iter().rev()));
    }
}

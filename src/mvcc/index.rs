//! The ordered map from key to per-key history.
//!
//! The shard store is written against the API subset of `crate::btree::BPlusTree` (being written
//! in parallel). Until it lands, [`StdIndex`] adapts `std::collections::BTreeMap` to exactly that
//! subset (two-bound `range`, `from_sorted_iter`), so the store cannot drift onto BTreeMap-only
//! methods and switching is the one-line change of [`Index`].

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use super::key_index::KeyIndex;

/// The per-shard key index. Swap for `crate::btree::BPlusTree<Bytes, KeyIndex>` once it lands.
pub(crate) type Index = StdIndex<Bytes, KeyIndex>;

/// `BTreeMap` restricted to the `BPlusTree` API subset. Unused once [`Index`] is switched.
#[derive(Clone, Debug)]
pub(crate) struct StdIndex<K, V>(BTreeMap<K, V>);

#[allow(dead_code)] // The full subset is kept so the adapter matches BPlusTree, used or not.
impl<K: Ord, V> StdIndex<K, V> {
    pub(crate) fn new() -> Self {
        StdIndex(BTreeMap::new())
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.get(key)
    }

    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.0.insert(key, value)
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.remove(key)
    }

    /// Entries with `lo <= key <= hi` per the bounds, in key order. Unlike `BTreeMap::range` an
    /// empty or inverted interval yields nothing instead of panicking.
    pub(crate) fn range<'a, Q>(
        &'a self,
        lo: Bound<&'a Q>,
        hi: Bound<&'a Q>,
    ) -> impl Iterator<Item = (&'a K, &'a V)> + 'a
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized + 'a,
    {
        let empty = match (lo, hi) {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
                a >= b
            }
            _ => false,
        };
        (!empty)
            .then(|| self.0.range::<Q, _>((lo, hi)))
            .into_iter()
            .flatten()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter()
    }

    pub(crate) fn retain(&mut self, f: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain(f)
    }

    pub(crate) fn first_key_value(&self) -> Option<(&K, &V)> {
        self.0.first_key_value()
    }

    pub(crate) fn last_key_value(&self) -> Option<(&K, &V)> {
        self.0.last_key_value()
    }

    /// Bulk load from entries in strictly increasing key order.
    pub(crate) fn from_sorted_iter(iter: impl IntoIterator<Item = (K, V)>) -> Self {
        StdIndex(iter.into_iter().collect())
    }
}

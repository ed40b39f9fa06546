//! In-memory B+tree used as the MVCC key index.
//!
//! The API mirrors the subset of `std::collections::BTreeMap` the index needs, so the two can be
//! swapped; the point of a separate type is RAM per key, which is where spindle aims to beat etcd.
//!
//! Design choices and why:
//!
//! - **Arenas with `u32` ids.** Leaves and branches live in two `Vec`s and refer to each other by
//!   `u32`. That avoids an allocation header per node, halves link size against pointers, and lets
//!   leaves be doubly linked in safe code (no `Rc`, no `unsafe`). Freed slots are recycled.
//! - **Branches hold copies of their separator keys.** Descending then searches a key array
//!   inside the node. Keeping no keys in branches (each child's leftmost leaf supplied its
//!   separator) saved one key handle per leaf, but every probe then chased a leaf and its key
//!   vector before it could compare: point operations ran ~3x slower than std's `BTreeMap` with
//!   1M keys, to save about one byte per entry. The price is `K: Clone` on mutations, which for
//!   the `Bytes` keys spindle uses is a reference count bump, not a copy of the key.
//! - **Separators are exact, not mere bounds.** Each equals the smallest key of the subtree to
//!   its right, so no separator outlives its key. A stale one would keep the removed key's
//!   buffer alive (a `Bytes` key may share a large request buffer), and the point of this type
//!   is RAM. Keeping them exact costs a comparison per level on remove and, only when the
//!   removed key was a separator, one extra descent; `retain` re-derives them in a single pass
//!   over the branches.
//! - **Linked leaves instead of a stack cursor.** A range is just a `(leaf, index)` pair at each
//!   end: O(1) steps, no per-iterator allocation, and `DoubleEndedIterator` is symmetric. A stack
//!   cursor would have to keep a root-to-leaf path per end and climb it at every leaf boundary.
//! - **Keys and values in separate vectors** so binary search in a leaf only touches keys.
//! - **Node buffers allocated at full capacity** so leaves never reallocate while they fill. A
//!   half-full leaf therefore carries its spare slots, and a split makes two such leaves. That
//!   is why bulk loading fills leaves to ~90% rather than full: a full leaf splits on its first
//!   new key, and after a restart new keys tend to land all over the key space.

mod bulk;
mod cursor;
mod node;
mod tree;

#[cfg(test)]
mod tests;

use std::borrow::Borrow;
use std::fmt;
use std::ops::Bound;

pub use cursor::Range;
use tree::Tree;

/// Maximum entries per leaf and children per branch. 64 keeps a million keys within four levels
/// while a leaf's key array stays a handful of cache lines for small keys.
pub const NODE_CAPACITY: usize = 64;

/// Null link / "no tree" marker; ids are indices into the arenas.
const NIL: u32 = u32::MAX;

/// An ordered map from `K` to `V`, API-compatible with the used subset of
/// [`std::collections::BTreeMap`] but with far less memory per entry.
#[derive(Clone)]
pub struct BPlusTree<K, V> {
    tree: Tree<K, V, NODE_CAPACITY>,
}

impl<K, V> BPlusTree<K, V> {
    /// Makes an empty tree; allocates nothing until the first insert.
    pub const fn new() -> Self {
        BPlusTree { tree: Tree::new() }
    }

    pub fn len(&self) -> usize {
        self.tree.len
    }

    pub fn is_empty(&self) -> bool {
        self.tree.len == 0
    }

    /// All entries in ascending key order.
    pub fn iter(&self) -> Range<'_, K, V> {
        self.tree.iter()
    }

    pub fn first_key_value(&self) -> Option<(&K, &V)> {
        self.tree.first_key_value()
    }

    pub fn last_key_value(&self) -> Option<(&K, &V)> {
        self.tree.last_key_value()
    }

    /// Removes everything and releases the node memory.
    pub fn clear(&mut self) {
        self.tree = Tree::new();
    }
}

impl<K: Ord, V> BPlusTree<K, V> {
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        self.tree.get(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        self.tree.get_mut(key)
    }

    /// The tree's own copy of `key` with its value.
    pub fn get_key_value_mut<Q>(&mut self, key: &Q) -> Option<(&K, &mut V)>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        self.tree.get_key_value_mut(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        self.tree.find(key).is_some()
    }

    /// Entries with keys within the bounds, ascending (and descending from the back). Unlike
    /// `BTreeMap::range`, inverted or empty bounds yield nothing instead of panicking, since
    /// they come straight from client requests.
    pub fn range<Q>(&self, lower: Bound<&Q>, upper: Bound<&Q>) -> Range<'_, K, V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        self.tree.range(lower, upper)
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        self.tree.check_invariants();
    }
}

/// Mutations store copies of keys in branch nodes, hence `K: Clone`; for `Bytes` keys a copy is
/// a reference count bump.
impl<K: Ord + Clone, V> BPlusTree<K, V> {
    /// Inserts or replaces. Like `BTreeMap`, an existing entry keeps its original key and the
    /// old value is returned.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.tree.insert(key, value)
    }

    /// Makes the tree hold `key`, which equals one of its keys, instead of its own copies of
    /// it (the entry's key and a separator), returning the entry's value; `None` if absent.
    /// For moving keys into compact buffers: with `Bytes` keys, the old buffers are freed once
    /// nothing else holds them.
    pub fn replace_key(&mut self, key: K) -> Option<&mut V> {
        self.tree.replace_key(key)
    }

    /// [`Self::replace_key`], finding the entry by `probe`, which equals `key`.
    pub fn replace_key_by<Q>(&mut self, probe: &Q, key: K) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        self.tree.replace_key_by(probe, key)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        self.tree.remove(key)
    }

    /// Keeps only the entries for which `f` returns true, visiting in ascending order. O(n); if
    /// removals leave nodes underfull the tree is repacked. If `f` panics, nothing is removed.
    pub fn retain(&mut self, f: impl FnMut(&K, &mut V) -> bool) {
        self.tree.retain(f)
    }

    /// Builds a tree from entries in strictly ascending key order in O(n), filling leaves to
    /// ~90% so the first inserts do not split them (the restart path loads the whole index this
    /// way). Order is checked only in debug
    /// builds; unsorted input in release gives a tree that misses lookups.
    pub fn from_sorted_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        BPlusTree {
            tree: Tree::from_sorted(iter),
        }
    }
}

impl<K, V> Default for BPlusTree<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for BPlusTree<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Sorts, then bulk-loads. As with `BTreeMap`, the last of several equal keys wins.
impl<K: Ord + Clone, V> FromIterator<(K, V)> for BPlusTree<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut entries: Vec<(K, V)> = iter.into_iter().collect();
        // Stable, so equal keys keep their input order and the last one can be picked.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut entries = entries.into_iter().peekable();
        let dedup = std::iter::from_fn(move || loop {
            let item = entries.next()?;
            if entries.peek().is_none_or(|next| next.0 != item.0) {
                return Some(item);
            }
        });
        Self::from_sorted_iter(dedup)
    }
}

impl<'a, K, V> IntoIterator for &'a BPlusTree<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Range<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

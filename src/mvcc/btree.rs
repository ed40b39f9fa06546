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

use std::borrow::Borrow;
use std::fmt;
use std::iter::FusedIterator;
use std::mem;
use std::ops::Bound;

/// Maximum entries per leaf and children per branch. 64 keeps a million keys within four levels
/// while a leaf's key array stays a handful of cache lines for small keys.
pub const NODE_CAPACITY: usize = 64;

/// Null link / "no tree" marker; ids are indices into the arenas.
const NIL: u32 = u32::MAX;

#[derive(Clone)]
struct Leaf<K, V> {
    keys: Vec<K>,
    vals: Vec<V>,
    prev: u32,
    next: u32,
}

impl<K, V> Leaf<K, V> {
    fn with_capacity(cap: usize) -> Self {
        Leaf {
            keys: Vec::with_capacity(cap),
            vals: Vec::with_capacity(cap),
            prev: NIL,
            next: NIL,
        }
    }
}

/// `keys[i]` is a copy of the smallest key under `children[i + 1]`, so there is one key fewer
/// than children; `children[0]` is bounded from below by the separator above this node.
#[derive(Clone)]
struct Branch<K> {
    keys: Vec<K>,
    /// Leaf ids one level above the leaves, branch ids higher up.
    children: Vec<u32>,
}

impl<K> Branch<K> {
    fn with_capacity(cap: usize) -> Self {
        Branch {
            keys: Vec::with_capacity(cap - 1),
            children: Vec::with_capacity(cap),
        }
    }

    fn empty() -> Self {
        Branch {
            keys: Vec::new(),
            children: Vec::new(),
        }
    }
}

enum Insert<K, V> {
    Replaced(V),
    Added,
    /// The child split; the new right sibling and a copy of its smallest key must be linked into
    /// the parent.
    Split(K, u32),
}

/// The tree proper. `B` is a parameter only so tests can use tiny nodes to get deep trees from
/// few keys; the public type fixes it to [`NODE_CAPACITY`].
#[derive(Clone)]
struct Tree<K, V, const B: usize> {
    leaves: Vec<Leaf<K, V>>,
    branches: Vec<Branch<K>>,
    free_leaves: Vec<u32>,
    free_branches: Vec<u32>,
    /// `NIL` when empty; then both arenas are empty too.
    root: u32,
    /// Number of branch levels above the leaves; all leaves are at this depth.
    height: usize,
    len: usize,
}

/// Node searches narrow down by bisection to this many keys, then scan them in order.
const LINEAR_TAIL: usize = 4;

/// Like `slice::partition_point`: how many leading `keys` satisfy `below`, which must hold on a
/// prefix of `keys` and nowhere after it.
///
/// std's binary search is branch-free, so each probe's address waits for the previous
/// comparison to finish. With `Bytes` keys every comparison reads key bytes from elsewhere on
/// the heap, which turned a lookup into a chain of dependent cache misses. A branch lets the CPU
/// guess the outcome and start loading the next probe's key while the comparison is pending,
/// and the in-order scan at the end overlaps its comparisons' loads completely. With 1M `Bytes`
/// keys this cut lookups from ~2.2x the time of std's `BTreeMap` to about the same time.
fn search<K>(keys: &[K], mut below: impl FnMut(&K) -> bool) -> usize {
    let (mut lo, mut hi) = (0, keys.len());
    while hi - lo > LINEAR_TAIL {
        let mid = lo + (hi - lo) / 2;
        if below(&keys[mid]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    while lo < hi && below(&keys[lo]) {
        lo += 1;
    }
    lo
}

/// Like `slice::binary_search` on sorted, unique `keys`, using [`search`].
fn search_exact<K, Q>(keys: &[K], key: &Q) -> Result<usize, usize>
where
    K: Borrow<Q>,
    Q: ?Sized + Ord,
{
    let i = search(keys, |k| k.borrow() < key);
    match keys.get(i) {
        Some(k) if k.borrow() == key => Ok(i),
        _ => Err(i),
    }
}

/// Panics if `a == b`; used to touch two sibling nodes at once.
fn two_mut<T>(items: &mut [T], a: u32, b: u32) -> (&mut T, &mut T) {
    let (a, b) = (a as usize, b as usize);
    assert_ne!(a, b, "sibling nodes must be distinct");
    if a < b {
        let (lo, hi) = items.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = items.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}

impl<K, V, const B: usize> Tree<K, V, B> {
    /// Minimum occupancy of non-root nodes. Splitting a full node yields two nodes of at least
    /// this size and merging an underfull node with a minimal sibling fits in one node.
    const MIN: usize = B / 2;

    /// Entries per leaf when bulk loading (at least MIN for every allowed `B`); the rest of
    /// each leaf is slack for later inserts. See `from_sorted` for why.
    const BULK_FILL: usize = B * 9 / 10;

    const fn new() -> Self {
        // u32 slot counts and `MIN >= 2` (no empty leaves mid-rebalance) rely on these bounds.
        const { assert!(B >= 4 && B <= 1 << 16, "node capacity out of range") };
        Tree {
            leaves: Vec::new(),
            branches: Vec::new(),
            free_leaves: Vec::new(),
            free_branches: Vec::new(),
            root: NIL,
            height: 0,
            len: 0,
        }
    }

    fn alloc_leaf(&mut self, leaf: Leaf<K, V>) -> u32 {
        if let Some(id) = self.free_leaves.pop() {
            self.leaves[id as usize] = leaf;
            return id;
        }
        let id = u32::try_from(self.leaves.len())
            .ok()
            .filter(|&id| id != NIL)
            .expect("B+tree leaf arena exhausted");
        self.leaves.push(leaf);
        id
    }

    fn free_leaf(&mut self, id: u32) {
        // Release the (already drained) buffers now; the slot itself is reused later.
        self.leaves[id as usize] = Leaf::with_capacity(0);
        self.free_leaves.push(id);
    }

    fn alloc_branch(&mut self, branch: Branch<K>) -> u32 {
        if let Some(id) = self.free_branches.pop() {
            self.branches[id as usize] = branch;
            return id;
        }
        let id = u32::try_from(self.branches.len())
            .ok()
            .filter(|&id| id != NIL)
            .expect("B+tree branch arena exhausted");
        self.branches.push(branch);
        id
    }

    fn free_branch(&mut self, id: u32) {
        // Also drops any separator copies still held, so a freed slot pins no key buffers.
        self.branches[id as usize] = Branch::empty();
        self.free_branches.push(id);
    }

    fn node_len(&self, node: u32, height: usize) -> usize {
        if height == 0 {
            self.leaves[node as usize].keys.len()
        } else {
            self.branches[node as usize].children.len()
        }
    }

    /// Leftmost leaf under `node`, which sits `height` levels above the leaves.
    fn first_leaf_of(&self, mut node: u32, height: usize) -> u32 {
        for _ in 0..height {
            node = self.branches[node as usize].children[0];
        }
        node
    }

    fn head(&self) -> u32 {
        if self.root == NIL {
            NIL
        } else {
            self.first_leaf_of(self.root, self.height)
        }
    }

    fn tail(&self) -> u32 {
        let mut node = self.root;
        if node != NIL {
            for _ in 0..self.height {
                let children = &self.branches[node as usize].children;
                node = children[children.len() - 1];
            }
        }
        node
    }

    fn first_key_value(&self) -> Option<(&K, &V)> {
        let leaf = self.leaves.get(self.head() as usize)?;
        Some((leaf.keys.first()?, leaf.vals.first()?))
    }

    fn last_key_value(&self) -> Option<(&K, &V)> {
        let leaf = self.leaves.get(self.tail() as usize)?;
        Some((leaf.keys.last()?, leaf.vals.last()?))
    }

    fn iter(&self) -> Range<'_, K, V> {
        let (head, tail) = (self.head(), self.tail());
        if head == NIL {
            return Range::empty(&self.leaves);
        }
        let back = (tail, self.leaves[tail as usize].keys.len());
        Range {
            leaves: &self.leaves,
            front: (head, 0),
            back,
        }
    }
}

/// Read-only operations: these never copy keys, so they need only `Ord`.
impl<K: Ord, V, const B: usize> Tree<K, V, B> {
    /// Index of the child of `branch` whose subtree covers `key`: one past the last separator
    /// that is `<= key`.
    fn route<Q>(&self, branch: u32, key: &Q) -> usize
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        search(&self.branches[branch as usize].keys, |sep| {
            sep.borrow() <= key
        })
    }

    /// Leaf that would hold `key`. The tree must not be empty.
    fn descend<Q>(&self, key: &Q) -> u32
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        let mut node = self.root;
        for _ in 0..self.height {
            let i = self.route(node, key);
            node = self.branches[node as usize].children[i];
        }
        node
    }

    fn find<Q>(&self, key: &Q) -> Option<(u32, usize)>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        if self.root == NIL {
            return None;
        }
        let leaf = self.descend(key);
        let keys = &self.leaves[leaf as usize].keys;
        let i = search_exact(keys, key).ok()?;
        Some((leaf, i))
    }

    fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        let (leaf, i) = self.find(key)?;
        Some(&self.leaves[leaf as usize].vals[i])
    }

    fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        let (leaf, i) = self.find(key)?;
        Some(&mut self.leaves[leaf as usize].vals[i])
    }

    fn range<Q>(&self, lower: Bound<&Q>, upper: Bound<&Q>) -> Range<'_, K, V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        let empty = Range::empty(&self.leaves);
        if self.root == NIL {
            return empty;
        }
        let leaves = &self.leaves;
        let position = |leaf: u32, below: &dyn Fn(&Q) -> bool| {
            (
                leaf,
                search(&leaves[leaf as usize].keys, |k| below(k.borrow())),
            )
        };
        // Front: first entry not below `lower`.
        let (mut fl, mut fi) = match lower {
            Bound::Unbounded => (self.head(), 0),
            Bound::Included(k) => position(self.descend(k), &|x| x < k),
            Bound::Excluded(k) => position(self.descend(k), &|x| x <= k),
        };
        if fi == leaves[fl as usize].keys.len() {
            (fl, fi) = (leaves[fl as usize].next, 0);
            if fl == NIL {
                return empty;
            }
        }
        // Back: one past the last entry not above `upper`.
        let (mut bl, mut bi) = match upper {
            Bound::Unbounded => {
                let tail = self.tail();
                (tail, leaves[tail as usize].keys.len())
            }
            Bound::Included(k) => position(self.descend(k), &|x| x <= k),
            Bound::Excluded(k) => position(self.descend(k), &|x| x < k),
        };
        // Nothing in this leaf is below `upper` (e.g. `Excluded` of its first key): the range
        // ends in the previous leaf.
        if bi == 0 {
            bl = leaves[bl as usize].prev;
            if bl == NIL {
                return empty;
            }
            bi = leaves[bl as usize].keys.len();
        }
        // Keys are unique and globally sorted, so comparing them orders the two positions; this
        // is also what makes `lower > upper` an empty range rather than a panic.
        if leaves[fl as usize].keys[fi] > leaves[bl as usize].keys[bi - 1] {
            return empty;
        }
        Range {
            leaves,
            front: (fl, fi),
            back: (bl, bi),
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        if self.root == NIL {
            assert_eq!(self.len, 0);
            assert_eq!(self.height, 0);
            assert!(self.leaves.is_empty() && self.branches.is_empty());
            return;
        }
        let mut order = Vec::new();
        let mut seen_leaf = vec![false; self.leaves.len()];
        let mut seen_branch = vec![false; self.branches.len()];
        let bounds = (None, None);
        self.check_node(
            self.root,
            self.height,
            true,
            bounds,
            &mut order,
            &mut seen_branch,
        );
        // Every live node is reached exactly once (hence all leaves sit at depth `height`) and
        // the free lists hold exactly the rest.
        for &id in &order {
            assert!(
                !mem::replace(&mut seen_leaf[id as usize], true),
                "leaf reached twice"
            );
        }
        for &id in &self.free_leaves {
            assert!(
                !mem::replace(&mut seen_leaf[id as usize], true),
                "free leaf in use"
            );
            assert!(self.leaves[id as usize].keys.is_empty());
        }
        for &id in &self.free_branches {
            assert!(
                !mem::replace(&mut seen_branch[id as usize], true),
                "free branch in use"
            );
            let branch = &self.branches[id as usize];
            assert!(
                branch.keys.is_empty() && branch.children.is_empty(),
                "free branch still holds separators"
            );
        }
        assert!(seen_leaf.iter().all(|&s| s), "leaked leaf");
        assert!(seen_branch.iter().all(|&s| s), "leaked branch");
        // The leaf chain follows tree order both ways, and keys ascend strictly across it.
        let mut count = 0;
        let mut last: Option<&K> = None;
        for (n, &id) in order.iter().enumerate() {
            let leaf = &self.leaves[id as usize];
            let prev = if n == 0 { NIL } else { order[n - 1] };
            assert_eq!(leaf.prev, prev, "broken prev link");
            assert_eq!(
                leaf.next,
                order.get(n + 1).copied().unwrap_or(NIL),
                "broken next link"
            );
            assert_eq!(leaf.keys.len(), leaf.vals.len());
            for k in &leaf.keys {
                assert!(last.is_none_or(|l| l < k), "keys out of order");
                last = Some(k);
            }
            count += leaf.keys.len();
        }
        assert_eq!(order.first(), Some(&self.head()));
        assert_eq!(order.last(), Some(&self.tail()));
        assert_eq!(count, self.len, "len mismatch");
    }

    /// Checks occupancy below `node`, and that every key there lies within `bounds` (inclusive
    /// lower, exclusive upper, `None` = open) and every separator equals the smallest key of the
    /// subtree to its right. Returns the smallest key under `node`.
    #[cfg(test)]
    fn check_node<'a>(
        &'a self,
        node: u32,
        height: usize,
        is_root: bool,
        (lower, upper): (Option<&'a K>, Option<&'a K>),
        order: &mut Vec<u32>,
        seen_branch: &mut [bool],
    ) -> &'a K {
        let n = self.node_len(node, height);
        let min = match (is_root, height) {
            (true, 0) => 1,
            (true, _) => 2,
            (false, _) => Self::MIN,
        };
        assert!((min..=B).contains(&n), "occupancy {n} outside {min}..={B}");
        if height == 0 {
            order.push(node);
            let keys = &self.leaves[node as usize].keys;
            for k in keys {
                assert!(lower.is_none_or(|l| l <= k), "key below its separator");
                assert!(upper.is_none_or(|u| k < u), "key not below next separator");
            }
            return &keys[0];
        }
        assert!(
            !mem::replace(&mut seen_branch[node as usize], true),
            "branch reached twice"
        );
        let Branch { keys, children } = &self.branches[node as usize];
        assert_eq!(keys.len() + 1, children.len(), "separator count");
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "separators out of order"
        );
        let mut first = None;
        for (j, &child) in children.iter().enumerate() {
            let lo = if j == 0 { lower } else { Some(&keys[j - 1]) };
            let hi = keys.get(j).or(upper);
            let bounds = (lo, hi);
            let smallest = self.check_node(child, height - 1, false, bounds, order, seen_branch);
            if j == 0 {
                first = Some(smallest);
            } else {
                assert!(smallest == &keys[j - 1], "stale separator");
            }
        }
        first.expect("branch has children")
    }
}

/// Mutations. Separators are copies of leaf keys, hence `K: Clone`.
impl<K: Ord + Clone, V, const B: usize> Tree<K, V, B> {
    fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.root == NIL {
            let mut leaf = Leaf::with_capacity(B);
            leaf.keys.push(key);
            leaf.vals.push(value);
            self.root = self.alloc_leaf(leaf);
            self.len = 1;
            return None;
        }
        match self.insert_at(self.root, self.height, key, value) {
            Insert::Replaced(old) => return Some(old),
            Insert::Added => {}
            Insert::Split(sep, right) => {
                let mut root = Branch::with_capacity(B);
                root.keys.push(sep);
                root.children.extend([self.root, right]);
                self.root = self.alloc_branch(root);
                self.height += 1;
            }
        }
        self.len += 1;
        None
    }

    fn insert_at(&mut self, node: u32, height: usize, key: K, value: V) -> Insert<K, V> {
        if height == 0 {
            return self.insert_into_leaf(node, key, value);
        }
        let i = self.route(node, &key);
        let child = self.branches[node as usize].children[i];
        match self.insert_at(child, height - 1, key, value) {
            Insert::Split(sep, right) => self.insert_child(node, i + 1, sep, right),
            done => done,
        }
    }

    fn insert_into_leaf(&mut self, id: u32, key: K, value: V) -> Insert<K, V> {
        let leaf = &mut self.leaves[id as usize];
        let pos = match search_exact(&leaf.keys, &key) {
            Ok(i) => return Insert::Replaced(mem::replace(&mut leaf.vals[i], value)),
            Err(i) => i,
        };
        if leaf.keys.len() < B {
            leaf.keys.insert(pos, key);
            leaf.vals.insert(pos, value);
            return Insert::Added;
        }
        // Split before inserting so neither half exceeds B and both keep at least MIN.
        let mid = B / 2;
        let mut right = Leaf::with_capacity(B);
        right.keys.extend(leaf.keys.drain(mid..));
        right.vals.extend(leaf.vals.drain(mid..));
        if pos <= mid {
            leaf.keys.insert(pos, key);
            leaf.vals.insert(pos, value);
        } else {
            right.keys.insert(pos - mid, key);
            right.vals.insert(pos - mid, value);
        }
        right.prev = id;
        right.next = leaf.next;
        let next = right.next;
        let sep = right.keys[0].clone();
        let rid = self.alloc_leaf(right);
        self.leaves[id as usize].next = rid;
        if next != NIL {
            self.leaves[next as usize].prev = rid;
        }
        Insert::Split(sep, rid)
    }

    /// Makes `child` (smallest key `sep`) the `at`-th child of branch `id`, `at >= 1`.
    fn insert_child(&mut self, id: u32, at: usize, sep: K, child: u32) -> Insert<K, V> {
        let branch = &mut self.branches[id as usize];
        if branch.children.len() < B {
            branch.keys.insert(at - 1, sep);
            branch.children.insert(at, child);
            return Insert::Added;
        }
        // Children `mid..` move right; the separator in front of them moves up instead, as
        // the right node's lower bound now comes from the parent.
        let mid = B / 2;
        let mut right = Branch::with_capacity(B);
        right.children.extend(branch.children.drain(mid..));
        right.keys.extend(branch.keys.drain(mid..));
        let up = branch.keys.pop().expect("a full branch has separators");
        if at <= mid {
            branch.keys.insert(at - 1, sep);
            branch.children.insert(at, child);
        } else {
            right.keys.insert(at - mid - 1, sep);
            right.children.insert(at - mid, child);
        }
        let rid = self.alloc_branch(right);
        Insert::Split(up, rid)
    }

    fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        if self.root == NIL {
            return None;
        }
        let value = self.remove_at(self.root, self.height, key)?;
        self.len -= 1;
        if self.len == 0 {
            // Drop the arenas so an emptied index holds no memory.
            *self = Self::new();
        } else if self.height > 0 && self.branches[self.root as usize].children.len() == 1 {
            let old = self.root;
            self.root = self.branches[old as usize].children[0];
            self.free_branch(old);
            self.height -= 1;
        }
        Some(value)
    }

    fn remove_at<Q>(&mut self, node: u32, height: usize, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        if height == 0 {
            let leaf = &mut self.leaves[node as usize];
            let i = search_exact(&leaf.keys, key).ok()?;
            leaf.keys.remove(i);
            return Some(leaf.vals.remove(i));
        }
        let i = self.route(node, key);
        let child = self.branches[node as usize].children[i];
        let value = self.remove_at(child, height - 1, key)?;
        // The removed key was `child`'s smallest and this separator its copy (at most one
        // separator in the tree can be). The new smallest is the first key of `child`'s leftmost
        // leaf: rebalancing inside `child` only appends to that leaf or merges into it.
        if i > 0 && self.branches[node as usize].keys[i - 1].borrow() == key {
            let leaf = self.first_leaf_of(child, height - 1);
            let smallest = self.leaves[leaf as usize].keys[0].clone();
            self.branches[node as usize].keys[i - 1] = smallest;
        }
        if self.node_len(child, height - 1) < Self::MIN {
            self.rebalance(node, i, height - 1);
        }
        Some(value)
    }

    /// Restores minimum occupancy of child `i` of `parent` (one below MIN) by borrowing one entry
    /// from a sibling that can spare it, otherwise by merging with a sibling.
    fn rebalance(&mut self, parent: u32, i: usize, height: usize) {
        let children = &self.branches[parent as usize].children;
        debug_assert!(children.len() >= 2, "non-root parent with a single child");
        let spare = |j: usize| self.node_len(children[j], height) > Self::MIN;
        if i > 0 && spare(i - 1) {
            self.borrow_from_left(parent, i, height);
        } else if i + 1 < children.len() && spare(i + 1) {
            self.borrow_from_right(parent, i, height);
        } else if i > 0 {
            self.merge(parent, i - 1, height);
        } else {
            self.merge(parent, i, height);
        }
    }

    fn borrow_from_left(&mut self, parent: u32, i: usize, height: usize) {
        let children = &self.branches[parent as usize].children;
        let (left, cur) = (children[i - 1], children[i]);
        if height == 0 {
            let (l, c) = two_mut(&mut self.leaves, left, cur);
            c.keys.insert(0, l.keys.pop().expect("sibling above MIN"));
            c.vals.insert(0, l.vals.pop().expect("sibling above MIN"));
            let sep = c.keys[0].clone();
            self.branches[parent as usize].keys[i - 1] = sep;
        } else {
            // Rotate through the parent: the left sibling's last separator (the moved child's
            // smallest key) goes up, and the parent's separator (`cur`'s old smallest key) comes
            // down to sit between the moved child and `cur`'s old first child.
            let l = &mut self.branches[left as usize];
            let moved = l.children.pop().expect("sibling above MIN");
            let up = l.keys.pop().expect("sibling above MIN");
            let down = mem::replace(&mut self.branches[parent as usize].keys[i - 1], up);
            let c = &mut self.branches[cur as usize];
            c.children.insert(0, moved);
            c.keys.insert(0, down);
        }
    }

    fn borrow_from_right(&mut self, parent: u32, i: usize, height: usize) {
        let children = &self.branches[parent as usize].children;
        let (cur, right) = (children[i], children[i + 1]);
        if height == 0 {
            let (c, r) = two_mut(&mut self.leaves, cur, right);
            c.keys.push(r.keys.remove(0));
            c.vals.push(r.vals.remove(0));
            let sep = r.keys[0].clone();
            self.branches[parent as usize].keys[i] = sep;
        } else {
            // Mirror image of the rotation in `borrow_from_left`.
            let r = &mut self.branches[right as usize];
            let moved = r.children.remove(0);
            let up = r.keys.remove(0);
            let down = mem::replace(&mut self.branches[parent as usize].keys[i], up);
            let c = &mut self.branches[cur as usize];
            c.children.push(moved);
            c.keys.push(down);
        }
    }

    /// Merges child `i + 1` of `parent` into child `i`. The right node is never a first child,
    /// so the only separator naming its smallest key is the parent's, which goes away here.
    fn merge(&mut self, parent: u32, i: usize, height: usize) {
        let p = &mut self.branches[parent as usize];
        let (left, right) = (p.children[i], p.children.remove(i + 1));
        let sep = p.keys.remove(i);
        if height == 0 {
            let (l, r) = two_mut(&mut self.leaves, left, right);
            l.keys.append(&mut r.keys);
            l.vals.append(&mut r.vals);
            l.next = r.next;
            let next = r.next;
            if next != NIL {
                self.leaves[next as usize].prev = left;
            }
            self.free_leaf(right);
        } else {
            // The parent's separator still bounds `right`'s first child, now inside `left`.
            let (l, r) = two_mut(&mut self.branches, left, right);
            l.keys.push(sep);
            l.keys.append(&mut r.keys);
            l.children.append(&mut r.children);
            self.free_branch(right);
        }
        debug_assert!(self.node_len(left, height) <= B);
    }

    /// Builds the tree by filling leaves left to right, then stacking branch levels on top.
    ///
    /// Leaves are filled to [`Self::BULK_FILL`] (~90%), not full. A full leaf splits on its next
    /// insert into two half-full leaves that each keep full-capacity buffers, so a fully packed
    /// tree is smallest only until new keys arrive across the key space. Measured with 1M `Bytes`
    /// keys and `u64` values (node memory only): packed full, the tree takes 41.5 bytes per entry,
    /// but 100k new keys split nearly every leaf and it grows to 75; with the slack it starts at 47
    /// and grows to 53, and those inserts run ~30% faster. The slack has paid for itself by 2.5k
    /// new keys (0.25%). Branches are still packed: there are ~60x fewer of them, so their splits
    /// cost little either way.
    fn from_sorted<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut t = Self::new();
        let mut cur = NIL;
        for (k, v) in iter {
            if cur == NIL {
                cur = t.alloc_leaf(Leaf::with_capacity(B));
            } else {
                let leaf = &t.leaves[cur as usize];
                debug_assert!(
                    leaf.keys.last().is_some_and(|last| *last < k),
                    "from_sorted_iter: keys must be strictly ascending"
                );
                if leaf.keys.len() == Self::BULK_FILL {
                    let mut next = Leaf::with_capacity(B);
                    next.prev = cur;
                    let id = t.alloc_leaf(next);
                    t.leaves[cur as usize].next = id;
                    cur = id;
                }
            }
            let leaf = &mut t.leaves[cur as usize];
            leaf.keys.push(k);
            leaf.vals.push(v);
            t.len += 1;
        }
        if cur == NIL {
            return t;
        }
        // Only the last leaf can be short. If so, it shares evenly with its neighbour when that
        // leaves both at MIN or above, else the two fit in one leaf (as 2 * MIN <= B).
        let prev = t.leaves[cur as usize].prev;
        let last = t.leaves[cur as usize].keys.len();
        if prev != NIL && last < Self::MIN {
            let (p, l) = two_mut(&mut t.leaves, prev, cur);
            let total = p.keys.len() + last;
            if total >= 2 * Self::MIN {
                let from = total - total / 2;
                l.keys.splice(0..0, p.keys.drain(from..));
                l.vals.splice(0..0, p.vals.drain(from..));
            } else {
                p.keys.append(&mut l.keys);
                p.vals.append(&mut l.vals);
                p.next = NIL;
                debug_assert_eq!(cur as usize, t.leaves.len() - 1);
                // `cur` is the newest arena slot; dropping it keeps leaf ids 0..n in key order.
                t.leaves.pop();
            }
        }
        // The arena started empty, so leaf ids are 0..n in key order. Each level spreads its
        // children evenly, which keeps every non-root branch at or above MIN. A level is a list
        // of (smallest key, node): the first of each group becomes the group's own smallest key,
        // the others its separators.
        let mut level: Vec<(K, u32)> = (0..t.leaves.len() as u32)
            .map(|id| (t.leaves[id as usize].keys[0].clone(), id))
            .collect();
        while level.len() > 1 {
            let groups = level.len().div_ceil(B);
            let (base, extra) = (level.len() / groups, level.len() % groups);
            let mut nodes = level.into_iter();
            level = (0..groups)
                .map(|g| {
                    let (smallest, first) = nodes.next().expect("groups are never empty");
                    let mut branch = Branch::with_capacity(B);
                    branch.children.push(first);
                    for (sep, child) in nodes.by_ref().take(base + usize::from(g < extra) - 1) {
                        branch.keys.push(sep);
                        branch.children.push(child);
                    }
                    (smallest, t.alloc_branch(branch))
                })
                .collect();
            t.height += 1;
        }
        t.root = level[0].1;
        t
    }

    fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        // Phase 1 asks `f` about every entry before anything moves, so a panic in `f` leaves a
        // valid tree. The verdicts cost one bit per entry.
        let mut keep: Vec<u64> = Vec::with_capacity(self.len.div_ceil(64));
        let (mut word, mut bit, mut removed) = (0u64, 0, 0usize);
        let mut id = self.head();
        while id != NIL {
            let leaf = &mut self.leaves[id as usize];
            for (k, v) in leaf.keys.iter().zip(leaf.vals.iter_mut()) {
                if f(k, v) {
                    word |= 1 << bit;
                } else {
                    removed += 1;
                }
                bit += 1;
                if bit == 64 {
                    keep.push(word);
                    (word, bit) = (0, 0);
                }
            }
            id = leaf.next;
        }
        if removed == 0 {
            return;
        }
        keep.push(word);
        self.len -= removed;
        if self.len == 0 {
            *self = Self::new();
            return;
        }
        // Phase 2 filters leaves in place. If some leaf fell below MIN, rebuild, which is O(n)
        // like the filtering itself. Otherwise the shape stands and only separators whose key
        // went need replacing.
        let mut verdicts = keep
            .iter()
            .flat_map(|&w| (0..64).map(move |b| (w >> b) & 1 == 1));
        let mut scratch: Vec<bool> = Vec::with_capacity(B);
        let (mut underfull, mut first_removed) = (false, false);
        let mut id = self.head();
        while id != NIL {
            let leaf = &mut self.leaves[id as usize];
            scratch.clear();
            scratch.extend(verdicts.by_ref().take(leaf.keys.len()));
            if scratch.contains(&false) {
                // `Vec::retain` visits elements exactly once, in order.
                let mut it = scratch.iter();
                leaf.keys.retain(|_| it.next() == Some(&true));
                let mut it = scratch.iter();
                leaf.vals.retain(|_| it.next() == Some(&true));
                underfull |= self.height > 0 && leaf.keys.len() < Self::MIN;
                first_removed |= !scratch[0];
            }
            id = leaf.next;
        }
        if underfull {
            self.rebuild();
        } else if first_removed && self.height > 0 {
            Self::refresh_separators(&mut self.branches, &self.leaves, self.root, self.height);
        }
    }

    /// Resets every separator under `node` to the smallest key of the subtree to its right, in
    /// one pass over the branches; returns the leftmost leaf under `node`.
    fn refresh_separators(
        branches: &mut [Branch<K>],
        leaves: &[Leaf<K, V>],
        node: u32,
        height: usize,
    ) -> u32 {
        if height == 0 {
            return node;
        }
        let mut first = NIL;
        for j in 0..branches[node as usize].children.len() {
            let child = branches[node as usize].children[j];
            let leaf = Self::refresh_separators(branches, leaves, child, height - 1);
            if j == 0 {
                first = leaf;
            } else {
                branches[node as usize].keys[j - 1] = leaves[leaf as usize].keys[0].clone();
            }
        }
        first
    }

    /// Repacks all entries, consuming the old leaves one by one so peak memory stays near one
    /// copy of the data.
    fn rebuild(&mut self) {
        let head = self.head();
        let mut leaves = mem::replace(self, Self::new()).leaves;
        let mut next = head;
        let entries = std::iter::from_fn(move || {
            let leaf = leaves.get_mut(next as usize)?;
            next = leaf.next;
            Some(
                mem::take(&mut leaf.keys)
                    .into_iter()
                    .zip(mem::take(&mut leaf.vals)),
            )
        });
        *self = Self::from_sorted(entries.flatten());
    }
}

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

/// Double-ended iterator over a key range (or the whole tree), in ascending key order.
pub struct Range<'a, K, V> {
    leaves: &'a [Leaf<K, V>],
    /// Next entry to yield from the front: always a valid entry unless equal to `back`.
    front: (u32, usize),
    /// One past the next entry to yield from the back: index >= 1 unless equal to `front`.
    back: (u32, usize),
}

impl<'a, K, V> Range<'a, K, V> {
    fn empty(leaves: &'a [Leaf<K, V>]) -> Self {
        Range {
            leaves,
            front: (NIL, 0),
            back: (NIL, 0),
        }
    }
}

impl<K, V> Clone for Range<'_, K, V> {
    fn clone(&self) -> Self {
        Range { ..*self }
    }
}

impl<'a, K, V> Iterator for Range<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        let (id, i) = self.front;
        let leaves: &'a [Leaf<K, V>] = self.leaves;
        let leaf = &leaves[id as usize];
        self.front = (id, i + 1);
        if i + 1 == leaf.keys.len() && self.front != self.back {
            self.front = (leaf.next, 0);
        }
        Some((&leaf.keys[i], &leaf.vals[i]))
    }
}

impl<'a, K, V> DoubleEndedIterator for Range<'a, K, V> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front == self.back {
            return None;
        }
        let (id, i) = (self.back.0, self.back.1 - 1);
        let leaves: &'a [Leaf<K, V>] = self.leaves;
        let leaf = &leaves[id as usize];
        self.back = (id, i);
        if i == 0 && self.front != self.back {
            let prev = leaf.prev;
            self.back = (prev, leaves[prev as usize].keys.len());
        }
        Some((&leaf.keys[i], &leaf.vals[i]))
    }
}

impl<K, V> FusedIterator for Range<'_, K, V> {}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for Range<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.clone()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt::Debug;
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
}

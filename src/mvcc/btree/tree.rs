//! The tree proper: node arenas, lookups, point inserts and removes with their rebalancing.
//!
//! Separate from the public [`super::BPlusTree`] wrapper so tests can instantiate it with tiny
//! node capacities, and from `bulk` so the per-key paths stay apart from the O(n) rebuilds.

use std::borrow::Borrow;
use std::mem;
use std::ops::Bound;

use super::cursor::Range;
use super::node::{search, search_exact, two_mut, Branch, Insert, Leaf};
use super::NIL;

/// The tree proper. `B` is a parameter only so tests can use tiny nodes to get deep trees from
/// few keys; the public type fixes it to [`NODE_CAPACITY`](super::NODE_CAPACITY).
#[derive(Clone)]
pub(super) struct Tree<K, V, const B: usize> {
    pub(super) leaves: Vec<Leaf<K, V>>,
    pub(super) branches: Vec<Branch<K>>,
    free_leaves: Vec<u32>,
    free_branches: Vec<u32>,
    /// `NIL` when empty; then both arenas are empty too.
    pub(super) root: u32,
    /// Number of branch levels above the leaves; all leaves are at this depth.
    pub(super) height: usize,
    pub(super) len: usize,
}

impl<K, V, const B: usize> Tree<K, V, B> {
    /// Minimum occupancy of non-root nodes. Splitting a full node yields two nodes of at least
    /// this size and merging an underfull node with a minimal sibling fits in one node.
    pub(super) const MIN: usize = B / 2;

    /// Entries per leaf when bulk loading (at least MIN for every allowed `B`); the rest of
    /// each leaf is slack for later inserts. See `from_sorted` for why.
    pub(super) const BULK_FILL: usize = B * 9 / 10;

    pub(super) const fn new() -> Self {
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

    pub(super) fn alloc_leaf(&mut self, leaf: Leaf<K, V>) -> u32 {
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

    pub(super) fn alloc_branch(&mut self, branch: Branch<K>) -> u32 {
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

    pub(super) fn head(&self) -> u32 {
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

    pub(super) fn first_key_value(&self) -> Option<(&K, &V)> {
        let leaf = self.leaves.get(self.head() as usize)?;
        Some((leaf.keys.first()?, leaf.vals.first()?))
    }

    pub(super) fn last_key_value(&self) -> Option<(&K, &V)> {
        let leaf = self.leaves.get(self.tail() as usize)?;
        Some((leaf.keys.last()?, leaf.vals.last()?))
    }

    pub(super) fn iter(&self) -> Range<'_, K, V> {
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

    pub(super) fn find<Q>(&self, key: &Q) -> Option<(u32, usize)>
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

    pub(super) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        let (leaf, i) = self.find(key)?;
        Some(&self.leaves[leaf as usize].vals[i])
    }

    pub(super) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        let (leaf, i) = self.find(key)?;
        Some(&mut self.leaves[leaf as usize].vals[i])
    }

    pub(super) fn get_key_value_mut<Q>(&mut self, key: &Q) -> Option<(&K, &mut V)>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        let (leaf, i) = self.find(key)?;
        let leaf = &mut self.leaves[leaf as usize];
        Some((&leaf.keys[i], &mut leaf.vals[i]))
    }

    pub(super) fn range<Q>(&self, lower: Bound<&Q>, upper: Bound<&Q>) -> Range<'_, K, V>
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
    pub(super) fn free_leaves_len(&self) -> usize {
        self.free_leaves.len()
    }

    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
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
    pub(super) fn insert(&mut self, key: K, value: V) -> Option<V> {
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

    /// Stores `key`, which equals a key in the tree, in place of every copy the tree holds (the
    /// leaf entry and the separator equal to it, if any) and returns the entry's value; `None`
    /// if the key is absent. For swapping key buffers: an equal key keeps every order intact.
    pub(super) fn replace_key(&mut self, key: K) -> Option<&mut V> {
        let probe = key.clone();
        self.replace_key_by(&probe, key)
    }

    /// [`Self::replace_key`], finding the key by `probe` (equal to it), so the search never
    /// reads `key`'s memory (which may be a mapped file's).
    pub(super) fn replace_key_by<Q>(&mut self, probe: &Q, key: K) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: ?Sized + Ord,
    {
        if self.root == NIL {
            return None;
        }
        let mut node = self.root;
        for _ in 0..self.height {
            let branch = &mut self.branches[node as usize];
            let i = search(&branch.keys, |sep| sep.borrow() <= probe);
            if i > 0 && branch.keys[i - 1].borrow() == probe {
                branch.keys[i - 1] = key.clone();
            }
            node = branch.children[i];
        }
        let leaf = &mut self.leaves[node as usize];
        let i = search_exact(&leaf.keys, probe).ok()?;
        leaf.keys[i] = key;
        Some(&mut leaf.vals[i])
    }

    fn insert_at(&mut self, node: u32, height: usize, key: K, value: V) -> Insert<K, V> {
        if height == 0 {
            return self.insert_into_leaf(node, key, value);
        }
        let mut i = self.route(node, &key);
        if height == 1 && self.shift_left(node, i) {
            i = self.route(node, &key);
        }
        let child = self.branches[node as usize].children[i];
        match self.insert_at(child, height - 1, key, value) {
            Insert::Split(sep, right) => self.insert_child(node, i + 1, sep, right),
            done => done,
        }
    }

    /// Before a full leaf (child `i` of branch `parent`) would split, moves its first entries
    /// into its left sibling when that has room for at least two, leaving it one free slot.
    /// Splitting halves a leaf, so keys arriving in ascending order (the usual load: sequential
    /// or time-ordered keys) would leave every leaf half full, twice the memory per key; with
    /// the shift they fill leaves nearly full, and random inserts leave leaves fuller too. The
    /// key to insert may then belong in the left sibling, which has room for it; the caller
    /// routes again. Returns whether anything moved.
    fn shift_left(&mut self, parent: u32, i: usize) -> bool {
        if i == 0 {
            return false;
        }
        let children = &self.branches[parent as usize].children;
        let (left, full) = (children[i - 1], children[i]);
        let room = B - self.leaves[left as usize].keys.len();
        if self.leaves[full as usize].keys.len() < B || room < 2 {
            return false;
        }
        let n = room - 1;
        let (l, f) = two_mut(&mut self.leaves, left, full);
        l.keys.extend(f.keys.drain(..n));
        l.vals.extend(f.vals.drain(..n));
        debug_assert!(f.keys.len() >= Self::MIN && l.keys.len() < B);
        // The separator is exact: the smallest key now in the right leaf.
        self.branches[parent as usize].keys[i - 1] = f.keys[0].clone();
        true
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

    pub(super) fn remove<Q>(&mut self, key: &Q) -> Option<V>
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
}

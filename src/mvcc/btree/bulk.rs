//! Whole-tree operations that run in O(n): bulk loading from sorted entries, `retain`, and the
//! repack that `retain` falls back to.
//!
//! Separate from the per-key paths in `tree` because they build or rewrite every level at once
//! instead of splitting and merging one node at a time.

use std::mem;

use super::node::{two_mut, Branch, Leaf};
use super::tree::Tree;
use super::NIL;

/// Bulk operations. Separators are copies of leaf keys, hence `K: Clone`.
impl<K: Ord + Clone, V, const B: usize> Tree<K, V, B> {
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
    pub(super) fn from_sorted<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
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

    pub(super) fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
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

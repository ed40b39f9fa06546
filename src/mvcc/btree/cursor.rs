//! Range cursors: a double-ended iterator that walks the doubly linked leaves.
//!
//! Separate from the tree because a cursor only needs the leaf arena, never the branches, and
//! its position invariants are independent of how the tree rebalances.

use std::fmt;
use std::iter::FusedIterator;

use super::node::Leaf;
use super::NIL;

/// Double-ended iterator over a key range (or the whole tree), in ascending key order.
pub struct Range<'a, K, V> {
    pub(super) leaves: &'a [Leaf<K, V>],
    /// Next entry to yield from the front: always a valid entry unless equal to `back`.
    pub(super) front: (u32, usize),
    /// One past the next entry to yield from the back: index >= 1 unless equal to `front`.
    pub(super) back: (u32, usize),
}

impl<'a, K, V> Range<'a, K, V> {
    pub(super) fn empty(leaves: &'a [Leaf<K, V>]) -> Self {
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

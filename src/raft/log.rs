//! The in-memory replica of the log: a snapshot (everything up to `snapshot.meta.index`)
//! followed by entries. The caller owns durability; this type only tracks which prefix the
//! caller has acknowledged as durable (`persisted`), which suffix it has not been handed yet
//! (`unstable_from`), and what was committed and handed out for apply.

use std::collections::VecDeque;

use super::message::{Entry, Snapshot};

#[derive(Debug)]
pub struct RaftLog {
    /// The latest snapshot; kept whole (data is a refcounted `Bytes`) to send to followers.
    snapshot: Snapshot,
    entries: VecDeque<Entry>,
    committed: u64,
    /// Highest index handed to the application.
    applied: u64,
    /// Every entry up to here is durable (acknowledged by the caller).
    persisted: u64,
    /// First index not yet handed out in `Ready::entries`.
    unstable_from: u64,
    /// A received snapshot not yet handed out in `Ready::snapshot`.
    pending_snapshot: Option<Snapshot>,
    /// Index of a received snapshot handed out (or pending) but not yet acknowledged.
    unacked_snapshot: Option<u64>,
}

impl RaftLog {
    /// Restores from durable state: everything given is persisted by definition.
    pub fn restore_durable(snapshot: Snapshot, entries: Vec<Entry>, commit: u64) -> Self {
        let base = snapshot.meta.index;
        let mut entries: VecDeque<Entry> = entries.into_iter().filter(|e| e.index > base).collect();
        // Keep only a contiguous run starting right after the snapshot.
        let contiguous = entries
            .iter()
            .enumerate()
            .take_while(|(i, e)| e.index == base + 1 + *i as u64)
            .count();
        entries.truncate(contiguous);
        let last = base + entries.len() as u64;
        RaftLog {
            snapshot,
            entries,
            committed: commit.clamp(base, last),
            applied: base,
            persisted: last,
            unstable_from: last + 1,
            pending_snapshot: None,
            unacked_snapshot: None,
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
    pub fn first_index(&self) -> u64 {
        self.snapshot.meta.index + 1
    }
    pub fn last_index(&self) -> u64 {
        self.snapshot.meta.index + self.entries.len() as u64
    }
    pub fn last_term(&self) -> u64 {
        self.entries
            .back()
            .map_or(self.snapshot.meta.term, |e| e.term)
    }
    pub fn committed(&self) -> u64 {
        self.committed
    }
    pub fn applied(&self) -> u64 {
        self.applied
    }
    pub fn persisted(&self) -> u64 {
        self.persisted
    }

    /// Term of the entry at `index`, if it is still known (not compacted, not beyond the end).
    pub fn term(&self, index: u64) -> Option<u64> {
        let base = self.snapshot.meta.index;
        if index == base {
            return Some(self.snapshot.meta.term);
        }
        if index < base {
            return None;
        }
        self.entries
            .get((index - base - 1) as usize)
            .map(|e| e.term)
    }

    pub fn entry(&self, index: u64) -> Option<&Entry> {
        let base = self.snapshot.meta.index;
        if index <= base {
            return None;
        }
        self.entries.get((index - base - 1) as usize)
    }

    pub fn match_term(&self, index: u64, term: u64) -> bool {
        self.term(index) == Some(term)
    }

    /// §5.4.1: a candidate's log is at least as up to date as ours.
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Entries from `lo` on, at most `max_entries` and (after the first) `max_bytes`.
    /// Clones are refcount bumps of the payloads.
    pub fn entries_from(&self, lo: u64, max_entries: usize, max_bytes: u64) -> Vec<Entry> {
        let base = self.snapshot.meta.index;
        if lo <= base || lo > self.last_index() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.entries.iter().skip((lo - base - 1) as usize) {
            if out.len() >= max_entries || (!out.is_empty() && bytes + e.size() > max_bytes) {
                break;
            }
            bytes += e.size();
            out.push(e.clone());
        }
        out
    }

    /// The leader's own appends.
    pub fn append(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        debug_assert!(
            entry.term >= self.last_term(),
            "terms in a log never decrease"
        );
        self.entries.push_back(entry);
    }

    /// A follower's append (§5.3): if our entry at `prev` has `prev_term`, drop whatever
    /// conflicts with `ents` and append the rest. Returns the last index now known to match.
    pub fn maybe_append(&mut self, prev: u64, prev_term: u64, ents: &[Entry]) -> Option<u64> {
        if !self.match_term(prev, prev_term) {
            return None;
        }
        let last_new = prev + ents.len() as u64;
        for (i, e) in ents.iter().enumerate() {
            debug_assert_eq!(e.index, prev + 1 + i as u64, "append batch not contiguous");
            match self.term(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    assert!(
                        e.index > self.committed,
                        "log matching violated: conflict at committed index {} (commit {})",
                        e.index,
                        self.committed
                    );
                    self.truncate_from(e.index);
                    self.extend(&ents[i..]);
                    break;
                }
                None => {
                    if e.index <= self.snapshot.meta.index {
                        continue; // compacted, hence committed, hence matching
                    }
                    self.extend(&ents[i..]);
                    break;
                }
            }
        }
        Some(last_new)
    }

    fn extend(&mut self, ents: &[Entry]) {
        for e in ents {
            if e.index <= self.snapshot.meta.index {
                continue;
            }
            debug_assert_eq!(e.index, self.last_index() + 1);
            debug_assert!(e.term >= self.last_term(), "terms in a log never decrease");
            self.entries.push_back(e.clone());
        }
    }

    fn truncate_from(&mut self, index: u64) {
        let keep = (index - self.snapshot.meta.index - 1) as usize;
        self.entries.truncate(keep);
        self.persisted = self.persisted.min(index - 1);
        self.unstable_from = self.unstable_from.min(index);
    }

    /// For a rejection: the first index of the term of our entry at `index` (or the end of
    /// our log if it is shorter), so the leader can skip a whole term per round trip.
    pub fn conflict_hint(&self, index: u64) -> (u64, u64) {
        if index > self.last_index() {
            return (self.last_index() + 1, 0);
        }
        let Some(term) = self.term(index) else {
            return (self.first_index(), 0);
        };
        let mut i = index;
        while i > self.first_index() && self.term(i - 1) == Some(term) {
            i -= 1;
        }
        (i, term)
    }

    /// Largest index `<= index` whose term is `<= term`, if still in the log.
    pub fn last_index_with_term_at_most(&self, index: u64, term: u64) -> Option<u64> {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Some(t) if t <= term => return Some(i),
                Some(_) if i > self.snapshot.meta.index => i -= 1,
                _ => return None,
            }
        }
    }

    pub fn commit_to(&mut self, index: u64) -> bool {
        let index = index.min(self.last_index());
        if index > self.committed {
            self.committed = index;
            true
        } else {
            false
        }
    }

    /// A snapshot from the leader replaces the whole log.
    pub fn restore(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        debug_assert!(index > self.committed);
        // Of the durable entries, only the committed ones are known to agree with the
        // snapshot; an uncommitted durable tail may differ and must not be acknowledged.
        self.persisted = self.persisted.min(self.committed);
        self.entries.clear();
        self.committed = index;
        self.applied = index;
        self.unstable_from = index + 1;
        self.unacked_snapshot = Some(index);
        self.pending_snapshot = Some(snapshot.clone());
        self.snapshot = snapshot;
    }

    /// Drops entries up to `snapshot.meta.index`, which the application has captured.
    pub fn compact(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        debug_assert!(index <= self.applied && index <= self.persisted);
        let drop = (index - self.snapshot.meta.index) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot = snapshot;
    }

    pub fn has_unstable(&self) -> bool {
        self.pending_snapshot.is_some() || self.unstable_from <= self.last_index()
    }

    /// Hands out what the caller must persist: a received snapshot, then new entries.
    pub fn take_unstable(&mut self) -> (Option<Snapshot>, Vec<Entry>) {
        let snap = self.pending_snapshot.take();
        let ents = if self.unstable_from <= self.last_index() {
            let lo = self.unstable_from.max(self.first_index());
            self.entries_from(lo, usize::MAX, u64::MAX)
        } else {
            Vec::new()
        };
        self.unstable_from = self.last_index() + 1;
        (snap, ents)
    }

    /// The caller made a snapshot durable. Acks for superseded snapshots are ignored.
    pub fn ack_snapshot(&mut self, index: u64) -> bool {
        if self.unacked_snapshot == Some(index) {
            self.unacked_snapshot = None;
            self.persisted = self.persisted.max(index);
            return true;
        }
        false
    }

    /// The caller made entries up to `(term, index)` durable (writes are acknowledged in
    /// order). Acks for entries since overwritten no longer match and are ignored.
    pub fn ack_entries(&mut self, term: u64, index: u64) -> bool {
        if self.unacked_snapshot.is_some() || index <= self.persisted || index >= self.unstable_from
        {
            return false;
        }
        if self.term(index) != Some(term) {
            return false;
        }
        self.persisted = index;
        true
    }

    pub fn has_next_committed(&self) -> bool {
        self.committed.min(self.persisted) > self.applied
    }

    /// Committed and locally durable entries not yet handed out for apply.
    pub fn take_committed(&mut self) -> Vec<Entry> {
        let hi = self.committed.min(self.persisted);
        if hi <= self.applied {
            return Vec::new();
        }
        let ents = self.entries_from(self.applied + 1, (hi - self.applied) as usize, u64::MAX);
        self.applied = hi;
        ents
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::message::{EntryKind, Snapshot};
    use super::*;

    fn ent(term: u64, index: u64) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Normal,
            data: Bytes::from(vec![index as u8]),
        }
    }

    fn log_with(terms: &[u64]) -> RaftLog {
        let ents = terms
            .iter()
            .enumerate()
            .map(|(i, &t)| ent(t, i as u64 + 2))
            .collect();
        RaftLog::restore_durable(Snapshot::bootstrap([1]), ents, 1)
    }

    #[test]
    fn append_truncates_conflicts_only() {
        let mut l = log_with(&[1, 2, 2]); // indexes 2,3,4
        assert_eq!(l.maybe_append(1, 1, &[ent(1, 2), ent(2, 3)]), Some(3));
        assert_eq!(l.last_index(), 4, "matching prefix does not truncate");
        assert_eq!(l.maybe_append(2, 1, &[ent(3, 3)]), Some(3));
        assert_eq!(l.last_index(), 3);
        assert_eq!(l.term(3), Some(3));
        assert_eq!(l.persisted(), 2);
        assert_eq!(l.maybe_append(3, 2, &[]), None);
    }

    #[test]
    fn conflict_hint_skips_a_term() {
        let l = log_with(&[1, 2, 2, 2, 3]); // 2..6
        assert_eq!(l.conflict_hint(5), (3, 2));
        assert_eq!(l.conflict_hint(9), (7, 0));
        assert_eq!(l.last_index_with_term_at_most(6, 2), Some(5));
        assert_eq!(l.last_index_with_term_at_most(6, 0), None);
    }

    #[test]
    fn apply_waits_for_durability() {
        let mut l = log_with(&[]);
        l.append(ent(2, 2));
        l.append(ent(2, 3));
        l.commit_to(3);
        assert!(!l.has_next_committed());
        let (_, ents) = l.take_unstable();
        assert_eq!(ents.len(), 2);
        assert!(!l.ack_entries(1, 3), "wrong term");
        assert!(l.ack_entries(2, 2));
        assert_eq!(l.take_committed().len(), 1);
        assert!(l.ack_entries(2, 3));
        assert_eq!(l.take_committed()[0].index, 3);
    }

    #[test]
    fn restore_forgets_an_uncommitted_durable_tail() {
        let mut l = log_with(&[1, 1, 1]); // 2..4 durable, only 2 committed
        l.commit_to(2);
        let mut s = Snapshot::bootstrap([1]);
        s.meta.index = 9;
        s.meta.term = 3;
        l.restore(s);
        assert_eq!(
            l.persisted(),
            2,
            "entries 3 and 4 may differ from the snapshot's history"
        );
        assert!(l.ack_snapshot(9));
        assert_eq!(l.persisted(), 9);
    }

    #[test]
    fn restore_and_compact() {
        let mut l = log_with(&[1, 1]);
        let mut s = Snapshot::bootstrap([1]);
        s.meta.index = 10;
        s.meta.term = 4;
        l.restore(s.clone());
        assert_eq!(
            (l.first_index(), l.last_index(), l.committed()),
            (11, 10, 10)
        );
        assert!(!l.ack_entries(4, 10));
        assert!(l.take_unstable().0.is_some());
        assert!(l.ack_snapshot(10));
        assert_eq!(l.persisted(), 10);
        l.append(ent(4, 11));
        l.append(ent(4, 12));
        l.take_unstable();
        l.ack_entries(4, 12);
        l.commit_to(12);
        l.take_committed();
        s.meta.index = 11;
        l.compact(s);
        assert_eq!((l.first_index(), l.last_index()), (12, 12));
        assert_eq!(l.term(11), Some(4));
        assert_eq!(l.term(10), None);
    }
}

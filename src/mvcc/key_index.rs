//! Per-key revision history, modelled on etcd's key index.
//!
//! A key's life is a sequence of generations: a generation starts with the put that creates the
//! key and ends with the delete (tombstone) that removes it; a later put starts a new generation.
//! Values and leases live next to their revision (there is no separate revision → value store),
//! and versions are not stored: the version of a put is its position in the generation, offset by
//! `first_version` once compaction has dropped the generation's older puts.
//!
//! Several events of one key may share a revision (etcd's sub-revisions, e.g. delete then put in
//! one txn); they are ordered by position, and the last one at a revision wins on reads.

use bytes::Bytes;

use crate::kv::KeyValue;

/// One put of a key. `value` is kept as the caller's `Bytes` (it may point into an mmap'd file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutEvent {
    pub revision: i64,
    pub value: Bytes,
    pub lease: i64,
}

/// One create ... delete lifetime of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Revision of the put that created this generation; kept after compaction drops that put.
    pub create_revision: i64,
    /// Version of `puts[0]`: 1, or more once compaction dropped the generation's older puts.
    pub first_version: i64,
    /// Puts in revision order (equal revisions only for puts in one txn). Never empty.
    pub puts: Vec<PutEvent>,
    /// Revision of the delete that ended the generation; `None` while the key is live.
    pub tombstone: Option<i64>,
}

/// The full retained history of one key, as exported for checkpoints.
///
/// Invariants (see [`KeyHistory::is_well_formed`]): at least one generation; every generation but
/// the last has a tombstone; revisions never decrease along the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyHistory {
    pub key: Bytes,
    /// Oldest first.
    pub generations: Vec<Generation>,
}

impl KeyHistory {
    /// Checks the invariants the store relies on; checkpoint loaders can use it on untrusted input.
    pub fn is_well_formed(&self) -> bool {
        let mut last = i64::MIN;
        let n = self.generations.len();
        n > 0
            && self.generations.iter().enumerate().all(|(i, g)| {
                let ok = !g.puts.is_empty()
                    && g.first_version >= 1
                    && g.create_revision >= last
                    && g.create_revision <= g.puts[0].revision
                    && g.puts.windows(2).all(|w| w[0].revision <= w[1].revision)
                    && (g.tombstone.is_some() || i + 1 == n);
                last = g.puts.last().map_or(last, |p| p.revision);
                match g.tombstone {
                    Some(t) => {
                        let ok = ok && t >= last;
                        last = t;
                        ok
                    }
                    None => ok,
                }
            })
    }
}

/// A key's state at some revision, borrowed from the index (no value copy until [`Self::to_kv`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Visible<'a> {
    pub key: &'a Bytes,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: &'a Bytes,
    pub lease: i64,
}

impl Visible<'_> {
    pub fn to_kv(self, keys_only: bool) -> KeyValue {
        KeyValue {
            key: self.key.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: if keys_only {
                Bytes::new()
            } else {
                self.value.clone()
            },
            lease: self.lease,
        }
    }
}

/// The index's value for one key: its generations (the key itself is the map key, not repeated).
///
/// A shard indexes millions of keys and nearly all of them are one live generation with one
/// retained put (written once, or compacted down to their latest put). Those are held inline with
/// no heap allocation: 64 bytes, where a `Vec<Generation>` costs 24 plus two allocations of ~100
/// bytes. Values themselves are `Bytes` and usually point into the mmap'd checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyIndex(Repr);

/// Canonical: a history that fits `Single` is never held as `Multi`, so derived equality is
/// equality of histories, and a rollback or compaction back to one put frees the heap.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    /// One live generation whose only retained put is `put`.
    Single {
        create_revision: i64,
        first_version: i64,
        put: PutEvent,
    },
    /// Any other history, oldest generation first. Empty only after `strip` removed everything.
    Multi(Vec<Generation>),
}

// `Vec::new()` does not allocate, so this is a free placeholder for `mem::take`.
impl Default for Repr {
    fn default() -> Self {
        Repr::Multi(Vec::new())
    }
}

impl Repr {
    /// A key created by `put`.
    fn created(put: PutEvent) -> Self {
        Repr::Single {
            create_revision: put.revision,
            first_version: 1,
            put,
        }
    }

    fn from_generations(mut gens: Vec<Generation>) -> Self {
        if !fits_single(&gens) {
            return Repr::Multi(gens);
        }
        let mut g = gens.pop().expect("fits_single: one generation");
        let put = g.puts.pop().expect("fits_single: one put");
        Repr::Single {
            create_revision: g.create_revision,
            first_version: g.first_version,
            put,
        }
    }

    fn into_generations(self) -> Vec<Generation> {
        match self {
            Repr::Single {
                create_revision,
                first_version,
                put,
            } => vec![Generation {
                create_revision,
                first_version,
                puts: vec![put],
                tombstone: None,
            }],
            Repr::Multi(gens) => gens,
        }
    }
}

fn fits_single(gens: &[Generation]) -> bool {
    matches!(gens, [g] if g.tombstone.is_none() && g.puts.len() == 1)
}

impl KeyIndex {
    pub fn created(rev: i64, value: Bytes, lease: i64) -> Self {
        KeyIndex(Repr::created(PutEvent {
            revision: rev,
            value,
            lease,
        }))
    }

    pub fn from_generations(gens: Vec<Generation>) -> Self {
        KeyIndex(Repr::from_generations(gens))
    }

    pub fn is_empty(&self) -> bool {
        matches!(&self.0, Repr::Multi(gens) if gens.is_empty())
    }

    /// Whether the key exists at the latest revision.
    pub fn is_live(&self) -> bool {
        match &self.0 {
            Repr::Single { .. } => true,
            Repr::Multi(gens) => gens.last().is_some_and(|g| g.tombstone.is_none()),
        }
    }

    /// Revision of the newest event, for ordering assertions.
    fn newest_revision(&self) -> i64 {
        match &self.0 {
            Repr::Single { put, .. } => put.revision,
            Repr::Multi(gens) => gens.last().map_or(i64::MIN, |g| {
                g.tombstone
                    .or_else(|| g.puts.last().map(|p| p.revision))
                    .unwrap_or(g.create_revision)
            }),
        }
    }

    /// Whether the representation is the canonical one for the history (see [`Repr`]).
    fn is_canonical(&self) -> bool {
        !matches!(&self.0, Repr::Multi(gens) if fits_single(gens))
    }

    /// Restores the canonical form after a change that may have shrunk a `Multi` history.
    fn normalize(&mut self) {
        if !self.is_canonical() {
            let gens = std::mem::take(&mut self.0).into_generations();
            self.0 = Repr::from_generations(gens);
        }
    }

    /// The key as seen by a read at `rev`, or `None` if it did not exist then. Only meaningful for
    /// `rev >=` the compact revision; below it the history may be gone and `None` is returned.
    pub fn at<'a>(&'a self, key: &'a Bytes, rev: i64) -> Option<Visible<'a>> {
        let gens = match &self.0 {
            Repr::Single {
                create_revision,
                first_version,
                put,
            } => {
                return (*create_revision <= rev && put.revision <= rev).then_some(Visible {
                    key,
                    create_revision: *create_revision,
                    mod_revision: put.revision,
                    version: *first_version,
                    value: &put.value,
                    lease: put.lease,
                });
            }
            Repr::Multi(gens) => gens,
        };
        let gi = gens.partition_point(|g| g.create_revision <= rev);
        let g = gens.get(gi.checked_sub(1)?)?;
        if g.tombstone.is_some_and(|t| t <= rev) {
            return None;
        }
        let pi = g
            .puts
            .partition_point(|p| p.revision <= rev)
            .checked_sub(1)?;
        let p = &g.puts[pi];
        Some(Visible {
            key,
            create_revision: g.create_revision,
            mod_revision: p.revision,
            version: g.first_version + pi as i64,
            value: &p.value,
            lease: p.lease,
        })
    }

    pub fn put(&mut self, rev: i64, value: Bytes, lease: i64) {
        debug_assert!(rev >= self.newest_revision(), "put below the key's history");
        let event = PutEvent {
            revision: rev,
            value,
            lease,
        };
        self.0 = match std::mem::take(&mut self.0) {
            Repr::Single {
                create_revision,
                first_version,
                put,
            } => Repr::Multi(vec![Generation {
                create_revision,
                first_version,
                puts: vec![put, event],
                tombstone: None,
            }]),
            Repr::Multi(gens) if gens.is_empty() => Repr::created(event),
            Repr::Multi(mut gens) => {
                match gens.last_mut() {
                    Some(g) if g.tombstone.is_none() => g.puts.push(event),
                    _ => gens.push(Generation {
                        create_revision: rev,
                        first_version: 1,
                        puts: vec![event],
                        tombstone: None,
                    }),
                }
                Repr::Multi(gens)
            }
        };
        debug_assert!(self.is_canonical());
    }

    /// Ends the live generation at `rev`; false (and no change) if the key is not live.
    pub fn delete(&mut self, rev: i64) -> bool {
        debug_assert!(
            rev >= self.newest_revision(),
            "delete below the key's history"
        );
        if !self.is_live() {
            return false;
        }
        let mut gens = std::mem::take(&mut self.0).into_generations();
        if let Some(g) = gens.last_mut() {
            g.tombstone = Some(rev);
        }
        self.0 = Repr::Multi(gens);
        true
    }

    /// Removes every event at `rev`, which must be the newest revision in the history. This is
    /// how a txn is undone: all its writes share one revision above everything else.
    pub fn strip(&mut self, rev: i64) {
        debug_assert!(
            rev >= self.newest_revision(),
            "strip of a non-newest revision"
        );
        let gens = match &mut self.0 {
            Repr::Single { put, .. } => {
                if put.revision == rev {
                    self.0 = Repr::default();
                }
                return;
            }
            Repr::Multi(gens) => gens,
        };
        while let Some(g) = gens.last_mut() {
            if g.tombstone == Some(rev) {
                g.tombstone = None;
            }
            if g.tombstone.is_some() {
                break;
            }
            while g.puts.last().is_some_and(|p| p.revision == rev) {
                g.puts.pop();
            }
            if !g.puts.is_empty() {
                break;
            }
            gens.pop();
        }
        self.normalize();
    }

    /// Drops history that no read at `>= at` can observe: generations tombstoned at or below
    /// `at`, and puts older than the one visible at `at`. Returns false when nothing is left, i.e.
    /// the key's last event at or below `at` was a delete and nothing came after.
    pub fn compact(&mut self, at: i64) -> bool {
        // A single live put is visible at every revision from its own on: nothing to drop.
        let Repr::Multi(gens) = &mut self.0 else {
            return true;
        };
        let dead = gens
            .iter()
            .take_while(|g| g.tombstone.is_some_and(|t| t <= at))
            .count();
        if dead > 0 {
            gens.drain(..dead);
        }
        if let Some(g) = gens.first_mut() {
            let keep_from = g
                .puts
                .partition_point(|p| p.revision <= at)
                .saturating_sub(1);
            if keep_from > 0 {
                g.puts.drain(..keep_from);
                g.first_version += keep_from as i64;
                if g.puts.capacity() > 2 * g.puts.len() + 4 {
                    g.puts.shrink_to_fit();
                }
            }
        }
        if gens.capacity() > 2 * gens.len() + 4 {
            gens.shrink_to_fit();
        }
        let alive = !gens.is_empty();
        self.normalize();
        alive
    }

    /// The history restricted to revisions `<= upto` (a generation tombstoned later is still
    /// open there), or `None` if the key has no event that old. `upto` must not be below the
    /// compact revision, since older events may be gone.
    pub fn export(&self, key: &Bytes, upto: i64) -> Option<KeyHistory> {
        let gens = match &self.0 {
            Repr::Single {
                create_revision,
                first_version,
                put,
            } => {
                return (*create_revision <= upto && put.revision <= upto).then(|| KeyHistory {
                    key: key.clone(),
                    generations: vec![Generation {
                        create_revision: *create_revision,
                        first_version: *first_version,
                        puts: vec![put.clone()],
                        tombstone: None,
                    }],
                });
            }
            Repr::Multi(gens) => gens,
        };
        let mut generations = Vec::new();
        for g in gens {
            if g.create_revision > upto {
                break;
            }
            let n = g.puts.partition_point(|p| p.revision <= upto);
            if n == 0 {
                break;
            }
            let tombstone = g.tombstone.filter(|&t| t <= upto);
            generations.push(Generation {
                create_revision: g.create_revision,
                first_version: g.first_version,
                puts: g.puts[..n].to_vec(),
                tombstone,
            });
            if tombstone.is_none() {
                break;
            }
        }
        (!generations.is_empty()).then(|| KeyHistory {
            key: key.clone(),
            generations,
        })
    }

    /// Appends this key's events with revisions in `(after, upto]`, oldest first, rebuilt from
    /// the history (so with op position 0: the order of a txn's ops is not retained).
    pub fn events_between(&self, key: &Bytes, after: i64, upto: i64, out: &mut Vec<super::Event>) {
        use super::{Event, EventKind};
        let in_window = |r: i64| r > after && r <= upto;
        let emit = |out: &mut Vec<Event>, g: &Generation, pi: usize, p: &PutEvent| {
            if in_window(p.revision) {
                out.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: key.clone(),
                        create_revision: g.create_revision,
                        mod_revision: p.revision,
                        version: g.first_version + pi as i64,
                        value: p.value.clone(),
                        lease: p.lease,
                    },
                    op: 0,
                });
            }
        };
        match &self.0 {
            Repr::Single {
                create_revision,
                first_version,
                put,
            } => {
                let g = Generation {
                    create_revision: *create_revision,
                    first_version: *first_version,
                    puts: Vec::new(),
                    tombstone: None,
                };
                emit(out, &g, 0, put);
            }
            Repr::Multi(gens) => {
                for g in gens {
                    if g.tombstone.is_some_and(|t| t <= after) {
                        continue;
                    }
                    if g.create_revision > upto {
                        break;
                    }
                    let start = g.puts.partition_point(|p| p.revision <= after);
                    for (pi, p) in g.puts.iter().enumerate().skip(start) {
                        if p.revision > upto {
                            break;
                        }
                        emit(out, g, pi, p);
                    }
                    if let Some(t) = g.tombstone.filter(|&t| in_window(t)) {
                        out.push(Event::deleted(key.clone(), t, 0));
                    }
                }
            }
        }
    }

    /// The put at `rev`, if the history holds exactly one (several puts of a key share a
    /// revision only within one txn, and a checkpoint's copy could not tell them apart).
    fn put_at_mut(&mut self, rev: i64) -> Option<&mut PutEvent> {
        match &mut self.0 {
            Repr::Single { put, .. } => (put.revision == rev).then_some(put),
            Repr::Multi(gens) => {
                let mut found = None;
                for g in gens.iter_mut() {
                    let at = g.puts.partition_point(|p| p.revision < rev);
                    let n = g.puts[at..]
                        .iter()
                        .take_while(|p| p.revision == rev)
                        .count();
                    match (n, &found) {
                        (0, _) => {}
                        (1, None) => found = Some(&mut g.puts[at]),
                        _ => return None,
                    }
                }
                found
            }
        }
    }

    /// Makes the put at `rev` hold `value`, an identical copy of its value that lives elsewhere
    /// (a slice of a checkpoint's mapping), so the heap copy can be freed. False, changing
    /// nothing, when there is no single put at `rev` (compacted away, or never) or the lengths
    /// differ.
    pub fn adopt(&mut self, rev: i64, value: &Bytes) -> bool {
        match self.put_at_mut(rev) {
            Some(put) if put.value.len() == value.len() => {
                debug_assert_eq!(&put.value, value, "adopted value differs at revision {rev}");
                put.value = value.clone();
                true
            }
            _ => false,
        }
    }

    /// The value of the put at `rev`, when the history holds exactly one put there.
    pub fn value_at(&mut self, rev: i64) -> Option<&Bytes> {
        self.put_at_mut(rev).map(|p| &p.value)
    }

    /// Highest revision mentioned anywhere in the history, for sanity checks on import.
    pub fn max_revision(&self) -> i64 {
        self.newest_revision()
    }

    /// The whole history, whatever the representation.
    #[cfg(test)]
    fn generations(&self) -> Vec<Generation> {
        self.0.clone().into_generations()
    }

    /// Whether the key is held without a heap allocation of its own.
    #[cfg(test)]
    fn is_inline(&self) -> bool {
        matches!(self.0, Repr::Single { .. })
    }

    /// Bytes this key owns on the heap (allocator overhead excluded; values are shared `Bytes`).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        match &self.0 {
            Repr::Single { .. } => 0,
            Repr::Multi(gens) => {
                gens.capacity() * std::mem::size_of::<Generation>()
                    + gens
                        .iter()
                        .map(|g| g.puts.capacity() * std::mem::size_of::<PutEvent>())
                        .sum::<usize>()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn versions_come_from_position_and_survive_compaction() {
        let key = b("k");
        let mut ki = KeyIndex::created(2, b("a"), 0);
        ki.put(4, b("b"), 7);
        ki.put(6, b("c"), 0);
        let v = ki.at(&key, 5).expect("live at 5");
        assert_eq!(
            (v.create_revision, v.mod_revision, v.version, v.lease),
            (2, 4, 2, 7)
        );
        assert!(ki.at(&key, 1).is_none());

        assert!(ki.compact(5));
        let v = ki
            .at(&key, 5)
            .expect("still readable at the compact revision");
        assert_eq!((v.create_revision, v.mod_revision, v.version), (2, 4, 2));
        let v = ki.at(&key, 9).expect("latest");
        assert_eq!((v.create_revision, v.mod_revision, v.version), (2, 6, 3));
        assert_eq!(ki.generations()[0].puts.len(), 2);
    }

    #[test]
    fn strip_undoes_every_event_at_the_newest_revision() {
        let key = b("k");
        let mut ki = KeyIndex::created(2, b("a"), 0);
        let before = ki.clone();
        // delete + put + delete + put, all at revision 5 (sub-revisions of one txn)
        assert!(ki.delete(5));
        ki.put(5, b("b"), 0);
        assert!(ki.delete(5));
        ki.put(5, b("c"), 0);
        let v = ki.at(&key, 5).expect("last event at 5 is a put");
        assert_eq!(
            (v.create_revision, v.version, v.value.as_ref()),
            (5, 1, &b"c"[..])
        );
        ki.strip(5);
        assert_eq!(ki, before);

        let mut fresh = KeyIndex::created(3, b("x"), 0);
        fresh.strip(3);
        assert!(fresh.is_empty());
    }

    #[test]
    fn compaction_drops_dead_generations() {
        let key = b("k");
        let mut ki = KeyIndex::created(1, b("a"), 0);
        assert!(ki.delete(3));
        assert!(
            ki.compact(2),
            "tombstone above the compact revision keeps the generation"
        );
        assert!(ki.at(&key, 2).is_some());
        assert!(
            !ki.compact(3),
            "tombstone at the compact revision removes the key"
        );

        let mut ki = KeyIndex::created(1, b("a"), 0);
        assert!(ki.delete(3));
        ki.put(8, b("b"), 0);
        assert!(ki.compact(5));
        assert_eq!(ki.generations().len(), 1);
        assert!(ki.at(&key, 5).is_none());
        assert_eq!(ki.at(&key, 8).map(|v| v.version), Some(1));
    }

    #[test]
    fn export_truncates_to_upto() {
        let key = b("k");
        let mut ki = KeyIndex::created(1, b("a"), 0);
        ki.put(2, b("b"), 0);
        assert!(ki.delete(4));
        ki.put(6, b("c"), 0);
        let h = ki.export(&key, 3).expect("has events <= 3");
        assert!(h.is_well_formed());
        assert_eq!(h.generations.len(), 1);
        assert_eq!(h.generations[0].tombstone, None);
        assert_eq!(h.generations[0].puts.len(), 2);
        let full = ki.export(&key, i64::MAX).expect("full");
        assert!(full.is_well_formed());
        assert_eq!(KeyIndex::from_generations(full.generations), ki);
        assert!(ki.export(&key, 0).is_none());
    }

    /// (create revision, mod revision, version, value) of the key as read at `rev`.
    fn seen(ki: &KeyIndex, rev: i64) -> Option<(i64, i64, i64, Bytes)> {
        let key = b("k");
        let v = ki.at(&key, rev)?;
        Some((
            v.create_revision,
            v.mod_revision,
            v.version,
            v.value.clone(),
        ))
    }

    /// The compact form is the canonical one, so a rebuild from the export must be equal.
    fn assert_round_trips(ki: &KeyIndex) {
        let h = ki.export(&b("k"), i64::MAX).expect("has history");
        assert!(h.is_well_formed());
        assert_eq!(&KeyIndex::from_generations(h.generations), ki);
    }

    #[test]
    fn a_single_put_key_has_no_heap_allocation() {
        assert!(std::mem::size_of::<KeyIndex>() <= 64);
        let mut ki = KeyIndex::created(3, b("a"), 9);
        assert!(ki.is_inline());
        assert_eq!(ki.heap_bytes(), 0);
        assert!(ki.is_live());
        assert_eq!(ki.max_revision(), 3);
        assert_eq!(seen(&ki, 2), None);
        assert_eq!(seen(&ki, 3), Some((3, 3, 1, b("a"))));
        assert_eq!(ki.at(&b("k"), 3).map(|v| v.lease), Some(9));
        assert!(ki.compact(10));
        assert_eq!(ki, KeyIndex::created(3, b("a"), 9));
        assert!(ki.export(&b("k"), 2).is_none());
        assert_round_trips(&ki);
    }

    #[test]
    fn second_put_leaves_the_compact_form_and_its_rollback_returns() {
        let mut ki = KeyIndex::created(2, b("a"), 1);
        let before = ki.clone();
        ki.put(4, b("b"), 0);
        assert!(!ki.is_inline());
        assert!(ki.heap_bytes() > 0);
        assert_eq!(seen(&ki, 3), Some((2, 2, 1, b("a"))));
        assert_eq!(seen(&ki, 4), Some((2, 4, 2, b("b"))));
        assert_round_trips(&ki);

        ki.strip(4);
        assert!(ki.is_inline());
        assert_eq!(ki, before);

        ki.strip(2);
        assert!(ki.is_empty() && !ki.is_live());
        ki.put(6, b("c"), 0);
        assert_eq!(ki, KeyIndex::created(6, b("c"), 0));
    }

    #[test]
    fn delete_and_recreate_stay_general_until_compaction() {
        let mut ki = KeyIndex::created(2, b("a"), 0);
        let before = ki.clone();
        assert!(ki.delete(3));
        assert!(!ki.is_inline() && !ki.is_live());
        assert!(!ki.delete(4));
        assert_eq!(seen(&ki, 2), Some((2, 2, 1, b("a"))));
        assert_eq!(seen(&ki, 3), None);
        assert_round_trips(&ki);
        let mut undone = ki.clone();
        undone.strip(3);
        assert_eq!(undone, before);

        ki.put(5, b("b"), 0);
        assert!(!ki.is_inline() && ki.is_live());
        assert_eq!(ki.generations().len(), 2);
        assert_eq!(seen(&ki, 4), None);
        assert_eq!(seen(&ki, 5), Some((5, 5, 1, b("b"))));
        assert_round_trips(&ki);

        assert!(ki.compact(4), "the new generation survives");
        assert!(ki.is_inline());
        assert_eq!(ki, KeyIndex::created(5, b("b"), 0));

        let mut gone = KeyIndex::created(2, b("a"), 0);
        assert!(gone.delete(3));
        assert!(!gone.compact(3));
    }

    #[test]
    fn compaction_to_one_put_returns_to_the_compact_form() {
        let mut ki = KeyIndex::created(2, b("a"), 0);
        ki.put(4, b("b"), 0);
        ki.put(6, b("c"), 0);
        assert!(ki.compact(5));
        assert!(!ki.is_inline(), "puts at 4 and 6 are both still visible");
        assert!(ki.compact(6));
        assert!(ki.is_inline());
        assert_eq!(ki.heap_bytes(), 0);
        assert_eq!(seen(&ki, 6), Some((2, 6, 3, b("c"))));
        assert_eq!(
            ki.generations(),
            vec![Generation {
                create_revision: 2,
                first_version: 3,
                puts: vec![PutEvent {
                    revision: 6,
                    value: b("c"),
                    lease: 0
                }],
                tombstone: None,
            }]
        );
        assert_round_trips(&ki);

        // Versions keep counting from the compacted first_version.
        ki.put(8, b("d"), 0);
        assert!(!ki.is_inline());
        assert_eq!(seen(&ki, 8), Some((2, 8, 4, b("d"))));
        ki.strip(8);
        assert!(ki.is_inline());
        assert_eq!(seen(&ki, 8), Some((2, 6, 3, b("c"))));
    }

    #[test]
    fn from_generations_uses_the_compact_form_exactly_when_it_fits() {
        let put = |revision| PutEvent {
            revision,
            value: b("v"),
            lease: 0,
        };
        let generation = |create_revision, puts, tombstone| Generation {
            create_revision,
            first_version: 1,
            puts,
            tombstone,
        };
        let inline = |gens| KeyIndex::from_generations(gens).is_inline();
        assert!(inline(vec![generation(1, vec![put(1)], None)]));
        assert!(!inline(vec![generation(1, vec![put(1)], Some(2))]));
        assert!(!inline(vec![generation(1, vec![put(1), put(2)], None)]));
        assert!(!inline(vec![
            generation(1, vec![put(1)], Some(2)),
            generation(3, vec![put(3)], None),
        ]));
        assert!(KeyIndex::from_generations(Vec::new()).is_empty());
    }

    /// Memory per key, before (a `Vec<Generation>` for every key) and now. Run with
    /// `cargo test --lib key_index::tests::footprint -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn footprint() {
        use std::mem::size_of;
        println!(
            "previous layout, one put: {} B in the map + {} B heap in 2 allocations",
            size_of::<Vec<Generation>>(),
            size_of::<Generation>() + size_of::<PutEvent>()
        );
        let mut ki = KeyIndex::created(1, b("a"), 0);
        let report = |what: &str, ki: &KeyIndex| {
            println!(
                "{what}: {} B in the map + {} B heap",
                size_of::<KeyIndex>(),
                ki.heap_bytes()
            )
        };
        report("one put", &ki);
        ki.put(2, b("b"), 0);
        report("two puts", &ki);
        ki.compact(2);
        report("two puts, compacted", &ki);
        ki.delete(3);
        report("deleted", &ki);
    }
}

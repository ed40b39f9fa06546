//! Deciding multi-shard writes on cluster members.
//!
//! A multi-shard write at revision `r` logs a `Part` in every participant's group. The leader
//! that wrote it decides it as it goes (every part committed: done; otherwise it logs an
//! `Abort` in each participant that holds a part). A member that applies the log, or a new
//! leader node after a failover, decides with the recovery rule instead: the write is committed
//! iff every participant's committed log holds its part; it is aborted once some participant's
//! committed log is known never to hold it. A participant's log is known complete when this
//! node leads that group with its term's no-op committed and has seen every committed entry up
//! to there: a part missing then can never be committed (a later leader's log starts from this
//! one's committed prefix). That is monotonic, so a flag once set stays true for the decision.
//!
//! Followers hold a shard's apply at an undecided part (later entries wait too, since a shard
//! applies in revision order), so a follower never shows half of a multi-shard write that may
//! still be aborted, and checkpoints (cut at the applied index) never contain an undecided
//! part. The leader node, when it finds a part that must be aborted, proposes the `Abort` in
//! that participant; the held part is then skipped on every member.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_listener::{Event, EventListener};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
    Undecided,
}

#[derive(Debug, Default)]
struct Parts {
    participants: Vec<u32>,
    committed: BTreeSet<u32>,
    applied: BTreeSet<u32>,
}

/// What this node knows of multi-shard parts its groups committed; shared by all cores.
#[derive(Debug)]
pub struct PartRegistry {
    parts: Mutex<HashMap<i64, Parts>>,
    /// Per shard: this node leads the group with a committed no-op and saw every committed entry.
    complete: Vec<AtomicBool>,
    changed: Event,
}

impl PartRegistry {
    pub fn new(shards: u32) -> Arc<PartRegistry> {
        Arc::new(PartRegistry {
            parts: Mutex::new(HashMap::new()),
            complete: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            changed: Event::new(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<i64, Parts>) -> T) -> T {
        match self.parts.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// `shard`'s group committed its part of the write at `rev`.
    pub fn committed(&self, rev: i64, participants: &[u32], shard: u32) {
        self.with(|m| {
            let p = m.entry(rev).or_default();
            if p.participants.is_empty() {
                p.participants = participants.to_vec();
            }
            p.committed.insert(shard);
        });
        self.changed.notify(usize::MAX);
    }

    /// `shard`'s committed log is complete as far as this node can tell (see the module notes).
    pub fn set_complete(&self, shard: u32, complete: bool) {
        if let Some(f) = self.complete.get(shard as usize) {
            if f.swap(complete, Ordering::SeqCst) != complete {
                self.changed.notify(usize::MAX);
            }
        }
    }

    pub fn decision(&self, rev: i64, participants: &[u32]) -> Decision {
        let committed = self.with(|m| m.get(&rev).map(|p| p.committed.clone()));
        let committed = committed.unwrap_or_default();
        if participants.iter().all(|p| committed.contains(p)) {
            return Decision::Commit;
        }
        let never = participants.iter().any(|p| {
            !committed.contains(p)
                && self
                    .complete
                    .get(*p as usize)
                    .is_some_and(|f| f.load(Ordering::SeqCst))
        });
        if never {
            Decision::Abort
        } else {
            Decision::Undecided
        }
    }

    /// `shard` applied its part; the record goes once every participant has.
    pub fn applied(&self, rev: i64, shard: u32) {
        self.with(|m| {
            if let Some(p) = m.get_mut(&rev) {
                p.applied.insert(shard);
                if p.participants.iter().all(|s| p.applied.contains(s)) {
                    m.remove(&rev);
                }
            }
        });
    }

    /// The write at `rev` was aborted: nobody needs its record.
    pub fn forget(&self, rev: i64) {
        self.with(|m| m.remove(&rev));
    }

    /// Fires on any registration or completeness change.
    pub fn listen(&self) -> EventListener {
        self.changed.listen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_commits_when_every_part_is_committed_and_aborts_only_on_a_complete_log() {
        let r = PartRegistry::new(3);
        r.committed(7, &[0, 2], 0);
        assert_eq!(r.decision(7, &[0, 2]), Decision::Undecided);
        // Shard 1 does not take part: its completeness decides nothing.
        r.set_complete(1, true);
        assert_eq!(r.decision(7, &[0, 2]), Decision::Undecided);
        r.set_complete(2, true);
        assert_eq!(r.decision(7, &[0, 2]), Decision::Abort);
        r.committed(8, &[0, 2], 2);
        r.committed(8, &[0, 2], 0);
        assert_eq!(r.decision(8, &[0, 2]), Decision::Commit);
        r.applied(8, 0);
        r.applied(8, 2);
        assert_eq!(
            r.decision(8, &[0, 2]),
            Decision::Abort,
            "record gone once applied"
        );
    }
}

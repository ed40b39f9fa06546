//! The glue between one shard's Raft group and its WAL: the thin IO shell around the pure
//! state machine in `raft`.
//!
//! Every record a shard logs is a Raft proposal. The shard encodes the record once (with the
//! term and index Raft will give it), proposes the encoded bytes, and the same `Bytes` become
//! the Raft log entry and the WAL frame's payload. The WAL's group commit is Raft's
//! persistence: once an fdatasync covers an index, `sync` acknowledges it with
//! `advance(Persisted)`, which in a one-member group commits it on the spot, so a write costs
//! what it cost before Raft: one shared fdatasync. The hard state (term, vote) is a WAL record
//! of its own that takes no log index. Checkpoints are the group's snapshots: writing one
//! compacts the in-memory log up to its index, and the WAL segments below it are dropped.
//!
//! A single node runs a one-member group per shard: at open each shard campaigns, logs its
//! vote, wins, and commits a no-op of its new term before it serves. The leader executes a
//! write before proposing it (the record carries effects, not requests); followers, which come
//! with peers, will apply committed records the way WAL replay does.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::raft::{
    self, ConfState, Config, DurableState, Entry, EntryKind as RaftKind, HardState, Persisted,
    Raft, Role, Snapshot, SnapshotMeta,
};
use crate::wal::{record, EntryKind, LoggedEntry, NoRoom, Recovered, Wal, WalEntry};

/// This node's id in every shard group until clusters assign real member ids.
pub const LOCAL_ID: raft::NodeId = 1;

/// Room kept for the small records (no-op, hard state) a group logs on its own.
pub const RECORD_SLACK: usize = 256;

/// Why a proposal was not logged.
pub enum ProposeError {
    /// No segment has room for the frame: make room and retry (nothing was proposed).
    NoRoom(NoRoom),
    Other(Error),
}

impl From<Error> for ProposeError {
    fn from(e: Error) -> Self {
        ProposeError::Other(e)
    }
}

pub struct Replica {
    shard: u32,
    /// `None` only in the benchmark baseline that bypasses consensus (`Options::bypass_raft`).
    raft: Option<RefCell<Raft>>,
    /// Hard state records appended and not yet durable: (WAL sequence, state).
    pending_hard_state: RefCell<VecDeque<(u64, HardState)>>,
    /// (term, vote) of the newest hard state record appended.
    logged_hard_state: Cell<(u64, Option<raft::NodeId>)>,
    /// WAL sequence of the newest record this replica appended.
    last_seq: Cell<u64>,
    /// Set when a record Raft handed out could not be logged: the shard must stop.
    failed: RefCell<Option<String>>,
}

impl Replica {
    /// Rebuilds the group's durable state: the checkpoint is the snapshot, the WAL tail the log,
    /// and the newest hard state record the term and vote.
    pub fn recover(
        shard: u32,
        snapshot: (u64, u64),
        recovered: &Recovered,
        bypass: bool,
    ) -> Result<Replica> {
        let (index, term) = snapshot;
        let hard_state = recovered
            .hard_state
            .as_ref()
            .map(|h| HardState {
                term: h.term,
                vote: (h.vote != 0).then_some(h.vote),
                commit: h.commit,
            })
            .unwrap_or_default();
        let entries = recovered.entries.iter().map(raft_entry).collect();
        let state = DurableState {
            hard_state,
            snapshot: Snapshot {
                meta: SnapshotMeta {
                    index,
                    term,
                    conf_state: ConfState::new([LOCAL_ID]),
                },
                data: Bytes::new(),
            },
            entries,
        };
        let mut cfg = Config::new(LOCAL_ID);
        cfg.seed = LOCAL_ID ^ (u64::from(shard) << 32);
        let raft = Raft::new(cfg, state).map_err(|e| raft_error(shard, e))?;
        Ok(Replica {
            shard,
            logged_hard_state: Cell::new((raft.term(), raft.vote())),
            raft: (!bypass).then(|| RefCell::new(raft)),
            pending_hard_state: RefCell::new(VecDeque::new()),
            last_seq: Cell::new(0),
            failed: RefCell::new(None),
        })
    }

    /// Campaigns and waits until this node leads with a committed entry of its term, so that
    /// everything before it counts as committed. Runs before the shard serves.
    pub async fn start(&self, wal: &Wal) -> Result<()> {
        // The first segment is prepared before serving (with or without Raft), so the first
        // write does not wait for it.
        wal.make_room(4 * RECORD_SLACK).await?;
        let Some(raft) = &self.raft else {
            return Ok(());
        };
        raft.borrow_mut().campaign();
        self.pump(wal);
        // A one-member group wins in a few rounds (vote durable, no-op durable); a group that
        // cannot (e.g. a log whose membership excludes this node) must not spin.
        for _ in 0..16 {
            self.ensure_healthy()?;
            {
                let r = raft.borrow();
                if r.role() == Role::Leader && r.term_at(r.commit()) == Some(r.term()) {
                    return Ok(());
                }
            }
            wal.wait_synced(self.last_seq.get()).await?;
            self.sync(wal);
        }
        let r = raft.borrow();
        Err(Error::ShardFailed {
            shard: self.shard,
            reason: format!(
                "could not become leader of its own group (term {}, role {:?}, commit {})",
                r.term(),
                r.role(),
                r.commit()
            ),
        })
    }

    pub fn ensure_healthy(&self) -> Result<()> {
        match &*self.failed.borrow() {
            Some(reason) => Err(Error::ShardFailed {
                shard: self.shard,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The current term (the term new entries get).
    pub fn term(&self) -> u64 {
        match &self.raft {
            Some(r) => r.borrow().term(),
            None => 1,
        }
    }

    /// Term of the entry at `index`, if the in-memory log (or its snapshot) still names it.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        match &self.raft {
            Some(r) => r.borrow().term_at(index),
            None => Some(1),
        }
    }

    /// The hard state to repeat after a checkpoint drops the segments holding the last one.
    pub fn hard_state(&self) -> Option<HardState> {
        self.raft.as_ref().map(|r| r.borrow().hard_state())
    }

    /// Proposes `entry` (its term and index are set here) and queues it in the WAL in the same
    /// synchronous step, so the log keeps the order in which the shard executed. Returns the
    /// index. Nothing is proposed when the WAL has no room for the frame.
    pub fn propose(
        &self,
        wal: &Wal,
        entry: &mut WalEntry,
    ) -> std::result::Result<u64, ProposeError> {
        self.ensure_healthy()?;
        let Some(raft) = &self.raft else {
            entry.term = 1;
            return wal.try_append(entry).map_err(ProposeError::NoRoom);
        };
        {
            let r = raft.borrow();
            entry.term = r.term();
            entry.index = r.last_index() + 1;
        }
        let encoded = Bytes::from(record::encode_payload(entry));
        let len = record::frame_len(encoded.len());
        // A no-op is Raft's empty entry (as a new leader's is); `pump` logs it as a Noop record.
        let payload = if entry.kind == EntryKind::Noop {
            Bytes::new()
        } else {
            encoded
        };
        if !wal.has_room(len + RECORD_SLACK) {
            return Err(ProposeError::NoRoom(NoRoom {
                frame_len: len + RECORD_SLACK,
            }));
        }
        let index = raft
            .borrow_mut()
            .propose(payload)
            .map_err(|e| raft_error(self.shard, e))?;
        assert_eq!(index, entry.index, "shard {} proposal index", self.shard);
        self.pump(wal);
        self.ensure_healthy()?;
        Ok(index)
    }

    /// Waits until the entry at `index`, proposed in `term`, is committed.
    pub async fn wait_committed(&self, wal: &Wal, index: u64, term: u64) -> Result<()> {
        wal.wait_durable(index).await?;
        let Some(raft) = &self.raft else {
            return Ok(());
        };
        self.sync(wal);
        self.ensure_healthy()?;
        let r = raft.borrow();
        // A one-member group commits what is durable; groups with peers wait here for the
        // quorum once a transport exists.
        if r.commit() < index {
            return Err(Error::ShardFailed {
                shard: self.shard,
                reason: format!("entry {index} is durable but not committed"),
            });
        }
        if r.term_at(index).is_some_and(|t| t != term) {
            return Err(Error::ShardFailed {
                shard: self.shard,
                reason: format!("entry {index} of term {term} was replaced (leader changed)"),
            });
        }
        Ok(())
    }

    /// Acknowledges to Raft whatever the WAL made durable since the last call, and handles
    /// what that produces (commit, and in groups with peers, messages).
    pub fn sync(&self, wal: &Wal) {
        let Some(raft) = &self.raft else {
            return;
        };
        let mut p = Persisted::default();
        let durable = wal.durable_index();
        {
            // Raft's own persisted mark is what was acknowledged so far.
            let r = raft.borrow();
            if durable > r.persisted() {
                p.entries = r.term_at(durable).map(|t| (t, durable));
            }
        }
        let synced = wal.durable_seq();
        {
            let mut pending = self.pending_hard_state.borrow_mut();
            while pending.front().is_some_and(|(seq, _)| *seq <= synced) {
                p.hard_state = pending.pop_front().map(|(_, hs)| hs);
            }
        }
        if p != Persisted::default() {
            raft.borrow_mut().advance(p);
            self.pump(wal);
        }
    }

    /// Hands Raft's output to the WAL: new entries (our proposals, a leader's no-op) and
    /// changed hard state. Committed entries need no apply here: the leader executed them
    /// before proposing, and recovery replayed the rest.
    fn pump(&self, wal: &Wal) {
        let Some(raft) = &self.raft else {
            return;
        };
        loop {
            let rd = {
                let mut r = raft.borrow_mut();
                if !r.has_ready() {
                    return;
                }
                r.ready()
            };
            assert!(
                rd.snapshot.is_none(),
                "shard {}: a one-member group never receives a snapshot",
                self.shard
            );
            for e in &rd.entries {
                let payload = match e.kind {
                    RaftKind::Normal if !e.data.is_empty() => e.data.clone(),
                    RaftKind::Normal => encode(WalEntry {
                        term: e.term,
                        index: e.index,
                        kind: EntryKind::Noop,
                        ..Default::default()
                    }),
                    RaftKind::ConfChange => encode(WalEntry {
                        term: e.term,
                        index: e.index,
                        kind: EntryKind::ConfChange,
                        data: e.data.clone(),
                        ..Default::default()
                    }),
                };
                if !self.append(wal, Some(e.index), &payload) {
                    return;
                }
            }
            if let Some(hs) = rd.hard_state {
                // Commit alone is not logged: a restarted member learns it again.
                if (hs.term, hs.vote) != self.logged_hard_state.get()
                    && !self.log_hard_state(wal, hs)
                {
                    return;
                }
            }
            debug_assert!(
                rd.messages.is_empty(),
                "a one-member group sends no messages"
            );
        }
    }

    /// Appends a hard state record; false if the shard had to stop.
    pub fn log_hard_state(&self, wal: &Wal, hs: HardState) -> bool {
        let payload = encode(WalEntry {
            term: hs.term,
            kind: EntryKind::HardState,
            vote: hs.vote.unwrap_or(0),
            commit: hs.commit,
            ..Default::default()
        });
        if !self.append(wal, None, &payload) {
            return false;
        }
        self.logged_hard_state.set((hs.term, hs.vote));
        self.pending_hard_state
            .borrow_mut()
            .push_back((self.last_seq.get(), hs));
        true
    }

    fn append(&self, wal: &Wal, index: Option<u64>, payload: &[u8]) -> bool {
        match wal.append_frame(index, payload) {
            Ok(seq) => {
                self.last_seq.set(seq);
                true
            }
            Err(nr) => {
                // Proposals reserve room for these small records, so this means the log could
                // not take a record Raft already counts on: stop rather than diverge.
                let reason = format!(
                    "the WAL had no room for a {}-byte Raft record",
                    nr.frame_len
                );
                tracing::error!(shard = self.shard, %reason, "shard stops");
                *self.failed.borrow_mut() = Some(reason);
                false
            }
        }
    }

    /// A checkpoint at `index` became the group's snapshot: drop the log up to it.
    pub fn compact(&self, index: u64) -> Result<()> {
        let Some(raft) = &self.raft else {
            return Ok(());
        };
        let mut r = raft.borrow_mut();
        if index <= r.first_index().saturating_sub(1) {
            return Ok(());
        }
        r.compact(index, Bytes::new())
            .map_err(|e| raft_error(self.shard, e))
    }
}

fn encode(entry: WalEntry) -> Bytes {
    Bytes::from(record::encode_payload(&entry))
}

/// The Raft entry a recovered WAL record stands for.
fn raft_entry(l: &LoggedEntry) -> Entry {
    let e = &l.entry;
    let (kind, data) = match e.kind {
        EntryKind::Noop => (RaftKind::Normal, Bytes::new()),
        EntryKind::ConfChange => (RaftKind::ConfChange, e.data.clone()),
        _ => (RaftKind::Normal, l.payload.clone()),
    };
    Entry {
        term: e.term,
        index: e.index,
        kind,
        data,
    }
}

fn raft_error(shard: u32, e: raft::Error) -> Error {
    Error::ShardFailed {
        shard,
        reason: format!("raft: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::rc::Rc;

    use super::*;
    use crate::mvcc::Effect;
    use crate::runtime::run_local;
    use crate::wal::{recover, WalOptions};

    fn write(rev: i64) -> WalEntry {
        WalEntry {
            kind: EntryKind::Write,
            revision: rev,
            ops: vec![Effect::Put {
                key: Bytes::from(format!("k{rev}")),
                value: Bytes::from_static(b"v"),
                lease: 0,
            }],
            ..Default::default()
        }
    }

    /// Opens the log in `dir`, starts the group, proposes `n` writes concurrently and returns
    /// (term, first index still in the in-memory log after compacting to the last write).
    fn session(dir: &Path, n: i64) -> (u64, u64) {
        let dir = dir.to_path_buf();
        run_local(move || async move {
            let rec = recover(&dir, 0, 0).unwrap();
            let wal = Wal::open(&dir, 0, WalOptions::default(), &rec)
                .await
                .unwrap();
            let replica = Rc::new(Replica::recover(0, (0, 0), &rec, false).unwrap());
            replica.start(&wal).await.unwrap();
            let mut waits = Vec::new();
            let mut last = 0;
            for i in 0..n {
                let mut e = write(i + 1);
                let index = match replica.propose(&wal, &mut e) {
                    Ok(index) => index,
                    Err(_) => panic!("proposal refused"),
                };
                assert_eq!((e.index, e.term), (index, replica.term()));
                last = index;
                let (wal, replica) = (wal.clone(), replica.clone());
                waits.push(glommio::spawn_local(async move {
                    replica.wait_committed(&wal, index, e.term).await
                }));
            }
            for w in waits {
                w.await.unwrap();
            }
            let commit = replica.raft.as_ref().unwrap().borrow().commit();
            assert_eq!(commit, last, "a one-member group commits what is durable");
            replica.compact(last).unwrap();
            let first = replica.raft.as_ref().unwrap().borrow().first_index();
            let term = replica.term();
            wal.close().await;
            (term, first)
        })
    }

    #[test]
    fn proposals_commit_when_durable_and_terms_grow_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            session(dir.path(), 50),
            (1, 52),
            "no-op at 1, writes 2..=51"
        );
        let rec = recover(dir.path(), 0, 0).unwrap();
        assert_eq!(rec.entries.len(), 51);
        let hs = rec.hard_state.as_ref().unwrap();
        assert_eq!((hs.term, hs.vote), (1, 1));
        // Recovered entries are the Raft log again; the next leader's no-op follows them.
        assert_eq!(session(dir.path(), 5), (2, 58));
        let rec = recover(dir.path(), 0, 0).unwrap();
        let terms: Vec<u64> = rec.entries.iter().map(|l| l.entry.term).collect();
        assert_eq!(&terms[50..], &[1, 2, 2, 2, 2, 2, 2]);
        assert_eq!(rec.entries[51].entry.kind, EntryKind::Noop);
        assert_eq!(rec.hard_state.unwrap().term, 2);
    }
}

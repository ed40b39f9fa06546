//! Wire-level types: log entries, messages between peers, hard state, snapshots and
//! membership. Payloads are `Bytes` so that fanning an entry out to every follower (and
//! handing it to the application) clones a refcount, never the data.

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{Error, Result};

/// A peer id. 0 is reserved for "nobody".
pub type NodeId = u64;

/// What an entry's payload means to Raft itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Application data (empty for the no-op a new leader appends).
    Normal,
    /// An encoded [`ConfChange`]; applied by Raft when the entry is handed out for apply.
    ConfChange,
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: u64,
    pub index: u64,
    pub kind: EntryKind,
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry counts against a message size budget.
    pub fn size(&self) -> u64 {
        self.data.len() as u64 + 24
    }
}

/// State that must be durable before the messages it produced are sent (Raft §5.1, §5.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: Option<NodeId>,
    pub commit: u64,
}

/// Who votes and who only replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfState {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

impl ConfState {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        ConfState {
            voters: voters.into_iter().collect(),
            learners: BTreeSet::new(),
        }
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Every member with whether it is a learner: voters first, then learners.
    pub fn members(&self) -> impl Iterator<Item = (NodeId, bool)> + '_ {
        let voters = self.voters.iter().map(|&id| (id, false));
        voters.chain(self.learners.iter().map(|&id| (id, true)))
    }

    /// Applies one change. Invalid changes (already validated at proposal time, but a log may
    /// hold them after a leader change) are no-ops, so every replica converges on the same set.
    pub fn apply(&mut self, cc: &ConfChange) {
        match *cc {
            ConfChange::AddVoter(id) | ConfChange::PromoteLearner(id) => {
                self.learners.remove(&id);
                self.voters.insert(id);
            }
            ConfChange::AddLearner(id) => {
                if !self.voters.contains(&id) {
                    self.learners.insert(id);
                }
            }
            ConfChange::Remove(id) => {
                self.voters.remove(&id);
                self.learners.remove(&id);
            }
            ConfChange::Update(_) => {}
        }
    }
}

/// A single-step membership change: at most one voter joins or leaves at a time, so the old
/// and new majorities always overlap (thesis §4.2) and no joint consensus is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfChange {
    AddVoter(NodeId),
    AddLearner(NodeId),
    PromoteLearner(NodeId),
    Remove(NodeId),
    /// Changes nothing Raft tracks: it carries new member attributes (peer URLs) in its
    /// context through the log, so every replica applies them at the same point.
    Update(NodeId),
}

impl ConfChange {
    /// 1 tag byte + 8-byte big-endian node id.
    pub fn encode(&self) -> Bytes {
        self.encode_with(&[])
    }

    /// The change followed by an opaque `context` Raft ignores (the application's record of
    /// the member, e.g. its name and peer URLs), as etcd's `ConfChange.Context`.
    pub fn encode_with(&self, context: &[u8]) -> Bytes {
        let (tag, id) = match *self {
            ConfChange::AddVoter(id) => (1u8, id),
            ConfChange::AddLearner(id) => (2, id),
            ConfChange::PromoteLearner(id) => (3, id),
            ConfChange::Remove(id) => (4, id),
            ConfChange::Update(id) => (5, id),
        };
        let mut b = BytesMut::with_capacity(9 + context.len());
        b.put_u8(tag);
        b.put_u64(id);
        b.put_slice(context);
        b.freeze()
    }

    /// The change an entry's data holds; its context follows ([`Self::context`]).
    pub fn decode(data: &[u8]) -> Result<Self> {
        if data.len() < 9 {
            return Err(Error::MalformedConfChange);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&data[1..9]);
        let id = u64::from_be_bytes(id);
        Ok(match data[0] {
            1 => ConfChange::AddVoter(id),
            2 => ConfChange::AddLearner(id),
            3 => ConfChange::PromoteLearner(id),
            4 => ConfChange::Remove(id),
            5 => ConfChange::Update(id),
            _ => return Err(Error::MalformedConfChange),
        })
    }

    /// The context [`Self::encode_with`] appended (empty if none).
    pub fn context(data: &[u8]) -> &[u8] {
        data.get(9..).unwrap_or(&[])
    }

    pub fn node(&self) -> NodeId {
        match *self {
            ConfChange::AddVoter(id)
            | ConfChange::AddLearner(id)
            | ConfChange::PromoteLearner(id)
            | ConfChange::Remove(id)
            | ConfChange::Update(id) => id,
        }
    }
}

/// Position and membership of a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
}

/// The application's state as of `meta.index`, opaque to Raft.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Bytes,
}

impl Snapshot {
    /// The identical starting point of every founding member: index 1, term 1, empty data.
    /// A node that joins later starts from [`Snapshot::default`] and receives the leader's.
    pub fn bootstrap(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Snapshot {
            meta: SnapshotMeta {
                index: 1,
                term: 1,
                conf_state: ConfState::new(voters),
            },
            data: Bytes::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// `index`/`log_term` name the entry preceding `entries`.
    Append,
    /// Accepted: `index` is the highest index known to match the leader and durable here.
    /// Rejected: `index` is the rejected prev index, `reject_hint`/`log_term` the first index
    /// and term of the conflicting term (term 0: the follower's log is too short).
    AppendResponse,
    /// `index`/`log_term` are the candidate's last entry.
    RequestVote,
    RequestVoteResponse,
    /// Same as `RequestVote` for `term` (the term the sender would campaign in) but nobody
    /// changes term or vote: a partitioned node cannot disrupt a healthy group.
    RequestPreVote,
    RequestPreVoteResponse,
    /// `commit` is capped at what the follower is known to have; `context` carries the
    /// leader's heartbeat round (8 bytes) used by ReadIndex and leases.
    Heartbeat,
    HeartbeatResponse,
    Snapshot,
    /// Leader transfer: campaign now, skipping pre-vote and leases.
    TimeoutNow,
    /// A follower forwards a read; `context` is the caller's read id.
    ReadIndex,
    /// `index` is the commit index the read must wait for.
    ReadIndexResponse,
}

/// One message between two peers. Fields not used by a kind are zero/empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: MessageKind,
    pub from: NodeId,
    pub to: NodeId,
    pub term: u64,
    pub log_term: u64,
    pub index: u64,
    pub entries: Vec<Entry>,
    pub commit: u64,
    pub reject: bool,
    pub reject_hint: u64,
    pub snapshot: Option<Snapshot>,
    pub context: Bytes,
}

impl Message {
    pub fn new(kind: MessageKind, from: NodeId, to: NodeId, term: u64) -> Self {
        Message {
            kind,
            from,
            to,
            term,
            log_term: 0,
            index: 0,
            entries: Vec::new(),
            commit: 0,
            reject: false,
            reject_hint: 0,
            snapshot: None,
            context: Bytes::new(),
        }
    }
}

/// A confirmed read: once the application has applied `index`, a read identified by `ctx`
/// may be served from local state and is linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub index: u64,
    pub ctx: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_change_round_trips() {
        for cc in [
            ConfChange::AddVoter(7),
            ConfChange::AddLearner(u64::MAX),
            ConfChange::PromoteLearner(1),
            ConfChange::Remove(3),
            ConfChange::Update(9),
        ] {
            assert_eq!(ConfChange::decode(&cc.encode()).ok(), Some(cc));
            let with = cc.encode_with(b"{\"name\":\"n4\"}");
            assert_eq!(ConfChange::decode(&with).ok(), Some(cc));
            assert_eq!(ConfChange::context(&with), b"{\"name\":\"n4\"}");
            assert!(ConfChange::context(&cc.encode()).is_empty());
        }
        assert!(ConfChange::decode(b"\x06\0\0\0\0\0\0\0\x01").is_err());
        assert!(ConfChange::decode(b"").is_err());
    }

    #[test]
    fn conf_state_apply() {
        let mut cs = ConfState::new([1, 2]);
        cs.apply(&ConfChange::AddLearner(3));
        assert!(cs.learners.contains(&3));
        cs.apply(&ConfChange::PromoteLearner(3));
        assert_eq!(cs.voters.len(), 3);
        assert!(cs.learners.is_empty());
        cs.apply(&ConfChange::AddLearner(3));
        assert!(
            cs.learners.is_empty(),
            "a voter is never demoted by AddLearner"
        );
        cs.apply(&ConfChange::Remove(1));
        assert!(!cs.contains(1));
    }
}

//! Why a request to the state machine was refused. A refused proposal was never appended, so
//! the caller may retry it elsewhere without risking a duplicate.

use super::message::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("no leader known")]
    NoLeader,
    #[error("leadership transfer to {0} in progress")]
    TransferInProgress(NodeId),
    #[error("a membership change is still pending")]
    ConfChangePending,
    #[error("invalid membership change: {0}")]
    InvalidConfChange(&'static str),
    #[error("malformed membership change entry")]
    MalformedConfChange,
    #[error("{0} is not a voter of this group")]
    NotVoter(NodeId),
    #[error("compaction index {index} outside [{first}, {applied}]")]
    CompactOutOfRange {
        index: u64,
        first: u64,
        applied: u64,
    },
    #[error("invalid persisted state: {0}")]
    InvalidState(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

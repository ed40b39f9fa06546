//! The engine's error type. Request errors carry etcd's exact messages because clients match on them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A shard's group has no leader (no quorum, or an election in progress).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// Another member leads: the request was not executed here (the server forwards it).
    #[error("etcdserver: not leader")]
    NotLeader,
    /// MoveLeader to a member that cannot lead (unknown, a learner).
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// Membership changes (etcd's Cluster service), with etcd's messages.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    /// Adding a voter would leave the cluster without a quorum of started members.
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    /// Removing the member would leave too few active voters for a quorum.
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    /// Leadership moved while a write was in flight: it may or may not have been applied.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// A multi-shard part was proposed but leadership moved before it committed: whether the
    /// write commits is for the recovery rule to decide (clients see `leader changed`).
    #[error("etcdserver: leader changed")]
    PartInDoubt,
    /// A write was proposed but its group did not commit it in time.
    #[error("etcdserver: request timed out")]
    Timeout,

    /// No space left for a WAL segment or checkpoint; nothing of the failed request was applied.
    #[error("disk full while writing {path}: {source}")]
    DiskFull {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file holds data that fails its checksum or framing where a valid record must be.
    #[error("corrupt data in {path} at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The data dir was created with options that conflict with the ones given.
    #[error("data dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    /// A shard hit an I/O error after it had applied a write in memory; it refuses further work so
    /// that nothing unacknowledged becomes visible. Restarting recovers from disk.
    #[error("shard {shard} stopped after an earlier i/o error: {reason}")]
    ShardFailed { shard: u32, reason: String },
    #[error("database is closed")]
    Closed,
    #[error("failed to start executor: {0}")]
    Executor(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        let path = path.into();
        let full = matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) || matches!(
            source.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        );
        if full {
            Error::DiskFull { path, source }
        } else {
            Error::Io { path, source }
        }
    }

    /// From a glommio error, keeping the OS error (glommio's own conversion hides the errno).
    pub(crate) fn glommio<T>(path: impl Into<PathBuf>, e: glommio::GlommioError<T>) -> Error {
        let source = match e {
            glommio::GlommioError::EnhancedIoError { source, .. } => source,
            glommio::GlommioError::IoError(source) => source,
            other => other.into(),
        };
        Error::io(path, source)
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// Errors that reject one request and leave the store untouched.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            Error::Compacted
                | Error::FutureRevision
                | Error::KeyNotFound
                | Error::LeaseNotFound
                | Error::LeaseExists
                | Error::LeaseTtlTooLarge
                | Error::DuplicateKey
                | Error::TooManyOps
                | Error::EmptyKey
                | Error::ValueProvided
                | Error::LeaseProvided
                | Error::InvalidSortOption
                | Error::RequestTooLarge
                | Error::InvalidArgument(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

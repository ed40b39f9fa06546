//! A pure Raft state machine (Ongaro's thesis), one instance per replicated group.
//!
//! No IO, clock, threads or runtime: the owner feeds it messages ([`Raft::step`]), time
//! ([`Raft::tick`]) and requests ([`Raft::propose`], [`Raft::read_index`], ...), collects work
//! with [`Raft::ready`], and reports what it made durable with [`Raft::advance`]. Nothing
//! counts as persisted (for votes, acknowledgements or commit) until it is acknowledged, so
//! a crash that loses unacknowledged writes cannot break safety. See `docs/raft.md`.

mod config;
mod error;
mod log;
mod message;
mod node;
mod progress;

pub use config::{Config, Rng};
pub use error::{Error, Result};
pub use message::{
    ConfChange, ConfState, Entry, EntryKind, HardState, Message, MessageKind, NodeId, ReadState,
    Snapshot, SnapshotMeta,
};
pub use node::{DurableState, Persisted, Raft, Ready, Role};
pub use progress::{Inflights, Progress, ProgressState};

#[cfg(test)]
mod tests;

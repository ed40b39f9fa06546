//! spindle: an etcd-compatible key-value store built thread-per-core on glommio.

pub mod bench;
pub mod btree;
pub mod checkpoint;
pub mod db;
pub mod error;
pub mod kv;
pub mod lease;
pub mod meta;
pub mod mvcc;
pub mod partition;
pub mod plan;
pub mod proto;
pub mod raft;
pub mod replica;
pub mod revision;
pub mod rt;
pub mod server;
pub mod shard;
pub mod wal;
pub mod watch;

pub use db::{CoreHook, Db, LocalDb, Options, Status, Watch};
pub use error::{Error, Result};
pub use watch::{WatchEvent, WatchRequest, WatchUpdate};

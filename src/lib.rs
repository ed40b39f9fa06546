//! spindle: an etcd-compatible key-value store built thread-per-core on glommio.

pub mod alarm;
pub mod auth;
pub mod bbolt;
pub mod bench;
pub mod cluster;
pub mod db;
pub mod engine;
pub mod error;
pub mod kv;
#[doc(hidden)]
pub mod lincheck;
pub mod mvcc;
pub mod peer;
pub mod proto;
pub mod proxy;
pub mod raft;
pub mod restore;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod wal;

pub use db::{
    CoreHook, Db, LocalDb, Options, Status, Watch, WatchEvent, WatchRequest, WatchUpdate,
};
pub use error::{Error, Result};

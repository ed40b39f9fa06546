//! spindle: an etcd-compatible key-value store built thread-per-core on glommio.

pub mod btree;
pub mod error;
pub mod kv;

pub use error::{Error, Result};

//! spindle: an etcd-compatible key-value store built thread-per-core on glommio.

pub mod error;
pub mod kv;
pub mod mvcc;

pub use error::{Error, Result};

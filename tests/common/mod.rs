//! The harness every integration test shares: server processes (`spindle serve` and a real etcd
//! 3.4), `etcdctl`, raw HTTP to the gateway, child processes, and embedded `Db` options.
//!
//! Each test binary compiles this module whole and uses a part of it.

#![allow(dead_code)]

pub mod alloc_count;
pub mod cluster;
pub mod db;
pub mod etcd;
pub mod etcdctl;
pub mod history;
pub mod http;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod server;

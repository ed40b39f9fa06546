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

/// Polls `cond` every 100 ms until it holds; panics naming `what` after `secs` seconds.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

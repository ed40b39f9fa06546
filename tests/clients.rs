//! The usual etcd client libraries, unchanged, against `spindle serve`: Node's `etcd3` and
//! Python's `etcd3` run the scripts in `tests/clients/` (KV, watch, lease, lock recipe), and the
//! Rust `etcd-client` crate runs `tests/clients/rust` (KV, watch, lease, lock and election
//! services). Each
//! script runs against a fresh etcd 3.4 first, which proves the script itself, then against a
//! fresh spindle.
//!
//! `tools/test` installs the libraries into `$SPINDLE_CLIENTS_DIR` (default
//! `~/.cache/spindle-clients`), along with etcd.

use std::path::PathBuf;
use std::process::Command;

mod common;

fn clients_dir() -> PathBuf {
    std::env::var_os("SPINDLE_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/spindle-clients")
        })
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Runs a client script against etcd, then spindle; both must print "ok".
fn run_both(make: impl Fn(&str) -> Command) {
    for etcd in [true, false] {
        let s = common::start(if etcd { "etcd" } else { "spindle" }, &[]);
        let out = make(&format!("127.0.0.1:{}", s.port))
            .output()
            .expect("run the client (tools/test installs it)");
        let who = if etcd { "etcd" } else { "spindle" };
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "{who}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn node_etcd3_client_works_unchanged() {
    let modules = clients_dir().join("node/node_modules");
    assert!(
        modules.join("etcd3").is_dir(),
        "Node's etcd3 is not installed in {}; run tools/test",
        modules.display()
    );
    run_both(|ep| {
        let mut c = Command::new("node");
        c.env("NODE_PATH", &modules)
            .arg(script("node_client.js"))
            .arg(ep);
        c
    });
}

#[test]
fn python_etcd3_client_works_unchanged() {
    let python = clients_dir().join("python/bin/python");
    assert!(
        python.exists(),
        "Python's etcd3 is not installed in {}; run tools/test",
        python.display()
    );
    run_both(|ep| {
        let mut c = Command::new(&python);
        c.arg(script("python_client.py")).arg(ep);
        c
    });
}

#[test]
fn rust_etcd_client_works_unchanged() {
    let bin = clients_dir().join("rust-target/release/spindle-rust-client-check");
    assert!(
        bin.exists(),
        "the Rust client check is not built at {}; run tools/test",
        bin.display()
    );
    run_both(|ep| {
        let mut c = Command::new(&bin);
        c.arg(ep);
        c
    });
}

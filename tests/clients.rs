//! The usual etcd client libraries, unchanged, against `spindle serve`: Node's `etcd3` and
//! Python's `etcd3` run the scripts in `tests/clients/` (KV, watch, lease, lock recipe), and the
//! Rust `etcd-client` crate runs `tests/clients/rust` (KV, watch, lease, lock and election
//! services). Each
//! script runs against a fresh etcd 3.4 first, which proves the script itself, then against a
//! fresh spindle. Each library also has an authenticated run: auth enabled, clients connect with
//! user and password, put and get, and see a user without permission refused.
//!
//! `tools/test` installs the libraries into `$SPINDLE_CLIENTS_DIR` (default
//! `~/.cache/spindle-clients`), along with etcd.

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::server::{Kind, Server};

/// `path` in `$SPINDLE_CLIENTS_DIR`, which must exist: `what` is installed there by tools/test.
fn installed(path: &str, what: &str) -> PathBuf {
    let dir = std::env::var_os("SPINDLE_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/spindle-clients")
        });
    let p = dir.join(path);
    assert!(
        p.exists(),
        "{what} is not installed at {}; run tools/test",
        p.display()
    );
    p
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Runs a client script against etcd, then spindle; both must print "ok".
fn run_both(make: impl Fn(&str) -> Command) {
    for kind in [Kind::Etcd, Kind::Spindle] {
        let s = Server::start(kind, &[]);
        let out = make(&s.endpoint())
            .output()
            .expect("run the client (tools/test installs it)");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "{}: {}\n{}",
            s.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Users for the authenticated runs: root, `u` with readwrite on `auth/`, `nobody` without a
/// role; then auth is enabled.
const AUTH_SETUP: &[&[&str]] = &[
    &["user", "add", "root:pw"],
    &["user", "grant-role", "root", "root"],
    &["role", "add", "r"],
    &[
        "role",
        "grant-permission",
        "r",
        "--prefix=true",
        "readwrite",
        "auth/",
    ],
    &["user", "add", "u:pw"],
    &["user", "grant-role", "u", "r"],
    &["user", "add", "nobody:pw"],
    &["auth", "enable"],
];

/// As [`run_both`] with auth enabled first; the client gets `HOST:PORT auth`.
fn run_both_auth(make: impl Fn(&str) -> Command) {
    for kind in [Kind::Etcd, Kind::Spindle] {
        let s = Server::start(kind, &["--bcrypt-cost", "4"]);
        for args in AUTH_SETUP {
            let out = s.etcdctl_cmd(args).output().expect("run etcdctl");
            assert!(
                out.status.success(),
                "{}: etcdctl {args:?}: {out:?}",
                s.name()
            );
        }
        let mut c = make(&s.endpoint());
        let out = c.arg("auth").output().expect("run the client");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "{} (auth): {}\n{}",
            s.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn node_client(modules: &std::path::Path, ep: &str) -> Command {
    let mut c = Command::new("node");
    c.env("NODE_PATH", modules)
        .arg(script("node_client.js"))
        .arg(ep);
    c
}

#[test]
fn node_etcd3_client_authenticates() {
    let etcd3 = installed("node/node_modules/etcd3", "Node's etcd3");
    let modules = etcd3.parent().unwrap();
    run_both_auth(|ep| node_client(modules, ep));
}

#[test]
fn python_etcd3_client_authenticates() {
    let python = installed("python/bin/python", "Python's etcd3");
    run_both_auth(|ep| {
        let mut c = Command::new(&python);
        c.arg(script("python_client.py")).arg(ep);
        c
    });
}

#[test]
fn rust_etcd_client_authenticates() {
    let bin = installed(
        "rust-target/release/spindle-rust-client-check",
        "the Rust client check",
    );
    run_both_auth(|ep| {
        let mut c = Command::new(&bin);
        c.arg(ep);
        c
    });
}

#[test]
fn node_etcd3_client_works_unchanged() {
    let etcd3 = installed("node/node_modules/etcd3", "Node's etcd3");
    let modules = etcd3.parent().unwrap();
    run_both(|ep| node_client(modules, ep));
}

#[test]
fn python_etcd3_client_works_unchanged() {
    let python = installed("python/bin/python", "Python's etcd3");
    run_both(|ep| {
        let mut c = Command::new(&python);
        c.arg(script("python_client.py")).arg(ep);
        c
    });
}

#[test]
fn rust_etcd_client_works_unchanged() {
    let bin = installed(
        "rust-target/release/spindle-rust-client-check",
        "the Rust client check",
    );
    run_both(|ep| {
        let mut c = Command::new(&bin);
        c.arg(ep);
        c
    });
}

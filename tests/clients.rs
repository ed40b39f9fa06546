//! The usual etcd client libraries, unchanged, against `spindle serve`: Node's `etcd3` and
//! Python's `etcd3` run the scripts in `tests/clients/` (KV, watch, lease, lock recipe). Each
//! script runs against a fresh etcd 3.4 first, which proves the script itself, then against a
//! fresh spindle.
//!
//! `tools/test` installs the libraries into `$SPINDLE_CLIENTS_DIR` (default
//! `~/.cache/spindle-clients`), along with etcd.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(etcd: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ls: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
    drop(ls);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let mut cmd = if etcd {
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let mut c = Command::new("etcd");
        c.args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("default={peer}")]);
        c
    } else {
        let mut c = Command::new(env!("CARGO_BIN_EXE_spindle"));
        c.arg("serve")
            .args(["--listen-client-urls", &url, "--cores", "2"]);
        c
    };
    let child = cmd
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server");
    let s = Server {
        child,
        port: ports[0],
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=127.0.0.1:{}", s.port))
        .args(["--dial-timeout=1s", "endpoint", "health"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success())
    {
        assert!(Instant::now() < deadline, "server did not become healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

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
        let s = start(etcd);
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

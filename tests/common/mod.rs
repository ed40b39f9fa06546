//! Processes the network tests start: a fresh etcd 3.4 or `spindle serve` on free ports and a
//! temp dir, killed (by its own pid) when dropped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub name: &'static str,
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// `n` distinct free ports (all bound at once so they differ).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Starts etcd (`name == "etcd"`) or spindle with two cores, plus `extra` flags both accept,
/// and waits until `etcdctl endpoint health` passes.
pub fn start(name: &'static str, extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut cmd = if name == "etcd" {
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let mut c = Command::new("etcd");
        c.args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
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
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start server (etcd from the etcd-server package; tools/test installs it)");
    let s = Server {
        name,
        child,
        port: ports[0],
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", s.endpoint()))
        .args(["--dial-timeout=1s", "endpoint", "health"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success())
    {
        assert!(
            Instant::now() < deadline,
            "{name} did not become healthy: {}",
            std::fs::read_to_string(s.dir.path().join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

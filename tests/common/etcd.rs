//! What starting a real etcd 3.4 takes beyond any server: its URL flags, the single-member
//! bootstrap, and its readiness check.

use std::net::TcpStream;
use std::path::Path;

use super::etcdctl;
use super::process::output_ok;
use super::server::{Kind, Ports, Server};

/// Client and peer URLs on `ports`.
pub fn args(ports: &Ports) -> Vec<String> {
    let (client, peer) = (ports.client_url(), ports.peer_url());
    [
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
    ]
    .map(str::to_string)
    .to_vec()
}

/// A one-member cluster named `default`.
pub fn single_member_args(ports: &Ports) -> Vec<String> {
    vec![
        "--name".to_string(),
        "default".to_string(),
        "--initial-cluster".to_string(),
        format!("default={}", ports.peer_url()),
    ]
}

/// Whether etcd at `endpoint` accepts connections and `etcdctl endpoint health` passes.
pub fn healthy(endpoint: &str) -> bool {
    TcpStream::connect(endpoint).is_ok()
        && etcdctl::run(endpoint, &["--command-timeout=2s", "endpoint", "health"]).ok
}

/// `etcdctl snapshot restore` of `snapshot` into the new data dir `restored` as the single
/// member `default`, and etcd started on it on fresh ports (not waited for).
pub fn spawn_restored(snapshot: &Path, restored: &Path) -> Server {
    let ports = Ports::free(1)[0];
    output_ok(&mut etcdctl::command(
        "127.0.0.1:1",
        &[
            "snapshot",
            "restore",
            snapshot.to_str().expect("utf-8 path"),
            "--data-dir",
            restored.to_str().expect("utf-8 path"),
            "--name",
            "default",
            "--initial-cluster",
            &format!("default={}", ports.peer_url()),
            "--initial-advertise-peer-urls",
            &ports.peer_url(),
        ],
    ));
    let mut args = single_member_args(&ports);
    args.extend([
        "--data-dir".to_string(),
        restored.to_str().expect("utf-8 path").to_string(),
    ]);
    Server::spawn_on(Kind::Etcd, ports, &args)
}

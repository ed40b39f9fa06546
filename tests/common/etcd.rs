//! What starting a real etcd 3.4 takes beyond any server: its URL flags, the single-member
//! bootstrap, and its readiness check.

use std::net::TcpStream;

use super::etcdctl;
use super::server::Ports;

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

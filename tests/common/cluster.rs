//! etcd's cluster flags for the members a test starts, so that every cluster test bootstraps
//! its members the same way (and etcd's the same way as spindle's).

/// `--initial-cluster`: member `{prefix}{i}` at `peer_urls[i]`.
pub fn initial_cluster(prefix: &str, peer_urls: &[String]) -> String {
    let members: Vec<String> = peer_urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("{prefix}{i}={u}"))
        .collect();
    members.join(",")
}

/// The flags spindle and etcd share: name, cluster, state (`new` or `existing`), token, and
/// fast timing (50 ms heartbeats, 500 ms election timeout) so failovers stay short.
pub fn flags(name: &str, initial: &str, state: &str, token: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--initial-cluster",
        initial,
        "--initial-cluster-state",
        state,
        "--initial-cluster-token",
        token,
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
    ]
    .map(str::to_string)
    .to_vec()
}

/// [`flags`] plus where a spindle member listens for peers and the peer URL it advertises (a
/// proxy in front of it, or its own).
pub fn spindle_member(
    name: &str,
    initial: &str,
    state: &str,
    token: &str,
    listen_peer: &str,
    advertise_peer: &str,
) -> Vec<String> {
    let mut args = flags(name, initial, state, token);
    args.extend(
        [
            "--listen-peer-urls",
            listen_peer,
            "--initial-advertise-peer-urls",
            advertise_peer,
        ]
        .map(str::to_string),
    );
    args
}

/// Starts `spindle serve` members `{prefix}0..` on `ports` (each advertising its own peer
/// URL) with `extra` flags, and waits until every one serves.
pub fn start_spindle(
    prefix: &str,
    token: &str,
    ports: &[super::server::Ports],
    extra: &[&str],
) -> Vec<super::server::Server> {
    use super::server::{Kind, Server};
    let urls: Vec<String> = ports.iter().map(|p| p.peer_url()).collect();
    let initial = initial_cluster(prefix, &urls);
    let mut servers: Vec<Server> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let url = p.peer_url();
            let mut args =
                spindle_member(&format!("{prefix}{i}"), &initial, "new", token, &url, &url);
            args.extend(extra.iter().map(|a| a.to_string()));
            Server::spawn_on(Kind::Spindle, *p, &args)
        })
        .collect();
    for s in &mut servers {
        s.wait_ready();
    }
    servers
}

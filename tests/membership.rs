//! Membership changes on `spindle serve` processes, driven by etcdctl as an operator would:
//! add a learner, start it with `--initial-cluster-state existing`, promote it once it caught up,
//! update and remove members (a removed member stops by itself), with etcd's errors for changes
//! the cluster must refuse.

mod common;

use std::time::{Duration, Instant};

use common::etcdctl;
use common::server::{Kind, Ports, Server};

const TOKEN: &str = "membership-test";

fn member_args(name: &str, p: &Ports, initial: &str, state: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--initial-cluster",
        initial,
        "--initial-cluster-state",
        state,
        "--initial-cluster-token",
        TOKEN,
        "--listen-peer-urls",
        &p.peer_url(),
        "--initial-advertise-peer-urls",
        &p.peer_url(),
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// `(id, name, is_learner)` of every member, as `endpoint` lists them.
fn member_list(endpoint: &str) -> Vec<(u64, String, bool)> {
    let out = etcdctl::run(endpoint, &["member", "list", "-w", "json"]);
    assert!(out.ok, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mut ms: Vec<(u64, String, bool)> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["ID"].as_u64().unwrap(),
                m["name"].as_str().unwrap_or_default().to_string(),
                m["isLearner"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    ms.sort();
    ms
}

fn member_id(s: &Server) -> u64 {
    let out = s.etcdctl(&["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v[0]["Status"]["header"]["member_id"].as_u64().unwrap()
}

fn leader_id(s: &Server) -> u64 {
    let out = s.etcdctl(&["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v[0]["Status"]["leader"].as_u64().unwrap_or(0)
}

/// Retries `args` against `endpoint` until it succeeds (leadership settling, a learner catching
/// up); panics with the last error after `secs`.
fn until_ok(endpoint: &str, args: &[&str], secs: u64) -> etcdctl::Ctl {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = etcdctl::run(endpoint, args);
        if out.ok {
            return out;
        }
        assert!(Instant::now() < deadline, "etcdctl {args:?}: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(endpoint: &str, key: &str, serializable: bool) -> String {
    let mut args = vec!["get", key, "--print-value-only"];
    if serializable {
        args.push("--consistency=s");
    }
    etcdctl::run(endpoint, &args).stdout.trim().to_string()
}

fn wait_value(endpoint: &str, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(endpoint, key, true) != want {
        assert!(
            Instant::now() < deadline,
            "{endpoint} never served {key}={want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn add_learner_join_promote_update_and_remove_members() {
    let ports = Ports::free(4);
    let initial: Vec<String> = ports[..3]
        .iter()
        .enumerate()
        .map(|(i, p)| format!("s{i}={}", p.peer_url()))
        .collect();
    let initial = initial.join(",");
    let mut servers: Vec<Server> = (0..3)
        .map(|i| {
            let args = member_args(&format!("s{i}"), &ports[i], &initial, "new");
            Server::spawn_on(Kind::Spindle, ports[i], &args)
        })
        .collect();
    for s in &mut servers {
        s.wait_ready();
    }
    let all: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    let all = all.join(",");
    until_ok(&all, &["put", "k/0", "before"], 15);

    // Changes the cluster must refuse, with etcd's messages.
    let taken = etcdctl::run(
        &all,
        &[
            "member",
            "add",
            "dup",
            &format!("--peer-urls={}", ports[0].peer_url()),
        ],
    );
    assert!(
        taken
            .stderr
            .contains("etcdserver: Peer URLs already exists"),
        "{taken:?}"
    );
    let missing = etcdctl::run(&all, &["member", "remove", "abcdef"]);
    assert!(
        missing.stderr.contains("etcdserver: member not found"),
        "{missing:?}"
    );
    let s0 = member_id(&servers[0]);
    let voter = etcdctl::run(&all, &["member", "promote", &format!("{s0:x}")]);
    assert!(
        voter
            .stderr
            .contains("etcdserver: can only promote a learner member"),
        "{voter:?}"
    );

    // Add a learner through a follower (the call is forwarded to the leader); etcdctl prints
    // the flags the new member starts with.
    let leader = leader_id(&servers[0]);
    let follower = servers.iter().find(|s| member_id(s) != leader).unwrap();
    let added = follower.etcdctl(&[
        "member",
        "add",
        "s3",
        "--learner",
        &format!("--peer-urls={}", ports[3].peer_url()),
    ]);
    assert!(added.ok, "{added:?}");
    let new_id = u64::from_str_radix(
        added
            .stdout
            .split_whitespace()
            .nth(1)
            .expect("Member ID added to cluster ..."),
        16,
    )
    .unwrap();
    let line = added
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER="))
        .expect("ETCD_INITIAL_CLUSTER line");
    let joined_initial = line.trim_matches('"').to_string();
    assert!(
        added
            .stdout
            .contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{added:?}"
    );
    let second = etcdctl::run(
        &all,
        &[
            "member",
            "add",
            "s4",
            "--learner",
            "--peer-urls=http://127.0.0.1:1",
        ],
    );
    assert!(
        second
            .stderr
            .contains("etcdserver: too many learner members in cluster"),
        "{second:?}"
    );
    for s in &servers {
        let ms = member_list(&s.endpoint());
        assert_eq!(ms.len(), 4, "{ms:?}");
        assert!(ms.contains(&(new_id, String::new(), true)), "{ms:?}");
    }

    // The new member joins with `existing`, learns the membership from a running member and
    // catches up by log.
    let args = member_args("s3", &ports[3], &joined_initial, "existing");
    let mut joiner = Server::spawn_on(Kind::Spindle, ports[3], &args);
    joiner.wait_ready();
    servers.push(joiner);
    assert_eq!(member_id(&servers[3]), new_id);
    wait_value(&servers[3].endpoint(), "k/0", "before");
    let status = servers[3].etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(status.stdout.contains("\"isLearner\":true"), "{status:?}");

    until_ok(&all, &["member", "promote", &format!("{new_id:x}")], 20);
    for s in &servers {
        let ms = member_list(&s.endpoint());
        assert!(ms.contains(&(new_id, "s3".into(), false)), "{ms:?}");
    }
    let four = format!("{all},{}", servers[3].endpoint());
    until_ok(&four, &["put", "k/1", "four"], 15);
    wait_value(&servers[3].endpoint(), "k/1", "four");

    // MemberUpdate: another member's URL is refused; its own URLs are accepted.
    let clash = etcdctl::run(
        &four,
        &[
            "member",
            "update",
            &format!("{new_id:x}"),
            &format!("--peer-urls={}", ports[1].peer_url()),
        ],
    );
    assert!(
        clash
            .stderr
            .contains("etcdserver: Peer URLs already exists"),
        "{clash:?}"
    );
    until_ok(
        &four,
        &[
            "member",
            "update",
            &format!("{new_id:x}"),
            &format!("--peer-urls={}", ports[3].peer_url()),
        ],
        10,
    );

    // Remove a follower, then the leader: each stops by itself, the rest keep serving.
    let leader = leader_id(&servers[0]);
    let victim = (0..4)
        .find(|&i| member_id(&servers[i]) != leader && i != 3)
        .unwrap();
    let vid = member_id(&servers[victim]);
    until_ok(&four, &["member", "remove", &format!("{vid:x}")], 10);
    let status = servers[victim].wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "a removed member exits with an error");
    assert!(
        servers[victim]
            .log()
            .contains("the member has been permanently removed from the cluster"),
        "{}",
        servers[victim].log_tail(20)
    );
    let live: Vec<usize> = (0..4).filter(|&i| i != victim).collect();
    let eps: Vec<String> = live.iter().map(|&i| servers[i].endpoint()).collect();
    let eps = eps.join(",");
    until_ok(&eps, &["put", "k/2", "three"], 15);
    let lid = leader_id(&servers[live[0]]);
    let li = *live
        .iter()
        .find(|&&i| member_id(&servers[i]) == lid)
        .unwrap();
    until_ok(&eps, &["member", "remove", &format!("{lid:x}")], 10);
    servers[li].wait_exit(Duration::from_secs(10));
    let rest: Vec<usize> = live.iter().copied().filter(|&i| i != li).collect();
    let eps: Vec<String> = rest.iter().map(|&i| servers[i].endpoint()).collect();
    let eps = eps.join(",");
    until_ok(&eps, &["put", "k/3", "two"], 20);
    for &i in &rest {
        let ms = member_list(&servers[i].endpoint());
        assert_eq!(ms.len(), 2, "{ms:?}");
        wait_value(&servers[i].endpoint(), "k/3", "two");
        assert_eq!(get(&servers[i].endpoint(), "k/0", true), "before");
    }
    // A survivor restarts from its data dir with the membership it applied.
    servers[rest[0]].kill();
    servers[rest[0]].restart();
    until_ok(&eps, &["put", "k/4", "again"], 20);
    wait_value(&servers[rest[0]].endpoint(), "k/4", "again");
}

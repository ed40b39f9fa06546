//! A multi-shard write its leader dies in the middle of: one participant's part is committed,
//! the other's was never logged. The members that remain must not show the committed half: the
//! new leader decides the write aborted (a participant whose whole log it leads lacks its part)
//! and every member skips the half it holds, the restarted old leader included.
//!
//! The leader's death comes from a fault point (`SPINDLE_FAULT=crash-before-last-part`, read
//! from the environment), which this test binary arms for its own servers.

mod common;

use std::time::{Duration, Instant};

use common::etcdctl;
use common::server::{Ports, Server};

const DIRS: usize = 8;

fn member_status(s: &Server) -> Option<(u64, u64)> {
    let out = etcdctl::run(&s.endpoint(), &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    let st = &v[0]["Status"];
    Some((st["header"]["member_id"].as_u64()?, st["leader"].as_u64()?))
}

/// Index of the member every live member names as leader.
fn leader(servers: &[Server], alive: &[bool]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st: Vec<(usize, (u64, u64))> = (0..servers.len())
            .filter(|&i| alive[i])
            .filter_map(|i| Some((i, member_status(&servers[i])?)))
            .collect();
        let live = alive.iter().filter(|a| **a).count();
        if st.len() == live && st.iter().all(|(_, s)| s.1 != 0 && s.1 == st[0].1 .1) {
            if let Some((i, _)) = st.iter().find(|(_, s)| s.0 == s.1) {
                return *i;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `d*/k` keys member `s` serves from its own state.
fn doomed_keys(s: &Server) -> Vec<String> {
    let out = etcdctl::run(
        &s.endpoint(),
        &["get", "d", "--prefix", "--keys-only", "--consistency=s"],
    );
    assert!(out.ok, "{}", out.stderr);
    out.stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn txn(endpoint: &str, ops: &str) -> etcdctl::Ctl {
    // No compares, the puts as the success branch, no failure branch.
    etcdctl::run_with_input(endpoint, &["txn"], &format!("\n{ops}\n\n\n"))
}

#[test]
fn a_half_committed_multi_shard_write_is_aborted_on_every_member() {
    // This binary holds this one test, so the fault reaches only its servers.
    std::env::set_var("SPINDLE_FAULT", "crash-before-last-part");
    let mut servers = common::cluster::start_spindle("s", "indoubt-test", &Ports::free(3), &[]);
    let mut alive = vec![true; 3];
    let l = leader(&servers, &alive);
    assert!(etcdctl::run(&servers[l].endpoint(), &["put", "before", "1"]).ok);

    // Keys in eight directories: both shards take part.
    let ops: Vec<String> = (0..DIRS).map(|d| format!("put d{d}/k doomed")).collect();
    let out = txn(&servers[l].endpoint(), &ops.join("\n"));
    assert!(
        !out.ok,
        "the leader died in the middle of the write: {out:?}"
    );
    let status = servers[l].wait_exit(Duration::from_secs(10));
    assert!(
        !status.success(),
        "the fault point aborted the leader: {out:?}"
    );
    alive[l] = false;

    // The two others elect a leader, which decides the write aborted; writes go on.
    let deadline = Instant::now() + Duration::from_secs(20);
    let all: Vec<String> = (0..3)
        .filter(|&i| alive[i])
        .map(|i| servers[i].endpoint())
        .collect();
    let all = all.join(",");
    while !etcdctl::run(&all, &["put", "after", "1"]).ok {
        assert!(
            Instant::now() < deadline,
            "the survivors never took writes again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in (0..3).filter(|&i| alive[i]) {
        assert_eq!(doomed_keys(&servers[i]), Vec::<String>::new(), "member {i}");
    }

    // The old leader comes back, replays the half it logged, and skips it too.
    servers[l].restart();
    alive[l] = true;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = etcdctl::run(
            &servers[l].endpoint(),
            &["get", "after", "--consistency=s", "--print-value-only"],
        );
        if got.stdout.trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "the old leader never caught up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(doomed_keys(&servers[l]), Vec::<String>::new());
    std::env::remove_var("SPINDLE_FAULT");
}

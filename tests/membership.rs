//! Operating a cluster of `spindle serve` processes with etcdctl, as an operator would: add a
//! learner, start it with `--initial-cluster-state existing`, promote it once it caught up,
//! update and remove members (a removed member stops by itself), with etcd's errors for changes
//! the cluster must refuse (compared with a real etcd cluster); and a rolling restart under a
//! writer.

mod common;

use std::time::{Duration, Instant};

use common::server::{Kind, Ports, Server};
use common::{cluster, etcdctl};

const TOKEN: &str = "membership-test";

fn member_args(name: &str, p: &Ports, initial: &str, state: &str) -> Vec<String> {
    let peer = p.peer_url();
    cluster::spindle_member(name, initial, state, TOKEN, &peer, &peer)
}

/// `--initial-cluster` for members `s0..` on `ports`.
fn initial_of(ports: &[Ports]) -> String {
    let urls: Vec<String> = ports.iter().map(Ports::peer_url).collect();
    cluster::initial_cluster("s", &urls)
}

/// The `--initial-cluster` a new member starts with, as `etcdctl member add` prints it.
fn joiner_initial_cluster(added: &etcdctl::Ctl) -> String {
    added
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER="))
        .expect("ETCD_INITIAL_CLUSTER line")
        .trim_matches('"')
        .to_string()
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

/// `member remove id`, retried like [`until_ok`]. A removal is not idempotent: an attempt whose
/// answer was lost (the removed member was the one answering, or leadership moved) may have
/// taken effect, and the retry then gets `member not found`. That counts only after a failed
/// attempt, and only if the member list no longer has the member.
fn remove_member(endpoint: &str, id: u64, secs: u64) {
    let hex = format!("{id:x}");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut failed_before = None;
    loop {
        let out = etcdctl::run(endpoint, &["member", "remove", &hex]);
        if out.ok {
            return;
        }
        if failed_before.is_some() && out.stderr.contains("etcdserver: member not found") {
            let listed = member_list(endpoint);
            assert!(
                listed.iter().all(|(m, _, _)| *m != id),
                "member {hex} reported missing but still listed: {listed:?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "member remove {hex}: {out:?} (earlier: {failed_before:?})"
        );
        failed_before = Some(out);
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
    let mut servers = cluster::start_spindle("s", TOKEN, &ports[..3], &[]);
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
    let joined_initial = joiner_initial_cluster(&added);
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
    // As etcd's, a learner serves only Status and serializable reads.
    let refused = servers[3].etcdctl(&["put", "k/learner", "x"]);
    assert!(
        refused
            .stderr
            .contains("etcdserver: rpc not supported for learner"),
        "{refused:?}"
    );

    until_ok(&all, &["member", "promote", &format!("{new_id:x}")], 20);
    // The joiner publishes its name through the log once it runs, and every member applies that
    // record in its own time: it may come after the promotion.
    for s in &servers {
        let endpoint = s.endpoint();
        common::wait_for(&format!("s3 promoted and named on {endpoint}"), 20, || {
            member_list(&endpoint).contains(&(new_id, "s3".into(), false))
        });
    }
    let four = format!("{all},{}", servers[3].endpoint());
    until_ok(&four, &["put", "k/1", "four"], 15);
    wait_value(&servers[3].endpoint(), "k/1", "four");
    // The JSON gateway of a follower forwards writes and linearizable reads to the leader.
    let leader = leader_id(&servers[0]);
    let f = servers.iter().find(|s| member_id(s) != leader).unwrap();
    let port: u16 = f.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    // "gw" and "via-gateway" in base64.
    let put = common::http::post(
        port,
        "/v3/kv/put",
        r#"{"key":"Z3c=","value":"dmlhLWdhdGV3YXk="}"#,
    );
    assert!(put.contains("\"revision\""), "{put}");
    let got = common::http::post(port, "/v3/kv/range", r#"{"key":"Z3c="}"#);
    assert!(got.contains("dmlhLWdhdGV3YXk="), "{got}");

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
    // Asked through the member it removes, the removal is answered before that member stops.
    let own = etcdctl::run(
        &servers[victim].endpoint(),
        &["member", "remove", &format!("{vid:x}")],
    );
    assert!(
        own.ok && own.stdout.contains("removed from cluster"),
        "{own:?}"
    );
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
    remove_member(&eps, lid, 10);
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
    // Two members down to one: every group needs both votes to drop the second, which works
    // because the data groups drop it before shard 0 takes it off the peer tables.
    let (last, gone) = (rest[0], rest[1]);
    let gid = member_id(&servers[gone]);
    remove_member(&eps, gid, 20);
    servers[gone].wait_exit(Duration::from_secs(10));
    let one = servers[last].endpoint();
    until_ok(&one, &["put", "k/5", "alone"], 20);
    assert_eq!(get(&one, "k/5", false), "alone");
    assert_eq!(member_list(&one).len(), 1);
}

/// Three members of `kind` bootstrapped together, ready to serve.
fn cluster_of(kind: Kind, ports: &[Ports]) -> Vec<Server> {
    let initial = initial_of(ports);
    let mut servers: Vec<Server> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = format!("s{i}");
            let args = match kind {
                Kind::Spindle => member_args(&name, p, &initial, "new"),
                Kind::Etcd => cluster::flags(&name, &initial, "new", TOKEN),
            };
            Server::spawn_on(kind, *p, &args)
        })
        .collect();
    for s in &mut servers {
        s.wait_ready();
    }
    servers
}

/// etcdctl's output with the run's ids and ports replaced by placeholders, so two clusters'
/// answers compare equal when they behave alike.
fn normalize(text: &str, ids: &[(u64, &str)], ports: &[(u16, &str)]) -> String {
    // etcdctl logs retries as JSON lines (timestamps, client ids) and pads ids to 16 columns.
    let mut t = text
        .lines()
        .filter(|l| !l.starts_with('{'))
        // Health checks time their proposal.
        .map(|l| l.split_once(": took =").map_or(l, |(head, _)| head))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n");
    for (id, name) in ids.iter().filter(|(id, _)| *id != 0) {
        t = t.replace(&format!("{id:x}"), &format!("<{name}>"));
    }
    for (port, name) in ports {
        t = t.replace(&port.to_string(), &format!("<{name}>"));
    }
    // Members come in id order, and ids differ between the two clusters.
    let mut lines: Vec<String> = t
        .lines()
        .map(|l| match l.strip_prefix("ETCD_INITIAL_CLUSTER=") {
            Some(v) => {
                let mut parts: Vec<&str> = v.trim_matches('"').split(',').collect();
                parts.sort_unstable();
                format!("ETCD_INITIAL_CLUSTER=\"{}\"", parts.join(","))
            }
            None => l.to_string(),
        })
        .collect();
    if lines
        .iter()
        .all(|l| l.starts_with('<') || l.starts_with("http"))
    {
        lines.sort();
    }
    lines.join("\n")
}

/// The same membership session against a running cluster: what etcdctl printed for each step
/// (exit status and output, ids and ports normalized).
fn membership_session(servers: &mut [Server], ports: &[Ports], spare: &Ports) -> Vec<String> {
    let all: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    let all = all.join(",");
    until_ok(&all, &["put", "k", "v"], 20);
    // etcd refuses changes until its peers have been connected for its health interval (5 s).
    std::thread::sleep(Duration::from_secs(6));
    let ids: Vec<u64> = servers.iter().map(member_id).collect();
    let cluster_id = {
        let st = etcdctl::run(&all, &["member", "list", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap_or_default();
        v["header"]["cluster_id"].as_u64().unwrap_or(0)
    };
    let mut names: Vec<(u64, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, format!("s{i}")))
        .collect();
    names.push((cluster_id, "cluster".into()));
    let mut port_names: Vec<(u16, String)> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        port_names.push((p.client, format!("client{i}")));
        port_names.push((p.peer, format!("peer{i}")));
    }
    port_names.push((spare.peer, "spare".into()));
    let out = std::cell::RefCell::new(Vec::new());
    let step = |label: &str, args: &[&str], names: &[(u64, String)]| -> etcdctl::Ctl {
        let r = etcdctl::run(&all, args);
        let ids: Vec<(u64, &str)> = names.iter().map(|(i, n)| (*i, n.as_str())).collect();
        let ports: Vec<(u16, &str)> = port_names.iter().map(|(p, n)| (*p, n.as_str())).collect();
        let text = if r.ok { &r.stdout } else { &r.stderr };
        // etcdctl prefixes errors with a timestamp; keep the message.
        let text = text
            .lines()
            .map(|l| l.split_once("Error: ").map_or(l, |(_, m)| m))
            .collect::<Vec<_>>()
            .join("\n");
        out.borrow_mut().push(format!(
            "{label}: ok={} {}",
            r.ok,
            normalize(text.trim(), &ids, &ports)
        ));
        r
    };
    let s0 = format!("{:x}", ids[0]);
    step("health", &["endpoint", "health", "--cluster"], &names);
    let st = etcdctl::run(
        &servers[0].endpoint(),
        &["endpoint", "status", "--cluster", "-w", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap_or_default();
    let statuses = v.as_array().cloned().unwrap_or_default();
    let leaders: Vec<u64> = statuses
        .iter()
        .map(|e| e["Status"]["leader"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(leaders.len(), 3, "{st:?}");
    out.borrow_mut().push(format!(
        "status --cluster: {} endpoints, one leader among them: {}, learners: {:?}, terms and indexes set: {}",
        statuses.len(),
        leaders.windows(2).all(|w| w[0] == w[1]) && ids.contains(&leaders[0]),
        statuses
            .iter()
            .map(|e| e["Status"]["isLearner"].as_bool().unwrap_or(false))
            .collect::<Vec<_>>(),
        statuses.iter().all(|e| e["Status"]["raft_term"].as_u64().unwrap_or(0) > 0
            && e["Status"]["raft_index"].as_u64().unwrap_or(0) > 0),
    ));
    step(
        "add a taken peer URL",
        &[
            "member",
            "add",
            "x",
            &format!("--peer-urls={}", ports[0].peer_url()),
        ],
        &names,
    );
    step(
        "remove an unknown id",
        &["member", "remove", "abcdef"],
        &names,
    );
    step("promote a voter", &["member", "promote", &s0], &names);
    step(
        "update to a taken URL",
        &[
            "member",
            "update",
            &s0,
            &format!("--peer-urls={}", ports[1].peer_url()),
        ],
        &names,
    );
    step(
        "update an unknown id",
        &[
            "member",
            "update",
            "abcdef",
            "--peer-urls=http://127.0.0.1:1",
        ],
        &names,
    );
    let added = step(
        "add a learner",
        &[
            "member",
            "add",
            "s3",
            "--learner",
            &format!("--peer-urls={}", spare.peer_url()),
        ],
        &[],
    );
    let new_id = added
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    assert_ne!(new_id, 0, "{added:?}");
    names.push((new_id, "s3".into()));
    // The "added" line names the new id and the cluster id; normalize them after the fact.
    if let Some(last) = out.borrow_mut().last_mut() {
        *last = last
            .replace(&format!("{new_id:x}"), "<s3>")
            .replace(&format!("{cluster_id:x}"), "<cluster>");
    }
    step(
        "add a second learner",
        &[
            "member",
            "add",
            "s4",
            "--learner",
            "--peer-urls=http://127.0.0.1:2",
        ],
        &names,
    );
    step(
        "promote a learner that never started",
        &["member", "promote", &format!("{new_id:x}")],
        &names,
    );
    step("list", &["member", "list"], &names);
    step(
        "remove the learner",
        &["member", "remove", &format!("{new_id:x}")],
        &names,
    );
    names.pop();
    step("list again", &["member", "list"], &names);
    step(
        "move-leader to an unknown id",
        &["move-leader", "abcdef"],
        &names,
    );
    // One voter down: adding a voter is refused, removing the down one is allowed.
    servers[2].kill();
    std::thread::sleep(Duration::from_secs(6));
    step(
        "add a voter with a member down",
        &["member", "add", "s5", "--peer-urls=http://127.0.0.1:3"],
        &names,
    );
    step(
        "remove the member that is down",
        &["member", "remove", &format!("{:x}", ids[2])],
        &names,
    );
    names.retain(|(id, _)| *id != ids[2]);
    step("list with two", &["member", "list"], &names);
    out.into_inner()
}

#[test]
fn membership_calls_answer_as_etcds_do() {
    // Separate ports: the first cluster's peer ports linger in TIME_WAIT.
    let ports = Ports::free(8);
    let mut etcd = cluster_of(Kind::Etcd, &ports[..3]);
    let want = membership_session(&mut etcd, &ports[..3], &ports[3]);
    drop(etcd);
    let mut ours = cluster_of(Kind::Spindle, &ports[4..7]);
    let got = membership_session(&mut ours, &ports[4..7], &ports[7]);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(
            g,
            w,
            "\n--- spindle ---\n{}\n--- etcd ---\n{}",
            got.join("\n"),
            want.join("\n")
        );
    }
    assert_eq!(got.len(), want.len());
}

#[test]
fn rolling_restart_under_a_writer_keeps_every_acknowledged_write() {
    let ports = Ports::free(3);
    let mut servers = cluster_of(Kind::Spindle, &ports);
    let all: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    let all = all.join(",");
    until_ok(&all, &["put", "warm", "up"], 15);
    // A writer puts numbered keys through every member in turn and records what was
    // acknowledged; failures during a restart are allowed, losses are not.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let eps: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("r/{i:05}");
                let ep = &eps[i as usize % eps.len()];
                if etcdctl::run(ep, &["--command-timeout=3s", "put", &key, "v"]).ok {
                    acked.push(key);
                }
                i += 1;
            }
            acked
        })
    };
    for (i, server) in servers.iter_mut().enumerate() {
        std::thread::sleep(Duration::from_millis(500));
        let status = server.terminate();
        assert!(status.success(), "{status}");
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
        // The cluster takes writes again before the next member goes down.
        until_ok(&all, &["put", &format!("after/{i}"), "v"], 20);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(
        acked.len() > 10,
        "the writer got {} writes through",
        acked.len()
    );
    for s in &servers {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = s.etcdctl(&["get", "r/", "--prefix", "--keys-only", "--consistency=s"]);
            let have: std::collections::BTreeSet<&str> =
                out.stdout.lines().filter(|l| !l.is_empty()).collect();
            let missing: Vec<&String> = acked
                .iter()
                .filter(|k| !have.contains(k.as_str()))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} lost {} acknowledged writes, e.g. {:?}",
                s.endpoint(),
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A member added after the leader compacted its log (`--snapshot-count`) cannot catch up by
/// log: it installs every shard's checkpoint, shard 0's with the membership, and then serves
/// what was written before, leases included, and follows new writes.
#[test]
fn a_member_added_after_compaction_catches_up_by_snapshot() {
    let ports = Ports::free(4);
    let with_count = |mut args: Vec<String>| {
        args.extend(["--snapshot-count", "50"].map(String::from));
        args
    };
    let mut servers = cluster::start_spindle("s", TOKEN, &ports[..3], &["--snapshot-count", "50"]);
    let all: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    let all = all.join(",");
    until_ok(&all, &["put", "k/0", "v0"], 15);
    let lease = until_ok(&all, &["lease", "grant", "600"], 10);
    let lease_id = lease
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("lease <id> granted with TTL(600s)")
        .to_string();
    until_ok(&all, &["put", "leased", "yes", "--lease", &lease_id], 10);
    // Several checkpoints' worth of writes on every shard.
    for i in 1..300 {
        let out = etcdctl::run(&all, &["put", &format!("k/{i}"), &format!("v{i}")]);
        assert!(out.ok, "{out:?}");
    }

    let added = etcdctl::run(
        &all,
        &[
            "member",
            "add",
            "s3",
            "--learner",
            &format!("--peer-urls={}", ports[3].peer_url()),
        ],
    );
    assert!(added.ok, "{added:?}");
    let joined_initial = joiner_initial_cluster(&added);
    let args = with_count(member_args("s3", &ports[3], &joined_initial, "existing"));
    let mut joiner = Server::spawn_on(Kind::Spindle, ports[3], &args);
    joiner.wait_ready();
    let ep = joiner.endpoint();
    wait_value(&ep, "k/299", "v299");
    wait_value(&ep, "k/0", "v0");
    // The leased key may live on another shard, which catches up on its own.
    let want_lease = format!("\"lease\":{}", i64::from_str_radix(&lease_id, 16).unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leased = joiner.etcdctl(&["get", "leased", "--consistency=s", "-w", "json"]);
        if leased.stdout.contains(&want_lease) {
            break;
        }
        assert!(Instant::now() < deadline, "{leased:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = joiner.log();
    assert!(
        log.contains("installed the leader's checkpoint"),
        "the new member caught up by snapshot: {log}"
    );
    let ms = member_list(&servers[0].endpoint());
    assert_eq!(ms.len(), 4, "{ms:?}");

    // Promoted, it is a voter that follows new writes.
    let new_id = member_id(&joiner);
    servers.push(joiner);
    until_ok(&all, &["member", "promote", &format!("{new_id:x}")], 20);
    until_ok(&all, &["put", "k/after", "promoted"], 10);
    wait_value(&servers[3].endpoint(), "k/after", "promoted");
}

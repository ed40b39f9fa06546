//! Three embedded cluster members in one process, talking over 127.0.0.1: elections, writes
//! through the node that leads every shard, followers applying them, failover when the leader
//! goes away, and a returning member catching up from the log. Ids are checked against a real
//! etcd started with the same flags.

mod common;

use common::etcdctl;
use common::process::free_ports;
use common::proxy::{Mode, Proxy};
use common::server::{Ports, Server};

use std::time::{Duration, Instant};

use spindle::db::ClusterOptions;
use spindle::kv::{PutRequest, RangeRequest};
use spindle::{Db, Error, Options};

struct Member {
    name: String,
    dir: tempfile::TempDir,
    opts: Options,
    db: Option<Db>,
}

/// `--initial-cluster` for members `{prefix}0..` on 127.0.0.1 peer `ports`.
fn initial_cluster(prefix: &str, ports: &[u16]) -> String {
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    common::cluster::initial_cluster(prefix, &urls)
}

fn members(n: usize) -> Vec<Member> {
    members_via(&free_ports(n))
}

/// Members listening for peers on `listen` ports; each advertises `advertise[i]` (a proxy in
/// front of it, or the port itself).
fn members_advertising(listen: &[u16], advertise: &[u16]) -> Vec<Member> {
    // RUST_LOG=spindle=info shows the members' elections, rebuilds and peer errors.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let initial = initial_cluster("m", advertise);
    listen
        .iter()
        .zip(advertise)
        .enumerate()
        .map(|(i, (l, a))| {
            let opts = Options {
                cluster: Some(ClusterOptions {
                    name: format!("m{i}"),
                    initial_cluster: initial.clone(),
                    token: "cluster-test".into(),
                    new_cluster: true,
                    advertise_peer_urls: vec![format!("http://127.0.0.1:{a}")],
                    listen_peer: format!("127.0.0.1:{l}"),
                    heartbeat: Duration::from_millis(20),
                    election: Duration::from_millis(200),
                    client_urls: Vec::new(),
                    ..ClusterOptions::default()
                }),
                ..common::db::opts(1, 2)
            };
            Member {
                name: format!("m{i}"),
                dir: tempfile::tempdir().unwrap(),
                opts,
                db: None,
            }
        })
        .collect()
}

fn members_via(ports: &[u16]) -> Vec<Member> {
    members_advertising(ports, ports)
}

impl Member {
    fn open(&mut self) {
        self.db = Some(Db::open(self.dir.path(), self.opts.clone()).unwrap());
    }
    fn db(&self) -> &Db {
        self.db.as_ref().unwrap()
    }
}

/// Closes every member still open.
fn close_all(ms: &mut [Member]) {
    for m in ms.iter_mut() {
        if let Some(db) = m.db.take() {
            db.close();
        }
    }
}

/// Puts through whichever member accepts it; returns (member index, revision). Members that do
/// not lead every shard refuse with etcd's leadership errors, never anything else; a new leader
/// that cannot commit in time (a loaded machine) says `request timed out`, and the put is
/// retried like a client would (same key, same value: the outcome does not depend on whether
/// the timed-out attempt took effect).
fn put(ms: &[Member], key: &str, value: &str) -> (usize, i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (i, m) in ms.iter().enumerate() {
            let Some(db) = &m.db else { continue };
            match db.put(PutRequest::new(key.to_string(), value.to_string())) {
                Ok(r) => return (i, r.header.revision),
                Err(Error::NoLeader | Error::NotLeader | Error::LeaderChanged | Error::Timeout) => {
                }
                Err(e) => panic!("{}: unexpected error {e}", m.name),
            }
        }
        assert!(Instant::now() < deadline, "no member accepted a write");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every key under `k/` with its value and mod revision, as member `m` serves it.
fn dump(m: &Member) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    let r = m.db().range(RangeRequest::range("k/", "k0")).unwrap();
    r.kvs
        .into_iter()
        .map(|kv| (kv.key.to_vec(), kv.value.to_vec(), kv.mod_revision))
        .collect()
}

fn converge(ms: &[Member], want: usize) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let views: Vec<_> = ms.iter().filter(|m| m.db.is_some()).map(dump).collect();
        if views.iter().all(|v| v.len() == want && *v == views[0]) {
            return views[0].clone();
        }
        if Instant::now() >= deadline {
            for m in ms.iter().filter(|m| m.db.is_some()) {
                eprintln!(
                    "{}: {:?} term {}",
                    m.name,
                    m.db().status(),
                    m.db().raft_term()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge on {want} keys: {:?}",
            views.iter().map(Vec::len).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn three_members_replicate_fail_over_and_catch_up() {
    let mut ms = members(3);
    for m in &mut ms {
        m.open();
    }
    let ids: Vec<_> = ms.iter().map(|m| m.db().identity()).collect();
    assert!(ids.iter().all(|(c, _)| *c == ids[0].0), "one cluster id");

    let mut last_rev = 0;
    let mut leader = 0;
    for i in 0..30 {
        let (who, rev) = put(&ms, &format!("k/{i:02}"), &format!("v{i}"));
        assert!(rev > last_rev, "revisions grow: {rev} after {last_rev}");
        last_rev = rev;
        leader = who;
    }
    let first = converge(&ms, 30);

    // The leader goes away; the two others elect and keep accepting writes.
    ms[leader].db.take().unwrap().close();
    for i in 30..60 {
        let (who, rev) = put(&ms, &format!("k/{i:02}"), &format!("v{i}"));
        assert_ne!(who, leader);
        assert!(
            rev > last_rev,
            "no revision reused after failover: {rev} after {last_rev}"
        );
        last_rev = rev;
    }
    let after = converge(&ms, 60);
    assert_eq!(
        &after[..30],
        &first[..],
        "acknowledged writes survive the failover"
    );

    // The old leader comes back and catches up from the others' logs.
    ms[leader].open();
    let all = converge(&ms, 60);
    assert_eq!(all, after);
    close_all(&mut ms);
}

#[test]
fn member_and_cluster_ids_match_etcds() {
    let ports = free_ports(4);
    let initial = initial_cluster("n", &ports[..3]);
    let (ours, me) = spindle::cluster::Membership::bootstrap(
        &initial,
        "id-check",
        "n0",
        &[format!("http://127.0.0.1:{}", ports[0])],
    )
    .unwrap();
    // One etcd member of that cluster logs every member's id and the cluster id at start.
    let client = ports[3];
    let data = tempfile::tempdir().unwrap();
    let peer = format!("http://127.0.0.1:{}", ports[0]);
    let client_url = format!("http://127.0.0.1:{client}");
    let mut etcd = common::process::Kill::new(
        std::process::Command::new("etcd")
            .args(["--name", "n0", "--data-dir"])
            .arg(data.path().join("etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "id-check"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start etcd"),
    );
    let stderr = etcd.child().stderr.take().unwrap();
    let (tx, rx) = flume::unbounded();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let want_cluster = format!("{:x}", ours.cluster_id);
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ours
        .members
        .keys()
        .all(|id| log.contains(&format!("added member {id:x}")))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => panic!("etcd did not log its members:\n{log}"),
        }
    }
    drop(etcd);
    assert!(
        log.contains(&format!("starting member {me:x} in cluster {want_cluster}")),
        "{log}"
    );
    for (id, m) in &ours.members {
        assert!(
            log.contains(&format!(
                "added member {id:x} [{}] to cluster {want_cluster}",
                m.peer_urls[0]
            )),
            "member {} ({id:x}) not in etcd's log:\n{log}",
            m.name
        );
    }
}

/// Member index whose id every live member's Status names as leader.
fn process_leader(servers: &[Server], alive: &[bool]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let statuses: Vec<(u64, u64)> = servers
            .iter()
            .zip(alive)
            .filter(|(_, a)| **a)
            .filter_map(|(s, _)| {
                let out = etcdctl::run(&s.endpoint(), &["endpoint", "status", "-w", "json"]);
                let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
                let st = &v[0]["Status"];
                Some((st["header"]["member_id"].as_u64()?, st["leader"].as_u64()?))
            })
            .collect();
        let live = alive.iter().filter(|a| **a).count();
        if statuses.len() == live && statuses.iter().all(|s| s.1 != 0 && s.1 == statuses[0].1) {
            if let Some(i) = statuses.iter().position(|s| s.0 == statuses[0].1) {
                let ids: Vec<usize> = (0..servers.len()).filter(|&i| alive[i]).collect();
                return ids[i];
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {statuses:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn keys_on(s: &Server) -> Vec<String> {
    let out = etcdctl::run(
        &s.endpoint(),
        &[
            "get",
            "k/",
            "--prefix",
            "--consistency=s",
            "--print-value-only",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    out.stdout.lines().map(str::to_string).collect()
}

fn wait_keys(s: &Server, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys_on(s) != want {
        assert!(
            Instant::now() < deadline,
            "{} has {:?}",
            s.name(),
            keys_on(s)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn spindle_serve_members_bootstrap_serve_etcdctl_and_survive_a_leader_kill() {
    let ports = Ports::free(3);
    let urls: Vec<String> = ports.iter().map(Ports::peer_url).collect();
    let initial = common::cluster::initial_cluster("s", &urls);
    let mut servers = common::cluster::start_spindle("s", "proc-test", &ports, &[]);
    let mut alive = vec![true; 3];

    // Every member lists the same three members, with the ids etcd derives from these flags.
    let (want, _) = spindle::cluster::Membership::bootstrap(
        &initial,
        "proc-test",
        "s0",
        &[ports[0].peer_url()],
    )
    .unwrap();
    for s in &servers {
        let out = etcdctl::run(&s.endpoint(), &["member", "list", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let mut ids: Vec<u64> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["ID"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, want.members.keys().copied().collect::<Vec<_>>());
        assert_eq!(v["header"]["cluster_id"].as_u64(), Some(want.cluster_id));
    }

    let l = process_leader(&servers, &alive);
    let mut values = Vec::new();
    // Through the leader, through a follower (which forwards), and through etcdctl's own pick
    // among all members.
    let all: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    let all = all.join(",");
    let follower = servers[(l + 1) % 3].endpoint();
    for i in 0..30 {
        let v = format!("v{i:02}");
        let ep = match i % 3 {
            0 => servers[l].endpoint(),
            1 => follower.clone(),
            _ => all.clone(),
        };
        let out = etcdctl::run(&ep, &["put", &format!("k/{i:02}"), &v]);
        assert!(out.ok, "put via {ep}: {}", out.stderr);
        values.push(v);
    }
    // A forwarded answer names the member that served the client, as etcd's headers do.
    let own = |ep: &str| {
        let out = etcdctl::run(ep, &["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v[0]["Status"]["header"]["member_id"].as_u64().unwrap()
    };
    let out = etcdctl::run(&follower, &["put", "hdr", "1", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect(&out.stderr);
    assert_eq!(v["header"]["member_id"].as_u64(), Some(own(&follower)));
    assert_ne!(own(&follower), own(&servers[l].endpoint()));
    // A linearizable read on a follower sees a write the leader just acknowledged.
    for i in 0..5 {
        let v = format!("lin{i}");
        assert!(etcdctl::run(&servers[l].endpoint(), &["put", "lin", &v]).ok);
        let got = etcdctl::run(&follower, &["get", "lin", "--print-value-only"]);
        assert_eq!(got.stdout.trim(), v, "{}", got.stderr);
    }
    // Leases through a follower: the grant is forwarded, keep-alives reach the leader's table.
    let out = etcdctl::run(&follower, &["lease", "grant", "60"]);
    assert!(out.ok, "{}", out.stderr);
    let id = out.stdout.split_whitespace().nth(1).unwrap().to_string();
    let ka = etcdctl::run(&follower, &["lease", "keep-alive", "--once", &id]);
    assert!(ka.ok && ka.stdout.contains("TTL(60)"), "{ka:?}");
    let ttl = etcdctl::run(&servers[l].endpoint(), &["lease", "timetolive", &id]);
    assert!(ttl.stdout.contains("granted with TTL(60s)"), "{ttl:?}");
    for s in &servers {
        wait_keys(s, &values);
    }

    // move-leader hands the cluster to another member (etcdctl finds the leader itself).
    let target = (l + 2) % 3;
    let status = etcdctl::run(
        &servers[target].endpoint(),
        &["endpoint", "status", "-w", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let tid = v[0]["Status"]["header"]["member_id"].as_u64().unwrap();
    let moved = etcdctl::run(&all, &["move-leader", &format!("{tid:x}")]);
    assert!(moved.ok, "{moved:?}");
    assert_eq!(process_leader(&servers, &alive), target);
    let bad = etcdctl::run(&all, &["move-leader", "abcdef"]);
    assert!(
        bad.stderr.contains("etcdserver: bad leader transferee"),
        "{bad:?}"
    );
    let l = target;
    let out = etcdctl::run(&follower, &["put", "k/29", "v29"]);
    assert!(out.ok, "{}", out.stderr);

    // kill -9 of the leader: the survivors elect a new one, which takes writes.
    servers[l].kill();
    alive[l] = false;
    let n = process_leader(&servers, &alive);
    assert_ne!(n, l);
    let survivor = (0..3).find(|&i| i != l && i != n).unwrap();
    for i in 30..50 {
        let v = format!("v{i:02}");
        let ep = if i % 2 == 0 { n } else { survivor };
        let out = etcdctl::run(&servers[ep].endpoint(), &["put", &format!("k/{i:02}"), &v]);
        assert!(out.ok, "{}", out.stderr);
        values.push(v);
    }
    for (s, _) in servers.iter().zip(&alive).filter(|(_, a)| **a) {
        wait_keys(s, &values);
    }
    // The killed member restarts from its data dir (ignoring the bootstrap flags) and catches up.
    servers[l].restart();
    wait_keys(&servers[l], &values);
}

#[test]
fn five_members_lose_two_and_keep_going() {
    let mut ms = members(5);
    for m in &mut ms {
        m.open();
    }
    let mut acked = 0;
    for i in 0..10 {
        put(&ms, &format!("k/{i:02}"), "a");
        acked += 1;
    }
    let (leader, _) = put(&ms, "k/10", "a");
    acked += 1;
    // The leader and one follower go: three of five still form a majority.
    let other = (leader + 1) % 5;
    ms[leader].db.take().unwrap().close();
    ms[other].db.take().unwrap().close();
    for i in 11..20 {
        put(&ms, &format!("k/{i:02}"), "b");
        acked += 1;
    }
    converge(&ms, acked);
    close_all(&mut ms);
}

#[test]
fn a_partitioned_leader_steps_down_the_majority_goes_on_and_healing_converges() {
    let listen = free_ports(3);
    let proxies: Vec<Proxy> = listen.iter().map(|&p| Proxy::start(p)).collect();
    let advertise: Vec<u16> = proxies.iter().map(|p| p.port).collect();
    let mut ms = members_advertising(&listen, &advertise);
    for m in &mut ms {
        m.open();
    }
    let mut acked = Vec::new();
    for i in 0..10 {
        let key = format!("k/{i:02}");
        put(&ms, &key, "before");
        acked.push(key);
    }
    let (l, _) = put(&ms, "k/10", "before");
    acked.push("k/10".to_string());

    // Nothing reaches the leader any more: it cannot commit, and steps down.
    proxies[l].set(Mode::Blackhole);
    let pending = ms[l].db().put(PutRequest::new(
        "k/pending".to_string(),
        "maybe".to_string(),
    ));
    assert!(
        matches!(
            pending,
            Err(Error::LeaderChanged | Error::NoLeader | Error::NotLeader | Error::Timeout)
        ),
        "a leader without a quorum acknowledged a write: {pending:?}"
    );
    // The majority elects and goes on.
    let majority: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut written = 0;
    while written < 10 {
        assert!(
            Instant::now() < deadline,
            "the majority did not take writes"
        );
        let key = format!("k/m{written:02}");
        let mut ok = false;
        for &i in &majority {
            if ms[i]
                .db()
                .put(PutRequest::new(key.clone(), "during".to_string()))
                .is_ok()
            {
                ok = true;
                break;
            }
        }
        if ok {
            acked.push(key);
            written += 1;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The minority refuses writes.
    let refused = ms[l]
        .db()
        .put(PutRequest::new("k/minority".to_string(), "no".to_string()));
    assert!(
        refused.is_err(),
        "the cut-off member took a write: {refused:?}"
    );

    // Heal (fresh connections): everyone converges on the same data, acknowledged writes in it.
    proxies[l].set(Mode::Drop);
    proxies[l].set(Mode::Pass);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let views: Vec<_> = ms.iter().map(dump).collect();
        let same = views.iter().all(|v| *v == views[0]);
        let keys: Vec<String> = views[0]
            .iter()
            .map(|(k, _, _)| String::from_utf8_lossy(k).to_string())
            .collect();
        if same && acked.iter().all(|k| keys.contains(k)) {
            assert!(!keys.contains(&"k/minority".to_string()));
            break;
        }
        assert!(Instant::now() < deadline, "no convergence after healing");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the healed member can lead writes again once it is elected, or forwards nothing
    // wrong meanwhile: a write through whichever member leads still works.
    put(&ms, "k/after", "healed");
    close_all(&mut ms);
}

/// Checkpoint files of every shard in member `m`'s data dir: (shard dir, index).
fn checkpoints(m: &Member) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(m.dir.path()).unwrap().flatten() {
        let name = shard.file_name().to_string_lossy().into_owned();
        if !name.starts_with("shard-") {
            continue;
        }
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let file = f.file_name().to_string_lossy().into_owned();
            if let Some(i) = file
                .strip_prefix("checkpoint-")
                .and_then(|s| s.strip_suffix(".ckpt"))
            {
                out.push((name.clone(), i.parse().unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_member_behind_the_leaders_checkpoints_catches_up_from_one() {
    let mut ms = members(3);
    for m in &mut ms {
        m.opts.checkpoint_every = 40;
        // Small segments (256 KiB): bursts of the leader's 8 KiB entries outrun them, and a
        // follower waits for the next segment in the middle of Raft's output.
        m.open();
    }
    for i in 0..10 {
        put(&ms, &format!("k/{i:03}"), &format!("v{i}"));
    }
    converge(&ms, 10);
    let (leader, _) = put(&ms, "k/010", "v10");
    let away = (leader + 1) % 3;
    ms[away].db.take().unwrap().close();
    let before = checkpoints(&ms[away]);

    // Enough writes that the leader checkpoints past what `away` holds, with values large
    // enough that the checkpoint travels in several chunks.
    let big = "x".repeat(8 << 10);
    for i in 11..400 {
        put(&ms, &format!("k/{i:03}"), &format!("v{i}{big}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !checkpoints(&ms[leader]).iter().any(|(_, i)| *i >= 200) {
        assert!(Instant::now() < deadline, "the leader wrote no checkpoints");
        std::thread::sleep(Duration::from_millis(20));
    }
    let want = converge(&ms, 400);

    // Back: it cannot catch up from the log alone, so it installs the leader's checkpoints.
    ms[away].open();
    assert_eq!(converge(&ms, 400), want);
    let after = checkpoints(&ms[away]);
    assert_ne!(
        after, before,
        "the returning member holds the leader's checkpoints"
    );

    // What it installed survives its own restart, and it keeps up with new writes.
    ms[away].db.take().unwrap().close();
    ms[away].open();
    for i in 400..420 {
        put(&ms, &format!("k/{i:03}"), &format!("v{i}"));
    }
    let want = converge(&ms, 420);

    // With the old leader gone, the member that caught up is part of the majority that goes on.
    let (leader, _) = put(&ms, "k/420", "v420");
    ms[leader].db.take().unwrap().close();
    put(&ms, "k/421", "v421");
    let now = converge(&ms, 422);
    assert_eq!(&now[..420], &want[..]);
    close_all(&mut ms);
}

/// Multi-shard txns (keys in several directories land on several shards): followers apply a
/// write's parts only once every part is committed, and never show half of one, through a
/// leader failover in the middle of a stream of them.
#[test]
fn multi_shard_writes_reach_followers_whole_across_a_failover() {
    use spindle::kv::{RequestOp, TxnRequest};
    let mut ms = members(3);
    for m in &mut ms {
        m.open();
    }
    let txn = |i: usize| TxnRequest {
        compare: vec![],
        success: ["a", "b", "c", "d"]
            .iter()
            .map(|d| RequestOp::Put(PutRequest::new(format!("{d}/{i:03}"), format!("{i}"))))
            .collect(),
        failure: vec![],
    };
    let write = |ms: &[Member], i: usize| -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (w, m) in ms.iter().enumerate() {
                let Some(db) = &m.db else { continue };
                match db.txn(txn(i)) {
                    Ok(_) => return w,
                    Err(Error::NoLeader | Error::NotLeader | Error::LeaderChanged) => {}
                    Err(e) => panic!("{}: unexpected error {e}", m.name),
                }
            }
            assert!(Instant::now() < deadline, "no member accepted txn {i}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Every member serves the four keys of each txn together, or none of them.
    let whole = |ms: &[Member], want: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut done = true;
            for m in ms.iter().filter(|m| m.db.is_some()) {
                let counts: Vec<usize> = ["a/", "b/", "c/", "d/"]
                    .iter()
                    .map(|d| {
                        let end = format!("{}0", &d[..1]);
                        m.db()
                            .range(RangeRequest::range(*d, end))
                            .unwrap()
                            .kvs
                            .len()
                    })
                    .collect();
                done &= counts.iter().all(|&c| c == want);
            }
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "members did not converge on {want} txns"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut leader = 0;
    for i in 0..20 {
        leader = write(&ms, i);
    }
    whole(&ms, 20);
    ms[leader].db.take().unwrap().close();
    for i in 20..40 {
        write(&ms, i);
    }
    whole(&ms, 40);
    ms[leader].open();
    whole(&ms, 40);
    close_all(&mut ms);
}

/// A follower applies each shard's log on its own schedule; its reads still never show half of
/// a multi-shard write. Every txn sets four keys on several shards to one value; a follower's
/// single range over all of them, serializable or linearizable, sees one value or none.
#[test]
fn a_follower_never_serves_half_of_a_multi_shard_write() {
    use spindle::kv::{RequestOp, TxnRequest};
    let mut ms = members(3);
    for m in &mut ms {
        m.open();
    }
    let (leader, _) = put(&ms, "k/leader", "found");
    let txn = |i: usize| TxnRequest {
        compare: vec![],
        success: ["a/0", "b/0", "c/0", "d/0"]
            .iter()
            .map(|k| RequestOp::Put(PutRequest::new(k.to_string(), i.to_string())))
            .collect(),
        failure: vec![],
    };
    ms[leader].db().txn(txn(0)).unwrap();
    let follower = (leader + 1) % 3;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (seen, torn) = std::thread::scope(|sc| {
        let reader = sc.spawn(|| {
            let mut seen = std::collections::BTreeSet::new();
            let mut torn = Vec::new();
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || n < 100 {
                n += 1;
                let mut req = RangeRequest::range("a/", "e");
                req.serializable = n % 2 == 0;
                let r = ms[follower].db().range(req).unwrap();
                let values: Vec<_> = r.kvs.iter().map(|kv| kv.value.to_vec()).collect();
                let whole = values.is_empty() || values.len() == 4;
                if !whole || values.windows(2).any(|w| w[0] != w[1]) {
                    torn.push((r.header.revision, values.clone()));
                }
                seen.extend(values);
            }
            (seen, torn)
        });
        for i in 1..=300 {
            ms[leader].db().txn(txn(i)).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().unwrap()
    });
    assert!(
        torn.is_empty(),
        "{} torn reads, first {:?}",
        torn.len(),
        torn.first()
    );
    assert!(seen.len() > 2, "the reader saw the writes go by: {seen:?}");
    close_all(&mut ms);
}

/// A member's store after a restart is each shard's own checkpoint, and shards checkpoint at
/// different revisions. Alone after the restart (no leader to catch up from), it must not read
/// at the newest of them: a multi-shard txn newer than one shard's checkpoint and older than
/// another's would show half.
#[test]
fn a_restarted_member_reads_only_what_every_shard_holds() {
    use spindle::kv::{RequestOp, TxnRequest};
    let mut ms = members(3);
    for m in &mut ms {
        m.opts.checkpoint_every = 20;
        m.open();
    }
    let dirs = ["a", "b", "c", "d"];
    for i in 0..30 {
        for d in dirs {
            put(&ms, &format!("{d}/pre{i:02}"), "p");
        }
    }
    let (leader, _) = put(&ms, "a/pre99", "p");
    let txn = TxnRequest {
        compare: vec![],
        success: dirs
            .iter()
            .map(|d| RequestOp::Put(PutRequest::new(format!("{d}/t"), "T".to_string())))
            .collect(),
        failure: vec![],
    };
    ms[leader].db().txn(txn).unwrap();
    // Only the shard of `a/` writes on: it checkpoints past the txn, the others stay before it.
    for i in 0..60 {
        put(&ms, &format!("a/pad{i:02}"), "x");
    }
    // Once the follower applied every pad, its next checkpoint of that shard (cut on a tick,
    // at least every 20 entries) covers the txn.
    let me = (leader + 1) % 3;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pads = ms[me].db().range(RangeRequest::range("a/pad", "a/pae"));
        if pads.is_ok_and(|r| r.kvs.len() == 60) {
            break;
        }
        assert!(Instant::now() < deadline, "m{me} did not apply the writes");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!checkpoints(&ms[me]).is_empty());
    close_all(&mut ms);
    ms[me].open();
    let mut req = RangeRequest::range("a/", "e");
    req.serializable = true;
    let r = ms[me].db().range(req).unwrap();
    let parts: Vec<_> = r
        .kvs
        .iter()
        .filter(|kv| kv.key.ends_with(b"/t"))
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert!(
        parts.is_empty() || parts.len() == 4,
        "half of a txn at revision {}: {parts:?}",
        r.header.revision
    );
    close_all(&mut ms);
}

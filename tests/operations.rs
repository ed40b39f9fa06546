//! Operating a server: the backend quota and alarms, side by side with etcd 3.4 (a small
//! `--quota-backend-bytes` filled until NOSPACE, the refusal (message and gRPC code), `alarm
//! list`, what is still served, compact + defrag shrinking `dbSize`, `alarm disarm`, writes
//! accepted again); in a three-member spindle cluster, an alarm raised through one member
//! refusing writes on every member and surviving a restart; a tampered member found by the
//! periodic and the initial corruption checks; and a data dir of a newer format refused
//! untouched.

mod common;

use std::time::{Duration, Instant};

use common::http::post;
use common::server::{Kind, Ports, Server};
use common::{cluster, etcdctl};

const QUOTA: &str = "2000000";
const VALUE_BYTES: usize = 64 * 1024;

fn status(s: &Server) -> serde_json::Value {
    let out = s.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(out.ok, "{}: {out:?}", s.name());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v[0]["Status"].clone()
}

fn member_id(s: &Server) -> u64 {
    status(s)["header"]["member_id"].as_u64().unwrap()
}

fn db_size(s: &Server) -> u64 {
    status(s)["dbSize"].as_u64().unwrap()
}

fn revision(s: &Server) -> u64 {
    status(s)["header"]["revision"].as_u64().unwrap()
}

/// `etcdctl` output with this member's id (decimal, as `alarm list` prints it) replaced by `ID`.
fn normalized(text: &str, id: u64) -> String {
    text.replace(&id.to_string(), "ID")
}

/// Puts `VALUE_BYTES` values until one is refused; returns how many fit and the refusal.
/// Other failures (a cluster still electing its leader) are retried for a while.
fn fill(s: &Server, value: &str) -> (usize, etcdctl::Ctl) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while i < 400 {
        let r = etcdctl::run_with_input(&s.endpoint(), &["put", &format!("k{i:04}")], value);
        if r.stderr.contains("database space exceeded") {
            return (i, r);
        }
        if r.ok {
            i += 1;
        } else {
            assert!(Instant::now() < deadline, "{}: {r:?}", s.name());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("{}: the quota was never reached", s.name());
}

/// The gateway's answer to a put (etcd's JSON error carries the gRPC code).
fn gateway_put(s: &Server) -> serde_json::Value {
    let resp = post(s.port, "/v3/kv/put", r#"{"key":"Z2F0ZQ==","value":"eA=="}"#);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body = body.trim_start_matches(|c: char| c.is_ascii_hexdigit() || c.is_whitespace());
    let end = body.rfind('}').map_or(0, |i| i + 1);
    serde_json::from_str(&body[..end]).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

/// Every step of the scenario, on one server; returns what must equal etcd's.
fn nospace_scenario(s: &Server) -> Vec<String> {
    let id = member_id(s);
    let mut seen = Vec::new();
    let value = "x".repeat(VALUE_BYTES);
    let (fitted, refused) = fill(s, &value);
    assert!(fitted > 3, "{}: only {fitted} values fit", s.name());
    seen.push(format!(
        "refusal: {:?}",
        etcdctl::error_lines(&refused.stderr)
    ));
    // The alarm is raised (through the log) shortly after the refusal.
    let deadline = Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let l = s.etcdctl(&["alarm", "list"]);
        assert!(l.ok, "{l:?}");
        if !l.stdout.is_empty() || Instant::now() > deadline {
            break l.stdout;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    seen.push(format!("alarm list: {}", normalized(&listed, id)));
    // Small writes that add data are refused too, with the gRPC code etcd uses.
    let small = s.etcdctl(&["put", "small", "v"]);
    seen.push(format!(
        "small put: {:?}",
        etcdctl::error_lines(&small.stderr)
    ));
    let g = gateway_put(s);
    seen.push(format!("gateway put: code {} {}", g["code"], g["message"]));
    let grant = s.etcdctl(&["lease", "grant", "60"]);
    seen.push(format!(
        "lease grant: {:?}",
        etcdctl::error_lines(&grant.stderr)
    ));
    let txn = etcdctl::run_with_input(&s.endpoint(), &["txn"], "\nput t v\n\n");
    seen.push(format!("txn put: {:?}", etcdctl::error_lines(&txn.stderr)));
    // Status lists the alarm among its errors.
    let st = post(s.port, "/v3/maintenance/status", "{}");
    let errors = st
        .split("\"errors\":")
        .nth(1)
        .and_then(|e| e.split(']').next())
        .unwrap_or_default();
    seen.push(format!("status errors: {}", normalized(errors, id)));
    // Reads, deletes, compaction and defragmentation are still served.
    let got = s.etcdctl(&["get", "k0000", "--print-value-only"]);
    seen.push(format!("get: {} {}", got.ok, got.stdout.trim() == value));
    let del = s.etcdctl(&["del", "--prefix", "k"]);
    seen.push(format!(
        "del: {} {}",
        del.ok,
        del.stdout.trim() == fitted.to_string()
    ));
    let before = db_size(s);
    let rev = revision(s).to_string();
    let compact = s.etcdctl(&["compact", &rev, "--physical"]);
    seen.push(format!("compact: {}", compact.ok));
    let defrag = s.etcdctl(&["defrag"]);
    seen.push(format!("defrag: {} {}", defrag.ok, defrag.stderr.trim()));
    let after = db_size(s);
    assert!(
        after < before,
        "{}: dbSize {before} -> {after} after compact + defrag",
        s.name()
    );
    // Still raised until disarmed.
    let still = s.etcdctl(&["put", "small", "v"]);
    seen.push(format!(
        "put before disarm: {:?}",
        etcdctl::error_lines(&still.stderr)
    ));
    let disarm = s.etcdctl(&["alarm", "disarm"]);
    seen.push(format!(
        "disarm: {} {}",
        disarm.ok,
        normalized(&disarm.stdout, id)
    ));
    let listed = s.etcdctl(&["alarm", "list"]);
    seen.push(format!("alarm list after disarm: {:?}", listed.stdout));
    let put = s.etcdctl(&["put", "small", "v"]);
    seen.push(format!(
        "put after disarm: {} {}",
        put.ok,
        put.stdout.trim()
    ));
    seen
}

#[test]
fn nospace_matches_etcd_side_by_side() {
    let flags = ["--quota-backend-bytes", QUOTA];
    let mut servers = [
        Server::spawn(Kind::Spindle, &flags),
        Server::spawn(Kind::Etcd, &flags),
    ];
    for s in &mut servers {
        s.wait_ready();
    }
    let [spindle, etcd] = &servers;
    let ours = nospace_scenario(spindle);
    let theirs = nospace_scenario(etcd);
    assert_eq!(ours, theirs);
    // A sanity check of the scenario itself: the refusal was etcd's.
    assert!(
        theirs[0].contains("etcdserver: mvcc: database space exceeded"),
        "{theirs:?}"
    );
}

/// `alarm list` on each of `servers`, polled until every one prints `expected`.
fn wait_alarms(servers: &[Server], expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lists: Vec<String> = servers
            .iter()
            .map(|s| s.etcdctl(&["alarm", "list"]).stdout)
            .collect();
        if lists.iter().all(|l| l == expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members list {lists:?}, not {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nospace_raised_through_one_member_holds_on_every_member_and_after_restart() {
    let ports = Ports::free(3);
    let mut servers = cluster::start_spindle(
        "a",
        "alarms-test",
        &ports,
        &["--quota-backend-bytes", QUOTA],
    );
    let value = "y".repeat(VALUE_BYTES);
    let (fitted, refused) = fill(&servers[1], &value);
    assert!(fitted > 3, "only {fitted} values fit");
    assert!(
        refused
            .stderr
            .contains("etcdserver: mvcc: database space exceeded"),
        "{refused:?}"
    );
    // A member that refused a write for its size raised its own alarm (the one the client
    // talks to, or the leader it forwarded to). Every member lists the same alarms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ids: Vec<u64> = servers.iter().map(member_id).collect();
    let listed = loop {
        let l = servers[0].etcdctl(&["alarm", "list"]).stdout;
        let raised = |id: &u64| l.contains(&format!("memberID:{id} alarm:NOSPACE \n"));
        if ids.iter().any(raised) {
            break l;
        }
        assert!(Instant::now() < deadline, "{l:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    wait_alarms(&servers, &listed);
    let enforced = |servers: &[Server]| {
        for s in servers {
            let r = s.etcdctl(&["put", "small", "v"]);
            assert!(
                r.stderr
                    .contains("etcdserver: mvcc: database space exceeded"),
                "{}: {r:?}",
                s.port
            );
            let g = s.etcdctl(&["get", "k0000", "--keys-only", "--consistency=s"]);
            assert!(g.ok, "{}: {g:?}", s.port);
        }
    };
    enforced(&servers);
    // One member folds the alarm into its checkpoints; the others replay it from their logs.
    assert!(servers[2].etcdctl(&["defrag"]).ok);
    for i in 0..servers.len() {
        assert!(servers[i].terminate().success());
        servers[i].restart();
        wait_alarms(&servers[i..=i], &listed);
    }
    wait_alarms(&servers, &listed);
    enforced(&servers);
    // Disarmed through another member, on every member. Right after the rolling restart a
    // leader change may still be settling: a refused disarm is tried again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let disarm = loop {
        let d = servers[0].etcdctl(&["alarm", "disarm"]);
        if d.ok || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(disarm.ok, "{disarm:?}");
    assert!(
        disarm
            .stdout
            .lines()
            .all(|l| listed.lines().any(|m| m == l)),
        "{disarm:?}"
    );
    wait_alarms(&servers, "");
}

/// Every file under `dir` with its bytes, sorted by path.
fn tree(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p.clone());
                out.push((p, Vec::new()));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_data_dir_of_a_newer_format_is_refused_and_left_as_it_was() {
    let mut before = Vec::new();
    let mut s = Server::spawn_prepared(Kind::Spindle, Ports::free(1)[0], &[], |data| {
        std::fs::create_dir_all(data.join("shard-000/wal")).unwrap();
        std::fs::write(
            data.join("spindle.meta"),
            "format=99\nshards=1\npartitioner=directory-crc32\ncluster_id=1\nmember_id=2\n\
             a_later_key=yes\n",
        )
        .unwrap();
        std::fs::write(
            data.join("shard-000/wal/00000000000000000001.wal"),
            [7u8; 100],
        )
        .unwrap();
        before = tree(data);
    });
    let status = s.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "{status:?}");
    let log = s.log();
    let meta = s.data_dir().join("spindle.meta");
    assert!(
        log.contains(&meta.display().to_string())
            && log.contains("format version 99")
            && log.contains("versions up to 2"),
        "{log}"
    );
    assert_eq!(tree(&s.data_dir()), before);
}

/// `etcdctl endpoint hashkv --rev REV` on `s`: (hash, compact revision), once it answers.
fn hashkv(s: &Server, rev: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.etcdctl(&[
            "endpoint",
            "hashkv",
            "--rev",
            &rev.to_string(),
            "-w",
            "json",
        ]);
        if r.ok {
            let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            let h = &v[0]["HashKV"];
            return (
                h["hash"].as_u64().unwrap_or(0),
                h["compact_revision"].as_u64().unwrap_or(0),
            );
        }
        assert!(Instant::now() < deadline, "{r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rewrites `from` as `to` (same length) inside the stopped member's checkpoints and fixes each
/// file's checksum, so only a comparison of contents can tell. Returns how many files changed.
fn tamper_checkpoints(data: &std::path::Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut changed = 0;
    for (path, mut bytes) in tree(data) {
        if path.extension().and_then(|e| e.to_str()) != Some("ckpt") {
            continue;
        }
        let Some(at) = bytes.windows(from.len()).position(|w| w == from) else {
            continue;
        };
        bytes[at..at + to.len()].copy_from_slice(to);
        // Footer: crc32 of everything before it, then the end marker.
        let body_end = bytes.len() - 12;
        let crc = crc32fast::hash(&bytes[..body_end]);
        bytes[body_end..body_end + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        changed += 1;
    }
    changed
}

/// Keys `c00`..`c19` with values `pristine-value-NN`, written through `s` once the cluster
/// takes writes.
fn write_pristine(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..20 {
        let (k, v) = (format!("c{i:02}"), format!("pristine-value-{i:02}"));
        while !s.etcdctl(&["put", &k, &v]).ok {
            assert!(Instant::now() < deadline, "the cluster takes no writes");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn hashkv_agrees_on_every_member_and_a_tampered_member_gets_the_corrupt_alarm() {
    let ports = Ports::free(3);
    let mut servers = cluster::start_spindle(
        "c",
        "corrupt-test",
        &ports,
        &["--experimental-corrupt-check-time", "300ms"],
    );
    write_pristine(&servers[0]);
    // Every member hashes the same at the same revision.
    let rev = revision(&servers[0]);
    let hashes: Vec<(u64, u64)> = servers.iter().map(|s| hashkv(s, rev)).collect();
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    // A follower's checkpoint is tampered with while it is stopped.
    let leader = status(&servers[0])["leader"].as_u64().unwrap();
    let victim = servers.iter().position(|s| member_id(s) != leader).unwrap();
    let victim_id = member_id(&servers[victim]);
    assert!(servers[victim].etcdctl(&["defrag"]).ok);
    assert!(servers[victim].terminate().success());
    let changed = tamper_checkpoints(
        &servers[victim].data_dir(),
        b"pristine-value-07",
        b"tampered-value-07",
    );
    assert_eq!(changed, 1);
    servers[victim].restart();
    let got = servers[victim].etcdctl(&["get", "c07", "--print-value-only", "--consistency=s"]);
    assert_eq!(got.stdout.trim(), "tampered-value-07", "{got:?}");
    // The leader's next check finds it and raises CORRUPT for that member, on every member.
    let expected = format!("memberID:{victim_id} alarm:CORRUPT \n");
    wait_alarms(&servers, &expected);
    for s in &servers {
        let r = s.etcdctl(&["put", "after", "v"]);
        assert!(
            !r.ok
                && r.stderr.contains("Error: etcdserver: corrupt cluster")
                && r.stderr.contains("code = DataLoss"),
            "{}: {r:?}",
            s.port
        );
        let del = s.etcdctl(&["del", "c00"]);
        assert!(
            del.stderr.contains("etcdserver: corrupt cluster"),
            "{del:?}"
        );
        let g = s.etcdctl(&["get", "c01", "--print-value-only", "--consistency=s"]);
        assert_eq!(g.stdout.trim(), "pristine-value-01", "{g:?}");
    }
    // etcd 3.4 answers with gRPC code DataLoss.
    let g = gateway_put(&servers[0]);
    assert_eq!(g["code"], 15, "{g}");
}

#[test]
fn initial_corrupt_check_refuses_a_tampered_member_and_passes_a_healthy_one() {
    let ports = Ports::free(3);
    let mut servers = cluster::start_spindle("i", "initial-check", &ports, &[]);
    write_pristine(&servers[0]);
    let leader = status(&servers[0])["leader"].as_u64().unwrap();
    let victim = servers.iter().position(|s| member_id(s) != leader).unwrap();
    // Healthy: the check passes and the member serves.
    assert!(servers[victim].etcdctl(&["defrag"]).ok);
    assert!(servers[victim].terminate().success());
    servers[victim].relaunch_with(&["--experimental-initial-corrupt-check"]);
    servers[victim].wait_ready();
    let got = servers[victim].etcdctl(&["get", "c07", "--print-value-only", "--consistency=s"]);
    assert_eq!(got.stdout.trim(), "pristine-value-07", "{got:?}");
    // Tampered while stopped (crc fixed, so only the hash comparison can tell): refused.
    assert!(servers[victim].etcdctl(&["defrag"]).ok);
    assert!(servers[victim].terminate().success());
    let changed = tamper_checkpoints(
        &servers[victim].data_dir(),
        b"pristine-value-07",
        b"tampered-value-07",
    );
    assert_eq!(changed, 1);
    servers[victim].relaunch_with(&[]);
    let exit = servers[victim].wait_exit(Duration::from_secs(30));
    assert!(!exit.success(), "a tampered member must not run");
    let log = servers[victim].log();
    assert!(
        log.contains("found data inconsistency with peers") && log.contains("at revision"),
        "{log}"
    );
    // The others kept serving.
    let other = (victim + 1) % 3;
    assert!(servers[other].etcdctl(&["put", "after", "v"]).ok);
}

//! Crash safety for real: a child process writes (single-shard puts and multi-shard txns, with
//! background checkpoints and WAL rollover), reports each acknowledged write on stdout, and is
//! killed with SIGKILL at a random moment. The parent reopens the data dir and checks that every
//! acknowledged write is there, that no multi-shard txn is half applied, that acknowledged lease
//! grants and revokes hold and no key outlives its lease, and that revisions never go backwards
//! across crashes.
//!
//! Bounded by `SPINDLE_CRASH_ITERS` (default 300) and `SPINDLE_CRASH_SECS` (default 60);
//! `tools/crash-soak` runs it longer.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use spindle::kv::*;
use spindle::{Db, Options};

mod common;

const DIR_ENV: &str = "SPINDLE_CRASH_DIR";
const PREFIX_ENV: &str = "SPINDLE_CRASH_PREFIX";
/// Directories of a multi-shard txn's keys: one per shard, so every txn spans all three.
fn txn_dirs() -> Vec<String> {
    let mut dirs: Vec<Option<String>> = vec![None; 3];
    for i in 0.. {
        let d = format!("t{i}/");
        let s = spindle::db::Partitioner::Directory.shard_of(d.as_bytes(), 3) as usize;
        dirs[s].get_or_insert(d);
        if dirs.iter().all(Option::is_some) {
            break;
        }
    }
    dirs.into_iter().flatten().collect()
}

fn options() -> Options {
    Options {
        wal_segment_size: 128 << 10,
        checkpoint_every: 300,
        ..common::db::opts(2, 3)
    }
}

/// The child: writes until killed. Runs only when the harness starts it.
#[test]
#[ignore = "entry point of the crash harness's child process"]
fn crash_child() {
    let dir = std::env::var(DIR_ENV).expect("started by the harness");
    let prefix = std::env::var(PREFIX_ENV).expect("started by the harness");
    let db = Db::open(&dir, options()).expect("open");
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let ack = |line: String| {
        let mut o = out.lock().unwrap();
        writeln!(o, "{line} END").unwrap();
        o.flush().unwrap();
    };
    std::thread::scope(|s| {
        for t in 0..3 {
            let (db, prefix, ack) = (db.clone(), prefix.clone(), &ack);
            s.spawn(move || {
                for n in 0.. {
                    let key = format!("p{t}/{prefix}-{n}");
                    let r = db
                        .put(PutRequest::new(key.clone(), format!("v{n}")))
                        .unwrap();
                    ack(format!("PUT {key} {}", r.header.revision));
                }
            });
        }
        // Leases: grant, attach a key on every shard, revoke (a multi-shard delete).
        let (ldb, lack) = (db.clone(), &ack);
        s.spawn(move || loop {
            let (db, ack) = (&ldb, lack);
            let id = db.lease_grant(0, 600).unwrap().id;
            ack(format!("GRANT {id} 0"));
            for d in txn_dirs() {
                db.put(PutRequest {
                    lease: id,
                    ..PutRequest::new(format!("{d}lease-{id}"), "v")
                })
                .unwrap();
            }
            // A revoke may complete without its acknowledgement reaching the parent.
            ack(format!("REVOKING {id} 0"));
            let r = db.lease_revoke(id).unwrap();
            ack(format!("REVOKE {id} {}", r.header.revision));
        });
        let (db, prefix, ack) = (db.clone(), prefix.clone(), &ack);
        s.spawn(move || {
            for n in 0.. {
                let id = format!("{prefix}-{n}");
                let txn = TxnRequest {
                    success: txn_dirs()
                        .iter()
                        .map(|d| RequestOp::Put(PutRequest::new(format!("{d}{id}"), id.clone())))
                        .collect(),
                    ..Default::default()
                };
                let r = db.txn(txn).unwrap();
                ack(format!("TXN {id} {}", r.header.revision));
            }
        });
    });
}

struct Acks {
    puts: Vec<(String, i64)>,
    txns: Vec<(String, i64)>,
    grants: Vec<i64>,
    revoking: Vec<i64>,
    revokes: Vec<i64>,
}

fn run_child(
    exe: &std::path::Path,
    dir: &std::path::Path,
    prefix: &str,
    run_for: Duration,
) -> Acks {
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(DIR_ENV, dir)
        .env(PREFIX_ENV, prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut acks = Acks {
            puts: vec![],
            txns: vec![],
            grants: vec![],
            revoking: vec![],
            revokes: vec![],
        };
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() != 4 || parts[3] != "END" {
                continue;
            }
            let rev: i64 = parts[2].parse().unwrap();
            match parts[0] {
                "PUT" => acks.puts.push((parts[1].to_string(), rev)),
                "TXN" => acks.txns.push((parts[1].to_string(), rev)),
                "GRANT" => acks.grants.extend(parts[1].parse::<i64>().ok()),
                "REVOKING" => acks.revoking.extend(parts[1].parse::<i64>().ok()),
                "REVOKE" => acks.revokes.extend(parts[1].parse::<i64>().ok()),
                _ => {}
            }
        }
        acks
    });
    std::thread::sleep(run_for);
    // SIGKILL only the child we started.
    child.kill().expect("kill child");
    child.wait().expect("reap child");
    reader.join().unwrap()
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let iters: usize = std::env::var("SPINDLE_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let secs: u64 = std::env::var("SPINDLE_CRASH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("SPINDLE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash harness: seed {seed} (SPINDLE_CRASH_SEED replays the kill schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last_revision = 0;
    let mut total_acks = 0;
    let mut total_grants = 0;
    let mut done = 0;
    while done < iters && Instant::now() < deadline {
        let prefix = format!("i{done}");
        let run_for = Duration::from_millis(rng.gen_range(5..120));
        let acks = run_child(&exe, dir.path(), &prefix, run_for);
        total_acks += acks.puts.len() + acks.txns.len();
        total_grants += acks.grants.len();

        let db = Db::open(
            dir.path(),
            Options {
                cores: 1,
                ..options()
            },
        )
        .unwrap_or_else(|e| panic!("iteration {done} (seed {seed}): reopen failed: {e}"));
        let rev = db.revision();
        assert!(
            rev >= last_revision,
            "iteration {done}: revision went back from {last_revision} to {rev}"
        );
        for (key, r) in &acks.puts {
            let got = db.range(RangeRequest::key(key.clone())).unwrap();
            let kv = got.kvs.first().unwrap_or_else(|| {
                panic!("iteration {done} (seed {seed}): acknowledged {key} lost")
            });
            assert_eq!(
                kv.mod_revision, *r,
                "iteration {done}: {key} has the wrong revision"
            );
            assert!(rev >= *r);
        }
        // Every txn of this run, acknowledged or not, is all-or-nothing.
        let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
        let dirs = txn_dirs();
        for d in &dirs {
            let r = db
                .range(RangeRequest::prefix(format!("{d}{prefix}-")))
                .unwrap();
            for kv in r.kvs {
                let id = String::from_utf8_lossy(&kv.key[d.len()..]).into_owned();
                seen.entry(id).or_default().push(kv.mod_revision);
            }
        }
        for (id, revs) in &seen {
            assert_eq!(
                revs.len(),
                dirs.len(),
                "iteration {done} (seed {seed}): txn {id} half applied: {revs:?}"
            );
            assert!(
                revs.windows(2).all(|w| w[0] == w[1]),
                "txn {id} split over revisions {revs:?}"
            );
        }
        for (id, r) in &acks.txns {
            let revs = seen.get(id).unwrap_or_else(|| {
                panic!("iteration {done} (seed {seed}): acknowledged txn {id} lost")
            });
            assert_eq!(revs[0], *r);
        }
        // An acknowledged grant exists until a revoke starts; an acknowledged revoke is final;
        // no key is attached to a lease that does not exist.
        let leases: std::collections::HashSet<i64> =
            db.lease_leases().unwrap().leases.into_iter().collect();
        for id in &acks.grants {
            if !acks.revoking.contains(id) {
                assert!(
                    leases.contains(id),
                    "iteration {done} (seed {seed}): acknowledged lease {id} lost"
                );
            }
        }
        for id in &acks.revokes {
            assert!(
                !leases.contains(id),
                "iteration {done} (seed {seed}): revoked lease {id} is back"
            );
        }
        for d in &dirs {
            let r = db
                .range(RangeRequest::prefix(format!("{d}lease-")))
                .unwrap();
            for kv in r.kvs {
                assert!(
                    leases.contains(&kv.lease),
                    "iteration {done} (seed {seed}): {:?} attached to missing lease {}",
                    kv.key,
                    kv.lease
                );
            }
        }
        last_revision = rev;
        db.close();
        done += 1;
    }
    println!("crash harness: {done} kills, {total_acks} acknowledged writes and {total_grants} lease grants verified, final revision {last_revision}");
    assert!(
        done >= 10.min(iters),
        "too few iterations ran ({done}) to mean anything"
    );
    assert!(total_acks > 0, "the child never acknowledged a write");
    assert!(
        total_grants > 0,
        "the child never acknowledged a lease grant"
    );
}

//! Embedded-engine benchmarks: durable puts (one writer and many), ranges, txns, and restart time
//! plus resident memory with many keys. Every write is fdatasync'ed before it is acknowledged.
//!
//! `cargo bench --bench engine` runs all; `cargo bench --bench engine -- put1 putN range txn
//! restart raft hop` picks some (`raft`: put throughput with and without the shards' Raft groups,
//! `BENCH_ROUNDS` alternating rounds; `hop`: the cross-core message round trip alone). `BENCH_OPS` scales the op counts, `BENCH_KEYS` the restart key count
//! (default 1,000,000), `BENCH_CORES` the executor count.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use spindle::kv::*;
use spindle::{Db, Options};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn options() -> Options {
    let mut o = Options::default();
    o.cores = env_usize("BENCH_CORES", o.cores);
    o
}

fn report(name: &str, ops: usize, elapsed: Duration, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name:<28} {ops:>9} ops {:>10.0} ops/s   latency us: p50 {:>8.1} p90 {:>8.1} p99 {:>8.1} p99.9 {:>8.1} max {:>9.1}",
        ops as f64 / elapsed.as_secs_f64(),
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    );
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// Runs `per_thread` ops on each of `threads` threads; `op(thread, i)` is timed individually.
fn run<F>(name: &str, threads: usize, per_thread: usize, op: F)
where
    F: Fn(usize, usize) + Sync,
{
    let total = Arc::new(Mutex::new(new_hist()));
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (op, total) = (&op, total.clone());
            s.spawn(move || {
                let mut h = new_hist();
                for i in 0..per_thread {
                    let t0 = Instant::now();
                    op(t, i);
                    h.record(t0.elapsed().as_nanos() as u64).expect("in range");
                }
                total
                    .lock()
                    .expect("histogram lock")
                    .add(&h)
                    .expect("same bounds");
            });
        }
    });
    let elapsed = start.elapsed();
    let h = total.lock().expect("histogram lock");
    report(name, threads * per_thread, elapsed, &h);
}

fn value(len: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![b'v'; len])
}

fn bench_put1(ops: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path(), options()).expect("open");
    let v = value(256);
    run("put, 1 writer", 1, ops, |_, i| {
        db.put(PutRequest::new(format!("k/{i:08}"), v.clone()))
            .expect("put");
    });
    db.close();
}

fn bench_put_n(ops: usize, writers: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path(), options()).expect("open");
    let v = value(256);
    let per = (ops * 4 / writers).max(10);
    run(&format!("put, {writers} writers"), writers, per, |t, i| {
        db.put(PutRequest::new(format!("w{t}/{i:08}"), v.clone()))
            .expect("put");
    });
    db.close();
}

/// The in-memory store alone (no WAL, no runtime): single-key put txns on random keys of a
/// `keys`-key shard, as the write path executes them. Measures what the index costs per put
/// (descents of the B+tree whose keys live on the heap, so each probe may miss the cache).
fn bench_store_put(ops: usize, keys: usize) {
    use rand::{Rng, SeedableRng};
    use spindle::mvcc::{ShardStore, TxnPath};
    let mut store = ShardStore::new();
    let v = value(256);
    let all = |_: &[u8]| true;
    let path = TxnPath(vec![true]);
    let put = |key: usize| TxnRequest {
        compare: Vec::new(),
        success: vec![RequestOp::Put(PutRequest::new(
            format!("key/{key:012}"),
            v.clone(),
        ))],
        failure: Vec::new(),
    };
    let mut rev = 1;
    for k in 0..keys {
        rev += 1;
        store.execute(&put(k), &path, rev, &all);
    }
    // A fixed seed: the same "random" keys every run.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let txns: Vec<TxnRequest> = (0..ops).map(|_| put(rng.gen_range(0..keys))).collect();
    let mut h = new_hist();
    let start = Instant::now();
    for t in &txns {
        rev += 1;
        let t0 = Instant::now();
        std::hint::black_box(store.execute(t, &path, rev, &all));
        h.record(t0.elapsed().as_nanos() as u64).expect("in range");
    }
    report(&format!("store put, {keys} keys"), ops, start.elapsed(), &h);
}

/// Durable puts through Raft against the same engine with Raft bypassed (`bypass_raft`), in
/// alternating rounds so both see the same disk and machine state; prints each round and the
/// ratio of the medians.
fn bench_raft_overhead(ops: usize, rounds: usize) {
    for writers in [1usize, 64] {
        let per = if writers == 1 {
            ops
        } else {
            (ops * 4 / writers).max(10)
        };
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            for (slot, bypass) in [(0, true), (1, false)] {
                let dir = tempfile::tempdir().expect("tempdir");
                let db = Db::open(
                    dir.path(),
                    Options {
                        bypass_raft: bypass,
                        ..options()
                    },
                )
                .expect("open");
                let v = value(256);
                let label = if bypass { "without raft" } else { "with raft" };
                let start = Instant::now();
                run(
                    &format!("put {writers}w {label} r{round}"),
                    writers,
                    per,
                    |t, i| {
                        db.put(PutRequest::new(format!("w{t}/{i:08}"), v.clone()))
                            .expect("put");
                    },
                );
                rates[slot].push((writers * per) as f64 / start.elapsed().as_secs_f64());
                db.close();
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (without, with) = (median(&mut rates[0]), median(&mut rates[1]));
        println!(
            "raft overhead, {writers} writer(s): median {with:.0} ops/s with raft vs {without:.0} without = {:.3}x",
            with / without
        );
    }
}

fn load(db: &Db, keys: usize, val_len: usize) {
    let v = value(val_len);
    let batch = 128;
    for start in (0..keys).step_by(batch) {
        let success = (start..(start + batch).min(keys))
            .map(|i| {
                RequestOp::Put(PutRequest::new(
                    format!("d{:03}/k{i:08}", i % 997),
                    v.clone(),
                ))
            })
            .collect();
        db.txn(TxnRequest {
            success,
            ..Default::default()
        })
        .expect("load txn");
    }
}

fn bench_range(ops: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path(), options()).expect("open");
    let keys = 100_000;
    load(&db, keys, 256);
    run("range, 1 key, 1 reader", 1, ops, |_, i| {
        let k = (i * 7919) % keys;
        let r = db
            .range(RangeRequest::key(format!("d{:03}/k{k:08}", k % 997)))
            .expect("range");
        assert_eq!(r.kvs.len(), 1);
    });
    run("range, 1 key, 16 readers", 16, ops / 4, |t, i| {
        let k = (t * 100_003 + i * 7919) % keys;
        let r = db
            .range(RangeRequest::key(format!("d{:03}/k{k:08}", k % 997)))
            .expect("range");
        assert_eq!(r.kvs.len(), 1);
    });
    run("range, prefix limit 100", 1, (ops / 10).max(10), |_, i| {
        let d = i % 997;
        let r = db.range(RangeRequest {
            limit: 100,
            ..RangeRequest::prefix(format!("d{d:03}/"))
        });
        assert!(!r.expect("range").kvs.is_empty());
    });
    db.close();
}

fn bench_txn(ops: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path(), options()).expect("open");
    for t in 0..16 {
        db.put(PutRequest::new(format!("c{t}/n"), "0"))
            .expect("seed");
    }
    run("txn CAS, 16 writers", 16, (ops / 4).max(10), |t, i| {
        let key = format!("c{t}/n");
        let r = db
            .txn(TxnRequest {
                compare: vec![Compare::value(
                    key.clone(),
                    CompareResult::Equal,
                    i.to_string(),
                )],
                success: vec![RequestOp::Put(PutRequest::new(
                    key.clone(),
                    (i + 1).to_string(),
                ))],
                failure: vec![],
            })
            .expect("txn");
        assert!(r.succeeded);
    });
    run(
        "txn, 2 shards, 16 writers",
        16,
        (ops / 8).max(10),
        |t, i| {
            let success = vec![
                RequestOp::Put(PutRequest::new(format!("x{t}/a"), i.to_string())),
                RequestOp::Put(PutRequest::new(format!("y{t}/b"), i.to_string())),
            ];
            db.txn(TxnRequest {
                success,
                ..Default::default()
            })
            .expect("txn");
        },
    );
    db.close();
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// Child mode: open the data dir, report time-to-serving and resident memory, exit.
fn reopen_child(dir: &str) {
    let t0 = Instant::now();
    let db = Db::open(dir, options()).expect("reopen");
    let r = db
        .range(RangeRequest::key("d000/k00000000"))
        .expect("first read");
    assert_eq!(r.kvs.len(), 1);
    let elapsed = t0.elapsed();
    if let Ok(dump) = std::env::var("BENCH_SMAPS_TO") {
        let _ = std::fs::copy("/proc/self/smaps", dump);
    }
    println!(
        "REOPEN {} {} {} {}",
        elapsed.as_millis(),
        rss_kib(),
        status_kib("RssAnon:"),
        status_kib("RssFile:")
    );
    db.close();
}

fn bench_restart(keys: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path(), options()).expect("open");
    let t0 = Instant::now();
    load(&db, keys, 256);
    let load_time = t0.elapsed();
    let loaded_rss = rss_kib();
    db.checkpoint().expect("checkpoint");
    db.close();
    println!(
        "load {keys} keys x 256 B        {:>9.0} keys/s (txns of 128 puts), RSS after load {} MiB",
        keys as f64 / load_time.as_secs_f64(),
        loaded_rss / 1024
    );
    let exe = std::env::current_exe().expect("exe");
    for attempt in 0..2 {
        let out = std::process::Command::new(&exe)
            .args(["--reopen", &dir.path().to_string_lossy()])
            .output()
            .expect("run reopen child");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("REOPEN"))
            .unwrap_or("REOPEN ? ? ? ?");
        let f: Vec<&str> = line.split(' ').collect();
        let mib = |s: &str| s.parse::<u64>().map(|k| k / 1024).unwrap_or(0);
        println!(
            "restart with {keys} keys (run {}): {} ms to first read, RSS {} MiB (anon {} MiB, file {} MiB)",
            attempt + 1,
            f[1],
            mib(f[2]),
            mib(f[3]),
            mib(f[4])
        );
    }
}

/// A request and the channel its answer goes back on, as a core's inbox carries them.
type HopMsg = (u64, flume::Sender<u64>);

/// Where the hop benchmark's executor `core` runs: pinned as `spindle serve` pins its cores.
fn hop_placement(core: usize) -> glommio::Placement {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    glommio::Placement::Fixed(core % cpus)
}

/// Answers every message on `inbox` until all senders are gone.
async fn hop_echo(inbox: flume::Receiver<HopMsg>) {
    while let Ok((v, reply)) = inbox.recv_async().await {
        let _ = reply.send(v);
    }
}

/// `ops` round trips in total from `tasks` concurrent tasks through `inbox`, each answered on its
/// own bounded(1) channel (the engine's `oneshot`); returns the elapsed time and the histogram.
async fn hop_rounds(
    inbox: flume::Sender<HopMsg>,
    tasks: usize,
    ops: usize,
) -> (Duration, Histogram<u64>) {
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let inbox = inbox.clone();
        handles.push(glommio::spawn_local(async move {
            let mut h = new_hist();
            for i in 0..(ops / tasks) as u64 {
                let t0 = Instant::now();
                let (tx, rx) = flume::bounded(1);
                inbox.send((i, tx)).expect("echo task alive");
                let v = rx.recv_async().await.expect("echo answers");
                assert_eq!(v, i);
                h.record(t0.elapsed().as_nanos() as u64).expect("in range");
            }
            h
        }));
    }
    let mut total = new_hist();
    for handle in handles {
        total.add(handle.await).expect("same bounds");
    }
    (start.elapsed(), total)
}

/// The hop the engine makes for every request whose shard lives on another core (`db/core.rs`): a
/// message into that core's flume inbox, awaited there by a glommio executor, and the answer back
/// on a bounded(1) flume channel. Measured alone, with nothing else running: both ends on one
/// executor (no hop, the baseline), then across two executors pinned to cores 0 and 1 with one
/// and with 64 round trips in flight.
fn bench_hop(ops: usize) {
    let ops = ops * 4;
    let same = spindle::runtime::builder(hop_placement(0), "hop-same")
        .spawn(move || async move {
            let (tx, rx) = flume::unbounded();
            glommio::spawn_local(hop_echo(rx)).detach();
            hop_rounds(tx, 1, ops).await
        })
        .expect("executor")
        .join()
        .expect("hop executor");
    report("same core, no hop", ops, same.0, &same.1);
    for tasks in [1usize, 64] {
        let (tx, rx) = flume::unbounded();
        let echo = spindle::runtime::builder(hop_placement(1), "hop-echo")
            .spawn(move || hop_echo(rx))
            .expect("executor");
        let (elapsed, h) = spindle::runtime::builder(hop_placement(0), "hop-send")
            .spawn(move || hop_rounds(tx, tasks, ops))
            .expect("executor")
            .join()
            .expect("hop executor");
        echo.join().expect("echo executor");
        report(
            &format!("cross-core hop, {tasks} in flight"),
            ops,
            elapsed,
            &h,
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--bench"))
        .collect();
    if args.first().map(String::as_str) == Some("--reopen") {
        reopen_child(&args[1]);
        return;
    }
    let ops = env_usize("BENCH_OPS", 5_000);
    let keys = env_usize("BENCH_KEYS", 1_000_000);
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    println!(
        "spindle engine bench: {} cores, fdatasync on every acknowledged write",
        options().cores
    );
    if want("put1") {
        bench_put1(ops);
    }
    if want("putN") {
        bench_put_n(ops, 64);
    }
    if want("range") {
        bench_range(ops * 4);
    }
    if want("txn") {
        bench_txn(ops);
    }
    if want("restart") {
        bench_restart(keys);
    }
    if want("raft") {
        bench_raft_overhead(ops, env_usize("BENCH_ROUNDS", 5));
    }
    if want("store") {
        bench_store_put(ops * 40, env_usize("BENCH_STORE_KEYS", 100_000));
    }
    if want("hop") {
        bench_hop(ops);
    }
}

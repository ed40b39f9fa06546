//! `spindle bench`: a load generator for any etcd v3 endpoint (spindle or etcd), thread-per-core
//! like the server, with hdrhistogram latencies.
//!
//! Closed loop by default (each client sends its next request when the previous one returns); with
//! `rate` it is open loop: requests are scheduled at fixed intervals and latency is measured from
//! the scheduled time, so a stalled server cannot hide its stall (no coordinated omission).

pub mod client;
pub mod noop;
pub mod stages;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::proto::etcdserverpb as pb;
use crate::server::grpc::{Code, Status};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    Put,
    /// Range over single keys (or a prefix of the key space); `serializable` as etcd's flag.
    Range {
        serializable: bool,
        prefix: bool,
    },
    /// A txn with one put per op.
    TxnPut {
        ops: usize,
    },
    /// Txns that either read one key (a Range op) or write it (a Put op), `read_ratio` reads
    /// per write (etcd's `--rw-ratio`).
    TxnMixed {
        read_ratio: f64,
    },
    /// The embedded engine, no network.
    Mvcc,
    /// Watch fan-out: `watchers` streams each watch the whole key space while the clients put;
    /// every delivered event counts as one op, its latency is put-issued to event-received.
    Watch {
        watchers: usize,
    },
    /// Each client grants a lease and renews it over its own LeaseKeepAlive stream, one
    /// request in flight; ops are renewals.
    LeaseKeepAlive,
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub workload: Workload,
    pub endpoints: Vec<String>,
    pub conns: usize,
    pub clients: usize,
    pub total: Option<u64>,
    pub duration: Option<Duration>,
    pub rate: Option<f64>,
    pub key_size: usize,
    pub val_size: usize,
    pub key_space_size: u64,
    pub sequential_keys: bool,
    /// Range and txn-mixed runs first write the whole key space so reads find data; false when
    /// it is already loaded (and rewriting it would change what is measured, e.g. memory).
    pub preload: bool,
    pub warmup: Duration,
    pub cores: usize,
    /// Data dir for the `Mvcc` workload (a temporary one when `None`).
    pub data_dir: Option<std::path::PathBuf>,
    /// `(user, password)`: every connection authenticates first (a server with auth enabled).
    pub user: Option<(String, String)>,
    /// How `https://` endpoints are dialed (`crate::tls::dial_config`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug)]
pub struct Report {
    pub workload: String,
    pub ops: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
    pub histogram: Histogram<u64>,
    /// Where the server's puts spent this run's time, when the endpoints are spindle.
    pub stages: Vec<stages::StageDelta>,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn us(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    /// Writes the full histogram (HdrHistogram V2 log encoding, nanoseconds) for offline analysis.
    pub fn write_hdr(&self, path: &std::path::Path) -> Result<(), String> {
        use hdrhistogram::serialization::Serializer;
        let mut buf = Vec::new();
        hdrhistogram::serialization::V2Serializer::new()
            .serialize(&self.histogram, &mut buf)
            .map_err(|e| format!("histogram encoding: {e:?}"))?;
        std::fs::write(path, buf).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "workload": self.workload,
            "ops": self.ops,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "throughput": self.throughput(),
            "latency_us": {
                "min": self.histogram.min() as f64 / 1000.0,
                "mean": self.histogram.mean() / 1000.0,
                "p50": self.us(0.5), "p90": self.us(0.9), "p99": self.us(0.99),
                "p999": self.us(0.999), "max": self.histogram.max() as f64 / 1000.0,
            },
            "stages": self.stages.iter().map(|d| serde_json::json!({
                "stage": d.stage, "count": d.count, "mean_us": d.mean_us,
                "p50_us": d.p50_us, "p99_us": d.p99_us, "seconds": d.sum_secs,
            })).collect::<Vec<_>>(),
        })
    }

    /// The human summary: throughput, percentiles and an ASCII latency histogram.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(s, "Summary ({}):", self.workload);
        let _ = writeln!(s, "  Total:        {:.4} s", self.elapsed.as_secs_f64());
        let _ = writeln!(s, "  Requests:     {}", self.ops);
        let _ = writeln!(s, "  Requests/sec: {:.1}", self.throughput());
        let errors: u64 = self.errors.values().sum();
        let _ = writeln!(s, "  Errors:       {errors}");
        for (e, n) in &self.errors {
            let _ = writeln!(s, "    {n:>8} × {e}");
        }
        let _ = writeln!(
            s,
            "  Latency (ms): min {:.3}  mean {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.histogram.min() as f64 / 1e6,
            self.histogram.mean() / 1e6,
            self.us(0.5) / 1000.0,
            self.us(0.9) / 1000.0,
            self.us(0.99) / 1000.0,
            self.us(0.999) / 1000.0,
            self.histogram.max() as f64 / 1e6
        );
        if !self.histogram.is_empty() {
            let _ = writeln!(s, "  Response time histogram (ms):");
            let (lo, hi) = (
                self.histogram.min().max(1) as f64,
                self.histogram.max().max(2) as f64,
            );
            let step = (hi / lo).powf(1.0 / 10.0);
            let mut bounds = Vec::new();
            let mut b = lo;
            for _ in 0..10 {
                b *= step;
                bounds.push(b);
            }
            let mut prev = 0u64;
            let counts: Vec<u64> = bounds
                .iter()
                .map(|&b| {
                    let c = self.histogram.count_between(prev, b as u64);
                    prev = b as u64 + 1;
                    c
                })
                .collect();
            let max = counts.iter().copied().max().unwrap_or(1).max(1);
            for (b, c) in bounds.iter().zip(&counts) {
                let bar = "∎".repeat((c * 40 / max) as usize);
                let _ = writeln!(s, "  {:>10.3} [{c:>8}]\t|{bar}", b / 1e6);
            }
        }
        if !self.stages.is_empty() {
            s.push_str(&stages::summary(&self.stages, self.histogram.mean() / 1e3));
        }
        s
    }
}

fn key_for(cfg: &BenchConfig, n: u64, rng: &mut u64) -> Bytes {
    let idx = if cfg.sequential_keys {
        n % cfg.key_space_size.max(1)
    } else {
        // xorshift: cheap, per-client, deterministic.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng % cfg.key_space_size.max(1)
    };
    let mut k = format!("{idx:0width$}", width = cfg.key_size.max(1)).into_bytes();
    k.truncate(cfg.key_size.max(1));
    Bytes::from(k)
}

struct Shared {
    cfg: BenchConfig,
    /// Time origin for the timestamps puts carry in watch runs.
    epoch: Instant,
    /// Watch runs: streams whose watch is created; puts start once all are.
    watchers_ready: AtomicU64,
    /// Watch runs: writer tasks still running, and puts acknowledged.
    writers_running: AtomicU64,
    puts_done: AtomicU64,
    issued: AtomicU64,
    stop: AtomicBool,
    measuring_from: Instant,
    results: Mutex<(Histogram<u64>, BTreeMap<String, u64>, u64)>,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds")
}

/// Runs the benchmark and returns the merged report.
pub fn run(cfg: BenchConfig) -> Result<Report, String> {
    if cfg.workload == Workload::Mvcc {
        return run_mvcc(cfg);
    }
    if cfg.endpoints.is_empty() {
        return Err("no endpoints".into());
    }
    if let (Workload::Range { .. } | Workload::TxnMixed { .. }, true) = (cfg.workload, cfg.preload)
    {
        preload(&cfg)?;
    }
    let stages_before = stages::scrape_all(&cfg.endpoints);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        measuring_from: start + cfg.warmup,
        cfg: cfg.clone(),
        epoch: Instant::now(),
        watchers_ready: AtomicU64::new(0),
        writers_running: AtomicU64::new(cfg.clients as u64),
        puts_done: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        results: Mutex::new((new_hist(), BTreeMap::new(), 0)),
    });
    let cores = cfg.cores.max(1);
    let mut handles = Vec::new();
    for core in 0..cores {
        let shared = shared.clone();
        let h = crate::runtime::builder(glommio::Placement::Unbound, &format!("bench-{core}"))
            .spawn(move || async move { run_core(core, shared).await })
            .map_err(|e| format!("executor: {e}"))?;
        handles.push(h);
    }
    if let Some(d) = cfg.duration {
        let s = shared.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d + s.cfg.warmup);
            s.stop.store(true, Ordering::Release);
        });
    }
    let finished = Arc::new(AtomicBool::new(false));
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let (s, done) = (shared.clone(), finished.clone());
        std::thread::spawn(move || progress(&s, &done));
    }
    let joined: Result<(), String> = handles
        .into_iter()
        .try_for_each(|h| h.join().map_err(|e| format!("bench executor: {e:?}"))?);
    finished.store(true, Ordering::Release);
    joined?;
    let elapsed = start.elapsed().saturating_sub(cfg.warmup);
    let (histogram, errors, ops) = std::mem::replace(
        &mut *shared.results.lock().map_err(|_| "poisoned")?,
        (new_hist(), BTreeMap::new(), 0),
    );
    let stages = match (stages_before, stages::scrape_all(&cfg.endpoints)) {
        (Some(before), Some(after)) => stages::delta(&before, &after),
        _ => Vec::new(),
    };
    Ok(Report {
        workload: format!("{:?}", cfg.workload),
        ops,
        errors,
        elapsed,
        histogram,
        stages,
    })
}

/// A one-line progress bar on a terminal, redrawn every 200 ms.
fn progress(shared: &Shared, done: &AtomicBool) {
    use std::io::Write;
    let start = Instant::now();
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        let n = shared.issued.load(Ordering::Relaxed);
        let (frac, goal) = match (shared.cfg.total, shared.cfg.duration) {
            (Some(t), _) => ((n as f64 / t as f64).min(1.0), format!("{n}/{t}")),
            (None, Some(d)) => (
                (start.elapsed().as_secs_f64() / d.as_secs_f64()).min(1.0),
                format!("{n}"),
            ),
            _ => (0.0, format!("{n}")),
        };
        let width = 40;
        let filled = (frac * width as f64) as usize;
        let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r[{}{}] {goal} requests, {rate:.0}/s ",
            "=".repeat(filled),
            " ".repeat(width - filled)
        );
        let _ = std::io::stderr().flush();
    }
    eprintln!();
}

/// Writes the key space once so reads find data.
fn preload(cfg: &BenchConfig) -> Result<(), String> {
    let mut pre = cfg.clone();
    pre.workload = Workload::Put;
    pre.sequential_keys = true;
    pre.total = Some(cfg.key_space_size);
    pre.duration = None;
    pre.rate = None;
    pre.warmup = Duration::ZERO;
    let r = run(pre)?;
    if !r.errors.is_empty() {
        return Err(format!("preloading the key space failed: {:?}", r.errors));
    }
    Ok(())
}

async fn run_core(core: usize, shared: Arc<Shared>) -> Result<(), String> {
    let cfg = &shared.cfg;
    let cores = cfg.cores.max(1);
    let my_conns = (cfg.conns / cores + usize::from(core < cfg.conns % cores)).max(1);
    let my_clients = cfg.clients / cores + usize::from(core < cfg.clients % cores);
    let mut conns = Vec::new();
    for i in 0..my_conns {
        let ep = &cfg.endpoints[(core + i * cores) % cfg.endpoints.len()];
        let mut c = client::Client::connect_with(ep, cfg.tls.as_ref()).await?;
        if let Some((user, password)) = &cfg.user {
            c.login(user, password)
                .await
                .map_err(|s| format!("authenticating as {user} at {ep}: {}", s.message))?;
        }
        conns.push(c);
    }
    let mut tasks = Vec::new();
    if let Workload::Watch { watchers } = cfg.workload {
        let mine = watchers / cores + usize::from(core < watchers % cores);
        for w in 0..mine {
            let shared = shared.clone();
            let client = conns[w % conns.len()].clone();
            tasks.push(glommio::spawn_local(watch_loop(shared, client)));
        }
        while shared.watchers_ready.load(Ordering::Acquire) < watchers as u64 {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
    for c in 0..my_clients {
        let shared = shared.clone();
        let client = conns[c % conns.len()].clone();
        let seed = (core as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (c as u64 + 1);
        tasks.push(glommio::spawn_local(client_loop(shared, client, seed)));
    }
    let mut hist = new_hist();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut ops = 0;
    for t in tasks {
        let (h, e, n) = t.await;
        hist.add(&h).map_err(|e| e.to_string())?;
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
        ops += n;
    }
    let mut r = shared.results.lock().map_err(|_| "poisoned")?;
    r.0.add(&hist).map_err(|e| e.to_string())?;
    for (k, v) in errors {
        *r.1.entry(k).or_default() += v;
    }
    r.2 += ops;
    Ok(())
}

async fn client_loop(
    shared: Arc<Shared>,
    mut client: client::Client,
    mut rng: u64,
) -> (Histogram<u64>, BTreeMap<String, u64>, u64) {
    let cfg = &shared.cfg;
    let mut hist = new_hist();
    let mut errors = BTreeMap::new();
    let mut ops = 0;
    let value = Bytes::from(vec![b'v'; cfg.val_size]);
    let interval = cfg
        .rate
        .map(|r| Duration::from_secs_f64(cfg.clients.max(1) as f64 / r.max(1e-9)));
    let mut next_at = Instant::now();
    let mut keepalive = None;
    if cfg.workload == Workload::LeaseKeepAlive {
        match open_keepalive(&mut client).await {
            Ok(k) => keepalive = Some(k),
            Err(s) => {
                *errors
                    .entry(format!("lease: {:?}: {}", s.code, s.message))
                    .or_default() += 1;
                return (hist, errors, ops);
            }
        }
    }
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let n = shared.issued.fetch_add(1, Ordering::AcqRel);
        if cfg.total.is_some_and(|t| n >= t) {
            break;
        }
        let scheduled = match interval {
            Some(iv) => {
                let now = Instant::now();
                if next_at > now {
                    glommio::timer::sleep(next_at - now).await;
                }
                let s = next_at;
                next_at += iv;
                s
            }
            None => Instant::now(),
        };
        let key = key_for(cfg, n, &mut rng);
        let result = match cfg.workload {
            Workload::LeaseKeepAlive => match keepalive.as_mut() {
                Some((id, stream)) => keep_alive_once(*id, stream).await,
                None => Err(Status::new(Code::Internal, "no lease")),
            },
            Workload::Watch { .. } => {
                // The value starts with the send time, so watchers can time delivery.
                let mut v = (shared.epoch.elapsed().as_nanos() as u64)
                    .to_be_bytes()
                    .to_vec();
                v.resize(cfg.val_size.max(8), b'v');
                let req = pb::PutRequest {
                    key,
                    value: Bytes::from(v),
                    ..Default::default()
                };
                let r = client
                    .unary::<_, pb::PutResponse>("/etcdserverpb.KV/Put", &req)
                    .await
                    .map(|_| ());
                if r.is_ok() {
                    shared.puts_done.fetch_add(1, Ordering::AcqRel);
                }
                if let Err(s) = r {
                    *errors
                        .entry(format!("put: {:?}: {}", s.code, s.message))
                        .or_default() += 1;
                }
                continue;
            }
            Workload::Put => {
                let req = pb::PutRequest {
                    key,
                    value: value.clone(),
                    ..Default::default()
                };
                client
                    .unary::<_, pb::PutResponse>("/etcdserverpb.KV/Put", &req)
                    .await
                    .map(|_| ())
            }
            Workload::Range {
                serializable,
                prefix,
            } => {
                let range_end = if prefix {
                    crate::kv::prefix_end(&key[..key.len() / 2])
                } else {
                    Bytes::new()
                };
                let key = if prefix {
                    key.slice(..key.len() / 2)
                } else {
                    key
                };
                let req = pb::RangeRequest {
                    key,
                    range_end,
                    serializable,
                    limit: 100,
                    ..Default::default()
                };
                client
                    .unary::<_, pb::RangeResponse>("/etcdserverpb.KV/Range", &req)
                    .await
                    .map(|_| ())
            }
            Workload::TxnPut { ops: nops } => {
                let success = (0..nops.max(1))
                    .map(|i| {
                        let mut k = key.to_vec();
                        k.extend_from_slice(format!("/{i}").as_bytes());
                        pb::RequestOp {
                            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                                key: Bytes::from(k),
                                value: value.clone(),
                                ..Default::default()
                            })),
                        }
                    })
                    .collect();
                let req = pb::TxnRequest {
                    success,
                    ..Default::default()
                };
                client
                    .unary::<_, pb::TxnResponse>("/etcdserverpb.KV/Txn", &req)
                    .await
                    .map(|_| ())
            }
            Workload::TxnMixed { read_ratio } => {
                // xorshift step for the read/write choice, from the same per-client stream.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let read = (rng % 1_000_000) as f64 / 1e6 < read_ratio / (read_ratio + 1.0);
                let op = if read {
                    pb::request_op::Request::RequestRange(pb::RangeRequest {
                        key,
                        ..Default::default()
                    })
                } else {
                    pb::request_op::Request::RequestPut(pb::PutRequest {
                        key,
                        value: value.clone(),
                        ..Default::default()
                    })
                };
                let req = pb::TxnRequest {
                    success: vec![pb::RequestOp { request: Some(op) }],
                    ..Default::default()
                };
                client
                    .unary::<_, pb::TxnResponse>("/etcdserverpb.KV/Txn", &req)
                    .await
                    .map(|_| ())
            }
            Workload::Mvcc => unreachable!("handled by run_mvcc"),
        };
        let done = Instant::now();
        if done < shared.measuring_from {
            continue;
        }
        match result {
            Ok(()) => {
                let _ = hist.record(done.duration_since(scheduled).as_nanos().max(1) as u64);
                ops += 1;
            }
            Err(s) => {
                *errors
                    .entry(format!("{:?}: {}", s.code, s.message))
                    .or_default() += 1
            }
        }
    }
    if let Workload::Watch { .. } = cfg.workload {
        shared.writers_running.fetch_sub(1, Ordering::AcqRel);
    }
    (hist, errors, ops)
}

/// Grants a lease for a keep-alive client and opens its stream.
async fn open_keepalive(
    client: &mut client::Client,
) -> Result<(i64, client::GrpcStream<pb::LeaseKeepAliveResponse>), Status> {
    let grant: pb::LeaseGrantResponse = client
        .unary(
            "/etcdserverpb.Lease/LeaseGrant",
            &pb::LeaseGrantRequest { ttl: 60, id: 0 },
        )
        .await?;
    let stream = client.stream("/etcdserverpb.Lease/LeaseKeepAlive").await?;
    Ok((grant.id, stream))
}

/// One renewal: a request on the stream and its answer.
async fn keep_alive_once(
    id: i64,
    stream: &mut client::GrpcStream<pb::LeaseKeepAliveResponse>,
) -> Result<(), Status> {
    stream.send(&pb::LeaseKeepAliveRequest { id })?;
    match stream.recv().await? {
        Some(r) if r.ttl > 0 => Ok(()),
        Some(_) => Err(Status::new(Code::NotFound, "lease expired")),
        None => Err(Status::new(Code::Unavailable, "keep-alive stream ended")),
    }
}

/// One watch stream over the whole key space: counts events and times them from the put's
/// send time (in the value) to arrival. Ends once every acknowledged put was seen, or reports
/// the shortfall if events stop coming after the writers finished.
async fn watch_loop(
    shared: Arc<Shared>,
    mut client: client::Client,
) -> (Histogram<u64>, BTreeMap<String, u64>, u64) {
    let mut hist = new_hist();
    let mut errors = BTreeMap::new();
    let mut ops = 0u64;
    let fail = |errors: &mut BTreeMap<String, u64>, what: String| {
        *errors.entry(what).or_default() += 1;
    };
    let mut stream = match client
        .stream::<pb::WatchResponse>("/etcdserverpb.Watch/Watch")
        .await
    {
        Ok(s) => s,
        Err(s) => {
            shared.watchers_ready.fetch_add(1, Ordering::AcqRel);
            fail(&mut errors, format!("watch: {:?}: {}", s.code, s.message));
            return (hist, errors, ops);
        }
    };
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: Bytes::from_static(b"\0"),
                range_end: Bytes::from_static(b"\0"),
                ..Default::default()
            },
        )),
    };
    let mut ready = false;
    if let Err(s) = stream.send(&create) {
        fail(&mut errors, format!("watch: {:?}: {}", s.code, s.message));
    }
    let mut idle_since: Option<Instant> = None;
    loop {
        let writers_done = shared.writers_running.load(Ordering::Acquire) == 0;
        if ready && writers_done && ops >= shared.puts_done.load(Ordering::Acquire) {
            break;
        }
        let next = futures_lite::future::or(async { Some(stream.recv().await) }, async {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            None
        })
        .await;
        let resp = match next {
            None => {
                if writers_done {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(10) {
                        let missing = shared.puts_done.load(Ordering::Acquire) - ops;
                        fail(&mut errors, format!("{missing} events never arrived"));
                        break;
                    }
                }
                continue;
            }
            Some(Ok(Some(r))) => r,
            Some(Ok(None)) => {
                fail(&mut errors, "watch stream ended".into());
                break;
            }
            Some(Err(s)) => {
                fail(&mut errors, format!("watch: {:?}: {}", s.code, s.message));
                break;
            }
        };
        idle_since = None;
        if resp.created && !ready {
            ready = true;
            shared.watchers_ready.fetch_add(1, Ordering::AcqRel);
        }
        let now = shared.epoch.elapsed().as_nanos() as u64;
        for e in resp.events {
            let sent =
                e.kv.as_ref()
                    .and_then(|kv| kv.value.get(..8))
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes);
            if let Some(sent) = sent {
                let _ = hist.record(now.saturating_sub(sent).max(1));
            }
            ops += 1;
        }
    }
    if !ready {
        shared.watchers_ready.fetch_add(1, Ordering::AcqRel);
    }
    (hist, errors, ops)
}

/// The embedded engine under the same load shape: `clients` threads doing blocking puts.
fn run_mvcc(cfg: BenchConfig) -> Result<Report, String> {
    let tmp;
    let dir = match &cfg.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempdir()?;
            tmp.clone()
        }
    };
    let db = crate::Db::open(
        &dir,
        crate::Options {
            cores: cfg.cores.max(1),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let issued = AtomicU64::new(0);
    let start = Instant::now();
    let results = Mutex::new((new_hist(), BTreeMap::<String, u64>::new(), 0u64));
    std::thread::scope(|s| {
        for c in 0..cfg.clients.max(1) {
            let (db, cfg, issued, results) = (&db, &cfg, &issued, &results);
            s.spawn(move || {
                let mut rng = c as u64 + 0x5EED;
                let mut hist = new_hist();
                let value = Bytes::from(vec![b'v'; cfg.val_size]);
                let deadline = cfg.duration.map(|d| start + d);
                let mut ops = 0;
                let mut errors = BTreeMap::new();
                loop {
                    let n = issued.fetch_add(1, Ordering::AcqRel);
                    if cfg.total.is_some_and(|t| n >= t)
                        || deadline.is_some_and(|d| Instant::now() > d)
                    {
                        break;
                    }
                    let t0 = Instant::now();
                    match db.put(crate::kv::PutRequest::new(
                        key_for(cfg, n, &mut rng),
                        value.clone(),
                    )) {
                        Ok(_) => {
                            let _ = hist.record(t0.elapsed().as_nanos().max(1) as u64);
                            ops += 1;
                        }
                        Err(e) => *errors.entry(e.to_string()).or_insert(0u64) += 1,
                    }
                }
                if let Ok(mut r) = results.lock() {
                    let _ = r.0.add(&hist);
                    for (k, v) in errors {
                        *r.1.entry(k).or_default() += v;
                    }
                    r.2 += ops;
                }
            });
        }
    });
    let elapsed = start.elapsed();
    db.close();
    if cfg.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (histogram, errors, ops) = results.into_inner().map_err(|_| "poisoned")?;
    Ok(Report {
        workload: "Mvcc".into(),
        ops,
        errors,
        elapsed,
        histogram,
        stages: Vec::new(),
    })
}

fn tempdir() -> Result<std::path::PathBuf, String> {
    let base = std::env::temp_dir();
    for i in 0..1000u32 {
        let p = base.join(format!("spindle-bench-{}-{i}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(p);
        }
    }
    Err("cannot create a temporary data dir".into())
}

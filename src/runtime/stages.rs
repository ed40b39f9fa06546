//! Where a put's time goes: per-stage latency histograms of the write path, recorded on every
//! core the put passes through and merged only when `/metrics` is rendered.
//!
//! A put is timed with one monotonic timestamp per stage boundary. A [`Tracer`] holds the last
//! boundary and the histograms of the core it runs on; when the put crosses to another core only
//! the boundary's `Instant` travels in the message, and the other core continues with its own
//! tracer. Each core writes only its own [`CoreStages`], so recording is a few plain loads and
//! stores (relaxed atomics, never a locked instruction) and the hot path takes no lock and
//! allocates nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The stages of a put, in the order a put passes them. A put served on the core that owns its
/// shard skips the two hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Decode,
    Route,
    HopToOwner,
    Execute,
    WalQueue,
    WalWrite,
    Fdatasync,
    Commit,
    Visible,
    HopBack,
    Encode,
}

impl Stage {
    pub const ALL: [Stage; 11] = [
        Stage::Decode,
        Stage::Route,
        Stage::HopToOwner,
        Stage::Execute,
        Stage::WalQueue,
        Stage::WalWrite,
        Stage::Fdatasync,
        Stage::Commit,
        Stage::Visible,
        Stage::HopBack,
        Stage::Encode,
    ];

    /// The `stage` label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Route => "route",
            Stage::HopToOwner => "hop_to_owner",
            Stage::Execute => "execute",
            Stage::WalQueue => "wal_queue",
            Stage::WalWrite => "wal_write",
            Stage::Fdatasync => "fdatasync",
            Stage::Commit => "commit",
            Stage::Visible => "visible",
            Stage::HopBack => "hop_back",
            Stage::Encode => "encode",
        }
    }

    /// What the stage covers, for `/metrics` HELP and the docs.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Decode => "request handed to the handler until its body is read and the protobuf decoded (connection's core)",
            Stage::Route => "validation and choosing the core that owns the key's shard",
            Stage::HopToOwner => "message to the owning core until its task runs (only puts whose shard is on another core)",
            Stage::Execute => "write permit, compares, applying to the index and queueing the WAL record (owning core)",
            Stage::WalQueue => "record queued until the flush that carries it starts (flusher wake-up, or the previous flush)",
            Stage::WalWrite => "the flush's O_DIRECT write, durable when it completes (segments are O_DSYNC)",
            Stage::Fdatasync => "the flush's write completed until the log counts it durable (no separate fdatasync: segments are O_DSYNC)",
            Stage::Commit => "the flush durable until the put's task resumes with the entry committed (in a cluster: followers' acknowledgements)",
            Stage::Visible => "revision finished until readers see it (waits for earlier revisions of other cores)",
            Stage::HopBack => "answer sent from the owning core until the connection's core resumes (only puts that hopped)",
            Stage::Encode => "response built and protobuf encoded, handed to HTTP/2",
        }
    }
}

const STAGES: usize = Stage::ALL.len();

/// Bucket upper bounds in nanoseconds: 1, 1.5, 2, 3, 5, 7 per decade from 1 µs to 1 s. Finer
/// than the request histograms' because most stages take microseconds.
pub const BUCKETS_NS: [u64; 37] = {
    const STEPS: [u64; 6] = [10, 15, 20, 30, 50, 70];
    let mut out = [0u64; 37];
    let mut decade = 100; // 10 × 100 ns = 1 µs
    let mut i = 0;
    while i < 36 {
        out[i] = STEPS[i % 6] * decade;
        i += 1;
        if i % 6 == 0 {
            decade *= 10;
        }
    }
    out[36] = 1_000_000_000;
    out
};

/// Buckets plus the overflow (`+Inf`) one.
const SLOTS: usize = BUCKETS_NS.len() + 1;

struct Hist {
    buckets: [AtomicU64; SLOTS],
    sum_ns: AtomicU64,
}

impl Default for Hist {
    fn default() -> Hist {
        Hist {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// One core's histograms. Only that core's thread writes them.
#[derive(Default)]
#[repr(align(128))] // no false sharing between cores' slots
pub struct CoreStages {
    stages: [Hist; STAGES],
}

/// Adds on the single writer's side: a load and a store, no read-modify-write instruction.
/// Another thread writing the same slot could only lose counts, never corrupt anything.
fn bump(a: &AtomicU64, by: u64) {
    a.store(a.load(Relaxed).wrapping_add(by), Relaxed);
}

impl CoreStages {
    pub fn record(&self, stage: Stage, took: Duration) {
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        let h = &self.stages[stage as usize];
        bump(&h.buckets[BUCKETS_NS.partition_point(|&le| le < ns)], 1);
        bump(&h.sum_ns, ns);
    }
}

/// Every core's stage histograms of one store.
pub struct PutStages {
    cores: Box<[CoreStages]>,
}

impl PutStages {
    pub fn new(cores: usize) -> PutStages {
        PutStages {
            cores: (0..cores.max(1)).map(|_| CoreStages::default()).collect(),
        }
    }

    /// The histograms core `core` records into (out-of-range ids share the last slot).
    pub fn core(&self, core: usize) -> &CoreStages {
        &self.cores[core.min(self.cores.len() - 1)]
    }

    /// All cores merged, in [`Stage::ALL`] order.
    pub fn snapshot(&self) -> Vec<StageSnapshot> {
        Stage::ALL
            .iter()
            .map(|&stage| {
                let mut s = StageSnapshot {
                    stage,
                    buckets: [0; SLOTS],
                    sum_ns: 0,
                };
                for c in self.cores.iter() {
                    let h = &c.stages[stage as usize];
                    for (out, b) in s.buckets.iter_mut().zip(&h.buckets) {
                        *out += b.load(Relaxed);
                    }
                    s.sum_ns += h.sum_ns.load(Relaxed);
                }
                s
            })
            .collect()
    }
}

/// One stage merged over cores: non-cumulative bucket counts (the last is `+Inf`).
#[derive(Clone, Debug)]
pub struct StageSnapshot {
    pub stage: Stage,
    pub buckets: [u64; SLOTS],
    pub sum_ns: u64,
}

impl StageSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Times one put on one core: each [`mark`](Tracer::mark) records the time since the previous
/// boundary as a stage.
pub struct Tracer<'a> {
    slot: &'a CoreStages,
    last: Instant,
}

impl<'a> Tracer<'a> {
    /// Starts (or, on the next core, continues) at boundary `at`.
    pub fn new(slot: &'a CoreStages, at: Instant) -> Tracer<'a> {
        Tracer { slot, last: at }
    }

    /// The last boundary; what a hop carries to the next core.
    pub fn last(&self) -> Instant {
        self.last
    }

    /// Moves the last boundary to `at` without recording: the stages up to it were timed on
    /// another core.
    pub fn skip_to(&mut self, at: Instant) {
        self.last = self.last.max(at);
    }

    /// Ends `stage` now.
    pub fn mark(&mut self, stage: Stage) {
        self.mark_at(stage, Instant::now());
    }

    /// Ends `stage` at `at`, a boundary another task observed (a WAL flush's). Boundaries never
    /// go backwards: one before the previous counts as the previous (a zero-length stage).
    pub fn mark_at(&mut self, stage: Stage, at: Instant) {
        let at = at.max(self.last);
        self.slot.record(stage, at.duration_since(self.last));
        self.last = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_rise_from_one_microsecond_to_one_second() {
        assert_eq!(BUCKETS_NS[0], 1_000);
        assert_eq!(
            &BUCKETS_NS[..7],
            &[1_000, 1_500, 2_000, 3_000, 5_000, 7_000, 10_000]
        );
        assert_eq!(BUCKETS_NS[36], 1_000_000_000);
        assert!(BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn marks_land_in_their_stage_and_bucket_and_cores_merge() {
        let stages = PutStages::new(2);
        let t0 = Instant::now();
        let mut a = Tracer::new(stages.core(0), t0);
        a.mark_at(Stage::Decode, t0 + Duration::from_micros(1)); // le 1 µs (inclusive)
        a.mark_at(Stage::Route, t0 + Duration::from_micros(3)); // 2 µs
        let mut b = Tracer::new(stages.core(1), a.last());
        b.mark_at(Stage::HopToOwner, t0 + Duration::from_millis(2)); // ≈ 2 ms
                                                                     // A boundary before the last one is a zero-length stage.
        b.mark_at(Stage::Execute, t0);
        b.mark_at(Stage::Fdatasync, t0 + Duration::from_secs(3)); // overflow
        let mut a2 = Tracer::new(stages.core(0), t0);
        a2.mark_at(Stage::Decode, t0 + Duration::from_micros(4)); // le 5 µs
        let snap = stages.snapshot();
        let get = |s: Stage| snap.iter().find(|x| x.stage == s).unwrap();
        let decode = get(Stage::Decode);
        assert_eq!(decode.count(), 2);
        assert_eq!(decode.buckets[0], 1);
        assert_eq!(decode.buckets[4], 1);
        assert_eq!(decode.sum_ns, 5_000);
        assert_eq!(get(Stage::Route).buckets[2], 1);
        let hop = get(Stage::HopToOwner);
        assert_eq!(hop.count(), 1);
        assert_eq!(hop.sum_ns, 1_997_000);
        assert_eq!(get(Stage::Execute).buckets[0], 1);
        assert_eq!(get(Stage::Fdatasync).buckets[SLOTS - 1], 1);
        assert_eq!(get(Stage::WalWrite).count(), 0);
        assert_eq!(snap.len(), Stage::ALL.len());
    }
}

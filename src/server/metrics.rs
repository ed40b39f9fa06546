//! Prometheus metrics on `/metrics`: per-method request counts and latency histograms, where a
//! put's time goes (per-stage histograms, see `runtime::stages`), plus the engine's WAL fsync
//! latency, queue depths and store size.
//!
//! Counters are relaxed atomics in a fixed table indexed by method, so recording takes no lock;
//! the stage histograms are per core and merged here.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::db::LocalDb;
use crate::runtime::stages::{StageSnapshot, BUCKETS_NS};

/// Latency bucket upper bounds, in seconds (shared with the engine's fsync histogram).
pub const BUCKETS: [f64; 12] = crate::runtime::LATENCY_BUCKETS;

const METHODS: [&str; 17] = [
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "other",
];

#[derive(Default)]
struct MethodStats {
    count: AtomicU64,
    sum_micros: AtomicU64,
    buckets: [AtomicU64; 12],
}

#[derive(Default)]
pub struct Metrics {
    methods: [MethodStats; METHODS.len()],
}

impl Metrics {
    pub fn observe(&self, path: &str, took: Duration) {
        let i = METHODS
            .iter()
            .position(|m| *m == path)
            .unwrap_or(METHODS.len() - 1);
        let m = &self.methods[i];
        m.count.fetch_add(1, Relaxed);
        m.sum_micros.fetch_add(took.as_micros() as u64, Relaxed);
        let secs = took.as_secs_f64();
        if let Some(b) = BUCKETS.iter().position(|&le| secs <= le) {
            m.buckets[b].fetch_add(1, Relaxed);
        }
    }

    pub async fn render(&self, db: &LocalDb) -> String {
        let mut out = String::new();
        out.push_str("# HELP spindle_grpc_requests_total gRPC requests handled, by method.\n");
        out.push_str("# TYPE spindle_grpc_requests_total counter\n");
        for (name, m) in METHODS.iter().zip(&self.methods) {
            let _ = writeln!(
                out,
                "spindle_grpc_requests_total{{method=\"{name}\"}} {}",
                m.count.load(Relaxed)
            );
        }
        out.push_str(
            "# HELP spindle_grpc_request_duration_seconds gRPC request latency, by method.\n",
        );
        out.push_str("# TYPE spindle_grpc_request_duration_seconds histogram\n");
        for (name, m) in METHODS.iter().zip(&self.methods) {
            let counts: Vec<u64> = m.buckets.iter().map(|b| b.load(Relaxed)).collect();
            histogram(
                &mut out,
                "spindle_grpc_request_duration_seconds",
                &format!("method=\"{name}\""),
                &BUCKETS,
                &counts,
                m.count.load(Relaxed),
                m.sum_micros.load(Relaxed) as f64 / 1e6,
            );
        }
        render_stages(&mut out, &db.put_stages());
        match db.status().await {
            Ok(st) => {
                let _ = writeln!(
                    out,
                    "# TYPE spindle_revision gauge\nspindle_revision {}",
                    st.revision
                );
                let _ = writeln!(
                    out,
                    "# TYPE spindle_compact_revision gauge\nspindle_compact_revision {}",
                    st.compact_revision
                );
                let _ = writeln!(out, "# TYPE spindle_keys gauge\nspindle_keys {}", st.keys);
                let _ = writeln!(
                    out,
                    "# TYPE spindle_disk_bytes gauge\nspindle_disk_bytes {}",
                    st.disk_bytes
                );
                out.push_str("# HELP spindle_wal_fsync_duration_seconds WAL durable write latency (O_DSYNC writes), all shards.\n");
                out.push_str("# TYPE spindle_wal_fsync_duration_seconds histogram\n");
                histogram(
                    &mut out,
                    "spindle_wal_fsync_duration_seconds",
                    "",
                    &BUCKETS,
                    &st.fsync_buckets,
                    st.fsyncs,
                    st.fsync_seconds,
                );
                out.push_str("# HELP spindle_shard_queue_depth WAL records queued and not yet durable, by shard.\n");
                out.push_str("# TYPE spindle_shard_queue_depth gauge\n");
                for (shard, depth) in st.queue_depths.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "spindle_shard_queue_depth{{shard=\"{shard}\"}} {depth}"
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(out, "# engine status unavailable: {e}");
            }
        }
        out
    }
}

/// The put stage histograms, every stage in path order (stages a put skipped have count 0).
fn render_stages(out: &mut String, stages: &[StageSnapshot]) {
    const NAME: &str = "spindle_put_stage_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {NAME} Where a put's time goes, by stage in path order: {}.",
        stages
            .iter()
            .map(|s| format!("{} = {}", s.stage.name(), s.stage.describe()))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(out, "# TYPE {NAME} histogram");
    let bounds: Vec<f64> = BUCKETS_NS.iter().map(|&ns| ns as f64 / 1e9).collect();
    for s in stages {
        histogram(
            out,
            NAME,
            &format!("stage=\"{}\"", s.stage.name()),
            &bounds,
            &s.buckets,
            s.count(),
            s.sum_ns as f64 / 1e9,
        );
    }
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    counts: &[u64],
    total: u64,
    sum: f64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (le, c) in bounds.iter().zip(counts) {
        cumulative += c;
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {total}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::stages::{PutStages, Stage, Tracer};

    #[test]
    fn stage_histograms_render_every_stage_with_matching_counts() {
        let stages = PutStages::new(2);
        let t0 = std::time::Instant::now();
        for core in 0..2 {
            let mut t = Tracer::new(stages.core(core), t0);
            t.mark_at(Stage::Decode, t0 + Duration::from_micros(40));
        }
        let mut out = String::new();
        render_stages(&mut out, &stages.snapshot());
        let name = "spindle_put_stage_duration_seconds";
        assert!(out.contains(&format!("# TYPE {name} histogram")), "{out}");
        assert!(
            out.contains(&format!(
                "{name}_bucket{{stage=\"decode\",le=\"0.00003\"}} 0"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "{name}_bucket{{stage=\"decode\",le=\"0.00005\"}} 2"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_count{{stage=\"decode\"}} 2")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_sum{{stage=\"decode\"}} 0.00008")),
            "{out}"
        );
        for s in Stage::ALL {
            assert!(
                out.contains(&format!("{name}_count{{stage=\"{}\"}}", s.name())),
                "{out}"
            );
        }
    }
}

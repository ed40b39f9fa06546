//! What every glommio-side layer shares and nothing engine-specific: executor construction (the
//! shard runtime, the load generator, tools and tests), the adapter that lets hyper run on a
//! glommio TCP stream (`io`, used by the server and the load generator's client), the latency
//! histogram bounds that the WAL's fsync histogram and `/metrics` both use, and the per-stage
//! timing of a put (`stages`), which the server, the routing layer and the engine all record.

pub mod io;
pub mod stages;

use glommio::{LocalExecutorBuilder, Placement};

/// Latency histogram bucket bounds in seconds (WAL fsyncs, server requests).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// io_uring registered-buffer memory per executor. The machine's memlock limit (8 MiB) must cover
/// every executor in the process, and writes larger than this fall back to ordinary allocations.
pub const IO_MEMORY: usize = 512 << 10;
/// Submission-queue depth per ring; small rings keep locked memory low.
pub const RING_DEPTH: usize = 128;

pub fn builder(placement: Placement, name: &str) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(placement)
        .name(name)
        .io_memory(IO_MEMORY)
        .ring_depth(RING_DEPTH)
}

/// Runs `f` to completion on a fresh unpinned executor thread (tests and one-shot tools).
pub fn run_local<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    builder(Placement::Unbound, "spindle-local")
        .spawn(f)
        .expect("failed to start a glommio executor")
        .join()
        .expect("executor thread panicked")
}

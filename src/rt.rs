//! Executor construction shared by the shard runtime, tools and tests.

use glommio::{LocalExecutorBuilder, Placement};

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

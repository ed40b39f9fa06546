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

/// Paces long background work on an executor (a checkpoint's export and adoption): between
/// steps, [`Pacer::pace`] lets the executor poll I/O and timers and run requests once the work
/// has run for [`Pacer::BUDGET`]. Neither of glommio's yields does that: `yield_if_needed`
/// yields only once the preemption timer (100 ms) fired, and `yield_task_queue_now` only lets the
/// queue's other *ready* tasks run, since the executor goes back to its rings only when no task is
/// ready. A short sleep makes this task not ready, so the executor polls before resuming it
/// (docs/benchmarks.md, "Checkpoints without stalls" and "Pacing that reaches the rings").
pub struct Pacer {
    since: std::cell::Cell<std::time::Instant>,
}

impl Pacer {
    /// How long work runs between yields.
    pub const BUDGET: std::time::Duration = std::time::Duration::from_millis(1);
    /// How long a step off lasts: any timer at all, long enough not to have expired by the time it
    /// is first polled.
    const STEP_OFF: std::time::Duration = std::time::Duration::from_micros(5);

    pub fn new() -> Pacer {
        Pacer {
            since: std::cell::Cell::new(std::time::Instant::now()),
        }
    }

    /// Whether the work has run its budget since the last yield.
    fn due(&self) -> bool {
        self.since.get().elapsed() >= Self::BUDGET
    }

    /// Steps off the executor (so it polls its rings and timers and runs what they woke) if the
    /// budget is spent.
    pub async fn pace(&self) {
        if self.due() {
            glommio::timer::sleep(Self::STEP_OFF).await;
            self.since.set(std::time::Instant::now());
        } else {
            glommio::yield_if_needed().await;
        }
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

/// An executor with the project's ring and io-memory sizes. `SPINDLE_SPIN_US=N` in the
/// environment makes a pinned executor poll N µs before it parks: off by default, because with
/// the load generator on the same two CPUs spinning takes their time (docs/benchmarks.md).
pub fn builder(placement: Placement, name: &str) -> LocalExecutorBuilder {
    let b = LocalExecutorBuilder::new(placement)
        .name(name)
        .io_memory(IO_MEMORY)
        .ring_depth(RING_DEPTH);
    match std::env::var("SPINDLE_SPIN_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(us) if us > 0 => b.spin_before_park(std::time::Duration::from_micros(us)),
        _ => b,
    }
}

/// Where each of a store's `cores` executors runs. Executors pin to the CPUs this process may
/// use (its affinity mask, so `taskset` and cpusets are obeyed), in order, when there are at
/// least as many cores as such CPUs: the process owns them, which is what thread-per-core
/// assumes. With fewer cores than allowed CPUs the process shares the machine (a `--cores 1`
/// member next to others, a test), and pinning every such process to the same first CPUs would
/// stack them on one CPU while the others idle; those executors are left to the kernel's
/// scheduler. `pin = false` (or `SPINDLE_NO_PIN` in the environment) never pins.
pub fn core_placements(cores: usize, pin: bool) -> Vec<Placement> {
    let pin = pin && std::env::var_os("SPINDLE_NO_PIN").is_none();
    let allowed = if pin { allowed_cpus() } else { Vec::new() };
    pin_plan(cores, &allowed)
        .into_iter()
        .map(|cpu| cpu.map_or(Placement::Unbound, Placement::Fixed))
        .collect()
}

/// The CPU each executor pins to (`None`: unpinned) given the allowed CPUs.
fn pin_plan(cores: usize, allowed: &[usize]) -> Vec<Option<usize>> {
    (0..cores)
        .map(|core| {
            (!allowed.is_empty() && cores >= allowed.len()).then(|| allowed[core % allowed.len()])
        })
        .collect()
}

/// The CPUs in this process's affinity mask (empty if it cannot be read: nothing is pinned).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills for this process (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
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

#[cfg(test)]
mod tests {
    use super::{pin_plan, run_local, Pacer};

    #[test]
    fn a_pacer_yields_once_its_budget_is_spent_and_starts_over() {
        let spin = || {
            let start = std::time::Instant::now();
            while start.elapsed() < Pacer::BUDGET {
                std::hint::spin_loop();
            }
        };
        run_local(move || async move {
            let pacer = Pacer::new();
            assert!(!pacer.due(), "due before any work");
            spin();
            assert!(pacer.due(), "not due after its budget");
            let ran = std::rc::Rc::new(std::cell::Cell::new(false));
            let flag = ran.clone();
            glommio::spawn_local(async move { flag.set(true) }).detach();
            pacer.pace().await;
            assert!(
                ran.get(),
                "the waiting task did not run when the pacer yielded"
            );
            assert!(
                !pacer.due(),
                "the budget did not start over after the yield"
            );
        });
    }

    #[test]
    fn a_pacer_lets_the_executor_fire_its_timers_while_it_works() {
        run_local(|| async {
            let start = std::time::Instant::now();
            let fired = std::rc::Rc::new(std::cell::Cell::new(false));
            let flag = fired.clone();
            glommio::spawn_local(async move {
                glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
                flag.set(true);
            })
            .detach();
            // Let the timer task register its timer, then work in paced 100 µs steps for 50 ms:
            // far less than glommio's 100 ms preemption timer, far more than the 2 ms timer.
            futures_lite::future::yield_now().await;
            let pacer = Pacer::new();
            while start.elapsed() < std::time::Duration::from_millis(50) {
                let step = std::time::Instant::now();
                while step.elapsed() < std::time::Duration::from_micros(100) {
                    std::hint::spin_loop();
                }
                pacer.pace().await;
            }
            // Not a bound on when it fired: a busy machine may deschedule this thread for a while.
            assert!(
                fired.get(),
                "the timer never fired while the work was paced"
            );
        });
    }

    #[test]
    fn executors_pin_only_when_they_use_every_allowed_cpu() {
        // The process owns its CPUs: one executor on each, in the mask's order.
        assert_eq!(pin_plan(2, &[0, 1]), vec![Some(0), Some(1)]);
        assert_eq!(pin_plan(2, &[2, 5]), vec![Some(2), Some(5)]);
        // `taskset -c 1 spindle serve --cores 1`: the one allowed CPU, not CPU 0.
        assert_eq!(pin_plan(1, &[1]), vec![Some(1)]);
        // More executors than CPUs wrap around the allowed ones.
        assert_eq!(pin_plan(3, &[4, 6]), vec![Some(4), Some(6), Some(4)]);
        // Fewer executors than allowed CPUs: the machine is shared, nothing is pinned.
        assert_eq!(pin_plan(1, &[0, 1]), vec![None]);
        // An unreadable mask pins nothing.
        assert_eq!(pin_plan(2, &[]), vec![None, None]);
    }
}

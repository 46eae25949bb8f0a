//! CPU-heavy work off the async runtime. Work on more than [`HEAVY_BYTES`] of input (parsing
//! a very large request, counting its prompt, keying or storing a very large cache entry) runs
//! on a few threads of its own at a low scheduling priority (nice [`NICE`], Linux): when they
//! share a core with the runtime's workers, the kernel runs the workers first, so a 100k-token
//! prompt does not hold up the small requests beside it; it takes the CPU they leave. Smaller
//! work goes to Tokio's blocking pool at normal priority.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

/// Input size up to which parsing and keying run inline on the runtime (tens of µs).
pub const INLINE_BYTES: usize = 64 * 1024;

/// Input size from which work runs on the low-priority threads (~64k tokens of text).
pub const HEAVY_BYTES: usize = 256 * 1024;

/// The low-priority threads' nice value: a nice-0 worker gets about nine tenths of a shared
/// core against one of them, and they still progress on a saturated one.
pub const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Runs `work` off the runtime: on the low-priority threads when `size` is over
/// [`HEAVY_BYTES`], else on the blocking pool. `None` when the work panicked.
pub async fn offload<T, F>(size: usize, work: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let pool = if size > HEAVY_BYTES { pool() } else { None };
    let Some(pool) = pool else {
        return tokio::task::spawn_blocking(work).await.ok();
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(work());
    });
    pool.send(job).ok()?;
    rx.await.ok()
}

/// The queue of the low-priority threads (as many as the process may use cores, at least
/// two), started on first use; `None` if no thread could start.
fn pool() -> Option<&'static mpsc::Sender<Job>> {
    static POOL: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let started = (0..n)
            .filter(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("tollgate-heavy-{i}"))
                    .spawn(move || serve(&rx))
                    .is_ok()
            })
            .count();
        (started > 0).then_some(tx)
    })
    .as_ref()
}

fn serve(rx: &Mutex<mpsc::Receiver<Job>>) {
    lower_priority();
    loop {
        let job = match rx.lock() {
            Ok(rx) => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
            Err(_) => return,
        };
        // A panicking job drops its answer channel (the caller gets `None`); the thread stays.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
    }
}

/// This thread to nice [`NICE`] (or leaves it lower still, if the process already runs so).
#[cfg(target_os = "linux")]
fn lower_priority() {
    use rustix::process::{getpriority_process, setpriority_process};
    let tid = Some(rustix::thread::gettid());
    let nice = getpriority_process(tid).map_or(NICE, |now| now.max(NICE));
    if let Err(e) = setpriority_process(tid, nice) {
        tracing::debug!("heavy work at normal priority: setpriority failed: {e}");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_and_heavy_work_both_answer() {
        assert_eq!(offload(10, || 1 + 1).await, Some(2));
        assert_eq!(offload(HEAVY_BYTES + 1, || 40 + 2).await, Some(42));
    }

    #[tokio::test]
    async fn a_panic_is_none_and_the_threads_stay() {
        for _ in 0..8 {
            let r: Option<u8> = offload(HEAVY_BYTES + 1, || panic!("boom")).await;
            assert_eq!(r, None);
        }
        assert_eq!(offload(HEAVY_BYTES + 1, || 7).await, Some(7));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn heavy_threads_run_at_low_priority() {
        let nice = offload(HEAVY_BYTES + 1, || {
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
        })
        .await
        .flatten();
        assert!(nice.is_some_and(|n| n >= NICE), "{nice:?}");
    }
}

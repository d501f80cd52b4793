//! Whether a worker thread (a chat engine's scheduler, an embedding model's batcher) is still
//! running. `/ready` and `/health` read it: a server whose worker died can only fail the requests
//! of that model, so it must be taken out of rotation and restarted rather than report healthy.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Shared flag, true while the worker's [`AliveGuard`] exists.
#[derive(Debug, Clone)]
pub struct Liveness(Arc<AtomicBool>);

/// Moved into the worker thread; dropping it (the thread returns or unwinds from a panic) marks
/// the worker dead.
#[derive(Debug)]
pub struct AliveGuard {
    flag: Arc<AtomicBool>,
    worker: String,
}

impl Liveness {
    /// A live flag and the guard that keeps it so.
    pub fn new(worker: impl Into<String>) -> (Liveness, AliveGuard) {
        let flag = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard {
            flag: flag.clone(),
            worker: worker.into(),
        };
        (Liveness(flag), guard)
    }

    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!(worker = %self.worker, "worker thread panicked and stopped; /ready and /health now answer 503");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_is_reported_dead() {
        let (live, guard) = Liveness::new("test");
        assert!(live.is_alive());
        let handle = std::thread::spawn(move || {
            let _guard = guard;
            panic!("worker bug");
        });
        assert!(handle.join().is_err());
        assert!(!live.is_alive());
    }
}

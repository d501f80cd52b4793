//! CPU compute shared by the model families: the thread count of the maths, quantized linear
//! kernels, paged attention, and element-wise functions candle runs slowly.
pub mod act;
pub mod attention;
pub mod quant;
pub mod rows;
pub mod sgemm;

pub use attention::{paged_attention, Dims, Span};

use std::sync::OnceLock;

/// Instruction sets the kernels come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best this CPU runs (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let base = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                if base && is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if base {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether this CPU can run kernels of this kind.
    pub fn supported(self) -> bool {
        match (self, Isa::detect()) {
            (Isa::Portable, _) => true,
            (Isa::Avx2, Isa::Avx2 | Isa::Avx512) => true,
            (a, b) => a == b,
        }
    }
}

/// Whether the CPU has AVX-512 VNNI (`vpdpbusd` on 512-bit vectors), detected once.
pub fn has_vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            Isa::detect() == Isa::Avx512
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// A raw output pointer shared by parallel tasks that each write their own disjoint elements
/// (rows, columns or blocks of one output); every use says which.
#[derive(Clone, Copy)]
pub struct SyncPtr(pub *mut f32);
// SAFETY: only used for disjoint writes, each user guarantees that tasks never overlap.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Threads the model maths may use: `requested`, or when 0 the CPUs this process may run on
/// (`available_parallelism` reads the affinity mask and the cgroup CPU quota, so a pod limited to
/// 2 CPUs on a 64-core node gets 2).
pub fn resolve_threads(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Set the thread count once, at start-up, before any model runs and before other threads exist.
///
/// candle sizes each float32 matmul's parallelism from `RAYON_NUM_THREADS` and, when it is unset,
/// calls `num_cpus::get_physical()` (parsing /proc/cpuinfo) on every matmul: 15-20% of decode
/// samples in a perf profile. Setting the variable makes that a cheap lookup; the rayon global
/// pool (our kernels, gemm) gets the same count. Returns the count.
pub fn init_threads(requested: usize) -> usize {
    let n = resolve_threads(requested);
    // Called from `main` before the async runtime or any pool starts: no other thread reads the
    // environment concurrently.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("glm-math-{i}"))
        .build_global()
        .is_err()
    {
        tracing::warn!("the rayon pool was already started; --threads applies to candle only");
    }
    n
}

/// Runs `op` on a worker of the global rayon pool and waits for it (directly when already on one).
///
/// A forward pass is hundreds of parallel operations (every matmul, norm and activation). Started
/// from a thread outside the pool, each one is injected into the pool while the caller sleeps on
/// a latch until it is done: `perf stat` counted ~950 context switches per decoded token (SmolLM2,
/// 2 threads) and the caller's core idles through every hand-off. On a worker, the pass's own
/// thread takes part in each operation and the hand-off happens once per pass.
pub fn on_pool<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return op();
    }
    rayon::scope(|_| op())
}

#[cfg(test)]
mod tests {
    /// Deterministic pseudo-random values in [-1, 1) (xorshift) for the kernels' tests.
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn on_pool_runs_on_a_pool_worker_and_propagates_panics() {
        assert_eq!(rayon::current_thread_index(), None);
        let inside = super::on_pool(rayon::current_thread_index);
        assert!(inside.is_some(), "the closure ran outside the pool");
        // Nested calls run in place rather than queueing behind themselves.
        assert_eq!(super::on_pool(|| super::on_pool(|| 7)), 7);
        let caught = std::panic::catch_unwind(|| super::on_pool(|| panic!("boom")));
        assert!(
            caught.is_err(),
            "a panic inside the pool must reach the caller"
        );
    }

    #[test]
    fn explicit_thread_counts_win_and_auto_is_at_least_one() {
        assert_eq!(super::resolve_threads(3), 3);
        assert!(super::resolve_threads(0) >= 1);
    }
}

//! CPU compute shared by the model families: the thread count of the maths, quantized linear
//! kernels, and element-wise functions candle runs slowly.
pub mod act;
pub mod quant;

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

#[cfg(test)]
mod tests {
    #[test]
    fn explicit_thread_counts_win_and_auto_is_at_least_one() {
        assert_eq!(super::resolve_threads(3), 3);
        assert!(super::resolve_threads(0) >= 1);
    }
}

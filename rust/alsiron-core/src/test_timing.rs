//! Timing helper for the ignored timing tests (`cargo test --release -- --ignored`).

/// CPU time [s] the calling thread has used (Linux `/proc/thread-self/schedstat`; 0 where
/// it cannot be read). Thread CPU time rather than wall time, because the development
/// machine is shared and wall time there measures the other jobs as well.
pub(crate) fn thread_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|t| t.parse::<f64>().ok())
        })
        .map_or(0.0, |ns| ns * 1e-9)
}

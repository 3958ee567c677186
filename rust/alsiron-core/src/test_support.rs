//! Helpers shared by the unit tests and the timing code: thread CPU time for the timing
//! code (`--features timing`, run through `tests/timing.rs`), masked NRMSE and demeaning
//! (inversion and background-removal tests), max-difference comparisons, seeded normal
//! noise and a valid [`Geometry`].
#![cfg_attr(not(test), allow(dead_code))]

use crate::grid::{Geometry, Shape3};

/// CPU time [s] the calling thread has used (Linux `/proc/thread-self/schedstat`; 0 where
/// it cannot be read). Thread CPU time rather than wall time, because the development
/// machine is shared and wall time there measures the other jobs as well.
#[cfg(feature = "timing")]
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

/// NRMSE [%] of `est` against `truth` over `mask` after removing each one's mean there
/// (DESIGN.md §5, as the Python metrics), in f64.
pub(crate) fn masked_nrmse_pct(est: &[f32], truth: &[f32], mask: &[u8]) -> f64 {
    let (e, t) = (demeaned_in(est, mask), demeaned_in(truth, mask));
    let num: f64 = e.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = t.iter().map(|b| b * b).sum();
    100.0 * (num / den).sqrt()
}

/// Largest |a − b| over two equally long slices (0 for empty ones).
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Largest |v| of a slice (0 for an empty one): the scale relative errors refer to.
pub(crate) fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Seeded standard-normal samples (a 64-bit LCG and Box–Muller): reproducible noise for
/// test phantoms without a random-number crate.
pub(crate) fn normal_source(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        let mut uniform = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // In (0, 1): the logarithm below never sees 0.
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (uniform(), uniform());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }
}

/// The values of `v` inside `mask` (nonzero), in f64, minus their mean there.
pub(crate) fn demeaned_in(v: &[f32], mask: &[u8]) -> Vec<f64> {
    let xs: Vec<f64> = v
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m != 0)
        .map(|(&x, _)| x as f64)
        .collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    xs.iter().map(|x| x - mean).collect()
}

/// A valid [`Geometry`] (panics on an invalid one: for tests only).
pub(crate) fn geometry(shape: Shape3, voxel_size: [f64; 3], b0_dir: [f64; 3]) -> Geometry {
    Geometry::new(shape, voxel_size, b0_dir).unwrap()
}

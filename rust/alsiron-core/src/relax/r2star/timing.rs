//! Throughput of the log-linear R2* fit and per-voxel CPU time of its chunk kernels
//! (not a test; run through `tests/timing.rs`, see there).

use super::*;

/// `cargo test --release -p alsiron-core --features timing --test timing r2star_timing -- --ignored --nocapture`
pub fn r2star_timing() {
    let n = 256 * 256 * 176;
    let tes = [0.002, 0.006, 0.010, 0.014, 0.018, 0.022];
    let mag: Vec<f32> = (0..tes.len() * n)
        .map(|i| 100.0 * (-(20.0 + (i % 97) as f64 * 0.3) * tes[i / n]).exp() as f32)
        .collect();
    let (mut r2, mut s0, mut st) = (vec![1.0f32; n], vec![1.0f32; n], vec![1u8; n]);
    for weighted in [false, true] {
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            fit_r2star_loglinear_into(&mag, &tes, None, weighted, &mut r2, &mut s0, &mut st)
                .unwrap();
            let dt = t0.elapsed().as_secs_f64();
            eprintln!(
                "weighted={weighted}: {:.3} s, {:.1} Mvox/s",
                dt,
                n as f64 / dt / 1e6
            );
        }
    }
}

use crate::test_support::thread_cpu_seconds as cpu;

/// Thread CPU time per voxel of the chunk kernels (the machine is shared):
/// `cargo test --release -p alsiron-core --features timing --test timing chunk_kernel_timing -- --ignored --nocapture`
pub fn chunk_kernel_timing() {
    let tes = [0.003, 0.007, 0.011, 0.015, 0.019, 0.023];
    let mag: Vec<f32> = (0..tes.len() * CHUNK)
        .map(|i| 100.0 * (-(20.0 + (i % 97) as f64 * 0.3) * tes[i / CHUNK]).exp() as f32)
        .collect();
    let rows = Rows {
        base: &mag,
        stride: CHUNK,
        offset: 0,
        len: CHUNK,
    };
    let (mut r2, mut s0, mut bad) = (vec![0.0f32; CHUNK], vec![0.0f32; CHUNK], vec![false; CHUNK]);
    let e = tes.len() as f64;
    let t_mean = tes.iter().sum::<f64>() / e;
    let sxx: f64 = tes.iter().map(|t| (t - t_mean).powi(2)).sum();
    let slope: Vec<f64> = tes.iter().map(|t| (t - t_mean) / sxx).collect();
    let icpt: Vec<f64> = slope.iter().map(|c| 1.0 / e - t_mean * c).collect();
    let reps = 20000;
    let t0 = cpu();
    for _ in 0..reps {
        fit_chunk_ols(rows, &slope, &icpt, &mut r2, &mut s0, &mut bad);
    }
    let ols = (cpu() - t0) / (reps * CHUNK) as f64 * 1e9;
    let t0 = cpu();
    for _ in 0..reps {
        fit_chunk_weighted(rows, &tes, &mut r2, &mut s0, &mut bad);
    }
    let w = (cpu() - t0) / (reps * CHUNK) as f64 * 1e9;
    let t0 = cpu();
    let mut acc = 0.0;
    for _ in 0..reps {
        for &s in &mag {
            acc += ln_fast_f32(s) as f64;
        }
    }
    let ln = (cpu() - t0) / (reps * CHUNK) as f64 * 1e9;
    eprintln!(
        "per voxel (6 echoes): ols {ols:.2} ns, weighted {w:.2} ns, 6 ln_fast_f32 {ln:.2} ns {acc}"
    );
}

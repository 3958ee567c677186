//! Per-voxel CPU time of the nonlinear R2* fits (not a test; run through
//! `tests/timing.rs`, see there).

use super::*;

use crate::test_support::thread_cpu_seconds as cpu;

/// Thread CPU time per voxel of the nonlinear fits on the bench's data (Rician
/// magnitudes, S0 500, σ 5, R2* 10–60 s⁻¹, 6 echoes 3–23 ms), one thread:
/// `cargo test --release -p alsiron-core --features timing --test timing nlls_timing -- --ignored --nocapture`
pub fn nlls_timing() {
    let tes = [0.003, 0.007, 0.011, 0.015, 0.019, 0.023];
    let n = 40_000;
    let mut state = 7u64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut normal = || {
        let (u, v) = (uniform(), uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let mut mag = vec![0.0f32; tes.len() * n];
    for v in 0..n {
        let r2 = 10.0 + 50.0 * (v as f64 / n as f64);
        for (k, t) in tes.iter().enumerate() {
            let a = 500.0 * (-r2 * t).exp();
            mag[k * n + v] = (a + 5.0 * normal()).hypot(5.0 * normal()) as f32;
        }
    }
    for sigma in [None, Some(5.0)] {
        let opts = R2starOptions {
            method: R2starMethod::Nlls,
            noise_sigma: sigma,
            ..Default::default()
        };
        let (mut r2, mut s0, mut sd, mut gof) =
            (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut st = vec![0u8; n];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        // The 1-thread pool runs the whole fit on its worker: that thread's CPU time.
        let mut wall = 0.0;
        for _ in 0..2 {
            wall = pool.install(|| {
                let t0 = cpu();
                fit_r2star_into(
                    &mag,
                    &tes,
                    None,
                    &opts,
                    R2starOutputs {
                        r2star: &mut r2,
                        s0: &mut s0,
                        sd: &mut sd,
                        gof: &mut gof,
                        status: &mut st,
                    },
                )
                .unwrap();
                cpu() - t0
            });
        }

        // Iterations per voxel, measured serially on this thread.
        let mut y = vec![0.0; tes.len()];
        let (mut iters, mut ok) = (0usize, 0usize);
        let t0 = cpu();
        for v in 0..n {
            for (k, yk) in y.iter_mut().enumerate() {
                *yk = mag[k * n + v] as f64;
            }
            let (s_w, r_w) = weighted_loglinear_voxel(&y, &tes, 0.0).unwrap();
            let (s, r) = initial_guess(&y, &tes, sigma, s_w as f32, r_w as f32);
            let f = levenberg_marquardt(&y, &tes, s, r, sigma, 100);
            iters += f.iterations;
            ok += f.converged as usize;
        }
        let lm = (cpu() - t0) / n as f64 * 1e6;
        eprintln!(
            "sigma {sigma:?}: fit_r2star_into 1 thread {:.2} µs/voxel cpu; LM alone \
             {lm:.2} µs cpu, {:.2} iterations, {ok}/{n} converged; bad status {}",
            wall / n as f64 * 1e6,
            iters as f64 / n as f64,
            st.iter().filter(|&&s| s != 0).count()
        );
    }
}

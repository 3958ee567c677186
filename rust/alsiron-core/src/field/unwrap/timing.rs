//! Timing of the block-wise and single-queue unwrapping on the field-mapping bench's
//! data (not a test; run through `tests/timing.rs`, see there).

use super::cost::*;
use super::queue::*;
use super::*;
use crate::test_support::normal_source;

/// Process CPU time [s] (user + system) from /proc, 0 where unavailable.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(") ").next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() > 12 {
        (f[11] + f[12]) / 100.0
    } else {
        0.0
    }
}

/// The field-mapping bench's data (bench/bench_fit.py `_data`): echoes 2 and 3 of a
/// noisy ellipsoid with several wraps, noise (SNR 100 inside, 5 outside).
fn bench_echoes(shape: Shape3) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let [nx, ny, nz] = shape.0;
    let mut normal = normal_source(12345u64);
    let axis = |i: usize, n: usize| -1.0 + 2.0 * i as f64 / (n - 1) as f64;
    let (mut phase1, mut phase2, mut mag1) = (vec![], vec![], vec![]);
    for i in 0..nx {
        for j in 0..ny {
            for k in 0..nz {
                let (x, y, z) = (axis(i, nx), axis(j, ny), axis(k, nz));
                let inside = (x / 0.9).powi(2) + (y / 0.85).powi(2) + (z / 0.8).powi(2) < 1.0;
                let mag0 = if inside {
                    1.0 + 0.3 * (3.0 * x).cos()
                } else {
                    0.05
                };
                let omega = TWO_PI * (120.0 * z * z - 60.0 * x * y + 30.0 * x);
                let r2 = if inside { 20.0 + 30.0 * x * x } else { 5.0 };
                for (te, phase, mag) in [
                    (0.007, &mut phase1, Some(&mut mag1)),
                    (0.011, &mut phase2, None),
                ] {
                    let a = 100.0 * mag0 * f64::exp(-r2 * te);
                    let noise = normal();
                    let re = a * (0.3 + omega * te).cos() + noise;
                    let im = a * (0.3 + omega * te).sin() + noise;
                    phase.push(im.atan2(re) as f32);
                    if let Some(m) = mag {
                        m.push(re.hypot(im) as f32);
                    }
                }
            }
        }
    }
    (phase1, mag1, phase2)
}

/// `cargo test --release -p alsiron-core --features timing --test timing unwrap_timing -- --ignored --nocapture`:
/// times of the block-wise unwrapping of the bench's data (`UNWRAP_TIMING_SIDE`
/// overrides the block side) and, with `UNWRAP_TIMING_SINGLE` set, of the
/// single-queue growth, and how far the two agree.
pub fn unwrap_timing() {
    let shape = Shape3([256, 256, 176]);
    let (phase, mag, later) = bench_echoes(shape);
    let second = SecondEcho {
        phase: &later,
        te_ratio: 7.0 / 11.0,
    };
    let side = std::env::var("UNWRAP_TIMING_SIDE")
        .ok()
        .and_then(|p| p.parse().ok())
        .or(default_block_side(shape));
    let mut best = f64::INFINITY;
    let mut blocks = None;
    for _ in 0..3 {
        let (t0, c0) = (std::time::Instant::now(), cpu_s());
        let out = unwrap_checked(&phase, Some(&mag), Some(second), None, shape, side, false);
        let (t1, c1) = (t0.elapsed().as_secs_f64(), cpu_s());
        best = best.min(t1);
        eprintln!(
            "blocks of side {side:?}: wall {:.0} ms, cpu {:.0} ms",
            t1 * 1e3,
            (c1 - c0) * 1e3,
        );
        blocks = Some(out);
    }
    eprintln!("best block-wise: {:.0} ms", best * 1e3);
    let blocks = blocks.unwrap();
    if std::env::var_os("UNWRAP_TIMING_SINGLE").is_none() {
        return;
    }
    let (t0, c0) = (std::time::Instant::now(), cpu_s());
    let usable = vec![OPEN; shape.len()];
    let m_ref = magnitude_reference(&mag, |_| true);
    let inputs = CostInputs {
        phase: &phase,
        magnitude: Some(&mag),
        second: Some(second),
        inv_ref: 1.0 / m_ref,
    };
    let (mut nodes, first_seed) = build_nodes(&inputs, &usable, shape, true);
    let (t2, c2) = (t0.elapsed(), cpu_s());
    let single = grow(&mut nodes, first_seed, shape);
    let (t3, c3) = (t0.elapsed(), cpu_s());
    let same = single
        .phase
        .iter()
        .zip(&blocks.phase)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    eprintln!(
        "single queue: wall costs+seed {t2:?} +grow {t3:?}; cpu: costs {:.2} s, \
         grow {:.2} s; {:.4} % of voxels identical to the block-wise",
        c2 - c0,
        c3 - c2,
        100.0 * same as f64 / shape.len() as f64
    );
}

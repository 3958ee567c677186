//! Timing of V-SHARP's radius search against FFT erosions (not a test; run through
//! `tests/timing.rs`, see there).

use super::sharp::first_fitting_radius;
use super::*;
use crate::fft::Fft3Plan;

/// `cargo test --release -p alsiron-core --features timing --test timing vsharp_timing -- --ignored --nocapture`
pub fn vsharp_timing() {
    let shape = Shape3([256, 256, 176]);
    let [nx, ny, nz] = shape.0;
    let mut mask = vec![0.0f32; shape.len()];
    let mut field = vec![0.0f32; shape.len()];
    for i in 0..nx {
        for j in 0..ny {
            for k in 0..nz {
                let r = |c: usize, n: usize| (c as f64 - (n - 1) as f64 / 2.0) / (0.42 * n as f64);
                let v = shape.idx(i, j, k);
                mask[v] = f32::from(r(i, nx).powi(2) + r(j, ny).powi(2) + r(k, nz).powi(2) <= 1.0);
                field[v] = ((v * 7919) % 1000) as f32 * 1e-4;
            }
        }
    }
    let radii = default_radii_mm([1.0; 3]);
    let mask_u8: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let first = first_fitting_radius(&mask, shape, [1.0; 3], &radii);
        let t1 = t0.elapsed();
        let _ = vsharp(&field, &mask_u8, shape, [1.0; 3], &radii, 0.05).unwrap();
        let t2 = std::time::Instant::now();
        // What the distance transform replaces: one mask × sphere convolution per radius.
        let plan = Fft3Plan::get(shape).unwrap();
        let mut mask_hat = plan.make_spectrum();
        plan.forward(&mask, &mut mask_hat).unwrap();
        let mut work = plan.make_spectrum();
        let mut real = vec![0.0f32; shape.len()];
        let mut eroded = vec![false; shape.len()];
        for _ in &radii {
            work.par_iter_mut()
                .zip(mask_hat.par_iter())
                .for_each(|(w, &m)| *w = m * 0.5);
            plan.inverse(&mut work, &mut real).unwrap();
            eroded
                .par_iter_mut()
                .zip(real.par_iter())
                .for_each(|(e, &v)| *e = v > 0.5);
        }
        eprintln!(
            "distance transform {t1:?}, FFT erosions {:?}, vsharp {:?} ({})",
            t2.elapsed(),
            t2 - t0 - t1,
            first[0]
        );
    }
}

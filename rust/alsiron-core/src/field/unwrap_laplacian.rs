//! Laplacian phase unwrapping (Schofield & Zhu, Opt Lett 2003): a fast, non-iterative
//! alternative to region growing.
//!
//! The Laplacian of the true phase is computed from the wrapped phase alone,
//! `∇²φ = cos φ·∇²(sin φ) − sin φ·∇²(cos φ)`, and inverted with the FFT. The discrete
//! 7-point Laplacian (unit spacing, periodic) and its FFT eigenvalues
//! `Σ_d 2(cos(2πk_d/n_d) − 1)` are used in both directions, so a smooth phase comes back
//! exactly up to a constant. The volume is zero-padded to fast FFT lengths plus a margin
//! against wrap-around. Outside the mask `sin φ = cos φ = 0` (no signal).
//!
//! The raw result is smooth but not congruent with the input (noise and phase
//! singularities are spread out, not kept); [`unwrap_laplacian`] therefore returns the
//! "snapped" phase `φ + 2π·round((φ_L + c − φ)/2π)` (an exact unwrapping, differing from
//! the input by multiples of 2π) with the constant `c` that best aligns `φ_L` with the
//! wrapped phase, and the raw `φ_L + c` beside it.

use crate::error::CoreResult;
use crate::fft::{fast_len, Fft3Plan};
use crate::field::unwrap::round_fast;
use crate::grid::Shape3;
use rayon::prelude::*;
use std::f64::consts::PI;

const TWO_PI: f64 = 2.0 * PI;
/// Zero margin (voxels per side of each axis) against periodic wrap-around.
const MARGIN: usize = 4;

/// 7-point Laplacian with periodic boundaries of a C-ordered volume.
fn laplacian_periodic(x: &[f32], shape: Shape3) -> Vec<f32> {
    let [nx, ny, nz] = shape.0;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, plane)| {
            let ip = (i + 1) % nx;
            let im = (i + nx - 1) % nx;
            for j in 0..ny {
                let jp = (j + 1) % ny;
                let jm = (j + ny - 1) % ny;
                for k in 0..nz {
                    let kp = (k + 1) % nz;
                    let km = (k + nz - 1) % nz;
                    let c = x[shape.idx(i, j, k)];
                    plane[j * nz + k] = x[shape.idx(ip, j, k)]
                        + x[shape.idx(im, j, k)]
                        + x[shape.idx(i, jp, k)]
                        + x[shape.idx(i, jm, k)]
                        + x[shape.idx(i, j, kp)]
                        + x[shape.idx(i, j, km)]
                        - 6.0 * c;
                }
            }
        });
    out
}

/// Result of [`unwrap_laplacian`].
#[derive(Debug, Clone)]
pub struct LaplacianUnwrapped {
    /// Input + 2πk per voxel inside the mask (input elsewhere).
    pub phase: Vec<f32>,
    /// The smooth Laplacian estimate (aligned to the input by one constant) [rad].
    pub raw: Vec<f32>,
}

/// Laplacian unwrapping of a wrapped 3-D phase [rad] inside an optional mask.
pub fn unwrap_laplacian(
    phase: &[f32],
    mask: Option<&[u8]>,
    shape: Shape3,
) -> CoreResult<LaplacianUnwrapped> {
    shape.check_len(phase.len(), "phase")?;
    if let Some(m) = mask {
        shape.check_len(m.len(), "mask")?;
    }
    let [nx, ny, nz] = shape.0;
    let padded = Shape3([
        fast_len(nx + 2 * MARGIN),
        fast_len(ny + 2 * MARGIN),
        fast_len(nz + 2 * MARGIN),
    ]);
    let [px, py, pz] = padded.0;
    let inside = |i: usize| mask.map_or(true, |m| m[i] != 0) && phase[i].is_finite();
    // sin and cos of the phase on the padded grid (zero outside the mask and the volume).
    let mut sin = vec![0.0f32; padded.len()];
    let mut cos = vec![0.0f32; padded.len()];
    sin.par_chunks_mut(py * pz)
        .zip(cos.par_chunks_mut(py * pz))
        .enumerate()
        .for_each(|(pi, (sp, cp))| {
            if pi < MARGIN || pi >= MARGIN + nx {
                return;
            }
            let i = pi - MARGIN;
            for j in 0..ny {
                for k in 0..nz {
                    let v = shape.idx(i, j, k);
                    if inside(v) {
                        let o = (j + MARGIN) * pz + k + MARGIN;
                        let (s, c) = phase[v].sin_cos();
                        sp[o] = s;
                        cp[o] = c;
                    }
                }
            }
        });
    let lap_sin = laplacian_periodic(&sin, padded);
    let lap_cos = laplacian_periodic(&cos, padded);
    let rhs: Vec<f32> = (0..padded.len())
        .into_par_iter()
        .with_min_len(1 << 12)
        .map(|v| cos[v] * lap_sin[v] - sin[v] * lap_cos[v])
        .collect();
    drop((sin, cos, lap_sin, lap_cos));

    let plan = Fft3Plan::get(padded)?;
    let mut spectrum = plan.make_spectrum();
    plan.forward(&rhs, &mut spectrum)?;
    let nh = pz / 2 + 1;
    let eig = |n: usize, k: usize| 2.0 * ((TWO_PI * k as f64 / n as f64).cos() - 1.0);
    let ex: Vec<f64> = (0..px).map(|k| eig(px, k)).collect();
    let ey: Vec<f64> = (0..py).map(|k| eig(py, k)).collect();
    let ez: Vec<f64> = (0..nh).map(|k| eig(pz, k)).collect();
    spectrum
        .par_chunks_mut(py * nh)
        .enumerate()
        .for_each(|(i, plane)| {
            for j in 0..py {
                for k in 0..nh {
                    let lambda = ex[i] + ey[j] + ez[k];
                    let value = &mut plane[j * nh + k];
                    *value = if lambda.abs() < 1e-12 {
                        num_complex::Complex32::new(0.0, 0.0)
                    } else {
                        *value / lambda as f32
                    };
                }
            }
        });
    let mut solved = vec![0.0f32; padded.len()];
    plan.inverse(&mut spectrum, &mut solved)?;

    // Crop, then align by the constant c = arg Σ e^{i(φ − φ_L)} over the mask.
    let mut raw = vec![f32::NAN; shape.len()];
    raw.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, plane)| {
            for j in 0..ny {
                for k in 0..nz {
                    let v = shape.idx(i, j, k);
                    if inside(v) {
                        plane[j * nz + k] = solved[padded.idx(i + MARGIN, j + MARGIN, k + MARGIN)];
                    }
                }
            }
        });
    let (re, im) = raw
        .par_iter()
        .zip(phase.par_iter())
        .filter(|(r, _)| r.is_finite())
        .map(|(&r, &p)| {
            let d = p as f64 - r as f64;
            (d.cos(), d.sin())
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let c = if re == 0.0 && im == 0.0 {
        0.0
    } else {
        im.atan2(re)
    };
    let mut snapped = phase.to_vec();
    snapped
        .par_iter_mut()
        .zip(raw.par_iter_mut())
        .for_each(|(s, r)| {
            if r.is_finite() {
                let estimate = *r as f64 + c;
                *r = estimate as f32;
                let p = *s as f64;
                *s = (p + TWO_PI * round_fast((estimate - p) / TWO_PI)) as f32;
            } else {
                *r = *s;
            }
        });
    Ok(LaplacianUnwrapped {
        phase: snapped,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::unwrap::wrap_angle;

    #[test]
    fn smooth_phase_is_recovered_exactly_after_snapping() {
        let shape = Shape3([30, 28, 24]);
        let [nx, ny, nz] = shape.0;
        let mut truth = Vec::new();
        let mut mask = Vec::new();
        for i in 0..nx {
            for j in 0..ny {
                for k in 0..nz {
                    let (x, y, z) = (i as f64 - 15.0, j as f64 - 14.0, k as f64 - 12.0);
                    // ≤ 0.2 rad/voxel: the boundary's harmonic error stays below π.
                    truth.push(0.006 * x * x + 0.15 * y - 0.12 * z + (0.2 * x).sin());
                    mask.push(u8::from(
                        x * x / 169.0 + y * y / 144.0 + z * z / 100.0 < 1.0,
                    ));
                }
            }
        }
        let wrapped: Vec<f32> = truth.iter().map(|&t| wrap_angle(t) as f32).collect();
        let inside: Vec<f64> = (0..shape.len())
            .filter(|&v| mask[v] != 0)
            .map(|v| truth[v])
            .collect();
        let span = inside.iter().cloned().fold(f64::MIN, f64::max)
            - inside.iter().cloned().fold(f64::MAX, f64::min);
        assert!(span > 1.2 * PI, "the test must wrap (span {span})");
        let out = unwrap_laplacian(&wrapped, Some(&mask), shape).unwrap();
        let mut offset = None;
        for v in 0..shape.len() {
            if mask[v] == 0 {
                assert_eq!(out.phase[v], wrapped[v]);
                continue;
            }
            let k = ((out.phase[v] as f64 - truth[v]) / TWO_PI).round();
            assert!((out.phase[v] as f64 - truth[v] - k * TWO_PI).abs() < 1e-3);
            assert_eq!(*offset.get_or_insert(k), k, "voxel {v} is off by a wrap");
        }
    }
}

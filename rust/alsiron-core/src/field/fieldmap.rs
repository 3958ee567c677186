//! Multi-echo field-map estimation from monopolar GRE magnitude and phase.
//!
//! Model: `φ_k(x) = φ0(x) + ω(x)·TE_k` (wrapped), `ω` the angular off-resonance [rad/s].
//!
//! 1. Initial ω from the echo pair with the shortest spacing (consecutive echoes, the
//!    earliest pair on ties): the phase of `S_{p+1}·conj(S_p)` is `ω·ΔTE` wrapped; the
//!    phase offset φ0 cancels and the short spacing gives the fewest wraps. It is
//!    unwrapped spatially ([`crate::field::unwrap`]) with the magnitude `sqrt(m_p·m_{p+1})` as the
//!    quality guide. Each disconnected part of the mask is then shifted by the multiple of
//!    2π that brings its magnitude²-weighted mean closest to zero (the scanner centres the
//!    frequency on the imaged tissue), so the result does not depend on the seed.
//! 2. `φ0 = wrap(φ_1 − ω·TE_1)`.
//! 3. Every echo is unwrapped in time against the prediction `φ0 + ω·TE_k`.
//! 4. Weighted least squares through the origin of `(φ_k − φ0)` against `TE_k` with
//!    weights `m_k²` (phase noise variance ∝ 1/|S|²) gives the final ω.
//!
//! Reliability: the magnitude²-weighted RMS phase residual of the fit [rad],
//! `sqrt(Σ m_k² r_k² / Σ m_k²)`. Noise-free data give 0; a residual above ~0.3–0.5 rad
//! flags voxels whose phase does not follow a line in TE (noise, flow, wrong wraps).
//!
//! Voxels outside the mask, never reached by the unwrapper (non-finite phase), or without
//! any positive finite magnitude get NaN in all three outputs.

use crate::error::{CoreError, CoreResult};
use crate::field::unwrap::{round_fast, unwrap_with_components, wrap_angle, Unwrapped};
use crate::grid::Shape3;
use rayon::prelude::*;
use std::f64::consts::PI;

const TWO_PI: f64 = 2.0 * PI;

/// Result of [`fit_multi_echo_field`]; every map is C-ordered with the input's shape.
#[derive(Debug, Clone)]
pub struct FieldFit {
    /// Angular off-resonance ω [rad/s].
    pub omega: Vec<f32>,
    /// Phase offset φ0 at TE = 0 [rad], in [−π, π].
    pub phase_offset: Vec<f32>,
    /// Magnitude²-weighted RMS phase residual of the fit [rad].
    pub residual: Vec<f32>,
}

/// Check echo times [s]: at least `needed`, finite, positive, strictly increasing.
pub fn check_echo_times(echo_times: &[f64], needed: usize) -> CoreResult<()> {
    if echo_times.len() < needed {
        return Err(CoreError::TooFewEchoes {
            needed,
            got: echo_times.len(),
        });
    }
    if echo_times.iter().any(|t| !t.is_finite() || *t < 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "echo times must be finite and non-negative seconds, got {echo_times:?}"
        )));
    }
    if echo_times.windows(2).any(|w| w[1] <= w[0]) {
        return Err(CoreError::InvalidArgument(format!(
            "echo times must be strictly increasing, got {echo_times:?}"
        )));
    }
    Ok(())
}

/// Index `p` of the consecutive echo pair (p, p+1) with the shortest spacing.
fn shortest_pair(echo_times: &[f64]) -> usize {
    let mut best = 0;
    for p in 1..echo_times.len() - 1 {
        if echo_times[p + 1] - echo_times[p] < echo_times[best + 1] - echo_times[best] {
            best = p;
        }
    }
    best
}

/// Fit ω, φ0 and the residual from echo-major `magnitude` and `phase` `[E][nx][ny][nz]`
/// (phase in radians, any 2π range), echo times [s] (E ≥ 2, strictly increasing) and an
/// optional mask (nonzero = inside).
pub fn fit_multi_echo_field(
    magnitude: &[f32],
    phase: &[f32],
    echo_times: &[f64],
    shape: Shape3,
    mask: Option<&[u8]>,
) -> CoreResult<FieldFit> {
    check_echo_times(echo_times, 2)?;
    let n_echo = echo_times.len();
    let n = shape.len();
    shape.check_len(n, "volume")?;
    let expected = n_echo * n;
    for (arr, what) in [(magnitude, "magnitude"), (phase, "phase")] {
        if arr.len() != expected {
            return Err(CoreError::ShapeMismatch(format!(
                "{what} has {} elements, expected {expected} ({n_echo} echoes × {:?})",
                arr.len(),
                shape.0
            )));
        }
    }
    if let Some(m) = mask {
        shape.check_len(m.len(), "mask")?;
    }

    // 1. Phase difference of the closest echo pair, unwrapped in space.
    let p = shortest_pair(echo_times);
    let spacing = echo_times[p + 1] - echo_times[p];
    let (phase_a, phase_b) = (&phase[p * n..(p + 1) * n], &phase[(p + 1) * n..(p + 2) * n]);
    let (mag_a, mag_b) = (
        &magnitude[p * n..(p + 1) * n],
        &magnitude[(p + 1) * n..(p + 2) * n],
    );
    let (dphi, pair_mag): (Vec<f32>, Vec<f32>) = (0..n)
        .into_par_iter()
        .map(|i| {
            let d = wrap_angle(phase_b[i] as f64 - phase_a[i] as f64) as f32;
            let m = (mag_a[i].abs() as f64 * mag_b[i].abs() as f64).sqrt() as f32;
            (d, m)
        })
        .unzip();
    let mut unwrapped = unwrap_with_components(&dphi, Some(&pair_mag), mask, shape)?;
    centre_components(&mut unwrapped, &pair_mag);
    let reached = unwrapped.reached(n);
    let dphi_unwrapped = unwrapped.phase;

    // 2–4. Per-voxel offset, temporal unwrapping and weighted fit.
    let mut fit = FieldFit {
        omega: vec![f32::NAN; n],
        phase_offset: vec![f32::NAN; n],
        residual: vec![f32::NAN; n],
    };
    fit.omega
        .par_iter_mut()
        .zip(fit.phase_offset.par_iter_mut())
        .zip(fit.residual.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((omega, offset), residual))| {
            if !reached[i] {
                return;
            }
            let omega0 = dphi_unwrapped[i] as f64 / spacing;
            let phi0 = wrap_angle(phase[i] as f64 - omega0 * echo_times[0]);
            // Accumulate Σw t y, Σw t², Σw y², Σw for the fit through the origin.
            let (mut swty, mut swtt, mut swyy, mut sw) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for (k, &te) in echo_times.iter().enumerate() {
                let raw = phase[k * n + i] as f64;
                let m = magnitude[k * n + i] as f64;
                if !raw.is_finite() || !m.is_finite() {
                    return;
                }
                let predicted = phi0 + omega0 * te;
                let y = raw + TWO_PI * round_fast((predicted - raw) * (1.0 / TWO_PI)) - phi0;
                let w = m * m;
                swty += w * te * y;
                swtt += w * te * te;
                swyy += w * y * y;
                sw += w;
            }
            if !(swtt > 0.0 && sw > 0.0) {
                return;
            }
            let w_omega = swty / swtt;
            // Σw (y − ωt)² = Σw y² − 2ωΣw t y + ω²Σw t² = Σw y² − ω·Σw t y.
            let rss = (swyy - w_omega * swty).max(0.0);
            *omega = w_omega as f32;
            *offset = phi0 as f32;
            *residual = (rss / sw).sqrt() as f32;
        });
    Ok(fit)
}

/// Shift each separately unwrapped part by the multiple of 2π that brings its weighted
/// mean (weights = magnitude²; plain mean if all weights vanish) closest to zero.
fn centre_components(unwrapped: &mut Unwrapped, magnitude: &[f32]) {
    let shifts: Vec<f32> = (0..unwrapped.n_components())
        .into_par_iter()
        .map(|c| {
            let (mut swv, mut sw, mut sv) = (0.0f64, 0.0f64, 0.0f64);
            let voxels = unwrapped.component(c);
            for &v in voxels {
                let value = unwrapped.phase[v as usize] as f64;
                let w = (magnitude[v as usize] as f64).powi(2);
                swv += w * value;
                sw += w;
                sv += value;
            }
            let mean = if sw > 0.0 {
                swv / sw
            } else {
                sv / voxels.len().max(1) as f64
            };
            (TWO_PI * round_fast(mean / TWO_PI)) as f32
        })
        .collect();
    for (c, &shift) in shifts.iter().enumerate() {
        if shift != 0.0 {
            let (start, end) = (
                unwrapped.component_starts[c],
                unwrapped.component_starts[c + 1],
            );
            for &v in &unwrapped.visit_order[start..end] {
                unwrapped.phase[v as usize] -= shift;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wrapped multi-echo data with a smooth field of several wraps per echo.
    fn simulate(shape: Shape3, tes: &[f64]) -> (Vec<f32>, Vec<f32>, Vec<f64>, Vec<f64>) {
        let [nx, ny, nz] = shape.0;
        let mut omega = Vec::new();
        let mut phi0 = Vec::new();
        for i in 0..nx {
            for j in 0..ny {
                for k in 0..nz {
                    let (x, y, z) = (i as f64, j as f64, k as f64);
                    // ~±600 rad/s: ω·TE up to ~12 rad at 20 ms, < π/voxel at ΔTE.
                    omega.push(40.0 * (x - 8.0) + 2.0 * (y - 6.0).powi(2) - 25.0 * z);
                    phi0.push(0.8 * (0.2 * x + 0.1 * y).sin() + 0.3);
                }
            }
        }
        let n = shape.len();
        let mut mag = Vec::with_capacity(tes.len() * n);
        let mut phase = Vec::with_capacity(tes.len() * n);
        for &te in tes {
            for v in 0..n {
                mag.push((100.0 * (-30.0 * te).exp() * (1.0 + 0.1 * (v % 5) as f64)) as f32);
                phase.push(wrap_angle(phi0[v] + omega[v] * te) as f32);
            }
        }
        (mag, phase, omega, phi0)
    }

    #[test]
    fn noiseless_field_is_recovered_exactly() {
        let shape = Shape3([16, 14, 12]);
        let tes = [0.004, 0.008, 0.012, 0.016, 0.020];
        let (mag, phase, omega, phi0) = simulate(shape, &tes);
        let max_wraps = omega.iter().map(|w| (w * 0.020).abs()).fold(0.0, f64::max) / TWO_PI;
        assert!(
            max_wraps > 1.5,
            "test must wrap several times ({max_wraps})"
        );
        let fit = fit_multi_echo_field(&mag, &phase, &tes, shape, None).unwrap();
        for v in 0..shape.len() {
            assert!((fit.omega[v] as f64 - omega[v]).abs() < 0.05, "voxel {v}");
            assert!(wrap_angle(fit.phase_offset[v] as f64 - phi0[v]).abs() < 1e-3);
            assert!(fit.residual[v] < 1e-3);
        }
    }

    #[test]
    fn uneven_echoes_and_mask() {
        let shape = Shape3([12, 12, 8]);
        let tes = [0.003, 0.010, 0.013, 0.025];
        let (mag, phase, omega, _) = simulate(shape, &tes);
        let mask: Vec<u8> = (0..shape.len()).map(|v| u8::from(v % 96 < 80)).collect();
        let fit = fit_multi_echo_field(&mag, &phase, &tes, shape, Some(&mask)).unwrap();
        for v in 0..shape.len() {
            if mask[v] != 0 {
                assert!((fit.omega[v] as f64 - omega[v]).abs() < 0.05, "voxel {v}");
            } else {
                assert!(fit.omega[v].is_nan() && fit.residual[v].is_nan());
            }
        }
    }

    #[test]
    fn bad_input_is_refused_or_nan() {
        let shape = Shape3([4, 4, 4]);
        let n = shape.len();
        let ok = vec![1.0f32; 2 * n];
        assert!(fit_multi_echo_field(&ok[..n], &ok[..n], &[0.01], shape, None).is_err());
        assert!(fit_multi_echo_field(&ok, &ok, &[0.01, 0.01], shape, None).is_err());
        assert!(fit_multi_echo_field(&ok, &ok, &[0.02, 0.01], shape, None).is_err());
        assert!(fit_multi_echo_field(&ok, &ok[..n], &[0.01, 0.02], shape, None).is_err());
        let mut phase = vec![0.0f32; 2 * n];
        phase[n + 5] = f32::NAN;
        let mut mag = ok.clone();
        mag[7] = 0.0;
        mag[n + 7] = 0.0;
        let fit = fit_multi_echo_field(&mag, &phase, &[0.01, 0.02], shape, None).unwrap();
        assert!(fit.omega[5].is_nan());
        assert!(fit.omega[7].is_nan(), "zero magnitude in every echo → NaN");
        assert_eq!(fit.omega[0], 0.0);
    }
}

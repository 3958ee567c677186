//! Multi-echo field estimation from phases that are already unwrapped in space (or any
//! starting estimate of ω): temporal unwrapping and the nonlinear complex fit.
//!
//! - [`unwrap_echoes_temporal`]: echoes whose phase offset φ0 has been removed (e.g. by
//!   MCPC-3D-S) are unwrapped in time: echo k takes `φ_k + 2π·round((φ̂_k − φ_k)/2π)`
//!   with the prediction `φ̂_k = φ_j·TE_k/TE_j` from the nearest already-unwrapped echo j,
//!   moving outward from the spatially unwrapped reference echo (ROMEO's temporal step).
//! - [`fit_field_linear`]: magnitude²-weighted least squares of unwrapped phase against TE
//!   with an intercept (φ0) — the starting point of the complex fit.
//! - [`fit_field_complex`]: nonlinear fit of `S_k = m_k·exp(i(φ0 + ω·TE_k))` to the
//!   complex signal with the measured magnitudes `m_k` as amplitudes, i.e. minimising
//!   `Σ_k m_k²·|e^{iφ_k} − e^{i(φ0 + ω TE_k)}|²` by Gauss–Newton. It needs only the
//!   wrapped phase and a starting ω within ±π/ΔTE of the answer, and it weights each echo
//!   by its SNR² (phase noise variance ∝ 1/m²) without any explicit unwrapping.
//!   Reliability: the Cramér–Rao (Gauss–Newton covariance) standard deviation of ω per
//!   unit complex noise σ, `sqrt(Σm² / (Σm²·Σm²t² − (Σm²t)²))`, and a per-voxel noise
//!   estimate `σ̂ = sqrt(Σ m_k² sin²(r_k) / (E − 2))` from the residual phases `r_k`.

use crate::error::{CoreError, CoreResult};
use crate::field::fieldmap::check_echo_times;
use crate::field::unwrap::{round_fast, wrap_angle};
use crate::grid::Shape3;
use rayon::prelude::*;
use std::f64::consts::PI;

const TWO_PI: f64 = 2.0 * PI;

fn check_echo_major(len: usize, n_echo: usize, shape: Shape3, what: &str) -> CoreResult<()> {
    if len != n_echo * shape.len() {
        return Err(CoreError::ShapeMismatch(format!(
            "{what} has {len} elements, expected {} ({n_echo} echoes × {:?})",
            n_echo * shape.len(),
            shape.0
        )));
    }
    Ok(())
}

/// Unwrap echo-major phases `[E][nx][ny][nz]` [rad] in time from the spatially unwrapped
/// phase `reference` of echo `reference_echo` (offset-free phases: φ ∝ TE).
///
/// Voxels where the reference or a phase is non-finite keep their input values.
pub fn unwrap_echoes_temporal(
    phase: &[f32],
    echo_times: &[f64],
    reference: &[f32],
    reference_echo: usize,
    shape: Shape3,
) -> CoreResult<Vec<f32>> {
    check_echo_times(echo_times, 1)?;
    let n_echo = echo_times.len();
    check_echo_major(phase.len(), n_echo, shape, "phase")?;
    shape.check_len(reference.len(), "reference phase")?;
    if reference_echo >= n_echo {
        return Err(CoreError::InvalidArgument(format!(
            "reference echo {reference_echo} does not exist ({n_echo} echoes)"
        )));
    }
    if echo_times[reference_echo] <= 0.0 {
        return Err(CoreError::InvalidArgument(
            "the reference echo must have TE > 0".into(),
        ));
    }
    let n = shape.len();
    let mut out = phase.to_vec();
    out[reference_echo * n..(reference_echo + 1) * n].copy_from_slice(reference);
    // Order: reference, then outward (later echoes upward, earlier downward).
    let mut sequence: Vec<(usize, usize)> = Vec::with_capacity(n_echo);
    for k in reference_echo + 1..n_echo {
        sequence.push((k, k - 1));
    }
    for k in (0..reference_echo).rev() {
        sequence.push((k, k + 1));
    }
    for (k, j) in sequence {
        let ratio = echo_times[k] / echo_times[j];
        let (lo, hi) = out.split_at_mut(k.max(j) * n);
        let (target, source) = if k > j {
            (&mut hi[..n], &lo[j * n..(j + 1) * n])
        } else {
            (&mut lo[k * n..(k + 1) * n], &hi[..n])
        };
        target
            .par_iter_mut()
            .zip(source.par_iter())
            .with_min_len(1 << 12)
            .for_each(|(t, &s)| {
                let raw = *t as f64;
                let predicted = s as f64 * ratio;
                if raw.is_finite() && predicted.is_finite() {
                    *t = (raw + TWO_PI * round_fast((predicted - raw) / TWO_PI)) as f32;
                }
            });
    }
    Ok(out)
}

/// Result of the field fits; every map is C-ordered with the input's shape, NaN where
/// the voxel was outside the mask or could not be fitted.
#[derive(Debug, Clone)]
pub struct ComplexFieldFit {
    /// Angular off-resonance ω [rad/s].
    pub omega: Vec<f32>,
    /// Phase offset φ0 at TE = 0 [rad], in [−π, π].
    pub phase_offset: Vec<f32>,
    /// Magnitude²-weighted RMS of the wrapped phase residuals [rad].
    pub residual: Vec<f32>,
    /// Standard deviation of ω per unit complex noise σ (same units as the magnitude)
    /// [rad/s per magnitude unit].
    pub omega_sd_per_sigma: Vec<f32>,
    /// Per-voxel estimate of the complex noise σ (magnitude units) from E − 2 (E − 1 with
    /// a fixed offset) residual degrees of freedom; NaN when there are none.
    pub sigma: Vec<f32>,
    /// Gauss–Newton iterations used per voxel (0 outside the mask).
    pub iterations: Vec<u8>,
}

/// Weighted sums Σw, Σw t, Σw t² of one voxel (w = m²) and whether all inputs are finite.
#[inline]
fn moments(magnitude: &[f32], phase: &[f32], n: usize, i: usize, tes: &[f64]) -> Option<[f64; 3]> {
    let (mut s0, mut s1, mut s2) = (0.0f64, 0.0f64, 0.0f64);
    for (k, &t) in tes.iter().enumerate() {
        let m = magnitude[k * n + i] as f64;
        if !m.is_finite() || !phase[k * n + i].is_finite() {
            return None;
        }
        let w = m * m;
        s0 += w;
        s1 += w * t;
        s2 += w * t * t;
    }
    let det = s0 * s2 - s1 * s1;
    if s0 > 0.0 && det > 1e-12 * s0 * s2 {
        Some([s0, s1, s2])
    } else {
        None
    }
}

/// Magnitude²-weighted least squares of unwrapped echo-major phase against TE: returns
/// (ω [rad/s], intercept φ0 [rad], not wrapped). With `through_origin` the phase is taken
/// as offset-free (φ0 = 0, e.g. after MCPC-3D-S) and only the slope is fitted.
pub fn fit_field_linear(
    magnitude: &[f32],
    unwrapped_phase: &[f32],
    echo_times: &[f64],
    shape: Shape3,
    mask: Option<&[u8]>,
    through_origin: bool,
) -> CoreResult<(Vec<f32>, Vec<f32>)> {
    check_echo_times(echo_times, 2)?;
    let n_echo = echo_times.len();
    check_echo_major(magnitude.len(), n_echo, shape, "magnitude")?;
    check_echo_major(unwrapped_phase.len(), n_echo, shape, "phase")?;
    if let Some(m) = mask {
        shape.check_len(m.len(), "mask")?;
    }
    let n = shape.len();
    let (omega, offset): (Vec<f32>, Vec<f32>) = (0..n)
        .into_par_iter()
        .with_min_len(1 << 10)
        .map(|i| {
            if mask.is_some_and(|m| m[i] == 0) {
                return (f32::NAN, f32::NAN);
            }
            let Some([s0, s1, s2]) = moments(magnitude, unwrapped_phase, n, i, echo_times) else {
                return (f32::NAN, f32::NAN);
            };
            let (mut sy, mut sty) = (0.0f64, 0.0f64);
            for (k, &t) in echo_times.iter().enumerate() {
                let w = (magnitude[k * n + i] as f64).powi(2);
                let y = unwrapped_phase[k * n + i] as f64;
                sy += w * y;
                sty += w * t * y;
            }
            if through_origin {
                return ((sty / s2) as f32, 0.0);
            }
            let det = s0 * s2 - s1 * s1;
            let omega = (s0 * sty - s1 * sy) / det;
            let phi0 = (sy - omega * s1) / s0;
            (omega as f32, phi0 as f32)
        })
        .unzip();
    Ok((omega, offset))
}

/// Nonlinear complex fit of ω and φ0 (see the module notes) from echo-major magnitude and
/// wrapped phase, starting at `omega_init` [rad/s] (NaN = skip the voxel) and, when
/// given, `phase_offset_init` [rad] (otherwise the optimal φ0 for the starting ω).
/// With `fixed_offset` the given φ0 is kept (known from MCPC-3D-S) and only ω is fitted
/// (Gauss–Newton step `Σm²t·sin r / Σm²t²`, CRLB `1/sqrt(Σm²t²)`, E − 1 residual dof).
/// Iterates until the update of ω·TE_max is below `tol` [rad] or `max_iter` is reached.
#[allow(clippy::too_many_arguments)]
pub fn fit_field_complex(
    magnitude: &[f32],
    phase: &[f32],
    echo_times: &[f64],
    shape: Shape3,
    mask: Option<&[u8]>,
    omega_init: &[f32],
    phase_offset_init: Option<&[f32]>,
    fixed_offset: bool,
    max_iter: usize,
    tol: f64,
) -> CoreResult<ComplexFieldFit> {
    check_echo_times(echo_times, 2)?;
    let n_echo = echo_times.len();
    check_echo_major(magnitude.len(), n_echo, shape, "magnitude")?;
    check_echo_major(phase.len(), n_echo, shape, "phase")?;
    shape.check_len(omega_init.len(), "initial ω")?;
    if let Some(p) = phase_offset_init {
        shape.check_len(p.len(), "initial φ0")?;
    }
    if let Some(m) = mask {
        shape.check_len(m.len(), "mask")?;
    }
    if fixed_offset && phase_offset_init.is_none() {
        return Err(CoreError::InvalidArgument(
            "a fixed phase offset needs phase_offset_init".into(),
        ));
    }
    if !(tol.is_finite() && tol > 0.0) || max_iter == 0 || max_iter > 255 {
        return Err(CoreError::InvalidArgument(format!(
            "need tol > 0 and 1 ≤ max_iter ≤ 255, got tol {tol}, max_iter {max_iter}"
        )));
    }
    let n = shape.len();
    let te_max = echo_times[n_echo - 1];
    let nan = f32::NAN;
    let per_voxel: Vec<[f32; 6]> = (0..n)
        .into_par_iter()
        .with_min_len(1 << 10)
        .map(|i| {
            let failed = [nan, nan, nan, nan, nan, 0.0];
            if mask.is_some_and(|m| m[i] == 0) {
                return failed;
            }
            let mut omega = omega_init[i] as f64;
            if !omega.is_finite() {
                return failed;
            }
            let Some([s0, s1, s2]) = moments(magnitude, phase, n, i, echo_times) else {
                return failed;
            };
            let det = s0 * s2 - s1 * s1;
            let mut phi0 = match phase_offset_init.map(|p| p[i] as f64) {
                Some(p) if p.is_finite() => p,
                _ => {
                    // argmin over φ0 for fixed ω: the angle of Σ m² e^{i(φ_k − ω t_k)}.
                    let (mut re, mut im) = (0.0f64, 0.0f64);
                    for (k, &t) in echo_times.iter().enumerate() {
                        let w = (magnitude[k * n + i] as f64).powi(2);
                        let a = phase[k * n + i] as f64 - omega * t;
                        re += w * a.cos();
                        im += w * a.sin();
                    }
                    im.atan2(re)
                }
            };
            let mut iterations = 0u8;
            for _ in 0..max_iter {
                // Gauss–Newton on the complex residual: J^H J = Σm²(1,t)(1,t)ᵀ is fixed,
                // the gradient term is Σ m² sin(r_k)·(1, t_k).
                let (mut g0, mut g1) = (0.0f64, 0.0f64);
                for (k, &t) in echo_times.iter().enumerate() {
                    let w = (magnitude[k * n + i] as f64).powi(2);
                    let r = (phase[k * n + i] as f64 - phi0 - omega * t).sin();
                    g0 += w * r;
                    g1 += w * r * t;
                }
                let (d_phi0, d_omega) = if fixed_offset {
                    (0.0, g1 / s2)
                } else {
                    ((s2 * g0 - s1 * g1) / det, (s0 * g1 - s1 * g0) / det)
                };
                phi0 += d_phi0;
                omega += d_omega;
                iterations += 1;
                if (d_omega * te_max).abs() < tol && d_phi0.abs() < tol {
                    break;
                }
            }
            let (mut rss, mut perp) = (0.0f64, 0.0f64);
            for (k, &t) in echo_times.iter().enumerate() {
                let w = (magnitude[k * n + i] as f64).powi(2);
                let r = wrap_angle(phase[k * n + i] as f64 - phi0 - omega * t);
                rss += w * r * r;
                perp += w * r.sin().powi(2);
            }
            let n_params = if fixed_offset { 1 } else { 2 };
            let sigma = if n_echo > n_params {
                (perp / (n_echo - n_params) as f64).sqrt() as f32
            } else {
                nan
            };
            let sd_unit = if fixed_offset {
                (1.0 / s2).sqrt()
            } else {
                (s0 / det).sqrt()
            };
            [
                omega as f32,
                wrap_angle(phi0) as f32,
                (rss / s0).sqrt() as f32,
                sd_unit as f32,
                sigma,
                iterations as f32,
            ]
        })
        .collect();
    let column = |c: usize| per_voxel.par_iter().map(|v| v[c]).collect::<Vec<f32>>();
    Ok(ComplexFieldFit {
        omega: column(0),
        phase_offset: column(1),
        residual: column(2),
        omega_sd_per_sigma: column(3),
        sigma: column(4),
        iterations: per_voxel.par_iter().map(|v| v[5] as u8).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simulate(n: usize, tes: &[f64]) -> (Vec<f32>, Vec<f32>, Vec<f64>, Vec<f64>) {
        let omega: Vec<f64> = (0..n).map(|v| -400.0 + 7.0 * (v % 113) as f64).collect();
        let phi0: Vec<f64> = (0..n).map(|v| 0.5 * ((v as f64) * 0.1).sin()).collect();
        let mut mag = Vec::new();
        let mut phase = Vec::new();
        for &te in tes {
            for v in 0..n {
                mag.push((100.0 * (-25.0 * te).exp()) as f32);
                phase.push(wrap_angle(phi0[v] + omega[v] * te) as f32);
            }
        }
        (mag, phase, omega, phi0)
    }

    #[test]
    fn complex_fit_converges_from_a_rough_start() {
        let shape = Shape3([4, 5, 6]);
        let tes = [0.004, 0.009, 0.014, 0.019];
        let (mag, phase, omega, phi0) = simulate(shape.len(), &tes);
        // Start 40 rad/s off (0.76 rad at the last echo) without φ0.
        let init: Vec<f32> = omega.iter().map(|w| (w + 40.0) as f32).collect();
        let fit = fit_field_complex(
            &mag, &phase, &tes, shape, None, &init, None, false, 30, 1e-7,
        )
        .unwrap();
        for v in 0..shape.len() {
            assert!((fit.omega[v] as f64 - omega[v]).abs() < 1e-2, "voxel {v}");
            assert!(wrap_angle(fit.phase_offset[v] as f64 - phi0[v]).abs() < 1e-4);
            assert!(fit.residual[v] < 1e-4 && fit.sigma[v] < 1e-2);
        }
    }

    #[test]
    fn temporal_and_linear_fit_recover_offset_free_phase() {
        let shape = Shape3([3, 4, 5]);
        let n = shape.len();
        let tes = [0.005, 0.010, 0.015, 0.020];
        let omega: Vec<f64> = (0..n).map(|v| -600.0 + 20.0 * v as f64).collect();
        let phase: Vec<f32> = tes
            .iter()
            .flat_map(|&t| omega.iter().map(move |w| wrap_angle(w * t) as f32))
            .collect();
        let reference: Vec<f32> = omega.iter().map(|w| (w * tes[1]) as f32).collect();
        let out = unwrap_echoes_temporal(&phase, &tes, &reference, 1, shape).unwrap();
        for (k, &t) in tes.iter().enumerate() {
            for v in 0..n {
                assert!((out[k * n + v] as f64 - omega[v] * t).abs() < 1e-3);
            }
        }
        let mag = vec![1.0f32; 4 * n];
        for origin in [false, true] {
            let (w, p0) = fit_field_linear(&mag, &out, &tes, shape, None, origin).unwrap();
            for v in 0..n {
                assert!((w[v] as f64 - omega[v]).abs() < 0.05 && p0[v].abs() < 1e-3);
            }
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        let shape = Shape3([2, 2, 2]);
        let x = vec![0.0f32; 16];
        let tes = [0.01, 0.02];
        let f = |m: &[f32], w: &[f32], fixed: bool, it: usize| {
            fit_field_complex(&x, m, &tes, shape, None, w, None, fixed, it, 1e-6)
        };
        assert!(f(&x, &x[..8], false, 0).is_err());
        assert!(f(&x[..8], &x[..8], false, 5).is_err());
        assert!(f(&x, &x[..8], true, 5).is_err(), "fixed offset without one");
        assert!(unwrap_echoes_temporal(&x, &tes, &x[..8], 2, shape).is_err());
        // Zero magnitude: no information, NaN rather than a made-up field.
        let fit = f(&x, &x[..8], false, 5).unwrap();
        assert!(fit.omega.iter().all(|w| w.is_nan()));
    }
}

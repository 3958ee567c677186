//! Rapid two-step inversion (Kames et al. 2018): k-space division in the well-conditioned
//! cone, then TV fills the ill-conditioned cone.

use num_complex::Complex32;
use rayon::prelude::*;

use super::ilsqr::*;
use super::operators::*;
use super::tv::tv_split_loop;
use super::*;
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::Geometry;
use crate::qsm::dipole::dipole_kernel;

/// Parameters of [`rts`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RtsParams {
    /// |D| above which k-space is well conditioned (step 1 keeps it).
    pub delta: f64,
    /// LSQR iterations of step 1 on M·F⁻¹DF·x = M·f (a small fixed count; Kames et al.
    /// use LSMR, which spans the same Krylov space).
    pub lsqr_iter: usize,
    /// Weight μ of the fit to the step-1 spectrum in the well-conditioned cone.
    pub mu: f64,
    /// ADMM penalty ρ of the TV step; the TV weight is 1, so the threshold is 1/ρ.
    pub rho: f64,
    /// Maximum TV iterations.
    pub max_iter: usize,
    /// Stop when ‖χₙ − χₙ₋₁‖ / ‖χₙ‖ < tol.
    pub tol: f64,
}

impl Default for RtsParams {
    /// Kames et al. 2018: δ = 0.15, μ = 10⁵, tolerance 10⁻² within 20 iterations; ρ is
    /// per mm here (theirs per voxel) and was tuned on the head phantom.
    fn default() -> Self {
        RtsParams {
            delta: 0.15,
            lsqr_iter: 16,
            mu: 1e5,
            rho: 10.0,
            max_iter: 20,
            tol: 1e-2,
        }
    }
}

/// Rapid two-step inversion (Kames et al. 2018). Step 1: x = LSQR on the masked dipole
/// model M·F⁻¹DF·x = M·f (`lsqr_iter` iterations from 0), χ̂₀ = F{x} where |D| > δ.
/// Step 2: min_χ μ/2·‖M_wc(χ̂ − χ̂₀)‖² + ‖∇χ‖₁ by ADMM (z = ∇χ, penalty ρ), which keeps
/// the well-conditioned cone and lets TV fill the ill-conditioned one. The Nyquist planes
/// of even axes count as ill-conditioned (LSQR's kernel is zero there, see
/// `zero_nyquist_planes`). `should_stop` sees 1..=lsqr_iter, then lsqr_iter + TV iteration.
pub fn rts(
    local_field: &[f32],
    mask: &[u8],
    geometry: &Geometry,
    params: RtsParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    check_field_and_mask(local_field, mask, shape)?;
    check_positive(&[
        ("RTS delta", params.delta),
        ("RTS mu", params.mu),
        ("RTS rho", params.rho),
    ])?;
    check_iterations(params.max_iter, params.tol)?;
    if params.lsqr_iter == 0 {
        return Err(CoreError::InvalidArgument(
            "RTS lsqr_iter must be >= 1".into(),
        ));
    }
    let mut kernel = dipole_kernel(geometry)?;
    zero_nyquist_planes(&mut kernel, shape);
    let e2 = gradient_energy(shape, voxel_size);
    let plan = Fft3Plan::get(shape)?;
    let (delta, mu, rho) = (params.delta as f32, params.mu as f32, params.rho as f32);
    let ones = vec![1.0f32; shape.len()];
    let lsqr = LsqrParams {
        tol: 0.0,
        max_iter: params.lsqr_iter,
    };
    let (mut data_term, _) =
        lsqr_dipole_spectrum(local_field, &ones, mask, geometry, lsqr, 0, should_stop)?;
    drop(ones);
    let mut inv_denominator = vec![0.0f32; kernel.len()];
    data_term
        .par_iter_mut()
        .zip(inv_denominator.par_iter_mut())
        .zip(kernel.par_iter().zip(e2.par_iter()))
        .with_min_len(MIN_LEN)
        .for_each(|((b, q), (&d, &e))| {
            let well = d.abs() > delta;
            *b = if well {
                *b * mu
            } else {
                Complex32::new(0.0, 0.0)
            };
            let den = if well { mu } else { 0.0 } + rho * e;
            *q = if den > 0.0 { 1.0 / den } else { 0.0 };
        });
    let offset = params.lsqr_iter;
    let tv_stop = |iter: usize| should_stop(offset + iter);
    let (mut chi, iterations) = tv_split_loop(
        shape,
        voxel_size,
        &plan,
        &data_term,
        &inv_denominator,
        rho,
        1.0 / rho,
        params.max_iter,
        params.tol,
        &tv_stop,
    )?;
    apply_mask(&mut chi, mask);
    Ok((chi, iterations))
}

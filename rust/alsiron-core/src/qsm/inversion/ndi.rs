//! Nonlinear dipole inversion (Polak et al. 2020): gradient descent on the
//! magnitude-weighted complex-exponential misfit with a small Tikhonov term.

use num_complex::Complex32;
use rayon::prelude::*;

use super::*;
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::Geometry;
use crate::qsm::dipole::DipoleSymbol;

/// Parameters of [`ndi`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NdiParams {
    /// Phase per ppm of field [rad/ppm] (2π·γ̄·B0·TE).
    pub phase_scale: f64,
    /// Tikhonov weight λ on ½‖χ‖².
    pub lambda: f64,
    /// Gradient step τ.
    pub step: f64,
    /// Maximum iterations (early stopping regularises).
    pub max_iter: usize,
    /// Stop when ‖χₙ − χₙ₋₁‖ / ‖χₙ‖ < tol.
    pub tol: f64,
}

/// Nonlinear dipole inversion by gradient descent on
/// Σ W²(1 − cos(s·(Dχ − f)))/s² + λ/2‖χ‖², gradient Dᵀ(W² sin(s(Dχ − f))/s) + λχ.
///
/// χ is kept as its spectrum, so an iteration costs one inverse FFT (Dχ) and one forward
/// FFT (of the voxel-wise residual). W = `weight` inside the mask, 0 outside.
pub fn ndi(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    geometry: &Geometry,
    params: NdiParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
    let shape = geometry.shape();
    check_field_and_mask(local_field, mask, shape)?;
    check_weight(weight, shape, "weight")?;
    check_positive(&[
        ("NDI phase_scale", params.phase_scale),
        ("NDI step", params.step),
    ])?;
    if !(params.lambda.is_finite() && params.lambda >= 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "NDI lambda must be >= 0, got {}",
            params.lambda
        )));
    }
    check_iterations(params.max_iter, params.tol)?;
    let dipole = DipoleSymbol::new(geometry);
    let plan = Fft3Plan::get(shape)?;
    let [nx, _, nz] = shape.0;
    let s = params.phase_scale as f32;
    let (tau, lambda) = (params.step as f32, params.lambda as f32);
    // χ̂ in the x pass's block layout (see Fft3Plan::x_blocks), read next to the gathered
    // block of the residual spectrum; and D·χ̂ with its x axis already transformed back.
    // Both start at 0; they are the plan's spare work buffers when those are there.
    let mut chi_hat = plan.take_workspace();
    let mut spec = plan.take_workspace();
    for buffer in [&mut chi_hat, &mut spec] {
        buffer
            .par_iter_mut()
            .with_min_len(1 << 14)
            .for_each(|v| *v = Complex32::new(0.0, 0.0));
    }
    let mut iterations = 0;
    for iter in 1..=params.max_iter {
        if should_stop(iter) {
            return Err(CoreError::Interrupted);
        }
        iterations = iter;
        // One sweep over the x-planes: the inverse y/z transforms give Dχ line by line,
        // the residual replaces it, and the forward z/y transforms put it back.
        plan.map_real_lines(&mut spec, |offset, line| {
            let end = offset + line.len();
            ndi_residual_line(
                line,
                &local_field[offset..end],
                &weight[offset..end],
                &mask[offset..end],
                s,
            );
        })?;
        // One sweep over the x columns: forward x FFT (the residual spectrum r̂), the
        // step g = τ(D·r̂ + λχ̂), χ̂ ← χ̂ − g, the next D·χ̂, inverse x FFT; plus the
        // energies of g and χ̂ (Parseval, mirror bins counted twice) for the stopping rule.
        let [change, norm] = plan.x_blocks(&mut spec, &mut chi_hat, true, |mut block| {
            block.forward();
            let first = block.first_column;
            let (mut change, mut norm) = (0.0f64, 0.0f64);
            for (c, (r_col, chi_col)) in block
                .rows
                .chunks_exact_mut(nx)
                .zip(block.companion.chunks_exact_mut(nx))
                .enumerate()
            {
                let (mut column_change, mut column_norm) = (0.0f32, 0.0f32);
                dipole.column_into(first + c, block.line);
                for ((r, chi), &d) in r_col.iter_mut().zip(chi_col.iter_mut()).zip(&*block.line) {
                    let g = (*r * d + *chi * lambda) * tau;
                    *chi -= g;
                    *r = *chi * d;
                    column_change += g.norm_sqr();
                    column_norm += chi.norm_sqr();
                }
                let m = dipole.column_weight(first + c, nz) as f64;
                change += m * column_change as f64;
                norm += m * column_norm as f64;
            }
            block.inverse();
            [change, norm]
        });
        if norm > 0.0 && (change / norm).sqrt() < params.tol {
            break;
        }
    }
    let mut chi = vec![0.0f32; shape.len()];
    plan.x_blocks(&mut spec, &mut chi_hat, false, |mut block| {
        block.rows.copy_from_slice(block.companion);
        block.inverse();
        [0.0; 2]
    });
    let result = plan.inverse_planes(&mut spec, &mut chi, Some(mask));
    plan.keep_workspace(chi_hat);
    plan.keep_workspace(spec);
    result?;
    Ok((chi, iterations))
}

/// NDI's voxel-wise residual of one line: `line ← W²·sin(s(line − field))/s` inside the
/// mask, exactly 0 outside it (whatever the field or weight hold there).
///
/// The sine is [`sin_f32`] (vectorisable, within 1.3e-7 of the exact sine) when every
/// argument of the line is within [`SIN_F32_MAX_ARG`]; otherwise (a residual of
/// thousands of radians, or a non-finite value) the line uses `f32::sin`.
pub(super) fn ndi_residual_line(
    line: &mut [f32],
    field: &[f32],
    weight: &[f32],
    mask: &[u8],
    s: f32,
) {
    let inv_s = 1.0 / s;
    let mut out_of_range = false;
    for ((v, &f), &m) in line.iter_mut().zip(field).zip(mask) {
        *v = s * (*v - f);
        out_of_range |= (m != 0) & (v.is_nan() | (v.abs() > SIN_F32_MAX_ARG));
    }
    // Two monomorphised loops rather than a branch per voxel, so the fast one vectorises.
    if out_of_range {
        scaled_sine_inside(line, weight, mask, inv_s, f32::sin);
    } else {
        scaled_sine_inside(line, weight, mask, inv_s, sin_f32);
    }
}

/// `line ← W²·sine(line)·inv_s` inside the mask, +0 outside (a bit select rather than a
/// branch, so the loop vectorises).
#[inline(always)]
pub(super) fn scaled_sine_inside(
    line: &mut [f32],
    weight: &[f32],
    mask: &[u8],
    inv_s: f32,
    sine: impl Fn(f32) -> f32,
) {
    for ((v, &w), &m) in line.iter_mut().zip(weight).zip(mask) {
        let r = w * w * inv_s * sine(*v);
        *v = f32::from_bits(r.to_bits() & 0u32.wrapping_sub(u32::from(m != 0)));
    }
}

/// Largest |x| for which [`sin_f32`] holds its accuracy: the quotient k = round(x/π)
/// stays below 2¹², so k times the 8-bit leading part of π is exact.
pub(super) const SIN_F32_MAX_ARG: f32 = 8192.0;

/// sin(x) in f32 without a libm call, so that loops over it vectorise. Reduction
/// x = kπ + r with |r| ≤ π/2 (π split into three parts, Cody & Waite), then an odd
/// degree-11 polynomial fitted to sin on [0, π/2] (model error 2e-11) and the sign of
/// (−1)ᵏ. Max error against the exact sine: 1.4e-7 for |x| ≤ [`SIN_F32_MAX_ARG`]
/// (`f32::sin`: 7e-8), measured in the unit test.
#[inline(always)]
pub(super) fn sin_f32(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds x/π to an integer kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const PI_A: f32 = 3.140625;
    const PI_B: f32 = 9.675_026e-4;
    const PI_C: f32 = 1.509_958e-7;
    const S3: f32 = -1.666_666_7e-1;
    const S5: f32 = 8.333_33e-3;
    const S7: f32 = -1.984_080_4e-4;
    const S9: f32 = 2.752_261_8e-6;
    const S11: f32 = -2.384_668_3e-8;
    let t = x * std::f32::consts::FRAC_1_PI + ROUND;
    let k = t - ROUND;
    let r = ((x - k * PI_A) - k * PI_B) - k * PI_C;
    let r2 = r * r;
    let p = r + r * r2 * (S3 + r2 * (S5 + r2 * (S7 + r2 * (S9 + r2 * S11))));
    // The parity of k is the lowest mantissa bit of t.
    f32::from_bits(p.to_bits() ^ (t.to_bits() << 31))
}

#[cfg(test)]
mod ndi_tests {
    use super::*;
    use crate::qsm::dipole::{dipole_kernel, forward_field};
    use crate::test_support::geometry;
    use crate::test_support::{max_abs, max_abs_diff};

    /// The former NDI (kernel array, full forward and inverse FFTs, `f32::sin`, the real
    /// residual volume): the reference the fused passes must reproduce.
    fn ndi_unfused(
        field: &[f32],
        weight: &[f32],
        mask: &[u8],
        shape: Shape3,
        voxel_size: [f64; 3],
        b0_dir: [f64; 3],
        p: NdiParams,
    ) -> (Vec<f32>, usize) {
        let kernel = dipole_kernel(&geometry(shape, voxel_size, b0_dir)).unwrap();
        let plan = Fft3Plan::get(shape).unwrap();
        let s = p.phase_scale as f32;
        let (tau, lambda) = (p.step as f32, p.lambda as f32);
        let f = masked(field, mask);
        let w2: Vec<f32> = weight
            .iter()
            .zip(mask)
            .map(|(&w, &m)| if m != 0 { w * w } else { 0.0 })
            .collect();
        let mut chi_hat = plan.make_spectrum();
        let mut spec = plan.make_spectrum();
        let mut work = vec![0.0f32; shape.len()];
        let nh = shape.0[2] / 2 + 1;
        let mut iterations = 0;
        for iter in 1..=p.max_iter {
            iterations = iter;
            plan.inverse(&mut spec, &mut work).unwrap();
            for ((v, &f), &w) in work.iter_mut().zip(&f).zip(&w2) {
                *v = w * (s * (*v - f)).sin() / s;
            }
            plan.forward(&work, &mut spec).unwrap();
            let (mut change, mut norm) = (0.0f64, 0.0f64);
            for (idx, (c, r)) in chi_hat.iter_mut().zip(spec.iter_mut()).enumerate() {
                let d = kernel[idx];
                let g = (*r * d + *c * lambda) * tau;
                *c -= g;
                *r = *c * d;
                let k = idx % nh;
                let m = if k == 0 || (shape.0[2] % 2 == 0 && k == nh - 1) {
                    1.0
                } else {
                    2.0
                };
                change += m * g.norm_sqr() as f64;
                norm += m * c.norm_sqr() as f64;
            }
            if norm > 0.0 && (change / norm).sqrt() < p.tol {
                break;
            }
        }
        let mut chi = vec![0.0f32; shape.len()];
        plan.inverse(&mut chi_hat, &mut chi).unwrap();
        apply_mask(&mut chi, mask);
        (chi, iterations)
    }

    #[test]
    fn fast_sine_is_within_its_stated_error() {
        let mut worst = 0.0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            // Dense near 0 and across the whole stated range, both signs.
            let x = (i as f64 / steps as f64 * 2.0 - 1.0).powi(3) * SIN_F32_MAX_ARG as f64;
            let x = x as f32;
            worst = worst.max((sin_f32(x) as f64 - (x as f64).sin()).abs());
        }
        assert!(worst < 1.4e-7, "max error {worst:e}");
        assert_eq!(sin_f32(0.0), 0.0);
    }

    #[test]
    fn residual_line_takes_the_exact_sine_out_of_range() {
        let field = [0.0f32; 5];
        let w = [1.0f32; 5];
        let inside = [1u8; 5];
        let mut line = [0.5f32, -1.0, 3.0, 1e5, 0.0];
        ndi_residual_line(&mut line, &field, &w, &inside, 1.0);
        let want = [
            0.5f32.sin(),
            (-1.0f32).sin(),
            3.0f32.sin(),
            1e5f32.sin(),
            0.0,
        ];
        assert_eq!(line, want);
        let mut line = [0.5f32, -1.0, 3.0, 100.0, 0.0];
        ndi_residual_line(&mut line, &field, &w, &inside, 1.0);
        for (got, x) in line.iter().zip([0.5f32, -1.0, 3.0, 100.0, 0.0]) {
            assert!((got - x.sin()).abs() < 2e-7);
        }
        // Outside the mask: exactly 0, even for a non-finite field or a huge residual
        // (which must not push the inside voxels onto the slow path either).
        let field = [f32::NAN, 0.0, f32::INFINITY, 0.0, 0.0];
        let mask = [0u8, 1, 0, 1, 0];
        let mut line = [0.5f32, 0.25, 3.0, -0.75, 1e6];
        ndi_residual_line(&mut line, &field, &[2.0; 5], &mask, 2.0);
        assert_eq!(line[0], 0.0);
        assert_eq!(line[2], 0.0);
        assert_eq!(line[4], 0.0);
        assert!((line[1] - 2.0 * 0.5f32.sin()).abs() < 1e-6);
        assert!((line[3] - 2.0 * (-1.5f32).sin()).abs() < 1e-6);
    }

    #[test]
    fn fused_ndi_equals_the_unfused_iteration() {
        // Odd and even axes (even nz has a one-sided Nyquist plane), a non-uniform weight,
        // a phase scale large enough for the sine to be nonlinear.
        for (shape, tol) in [
            ([14, 12, 10], 0.0),
            ([13, 16, 9], 0.0),
            ([12, 11, 16], 0.02),
        ] {
            let shape = Shape3(shape);
            let [nx, ny, nz] = shape.0;
            let n = shape.len();
            let mut chi = vec![0.0f32; n];
            let mut mask = vec![0u8; n];
            let mut weight = vec![0.0f32; n];
            for i in 0..nx {
                for j in 0..ny {
                    for k in 0..nz {
                        let r2 = (i as f64 / nx as f64 - 0.5).powi(2)
                            + (j as f64 / ny as f64 - 0.45).powi(2)
                            + (k as f64 / nz as f64 - 0.5).powi(2);
                        let idx = shape.idx(i, j, k);
                        mask[idx] = u8::from(r2 < 0.16);
                        chi[idx] = if r2 < 0.02 { 0.2 } else { -0.02 };
                        weight[idx] = 0.5 + ((i * 7 + j * 3 + k) % 5) as f32 * 0.2;
                    }
                }
            }
            let (vs, b0) = ([1.0, 1.1, 1.3], [0.1, 0.2, 1.0]);
            let field = forward_field(&chi, &geometry(shape, vs, b0)).unwrap();
            let params = NdiParams {
                phase_scale: 12.0,
                lambda: 1e-3,
                step: 1.5,
                max_iter: 30,
                tol,
            };
            let (want, want_it) = ndi_unfused(&field, &weight, &mask, shape, vs, b0, params);
            let (got, got_it) = ndi(
                &field,
                &weight,
                &mask,
                &geometry(shape, vs, b0),
                params,
                &|_| false,
            )
            .unwrap();
            assert_eq!(got_it, want_it);
            if tol > 0.0 {
                assert!(
                    got_it < params.max_iter,
                    "the tolerance should stop it early"
                );
            }
            let scale = max_abs(&want);
            let err = max_abs_diff(&want, &got);
            // Measured: 1.9e-8 at scale 0.16 (the fast sine and the summation order).
            assert!(
                err <= 1e-5 * scale,
                "{:?}: max err {err:e} (scale {scale})",
                shape.0
            );
            assert!(got.iter().zip(&mask).all(|(v, &m)| m != 0 || *v == 0.0));
        }
    }
}

//! Dipole inversion: local field [ppm] → susceptibility χ [ppm].
//!
//! - [`tkd`]: truncated k-space division (Shmueli et al. 2009; Wharton et al. 2010).
//! - [`tv_admm`]: total-variation regularised linear inversion solved by ADMM
//!   (Bilgic et al. 2014, "fast, nonlinear, ..." FANSI's linear variant).
//!
//! Both treat the field outside the mask as zero and return χ set to 0 outside the mask.

use num_complex::Complex32;
use rayon::prelude::*;

use crate::dipole::{apply_kernel, dipole_kernel, DipoleSymbol};
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::Shape3;

/// Default TKD truncation threshold on |D|.
pub const TKD_DEFAULT_THRESHOLD: f64 = 0.19;

pub(crate) fn check_field_and_mask(field: &[f32], mask: &[u8], shape: Shape3) -> CoreResult<()> {
    shape.check_len(field.len(), "local field")?;
    shape.check_len(mask.len(), "mask")?;
    if !mask.iter().any(|&m| m != 0) {
        return Err(CoreError::InvalidArgument("mask is empty".into()));
    }
    Ok(())
}

pub(crate) fn masked(values: &[f32], mask: &[u8]) -> Vec<f32> {
    values
        .par_iter()
        .zip(mask.par_iter())
        .map(|(&v, &m)| if m != 0 { v } else { 0.0 })
        .collect()
}

pub(crate) fn apply_mask(values: &mut [f32], mask: &[u8]) {
    values
        .par_iter_mut()
        .zip(mask.par_iter())
        .for_each(|(v, &m)| {
            if m == 0 {
                *v = 0.0
            }
        });
}

/// Truncated inverse of the dipole kernel: 1/D where |D| > t, sign(D)/t elsewhere, 0 where
/// D = 0 (the k = 0 bin, whose content is undetermined).
pub fn truncated_inverse(kernel: &[f32], threshold: f32) -> Vec<f32> {
    kernel
        .par_iter()
        .map(|&d| truncated_inverse_value(d, threshold))
        .collect()
}

/// One value of [`truncated_inverse`], branch-free (so loops over it vectorise):
/// ±1/max(|d|, t) with the sign of d is 1/d where |d| > t and sign(d)/t elsewhere, with the
/// same rounding as those two expressions.
#[inline]
pub fn truncated_inverse_value(d: f32, threshold: f32) -> f32 {
    let inverse = (1.0 / d.abs().max(threshold)).copysign(d);
    if d == 0.0 {
        0.0
    } else {
        inverse
    }
}

/// Truncated k-space division. `threshold` on |D| (default [`TKD_DEFAULT_THRESHOLD`]).
pub fn tkd(
    local_field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    threshold: f64,
) -> CoreResult<Vec<f32>> {
    check_field_and_mask(local_field, mask, shape)?;
    if !(threshold.is_finite() && threshold > 0.0 && threshold <= 2.0 / 3.0) {
        return Err(CoreError::InvalidArgument(format!(
            "TKD threshold must be in (0, 2/3], got {threshold}"
        )));
    }
    let dipole = DipoleSymbol::new(shape, voxel_size, b0_dir)?;
    let plan = Fft3Plan::get(shape)?;
    let t = threshold as f32;
    let mut chi = vec![0.0f32; shape.len()];
    plan.filter(
        local_field,
        Some(mask),
        &mut chi,
        Some(mask),
        |column, values, kernel| {
            dipole.column_into(column, kernel);
            for (v, &d) in values.iter_mut().zip(kernel.iter()) {
                *v *= truncated_inverse_value(d, t);
            }
        },
    )?;
    Ok(chi)
}

/// Default gradient-regularisation weight λ of [`tikhonov`] [mm²] (tuned on the head
/// phantom's true local field, docs/qsm_stages.md).
pub const TIKHONOV_DEFAULT_LAMBDA: f64 = 2e-2;

/// Closed-form Tikhonov inversion with gradient regularisation:
/// χ̂ = D·f̂ / (D² + λ·Σₐ|Eₐ|²), Eₐ the symbols of the periodic forward differences
/// divided by the voxel size (so λ is in mm² and anisotropic voxels are honoured).
///
/// The filter is evaluated on the fly inside the fused x pass of [`Fft3Plan::filter`]
/// (no kernel arrays, no full-size temporaries), so the call costs a little less than one
/// forward and one inverse real FFT. χ̂(0) = 0.
pub fn tikhonov(
    local_field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    lambda: f64,
) -> CoreResult<Vec<f32>> {
    check_field_and_mask(local_field, mask, shape)?;
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "Tikhonov lambda must be positive, got {lambda}"
        )));
    }
    crate::grid::check_voxel_size(voxel_size)?;
    let b = crate::grid::unit_direction(b0_dir)?;
    let plan = Fft3Plan::get(shape)?;
    let [kx, ky, kz] = crate::dipole::half_spectrum_frequencies(shape, voxel_size);
    let [ex, ey, ez] = difference_symbols(shape, voxel_size);
    let e2 = |s: &[Complex32]| -> Vec<f64> { s.iter().map(|c| c.norm_sqr() as f64).collect() };
    let (ex2, ey2, ez2) = (e2(&ex), e2(&ey), e2(&ez));
    let nh = shape.half_spectrum().0[2];
    let mut chi = vec![0.0f32; shape.len()];
    plan.filter(
        local_field,
        Some(mask),
        &mut chi,
        Some(mask),
        |column, values, _| {
            let (j, k) = (column / nh, column % nh);
            let (y, z) = (ky[j], kz[k]);
            let yz2 = y * y + z * z;
            let yz_b = y * b[1] + z * b[2];
            let eyz = ey2[j] + ez2[k];
            for ((v, &x), &ex) in values.iter_mut().zip(&kx).zip(&ex2) {
                let k2 = x * x + yz2;
                let kb = x * b[0] + yz_b;
                let d = 1.0 / 3.0 - kb * kb / k2;
                let filter = d / (d * d + lambda * (ex + eyz));
                // Branch-free select (vectorises); χ̂(0) = 0.
                *v *= if k2 == 0.0 { 0.0 } else { filter as f32 };
            }
        },
    )?;
    Ok(chi)
}

/// Parameters of [`tv_admm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TvAdmmParams {
    /// Weight of the TV term, in ppm (field) per ppm/mm (gradient of χ).
    pub alpha: f64,
    /// ADMM penalty on the gradient splitting z = ∇χ.
    pub mu: f64,
    /// Maximum number of iterations.
    pub max_iter: usize,
    /// Stop when ‖χₙ − χₙ₋₁‖ / ‖χₙ‖ < tol.
    pub tol: f64,
}

impl Default for TvAdmmParams {
    /// α and μ = 100·α minimise NRMSE on the simulated phantom of
    /// `tests/twins_qsm.py::simulate_phantom` (64³, 1.5×1.5×2 mm, oblique B0, field in
    /// ppm with 0.002 ppm noise): NRMSE ≈ 14.5 % vs 53 % for TKD. α = 5e-4 is marginally
    /// better when noiseless, 1e-3 at 0.005 ppm noise; 7e-4 is the compromise.
    fn default() -> Self {
        TvAdmmParams {
            alpha: 7e-4,
            mu: 7e-2,
            max_iter: 100,
            tol: 1e-3,
        }
    }
}

impl TvAdmmParams {
    fn check(&self) -> CoreResult<()> {
        let ok = self.alpha.is_finite()
            && self.alpha >= 0.0
            && self.mu.is_finite()
            && self.mu > 0.0
            && self.max_iter > 0
            && self.tol.is_finite()
            && self.tol >= 0.0;
        if !ok {
            return Err(CoreError::InvalidArgument(format!(
                "TV-ADMM needs alpha >= 0, mu > 0, max_iter > 0, tol >= 0; got {self:?}"
            )));
        }
        Ok(())
    }
}

/// k-space symbols of the periodic forward differences along each axis, on the half
/// spectrum: E_a(k) = (exp(2πi·k_a/N_a) − 1) / h_a. Stored per axis (1-D).
pub(crate) fn difference_symbols(shape: Shape3, voxel_size: [f64; 3]) -> [Vec<Complex32>; 3] {
    let [nx, ny, nz] = shape.0;
    let symbol = |n: usize, count: usize, h: f64| -> Vec<Complex32> {
        (0..count)
            .map(|i| {
                let w = 2.0 * std::f64::consts::PI * i as f64 / n as f64;
                Complex32::new(((w.cos() - 1.0) / h) as f32, (w.sin() / h) as f32)
            })
            .collect()
    };
    [
        symbol(nx, nx, voxel_size[0]),
        symbol(ny, ny, voxel_size[1]),
        symbol(nz, nz / 2 + 1, voxel_size[2]),
    ]
}

/// Σₐ|Eₐ(k)|² on the half spectrum: the symbol of ∇ᵀ∇ (minus the 7-point Laplacian) for
/// periodic forward differences scaled by the voxel size [mm⁻²].
pub(crate) fn gradient_energy(shape: Shape3, voxel_size: [f64; 3]) -> Vec<f32> {
    let [ex, ey, ez] = difference_symbols(shape, voxel_size);
    let half = shape.half_spectrum();
    let [_, hy, hz] = half.0;
    let mut out = vec![0.0f32; half.len()];
    out.par_chunks_mut(hy * hz)
        .enumerate()
        .for_each(|(i, plane)| {
            for (j, row) in plane.chunks_mut(hz).enumerate() {
                for (k, v) in row.iter_mut().enumerate() {
                    *v = ex[i].norm_sqr() + ey[j].norm_sqr() + ez[k].norm_sqr();
                }
            }
        });
    out
}

/// Per-voxel 3-vector (x, y, z components) of the ADMM split variables. The iteration
/// keeps the scaled dual u and w = z − u (all the χ-update needs), so the divergence pass
/// reads 12 bytes per voxel and the update pass streams u and w once.
pub(crate) type Vec3 = [f32; 3];

/// Periodic forward differences of `chi` at voxel (i, j, k) divided by the voxel size.
#[inline]
fn gradient_at(
    chi: &[f32],
    shape: Shape3,
    inv_h: [f32; 3],
    i: usize,
    j: usize,
    k: usize,
) -> [f32; 3] {
    let [nx, ny, nz] = shape.0;
    let c = chi[shape.idx(i, j, k)];
    let ip = if i + 1 == nx { 0 } else { i + 1 };
    let jp = if j + 1 == ny { 0 } else { j + 1 };
    let kp = if k + 1 == nz { 0 } else { k + 1 };
    [
        (chi[shape.idx(ip, j, k)] - c) * inv_h[0],
        (chi[shape.idx(i, jp, k)] - c) * inv_h[1],
        (chi[shape.idx(i, j, kp)] - c) * inv_h[2],
    ]
}

/// Value of the TV-ADMM objective ½‖Dχ − f‖² + α‖∇χ‖₁ (f masked, periodic gradients);
/// used by tests and diagnostics.
pub fn tv_objective(
    chi: &[f32],
    local_field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    alpha: f64,
) -> CoreResult<f64> {
    check_field_and_mask(local_field, mask, shape)?;
    shape.check_len(chi.len(), "chi")?;
    let field = crate::dipole::forward_field(chi, shape, voxel_size, b0_dir)?;
    let data: f64 = field
        .par_iter()
        .zip(local_field.par_iter().zip(mask.par_iter()))
        .map(|(&d, (&f, &m))| {
            let r = d as f64 - if m != 0 { f as f64 } else { 0.0 };
            r * r
        })
        .sum();
    let inv_h = voxel_size.map(|h| (1.0 / h) as f32);
    let [nx, ny, nz] = shape.0;
    let tv: f64 = (0..nx)
        .into_par_iter()
        .map(|i| {
            let mut s = 0.0f64;
            for j in 0..ny {
                for k in 0..nz {
                    let g = gradient_at(chi, shape, inv_h, i, j, k);
                    s += g.iter().map(|v| v.abs() as f64).sum::<f64>();
                }
            }
            s
        })
        .sum();
    Ok(0.5 * data + alpha * tv)
}

/// TV-regularised dipole inversion by ADMM:
/// min_χ ½‖Dχ − f‖² + α‖∇χ‖₁ with z = ∇χ.
///
/// Per iteration: χ-update as one k-space division
/// χ̂ = (D·f̂ + μ·Σ conj(E_a)·F{z_a − u_a}) / (D² + μ·Σ|E_a|²) (one forward FFT of the
/// divergence term, one inverse FFT), then z = soft(∇χ + u, α/μ), u += ∇χ − z.
/// `should_stop(iter)` is polled every iteration; returning true aborts with
/// [`CoreError::Interrupted`]. Returns (χ masked, iterations run).
#[allow(clippy::too_many_arguments)]
pub fn tv_admm(
    local_field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    params: TvAdmmParams,
    should_stop: &(dyn Fn(usize) -> bool + Sync),
) -> CoreResult<(Vec<f32>, usize)> {
    check_field_and_mask(local_field, mask, shape)?;
    params.check()?;
    let kernel = dipole_kernel(shape, voxel_size, b0_dir)?;
    let plan = Fft3Plan::get(shape)?;
    let mu = params.mu as f32;

    // Fixed k-space terms: D·f̂ and 1 / (D² + μ Σ|E|²) (0 at k = 0 where χ̂ is undetermined).
    let mut data_term = plan.make_spectrum();
    plan.forward(&masked(local_field, mask), &mut data_term)?;
    apply_kernel(&mut data_term, &kernel);
    let e2 = gradient_energy(shape, voxel_size);
    let inv_denominator: Vec<f32> = kernel
        .par_iter()
        .zip(e2.par_iter())
        .map(|(&d, &e)| {
            let den = d * d + mu * e;
            if den > 0.0 {
                1.0 / den
            } else {
                0.0
            }
        })
        .collect();

    let threshold = (params.alpha / params.mu) as f32;
    let (mut chi, iterations) = tv_split_loop(
        shape,
        voxel_size,
        &plan,
        &data_term,
        &inv_denominator,
        mu,
        threshold,
        params.max_iter,
        params.tol,
        should_stop,
    )?;
    apply_mask(&mut chi, mask);
    Ok((chi, iterations))
}

/// The ADMM loop shared by [`tv_admm`] and RTS: with z = ∇χ split off and scaled dual u,
/// χ̂ = (b̂ + μ·F{∇ᵀ(z − u)})·q̂, z = soft(∇χ + u, threshold), u ← u + ∇χ − z, where
/// b̂ (`data_term`) and q̂ (`inv_denominator`) are the problem's fixed k-space terms.
/// Returns (χ unmasked, iterations run).
#[allow(clippy::too_many_arguments)]
pub(crate) fn tv_split_loop(
    shape: Shape3,
    voxel_size: [f64; 3],
    plan: &Fft3Plan,
    data_term: &[Complex32],
    inv_denominator: &[f32],
    mu: f32,
    threshold: f32,
    max_iter: usize,
    tol: f64,
    should_stop: &(dyn Fn(usize) -> bool + Sync),
) -> CoreResult<(Vec<f32>, usize)> {
    let [nx, ny, nz] = shape.0;
    let plane = ny * nz;
    let inv_h = voxel_size.map(|h| (1.0 / h) as f32);
    let mut u: Vec<Vec3> = vec![[0.0; 3]; shape.len()];
    let mut w: Vec<Vec3> = vec![[0.0; 3]; shape.len()];
    let mut chi = vec![0.0f32; shape.len()];
    let mut chi_prev = vec![0.0f32; shape.len()];
    let mut divergence = vec![0.0f32; shape.len()];
    let mut spectrum = plan.make_spectrum();
    let mut iterations = 0;

    for iter in 1..=max_iter {
        if should_stop(iter) {
            return Err(CoreError::Interrupted);
        }
        iterations = iter;
        // μ·∇ᵀ(z − u): adjoint of the periodic forward difference is a backward
        // difference with a sign flip, (w[i−1] − w[i]) / h, with w = z − u.
        {
            let w = &w;
            divergence
                .par_chunks_mut(plane)
                .enumerate()
                .for_each(|(i, out)| {
                    let im = if i == 0 { nx - 1 } else { i - 1 };
                    for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                        let jm = if j == 0 { ny - 1 } else { j - 1 };
                        let here = &w[shape.idx(i, j, 0)..][..nz];
                        let xm = &w[shape.idx(im, j, 0)..][..nz];
                        let ym = &w[shape.idx(i, jm, 0)..][..nz];
                        let mut zm = here[nz - 1][2];
                        for k in 0..nz {
                            let h = here[k];
                            let d = (xm[k][0] - h[0]) * inv_h[0]
                                + (ym[k][1] - h[1]) * inv_h[1]
                                + (zm - h[2]) * inv_h[2];
                            out_row[k] = mu * d;
                            zm = h[2];
                        }
                    }
                });
        }
        plan.forward(&divergence, &mut spectrum)?;
        spectrum
            .par_iter_mut()
            .zip(data_term.par_iter().zip(inv_denominator.par_iter()))
            .with_min_len(4096)
            .for_each(|(s, (&b, &w))| *s = (*s + b) * w);
        std::mem::swap(&mut chi, &mut chi_prev);
        plan.inverse(&mut spectrum, &mut chi)?;

        // Fused z/u update (z = soft(∇χ + u), u ← ∇χ + u − z, w = z − u) with the
        // convergence measure, one row of the volume at a time.
        let (change, norm) = {
            let chi = &chi;
            let chi_prev = &chi_prev;
            u.par_chunks_mut(plane)
                .zip(w.par_chunks_mut(plane))
                .enumerate()
                .map(|(i, (u_plane, w_plane))| {
                    let ip = if i + 1 == nx { 0 } else { i + 1 };
                    let (mut change, mut norm) = (0.0f64, 0.0f64);
                    let rows = u_plane
                        .chunks_exact_mut(nz)
                        .zip(w_plane.chunks_exact_mut(nz));
                    for (j, (u_row, w_row)) in rows.enumerate() {
                        let jp = if j + 1 == ny { 0 } else { j + 1 };
                        let c = &chi[shape.idx(i, j, 0)..][..nz];
                        let cx = &chi[shape.idx(ip, j, 0)..][..nz];
                        let cy = &chi[shape.idx(i, jp, 0)..][..nz];
                        let prev = &chi_prev[shape.idx(i, j, 0)..][..nz];
                        let (mut row_change, mut row_norm) = (0.0f32, 0.0f32);
                        for k in 0..nz {
                            let ck = c[k];
                            let cz = if k + 1 == nz { c[0] } else { c[k + 1] };
                            let g = [
                                (cx[k] - ck) * inv_h[0],
                                (cy[k] - ck) * inv_h[1],
                                (cz - ck) * inv_h[2],
                            ];
                            // z = soft(v, t) = v − clamp(v, ±t), so u = v − z = clamp(v)
                            // and w = z − u = v − 2u: branch-free and vectorisable.
                            for a in 0..3 {
                                let v = g[a] + u_row[k][a];
                                let clamped = v.clamp(-threshold, threshold);
                                u_row[k][a] = clamped;
                                w_row[k][a] = v - 2.0 * clamped;
                            }
                            let d = ck - prev[k];
                            row_change += d * d;
                            row_norm += ck * ck;
                        }
                        change += row_change as f64;
                        norm += row_norm as f64;
                    }
                    (change, norm)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        if norm > 0.0 && (change / norm).sqrt() < tol {
            break;
        }
    }
    Ok((chi, iterations))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dipole::forward_field;
    use crate::test_support::masked_nrmse_pct as nrmse;
    use crate::test_support::{max_abs, max_abs_diff};

    /// Smooth blob (Gaussian) in the middle of an n³ grid, and a ball mask.
    fn phantom(n: usize) -> (Vec<f32>, Vec<u8>, Shape3) {
        let shape = Shape3([n, n, n]);
        let c = (n as f64 - 1.0) / 2.0;
        let mut chi = vec![0.0f32; shape.len()];
        let mut mask = vec![0u8; shape.len()];
        for i in 0..n {
            for j in 0..n {
                for k in 0..n {
                    let r2 = (i as f64 - c).powi(2)
                        + (j as f64 - 0.8 * c).powi(2)
                        + (k as f64 - c).powi(2);
                    chi[shape.idx(i, j, k)] = (0.1 * (-r2 / (2.0 * 9.0)).exp()) as f32;
                    if r2 < (0.4 * n as f64).powi(2) {
                        mask[shape.idx(i, j, k)] = 1;
                    }
                }
            }
        }
        (chi, mask, shape)
    }

    #[test]
    fn truncated_inverse_rules() {
        let inv = truncated_inverse(&[0.0, 0.5, -0.5, 0.1, -0.1], 0.2);
        assert_eq!(inv, vec![0.0, 2.0, -2.0, 5.0, -5.0]);
    }

    #[test]
    fn tkd_recovers_a_smooth_source_from_a_noiseless_field() {
        let (chi, mask, shape) = phantom(32);
        let b0 = [0.2, 0.1, 1.0];
        let field = forward_field(&chi, shape, [1.0, 1.0, 1.2], b0).unwrap();
        let est = tkd(
            &field,
            &vec![1; shape.len()],
            shape,
            [1.0, 1.0, 1.2],
            b0,
            0.19,
        )
        .unwrap();
        let err = nrmse(&est, &chi, &mask);
        // The smooth source lives mostly where |D| > t; truncation costs a few percent.
        assert!(err < 25.0, "TKD NRMSE {err:.1}%");
        // Lower threshold -> closer to the exact inverse on noiseless data.
        let est = tkd(
            &field,
            &vec![1; shape.len()],
            shape,
            [1.0, 1.0, 1.2],
            b0,
            0.05,
        )
        .unwrap();
        let err_low = nrmse(&est, &chi, &mask);
        assert!(err_low < err, "{err_low} !< {err}");
    }

    #[test]
    fn fused_tkd_equals_the_kernel_array_version() {
        // The former implementation: kernel arrays, forward, multiply, inverse, mask.
        for (n, voxel, b0) in [
            (16, [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]),
            (15, [1.0, 1.1, 1.3], [0.2, -0.1, 1.0]),
        ] {
            let (chi, mask, _) = phantom(n);
            let shape = Shape3([n, n + 2, n - 3]);
            let chi = &chi[..shape.len()];
            let mask = &mask[..shape.len()];
            let field = forward_field(chi, shape, voxel, b0).unwrap();
            let inverse_kernel = truncated_inverse(&dipole_kernel(shape, voxel, b0).unwrap(), 0.19);
            let plan = Fft3Plan::get(shape).unwrap();
            let mut spectrum = plan.make_spectrum();
            plan.forward(&masked(&field, mask), &mut spectrum).unwrap();
            apply_kernel(&mut spectrum, &inverse_kernel);
            let mut want = vec![0.0f32; shape.len()];
            plan.inverse(&mut spectrum, &mut want).unwrap();
            apply_mask(&mut want, mask);
            let got = tkd(&field, mask, shape, voxel, b0, 0.19).unwrap();
            let scale = max_abs(&want);
            let err = max_abs_diff(&want, &got);
            assert!(err <= 1e-5 * scale, "max err {err} (scale {scale})");
            assert!(got.iter().zip(mask).all(|(v, &m)| m != 0 || *v == 0.0));
        }
    }

    #[test]
    fn fused_tikhonov_equals_the_kernel_array_version() {
        let (chi, mask, _) = phantom(15);
        let shape = Shape3([15, 17, 12]);
        let (chi, mask) = (&chi[..shape.len()], &mask[..shape.len()]);
        let (voxel, b0, lambda) = ([1.0, 1.1, 1.3], [0.2, -0.1, 1.0], 2e-2);
        let field = forward_field(chi, shape, voxel, b0).unwrap();
        let d = dipole_kernel(shape, voxel, b0).unwrap();
        let [ex, ey, ez] = difference_symbols(shape, voxel);
        let half = shape.half_spectrum();
        let mut filter = vec![0.0f32; half.len()];
        for (i, exi) in ex.iter().enumerate().take(half.0[0]) {
            for (j, eyj) in ey.iter().enumerate().take(half.0[1]) {
                for (k, ezk) in ez.iter().enumerate().take(half.0[2]) {
                    let idx = half.idx(i, j, k);
                    let e2 = (exi.norm_sqr() + eyj.norm_sqr() + ezk.norm_sqr()) as f64;
                    let dk = d[idx] as f64;
                    if idx != 0 {
                        filter[idx] = (dk / (dk * dk + lambda * e2)) as f32;
                    }
                }
            }
        }
        let plan = Fft3Plan::get(shape).unwrap();
        let mut spectrum = plan.make_spectrum();
        plan.forward(&masked(&field, mask), &mut spectrum).unwrap();
        apply_kernel(&mut spectrum, &filter);
        let mut want = vec![0.0f32; shape.len()];
        plan.inverse(&mut spectrum, &mut want).unwrap();
        apply_mask(&mut want, mask);
        let got = tikhonov(&field, mask, shape, voxel, b0, lambda).unwrap();
        let scale = max_abs(&want);
        let err = max_abs_diff(&want, &got);
        assert!(err <= 1e-5 * scale, "max err {err} (scale {scale})");
    }

    #[test]
    fn tkd_output_is_zero_outside_mask_and_refuses_empty_masks() {
        let (chi, mask, shape) = phantom(16);
        let field = forward_field(&chi, shape, [1.0; 3], [0.0, 0.0, 1.0]).unwrap();
        let est = tkd(&field, &mask, shape, [1.0; 3], [0.0, 0.0, 1.0], 0.19).unwrap();
        assert!(est.iter().zip(&mask).all(|(v, &m)| m != 0 || *v == 0.0));
        assert!(tkd(
            &field,
            &vec![0; shape.len()],
            shape,
            [1.0; 3],
            [0.0, 0.0, 1.0],
            0.19
        )
        .is_err());
        assert!(tkd(&field, &mask, shape, [1.0; 3], [0.0, 0.0, 1.0], 0.0).is_err());
    }

    #[test]
    fn admm_decreases_the_objective_and_stops_on_request() {
        let (chi, mask, shape) = phantom(24);
        let b0 = [0.0, 0.3, 1.0];
        let vs = [1.0, 1.0, 1.5];
        let field = forward_field(&chi, shape, vs, b0).unwrap();
        let all = vec![1u8; shape.len()];
        let alpha = 1e-4;
        let run = |iters: usize| {
            let p = TvAdmmParams {
                alpha,
                mu: 1e-2,
                max_iter: iters,
                tol: 0.0,
            };
            tv_admm(&field, &all, shape, vs, b0, p, &|_| false).unwrap()
        };
        let obj = |x: &[f32]| tv_objective(x, &field, &all, shape, vs, b0, alpha).unwrap();
        let zero = vec![0.0f32; shape.len()];
        let (chi1, n1) = run(1);
        let (chi30, n30) = run(30);
        assert_eq!((n1, n30), (1, 30));
        let (o0, o1, o30) = (obj(&zero), obj(&chi1), obj(&chi30));
        assert!(o1 < o0 && o30 < o1, "objective {o0} -> {o1} -> {o30}");
        assert!(nrmse(&chi30, &chi, &mask) < 30.0);

        let p = TvAdmmParams {
            max_iter: 50,
            ..TvAdmmParams::default()
        };
        let stopped = tv_admm(&field, &all, shape, vs, b0, p, &|it| it >= 3);
        assert_eq!(stopped, Err(CoreError::Interrupted));
    }
}

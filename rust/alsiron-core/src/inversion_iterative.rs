//! Iterative dipole inversions beyond plain TV-ADMM: local field [ppm] → χ [ppm].
//!
//! - [`weighted_tv_admm`]: ADMM for ½‖W(Dχ + φ − f)‖² + α‖G∘∇χ‖₁ (+ β/2‖M·Δφ‖²), the
//!   engine of FANSI-style TV with a weak-harmonic background term (Milovic et al. 2019)
//!   and of MEDI-style magnitude-weighted L1 (Liu et al. 2011/2012): per-voxel data
//!   weights W, per-voxel TV weights G (edge mask), optional nonlinear data term
//!   (1 − cos(s·(Dχ + φ − f)))·W²/s² with s the phase per ppm.
//! - [`rts`]: rapid two-step (Kames et al. 2018): k-space division in the well-conditioned
//!   cone, then TV fills the ill-conditioned cone.
//! - [`ndi`]: nonlinear dipole inversion (Polak et al. 2020), gradient descent on the
//!   magnitude-weighted complex-exponential misfit with a small Tikhonov term.
//! - [`ilsqr`]: the LSQR core of iLSQR (Li et al. 2015) on the weighted dipole model,
//!   regularised by early stopping.
//!
//! All return χ set to 0 outside the mask and the number of iterations run; each polls
//! `should_stop(iteration)` once per iteration ([`CoreError::Interrupted`] when it says so).

use num_complex::Complex32;
use rayon::prelude::*;

use crate::dipole::{dipole_kernel, DipoleSymbol};
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::Shape3;
use crate::inversion::{
    apply_mask, check_field_and_mask, gradient_energy, masked, tv_split_loop, Vec3,
};

/// Minimum parallel chunk for element-wise passes.
const MIN_LEN: usize = 4096;

type StopFn<'a> = &'a (dyn Fn(usize) -> bool + Sync);

fn check_weight(weight: &[f32], shape: Shape3, what: &str) -> CoreResult<()> {
    shape.check_len(weight.len(), what)?;
    if weight.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(CoreError::InvalidArgument(format!(
            "{what} must be finite and non-negative"
        )));
    }
    Ok(())
}

fn check_positive(values: &[(&str, f64)]) -> CoreResult<()> {
    for (name, v) in values {
        if !(v.is_finite() && *v > 0.0) {
            return Err(CoreError::InvalidArgument(format!(
                "{name} must be positive and finite, got {v}"
            )));
        }
    }
    Ok(())
}

fn check_iterations(max_iter: usize, tol: f64) -> CoreResult<()> {
    if max_iter == 0 || !(tol.is_finite() && tol >= 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "need max_iter > 0 and tol >= 0, got {max_iter} and {tol}"
        )));
    }
    Ok(())
}

/// `out = scale · ∇ᵀw` for periodic forward differences (a backward difference with a
/// sign flip per axis).
fn divergence_into(w: &[Vec3], shape: Shape3, inv_h: [f32; 3], scale: f32, out: &mut [f32]) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
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
                    out_row[k] = scale * d;
                    zm = h[2];
                }
            }
        });
}

/// Periodic 7-point Laplacian Σₐ (x[+1] − 2x + x[−1]) / hₐ² (symbol −Σ|Eₐ|²).
fn laplacian_into(x: &[f32], shape: Shape3, inv_h2: [f32; 3], out: &mut [f32]) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let im = if i == 0 { nx - 1 } else { i - 1 };
            let ip = if i + 1 == nx { 0 } else { i + 1 };
            for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                let jm = if j == 0 { ny - 1 } else { j - 1 };
                let jp = if j + 1 == ny { 0 } else { j + 1 };
                let c = &x[shape.idx(i, j, 0)..][..nz];
                let (xm, xp) = (
                    &x[shape.idx(im, j, 0)..][..nz],
                    &x[shape.idx(ip, j, 0)..][..nz],
                );
                let (ym, yp) = (
                    &x[shape.idx(i, jm, 0)..][..nz],
                    &x[shape.idx(i, jp, 0)..][..nz],
                );
                for k in 0..nz {
                    let zm = if k == 0 { c[nz - 1] } else { c[k - 1] };
                    let zp = if k + 1 == nz { c[0] } else { c[k + 1] };
                    let two_c = 2.0 * c[k];
                    out_row[k] = (xm[k] + xp[k] - two_c) * inv_h2[0]
                        + (ym[k] + yp[k] - two_c) * inv_h2[1]
                        + (zm + zp - two_c) * inv_h2[2];
                }
            }
        });
}

/// Minimiser z of W²·ρ(z − f) + μ/2·(z − v)² with ρ(r) = r²/2 (linear) or
/// (1 − cos(s·r))/s² (nonlinear, s = phase per ppm; Newton steps from the linear answer).
#[inline]
fn data_prox(v: f32, f: f32, w2: f32, mu: f32, phase_scale: Option<f32>) -> f32 {
    let mut z = (w2 * f + mu * v) / (w2 + mu);
    if let (Some(s), true) = (phase_scale, w2 > 0.0) {
        for _ in 0..3 {
            let r = s * (z - f);
            let g = w2 * r.sin() / s + mu * (z - v);
            // The curvature W²cos(r) + μ may vanish far from the data; bounding it by μ
            // below keeps each step a damped descent step.
            let h = (w2 * r.cos() + mu).max(mu);
            z -= g / h;
        }
    }
    z
}

/// Weak-harmonic background term of [`weighted_tv_admm`] (FANSI's WH option).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeakHarmonic {
    /// Weight β of ½‖M·Δφ‖² [ppm⁻²·mm⁴ relative to the data term].
    pub beta: f64,
    /// ADMM penalty on the split z₃ = Δφ.
    pub mu: f64,
}

/// Parameters of [`weighted_tv_admm`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedTvParams {
    /// TV weight α (ppm of field per ppm/mm of χ gradient).
    pub alpha: f64,
    /// ADMM penalty μ₁ on z₁ = ∇χ.
    pub mu_gradient: f64,
    /// ADMM penalty μ₂ on z₂ = Dχ + φ.
    pub mu_data: f64,
    /// Maximum iterations.
    pub max_iter: usize,
    /// Stop when ‖χₙ − χₙ₋₁‖ / ‖χₙ‖ < tol.
    pub tol: f64,
    /// Phase per ppm of field [rad/ppm] for the nonlinear (complex exponential) data term;
    /// None = linear data term.
    pub phase_scale: Option<f64>,
    /// Joint estimate of a residual harmonic background φ.
    pub weak_harmonic: Option<WeakHarmonic>,
}

impl WeightedTvParams {
    fn check(&self) -> CoreResult<()> {
        check_positive(&[("mu_gradient", self.mu_gradient), ("mu_data", self.mu_data)])?;
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(CoreError::InvalidArgument(format!(
                "alpha must be >= 0, got {}",
                self.alpha
            )));
        }
        check_iterations(self.max_iter, self.tol)?;
        if let Some(s) = self.phase_scale {
            check_positive(&[("phase_scale", s)])?;
        }
        if let Some(wh) = self.weak_harmonic {
            check_positive(&[("weak-harmonic beta", wh.beta), ("weak-harmonic mu", wh.mu)])?;
        }
        Ok(())
    }
}

/// Weighted (optionally nonlinear, optionally weak-harmonic) TV inversion by ADMM.
///
/// min_χ,φ Σ W²ρ(Dχ + φ − f) + α‖G∘∇χ‖₁ + β/2‖M·Δφ‖² with splits z₁ = ∇χ, z₂ = Dχ + φ,
/// z₃ = Δφ. The (χ, φ) update is a 2×2 solve per frequency; z₁ is a soft threshold with
/// the per-voxel threshold α·G/μ₁, z₂ the voxel-wise data proximal step, z₃ a shrink.
/// Without the weak-harmonic term φ ≡ 0 and each iteration costs two forward and two
/// inverse FFTs (three each with it).
///
/// `data_weight` W (0 outside the mask carries the mask into the data term),
/// `tv_weight` G (None = 1 everywhere). Returns (χ masked, iterations run).
#[allow(clippy::too_many_arguments)]
pub fn weighted_tv_admm(
    local_field: &[f32],
    data_weight: &[f32],
    tv_weight: Option<&[f32]>,
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    params: WeightedTvParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
    check_field_and_mask(local_field, mask, shape)?;
    check_weight(data_weight, shape, "data weight")?;
    if let Some(g) = tv_weight {
        check_weight(g, shape, "TV weight")?;
    }
    params.check()?;
    let kernel = dipole_kernel(shape, voxel_size, b0_dir)?;
    let e2 = gradient_energy(shape, voxel_size);
    let plan = Fft3Plan::get(shape)?;
    let n = shape.len();
    let [_, ny, nz] = shape.0;
    let plane = ny * nz;
    let (mu1, mu2) = (params.mu_gradient as f32, params.mu_data as f32);
    let wh = params.weak_harmonic;
    let (beta, mu3) = wh.map_or((0.0, 0.0), |w| (w.beta as f32, w.mu as f32));
    let phase_scale = params.phase_scale.map(|s| s as f32);
    let inv_h = voxel_size.map(|h| (1.0 / h) as f32);
    let inv_h2 = voxel_size.map(|h| (1.0 / (h * h)) as f32);
    let alpha_over_mu = (params.alpha / params.mu_gradient) as f32;

    // The field and W² inside the mask only (the data term knows nothing outside).
    let field = masked(local_field, mask);
    let w2: Vec<f32> = data_weight
        .par_iter()
        .zip(mask.par_iter())
        .map(|(&w, &m)| if m != 0 { w * w } else { 0.0 })
        .collect();
    let threshold: Vec<f32> = match tv_weight {
        Some(g) => g.par_iter().map(|&g| alpha_over_mu * g).collect(),
        None => vec![alpha_over_mu; n],
    };
    let zero3: Vec3 = [0.0; 3];
    let mut u1: Vec<Vec3> = vec![zero3; n];
    let mut w1: Vec<Vec3> = vec![zero3; n]; // z₁ − u₁
                                            // z₂ starts at the field (a data-consistent start), u₂ at 0; t₂ = z₂ − u₂.
    let mut u2 = vec![0.0f32; n];
    let mut t2 = field.clone();
    let (mut u3, mut t3, mut phi, mut lap_phi) = if wh.is_some() {
        (
            vec![0.0f32; n],
            vec![0.0f32; n],
            vec![0.0f32; n],
            vec![0.0f32; n],
        )
    } else {
        (Vec::new(), Vec::new(), Vec::new(), Vec::new())
    };
    let mut chi = vec![0.0f32; n];
    let mut chi_prev = vec![0.0f32; n];
    let mut model = vec![0.0f32; n]; // Dχ + φ
    let mut work = vec![0.0f32; n];
    let mut spec_chi = plan.make_spectrum();
    let mut spec_model = plan.make_spectrum();
    let mut spec_phi = if wh.is_some() {
        plan.make_spectrum()
    } else {
        Vec::new()
    };
    let mut iterations = 0;

    for iter in 1..=params.max_iter {
        if should_stop(iter) {
            return Err(CoreError::Interrupted);
        }
        iterations = iter;
        divergence_into(&w1, shape, inv_h, mu1, &mut work);
        plan.forward(&work, &mut spec_chi)?;
        plan.forward(&t2, &mut spec_model)?;
        if wh.is_some() {
            plan.forward(&t3, &mut spec_phi)?;
            spec_chi
                .par_iter_mut()
                .zip(spec_model.par_iter_mut())
                .zip(spec_phi.par_iter_mut())
                .zip(kernel.par_iter().zip(e2.par_iter()))
                .with_min_len(MIN_LEN)
                .for_each(|(((c, m), p), (&d, &e))| {
                    // Normal equations of (χ, φ) at this frequency (Δ ↔ −e):
                    // [μ₁e + μ₂d², μ₂d; μ₂d, μ₂ + μ₃e²] [χ̂; φ̂] = [r₁; r₂].
                    let r1 = *c + *m * (mu2 * d);
                    let r2 = *m * mu2 - *p * (mu3 * e);
                    let a = mu1 * e + mu2 * d * d;
                    let b = mu2 * d;
                    let cc = mu2 + mu3 * e * e;
                    let det = a * cc - b * b;
                    let (x, y) = if det > 0.0 {
                        ((r1 * cc - r2 * b) / det, (r2 * a - r1 * b) / det)
                    } else {
                        (Complex32::new(0.0, 0.0), r2 / cc)
                    };
                    *c = x;
                    *m = x * d + y;
                    *p = y;
                });
        } else {
            spec_chi
                .par_iter_mut()
                .zip(spec_model.par_iter_mut())
                .zip(kernel.par_iter().zip(e2.par_iter()))
                .with_min_len(MIN_LEN)
                .for_each(|((c, m), (&d, &e))| {
                    let den = mu1 * e + mu2 * d * d;
                    let x = if den > 0.0 {
                        (*c + *m * (mu2 * d)) / den
                    } else {
                        Complex32::new(0.0, 0.0)
                    };
                    *c = x;
                    *m = x * d;
                });
        }
        std::mem::swap(&mut chi, &mut chi_prev);
        plan.inverse(&mut spec_chi, &mut chi)?;
        plan.inverse(&mut spec_model, &mut model)?;
        if wh.is_some() {
            plan.inverse(&mut spec_phi, &mut phi)?;
            laplacian_into(&phi, shape, inv_h2, &mut lap_phi);
            // z₃ = argmin β/2·M·z² + μ₃/2·(z − v)², v = Δφ + u₃.
            t3.par_iter_mut()
                .zip(u3.par_iter_mut())
                .zip(lap_phi.par_iter().zip(mask.par_iter()))
                .with_min_len(MIN_LEN)
                .for_each(|((t, u), (&l, &m))| {
                    let v = l + *u;
                    let z = mu3 * v / (if m != 0 { beta } else { 0.0 } + mu3);
                    *u = v - z;
                    *t = z - *u;
                });
        }
        // z₂ = data proximal step at v = Dχ + φ + u₂; u₂ ← v − z₂; t₂ = z₂ − u₂.
        t2.par_iter_mut()
            .zip(u2.par_iter_mut())
            .zip(model.par_iter().zip(field.par_iter().zip(w2.par_iter())))
            .with_min_len(MIN_LEN)
            .for_each(|((t, u), (&dm, (&f, &w)))| {
                let v = dm + *u;
                let z = data_prox(v, f, w, mu2, phase_scale);
                *u = v - z;
                *t = z - *u;
            });
        // z₁ = soft(∇χ + u₁, α·G/μ₁): u₁ = clamp(v), w₁ = z₁ − u₁ = v − 2u₁.
        let (change, norm) = {
            let (chi, chi_prev, threshold) = (&chi, &chi_prev, &threshold);
            let [nx, ny, nz] = shape.0;
            u1.par_chunks_mut(plane)
                .zip(w1.par_chunks_mut(plane))
                .enumerate()
                .map(|(i, (u_plane, w_plane))| {
                    let ip = if i + 1 == nx { 0 } else { i + 1 };
                    let (mut change, mut norm) = (0.0f64, 0.0f64);
                    let rows = u_plane
                        .chunks_exact_mut(nz)
                        .zip(w_plane.chunks_exact_mut(nz));
                    for (j, (u_row, w_row)) in rows.enumerate() {
                        let jp = if j + 1 == ny { 0 } else { j + 1 };
                        let base = shape.idx(i, j, 0);
                        let c = &chi[base..][..nz];
                        let cx = &chi[shape.idx(ip, j, 0)..][..nz];
                        let cy = &chi[shape.idx(i, jp, 0)..][..nz];
                        let prev = &chi_prev[base..][..nz];
                        let thr = &threshold[base..][..nz];
                        let (mut row_change, mut row_norm) = (0.0f32, 0.0f32);
                        for k in 0..nz {
                            let ck = c[k];
                            let cz = if k + 1 == nz { c[0] } else { c[k + 1] };
                            let g = [
                                (cx[k] - ck) * inv_h[0],
                                (cy[k] - ck) * inv_h[1],
                                (cz - ck) * inv_h[2],
                            ];
                            let t = thr[k];
                            for a in 0..3 {
                                let v = g[a] + u_row[k][a];
                                let clamped = v.clamp(-t, t);
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
        if norm > 0.0 && (change / norm).sqrt() < params.tol {
            break;
        }
    }
    apply_mask(&mut chi, mask);
    Ok((chi, iterations))
}

/// MEDI's gradient weight G from the magnitude: 0 on edges (the `edge_fraction` of mask
/// voxels with the largest magnitude-gradient norm, periodic forward differences per mm),
/// 1 elsewhere, so TV is not applied across anatomical edges.
pub fn edge_weight(
    magnitude: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    edge_fraction: f64,
) -> CoreResult<Vec<f32>> {
    check_field_and_mask(magnitude, mask, shape)?;
    crate::grid::check_voxel_size(voxel_size)?;
    if !(edge_fraction.is_finite() && (0.0..1.0).contains(&edge_fraction)) {
        return Err(CoreError::InvalidArgument(format!(
            "edge fraction must be in [0, 1), got {edge_fraction}"
        )));
    }
    let mag = masked(magnitude, mask);
    let inv_h = voxel_size.map(|h| (1.0 / h) as f32);
    let [nx, ny, nz] = shape.0;
    let mut grad_norm = vec![0.0f32; shape.len()];
    grad_norm
        .par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let ip = if i + 1 == nx { 0 } else { i + 1 };
            for j in 0..ny {
                let jp = if j + 1 == ny { 0 } else { j + 1 };
                for k in 0..nz {
                    let kp = if k + 1 == nz { 0 } else { k + 1 };
                    let c = mag[shape.idx(i, j, k)];
                    let g0 = (mag[shape.idx(ip, j, k)] - c) * inv_h[0];
                    let g1 = (mag[shape.idx(i, jp, k)] - c) * inv_h[1];
                    let g2 = (mag[shape.idx(i, j, kp)] - c) * inv_h[2];
                    out[j * nz + k] = (g0 * g0 + g1 * g1 + g2 * g2).sqrt();
                }
            }
        });
    let mut inside: Vec<f32> = grad_norm
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m != 0)
        .map(|(&g, _)| g)
        .collect();
    let n_edges = (edge_fraction * inside.len() as f64).round() as usize;
    if n_edges == 0 {
        return Ok(vec![1.0; shape.len()]);
    }
    let cut = inside.len() - n_edges;
    let (_, &mut threshold, _) = inside.select_nth_unstable_by(cut, |a, b| a.total_cmp(b));
    Ok(grad_norm
        .par_iter()
        .zip(mask.par_iter())
        .map(|(&g, &m)| if m != 0 && g >= threshold { 0.0 } else { 1.0 })
        .collect())
}

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
#[allow(clippy::too_many_arguments)]
pub fn rts(
    local_field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    params: RtsParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
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
    let mut kernel = dipole_kernel(shape, voxel_size, b0_dir)?;
    zero_nyquist_planes(&mut kernel, shape);
    let e2 = gradient_energy(shape, voxel_size);
    let plan = Fft3Plan::get(shape)?;
    let (delta, mu, rho) = (params.delta as f32, params.mu as f32, params.rho as f32);
    let ones = vec![1.0f32; shape.len()];
    let lsqr = LsqrParams {
        tol: 0.0,
        max_iter: params.lsqr_iter,
    };
    let (mut data_term, _) = lsqr_dipole_spectrum(
        local_field,
        &ones,
        mask,
        shape,
        voxel_size,
        b0_dir,
        lsqr,
        0,
        should_stop,
    )?;
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
#[allow(clippy::too_many_arguments)]
pub fn ndi(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    params: NdiParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
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
    let dipole = DipoleSymbol::new(shape, voxel_size, b0_dir)?;
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
fn ndi_residual_line(line: &mut [f32], field: &[f32], weight: &[f32], mask: &[u8], s: f32) {
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
fn scaled_sine_inside(
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
const SIN_F32_MAX_ARG: f32 = 8192.0;

/// sin(x) in f32 without a libm call, so that loops over it vectorise. Reduction
/// x = kπ + r with |r| ≤ π/2 (π split into three parts, Cody & Waite), then an odd
/// degree-11 polynomial fitted to sin on [0, π/2] (model error 2e-11) and the sign of
/// (−1)ᵏ. Max error against the exact sine: 1.4e-7 for |x| ≤ [`SIN_F32_MAX_ARG`]
/// (`f32::sin`: 7e-8), measured in the unit test.
#[inline(always)]
fn sin_f32(x: f32) -> f32 {
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
    use crate::dipole::forward_field;
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
        let kernel = dipole_kernel(shape, voxel_size, b0_dir).unwrap();
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
            let field = forward_field(&chi, shape, vs, b0).unwrap();
            let params = NdiParams {
                phase_scale: 12.0,
                lambda: 1e-3,
                step: 1.5,
                max_iter: 30,
                tol,
            };
            let (want, want_it) = ndi_unfused(&field, &weight, &mask, shape, vs, b0, params);
            let (got, got_it) =
                ndi(&field, &weight, &mask, shape, vs, b0, params, &|_| false).unwrap();
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

/// LSQR's plane rotation (Paige & Saunders 1982): the scalar recurrences shared by the
/// k-space and the image-space LSQR loops.
struct LsqrRotation {
    /// φ̄, the norm of the current residual.
    phi_bar: f64,
    rho_bar: f64,
}

/// What one rotation gives the vector updates: x += step·w, v ← v·inv_alpha,
/// w ← v − back·w; `c` (cosine) for the ‖Aᵀr‖ estimate φ̄·α·|c|.
struct LsqrStep {
    step: f32,
    back: f32,
    inv_alpha: f32,
    c: f64,
}

impl LsqrRotation {
    fn next(&mut self, alpha: f64, beta: f64) -> LsqrStep {
        let rho = (self.rho_bar * self.rho_bar + beta * beta).sqrt();
        let (c, s) = (self.rho_bar / rho, beta / rho);
        let theta = s * alpha;
        self.rho_bar = -c * alpha;
        let phi = c * self.phi_bar;
        self.phi_bar *= s;
        LsqrStep {
            step: (phi / rho) as f32,
            back: (theta / rho) as f32,
            inv_alpha: if alpha > 0.0 {
                (1.0 / alpha) as f32
            } else {
                0.0
            },
            c,
        }
    }
}

/// Zero a half-spectrum kernel on the Nyquist planes of even axes. With an oblique B0 the
/// dipole kernel is not symmetric there (D(−N/2, k_y) ≠ D(N/2, −k_y) through k_x·k_y), so
/// D·F{x} would not be the spectrum of a real volume; LSQR keeps its vectors in k-space
/// and needs that to hold for its norms to match the image-space ones.
fn zero_nyquist_planes(kernel: &mut [f32], shape: Shape3) {
    let [nx, ny, nz] = shape.0;
    let [_, hy, hz] = shape.half_spectrum().0;
    kernel
        .par_chunks_mut(hy * hz)
        .enumerate()
        .for_each(|(i, plane)| {
            for (j, row) in plane.chunks_exact_mut(hz).enumerate() {
                let x_nyq = nx % 2 == 0 && i == nx / 2;
                let y_nyq = ny % 2 == 0 && j == ny / 2;
                for (k, d) in row.iter_mut().enumerate() {
                    if x_nyq || y_nyq || (nz % 2 == 0 && k == nz / 2) {
                        *d = 0.0;
                    }
                }
            }
        });
}

/// Parameters of [`ilsqr`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LsqrParams {
    /// Stop when ‖r‖/‖b‖ < tol or ‖Aᵀr‖/(‖A‖·‖r‖) < tol.
    pub tol: f64,
    /// Maximum LSQR iterations (early stopping is the regularisation).
    pub max_iter: usize,
}

/// LSQR (Paige & Saunders 1982) on W·F⁻¹DF·χ = W·f, the core of iLSQR (Li et al. 2015)
/// (step 1 of [`ilsqr_streaking`]).
///
/// The right-hand vectors (v, w, x) live in k-space (half spectrum; norms by Parseval),
/// so Av costs one inverse FFT and Aᵀu one forward FFT. W = `weight` inside the mask.
#[allow(clippy::too_many_arguments)]
pub fn ilsqr(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    params: LsqrParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
    check_field_and_mask(local_field, mask, shape)?;
    check_weight(weight, shape, "weight")?;
    check_iterations(params.max_iter, params.tol)?;
    let plan = Fft3Plan::get(shape)?;
    let (mut x_hat, iterations) = lsqr_dipole_spectrum(
        local_field,
        weight,
        mask,
        shape,
        voxel_size,
        b0_dir,
        params,
        0,
        should_stop,
    )?;
    let mut chi = vec![0.0f32; shape.len()];
    plan.inverse(&mut x_hat, &mut chi)?;
    apply_mask(&mut chi, mask);
    Ok((chi, iterations))
}

/// The LSQR iteration of [`ilsqr`]; returns the spectrum of the (unmasked) solution and
/// the iterations run. `should_stop` sees `first_iteration + iteration`.
#[allow(clippy::too_many_arguments)]
fn lsqr_dipole_spectrum(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    params: LsqrParams,
    first_iteration: usize,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<Complex32>, usize)> {
    let mut kernel = dipole_kernel(shape, voxel_size, b0_dir)?;
    zero_nyquist_planes(&mut kernel, shape);
    let plan = Fft3Plan::get(shape)?;
    let n = shape.len();
    let n_f = n as f64;
    let nz = shape.0[2];
    let nh = nz / 2 + 1;
    let w: Vec<f32> = weight
        .par_iter()
        .zip(mask.par_iter())
        .map(|(&w, &m)| if m != 0 { w } else { 0.0 })
        .collect();
    // Image-space vectors (u, W·u) and k-space vectors (v, w, x: half spectra whose
    // squared norms count the mirror bins twice and carry a factor N by Parseval).
    let mirror = |k: usize| -> f32 {
        if k == 0 || (nz % 2 == 0 && k == nh - 1) {
            1.0
        } else {
            2.0
        }
    };
    let mut u: Vec<f32> = local_field
        .par_iter()
        .zip(w.par_iter())
        .map(|(&f, &w)| f * w)
        .collect();
    let beta0 = u
        .par_iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    let mut x_hat = plan.make_spectrum();
    let mut weighted_u = vec![0.0f32; n];
    let mut v = plan.make_spectrum();
    // u ← u/β and W·u in one pass, then v = D·F{W·u} (Aᵀu) without the scaling by 1/α.
    let normalise_u = |u: &mut [f32], wu: &mut [f32], beta: f64| {
        let inv = if beta > 0.0 { (1.0 / beta) as f32 } else { 0.0 };
        u.par_iter_mut()
            .zip(wu.par_iter_mut().zip(w.par_iter()))
            .with_min_len(MIN_LEN)
            .for_each(|(u, (wu, &w))| {
                *u *= inv;
                *wu = *u * w;
            });
    };
    let mut alpha = 0.0f64;
    if beta0 > 0.0 {
        normalise_u(&mut u, &mut weighted_u, beta0);
        plan.forward(&weighted_u, &mut v)?;
        alpha = v
            .par_chunks_mut(nh)
            .zip(kernel.par_chunks(nh))
            .map(|(row, d_row)| {
                let mut e = 0.0f32;
                for (k, (c, &d)) in row.iter_mut().zip(d_row).enumerate() {
                    *c *= d;
                    e += mirror(k) * c.norm_sqr();
                }
                e as f64
            })
            .sum::<f64>()
            / n_f;
        alpha = alpha.sqrt();
    }
    if beta0 == 0.0 || alpha == 0.0 {
        return Ok((x_hat, 0));
    }
    // v ← v/α, w_dir = v and spec = D·v for the first A·v.
    let mut w_dir = plan.make_spectrum();
    let mut spec = plan.make_spectrum();
    {
        let inv = (1.0 / alpha) as f32;
        v.par_chunks_mut(nh)
            .zip(w_dir.par_chunks_mut(nh).zip(spec.par_chunks_mut(nh)))
            .zip(kernel.par_chunks(nh))
            .for_each(|((v_row, (w_row, s_row)), d_row)| {
                for k in 0..v_row.len() {
                    v_row[k] *= inv;
                    w_row[k] = v_row[k];
                    s_row[k] = v_row[k] * d_row[k];
                }
            });
    }
    let mut av = vec![0.0f32; n];
    let mut rotation = LsqrRotation {
        phi_bar: beta0,
        rho_bar: alpha,
    };
    let mut a_norm_sq = 0.0f64;
    let mut iterations = 0;
    for iter in 1..=params.max_iter {
        if should_stop(first_iteration + iter) {
            return Err(CoreError::Interrupted);
        }
        iterations = iter;
        // β u = A v − α u  (A v = W·F⁻¹{D v}; spec holds D v).
        plan.inverse(&mut spec, &mut av)?;
        let a32 = alpha as f32;
        let beta = u
            .par_chunks_mut(MIN_LEN)
            .zip(av.par_chunks(MIN_LEN).zip(w.par_chunks(MIN_LEN)))
            .map(|(u, (a, w))| {
                let mut e = 0.0f32;
                for k in 0..u.len() {
                    let val = w[k] * a[k] - a32 * u[k];
                    u[k] = val;
                    e += val * val;
                }
                e as f64
            })
            .sum::<f64>()
            .sqrt();
        normalise_u(&mut u, &mut weighted_u, beta);
        a_norm_sq += alpha * alpha + beta * beta;
        // α v = Aᵀu − β v  (Aᵀu = D·F{W u}).
        plan.forward(&weighted_u, &mut spec)?;
        let b32 = beta as f32;
        alpha = (v
            .par_chunks_mut(nh)
            .zip(spec.par_chunks(nh))
            .zip(kernel.par_chunks(nh))
            .map(|((v_row, g_row), d_row)| {
                let mut e = 0.0f32;
                for k in 0..v_row.len() {
                    let val = g_row[k] * d_row[k] - v_row[k] * b32;
                    v_row[k] = val;
                    e += mirror(k) * val.norm_sqr();
                }
                e as f64
            })
            .sum::<f64>()
            / n_f)
            .sqrt();
        // Plane rotation, then v ← v/α, x and w updates and spec = D·v in one pass.
        let LsqrStep {
            step,
            back,
            inv_alpha,
            c,
        } = rotation.next(alpha, beta);
        let phi_bar = rotation.phi_bar;
        x_hat
            .par_chunks_mut(nh)
            .zip(w_dir.par_chunks_mut(nh))
            .zip(v.par_chunks_mut(nh).zip(spec.par_chunks_mut(nh)))
            .zip(kernel.par_chunks(nh))
            .for_each(|(((x_row, w_row), (v_row, s_row)), d_row)| {
                for k in 0..x_row.len() {
                    x_row[k] += w_row[k] * step;
                    let vk = v_row[k] * inv_alpha;
                    v_row[k] = vk;
                    w_row[k] = vk - w_row[k] * back;
                    s_row[k] = vk * d_row[k];
                }
            });
        let residual = phi_bar; // ‖r‖
        let normal_residual = phi_bar * alpha * c.abs(); // ‖Aᵀr‖
        let a_norm = a_norm_sq.sqrt();
        if residual / beta0 < params.tol
            || (a_norm > 0.0
                && residual > 0.0
                && normal_residual / (a_norm * residual) < params.tol)
            || alpha == 0.0
        {
            break;
        }
    }
    Ok((x_hat, iterations))
}

/// Parameters of [`ilsqr_streaking`] (steps 2–4 of iLSQR; step 1 is [`LsqrParams`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreakingParams {
    /// |D| below which k-space is ill-conditioned (M_ic; Li et al. 2015: 0.1).
    pub ill_threshold: f64,
    /// Stopping tolerance of the streaking LSQR (as [`LsqrParams::tol`]).
    pub tol: f64,
    /// Maximum streaking LSQR iterations.
    pub max_iter: usize,
}

impl Default for StreakingParams {
    /// Li et al. 2015: M_ic = |D| < 0.1, LSQR to 10⁻² within 50 iterations.
    fn default() -> Self {
        StreakingParams {
            ill_threshold: 0.1,
            tol: 1e-2,
            max_iter: 50,
        }
    }
}

/// Fixed constants of the fast-QSM estimate (Li et al. 2015, eqs. 8–14) and of the
/// gradient weights (eq. 15).
pub mod ilsqr_constants {
    /// Exponent n of the k-space weight |D|ⁿ (eq. 10).
    pub const FAST_WEIGHT_EXPONENT: f64 = 0.001;
    /// Percentiles of |D|ⁿ over k-space mapped to weight 0 and 1 (eq. 10).
    pub const FAST_WEIGHT_PERCENTILES: [f64; 2] = [1.0, 30.0];
    /// Radius of the spherical mean filter of eqs. 9 and 11 [mm].
    pub const FAST_SMV_RADIUS_MM: f64 = 3.0;
    /// TKD threshold of the reference the fast estimate is scaled to (eq. 12).
    pub const FAST_TKD_THRESHOLD: f64 = 0.125;
    /// Percentiles of |∂ₐχ_fs| in the mask mapped to weight 1 and 0 (eq. 15).
    pub const GRADIENT_WEIGHT_PERCENTILES: [f64; 2] = [50.0, 70.0];
}

/// Iterations run by [`ilsqr_streaking`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IlsqrIterations {
    /// LSQR iterations of step 1.
    pub lsqr: usize,
    /// LSQR iterations of the streaking estimate (step 3).
    pub streaking: usize,
}

/// Linear-interpolation percentile (NumPy's default) of `values` (reordered in place).
fn percentile(values: &mut [f64], p: f64) -> f64 {
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let pos = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let (_, &mut v_lo, upper) = values.select_nth_unstable_by(lo, |a, b| a.total_cmp(b));
    if frac == 0.0 || upper.is_empty() {
        return v_lo;
    }
    let v_hi = upper.iter().copied().fold(f64::INFINITY, f64::min);
    v_lo + frac * (v_hi - v_lo)
}

/// Weight 1 below `lo`, 0 above `hi`, linear in between (eqs. 10 and 15 of Li et al.).
#[inline]
fn ramp_down(v: f64, lo: f64, hi: f64) -> f32 {
    if v < lo {
        1.0
    } else if v > hi {
        0.0
    } else if hi > lo {
        ((hi - v) / (hi - lo)) as f32
    } else {
        1.0
    }
}

/// Periodic forward differences per mm of `x` into `out` (one 3-vector per voxel).
fn gradient_into(x: &[f32], shape: Shape3, inv_h: [f32; 3], out: &mut [Vec3]) {
    scaled_gradient_into(x, shape, inv_h, out, |_| [1.0; 3]);
}

/// `out = g∘∇x` (periodic forward differences per mm, weighted per axis by `g`).
fn weighted_gradient_into(x: &[f32], g: &[Vec3], shape: Shape3, inv_h: [f32; 3], out: &mut [Vec3]) {
    scaled_gradient_into(x, shape, inv_h, out, |v| g[v]);
}

/// Forward differences per mm, each axis scaled by `scale(voxel)`; generic so that the
/// unweighted case compiles to plain differences (the multiplications by 1 fold away).
fn scaled_gradient_into<S: Fn(usize) -> Vec3 + Sync>(
    x: &[f32],
    shape: Shape3,
    inv_h: [f32; 3],
    out: &mut [Vec3],
    scale: S,
) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let ip = if i + 1 == nx { 0 } else { i + 1 };
            for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                let jp = if j + 1 == ny { 0 } else { j + 1 };
                let row = shape.idx(i, j, 0);
                let c = &x[row..][..nz];
                let xp = &x[shape.idx(ip, j, 0)..][..nz];
                let yp = &x[shape.idx(i, jp, 0)..][..nz];
                for k in 0..nz {
                    let zp = if k + 1 == nz { c[0] } else { c[k + 1] };
                    let w = scale(row + k);
                    out_row[k] = [
                        (xp[k] - c[k]) * inv_h[0] * w[0],
                        (yp[k] - c[k]) * inv_h[1] * w[1],
                        (zp - c[k]) * inv_h[2] * w[2],
                    ];
                }
            }
        });
}

/// `out = ∇ᵀ(g∘y)`, the adjoint of [`weighted_gradient_into`].
fn weighted_divergence_into(
    y: &[Vec3],
    g: &[Vec3],
    shape: Shape3,
    inv_h: [f32; 3],
    out: &mut [f32],
) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let im = if i == 0 { nx - 1 } else { i - 1 };
            for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                let jm = if j == 0 { ny - 1 } else { j - 1 };
                let here = shape.idx(i, j, 0);
                let (xm, ym) = (shape.idx(im, j, 0), shape.idx(i, jm, 0));
                let (yh, gh) = (&y[here..][..nz], &g[here..][..nz]);
                let (yx, gx) = (&y[xm..][..nz], &g[xm..][..nz]);
                let (yy, gy) = (&y[ym..][..nz], &g[ym..][..nz]);
                let mut zm = yh[nz - 1][2] * gh[nz - 1][2];
                for k in 0..nz {
                    let hz = yh[k][2] * gh[k][2];
                    out_row[k] = (yx[k][0] * gx[k][0] - yh[k][0] * gh[k][0]) * inv_h[0]
                        + (yy[k][1] * gy[k][1] - yh[k][1] * gh[k][1]) * inv_h[1]
                        + (zm - hz) * inv_h[2];
                    zm = hz;
                }
            }
        });
}

/// Fast QSM estimate of iLSQR (Li et al. 2015, eqs. 8–14): χ̂ = sgn(D)·F{f·M}; in
/// k-space regions of small |D| (weight w from |D|ⁿ, eq. 10) the estimate is replaced by
/// its spherical mean (radius 3 mm) twice, with the mask applied in between (eqs. 9, 11);
/// the result is scaled to TKD (threshold 1/8) by a least-squares line a·χ + b over the
/// mask (eqs. 12–14). Returns χ_fs, 0 outside the mask.
pub fn ilsqr_fast_estimate(
    local_field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
) -> CoreResult<Vec<f32>> {
    use ilsqr_constants::*;
    check_field_and_mask(local_field, mask, shape)?;
    let kernel = dipole_kernel(shape, voxel_size, b0_dir)?;
    let plan = Fft3Plan::get(shape)?;
    let n = shape.len();
    // k-space weight of the sign estimate (eq. 10), percentiles over the half spectrum.
    let powered: Vec<f64> = kernel
        .par_iter()
        .map(|&d| (d.abs() as f64).powf(FAST_WEIGHT_EXPONENT))
        .collect();
    let mut scratch = powered.clone();
    let lo = percentile(&mut scratch, FAST_WEIGHT_PERCENTILES[0]);
    let hi = percentile(&mut scratch, FAST_WEIGHT_PERCENTILES[1]);
    drop(scratch);
    let fast_weight: Vec<f32> = powered
        .par_iter()
        .map(|&v| 1.0 - ramp_down(v, lo, hi))
        .collect();
    drop(powered);
    // Normalised spherical mean filter (real spectrum: the sphere is symmetric).
    let (sphere, count) = crate::bfr::sphere_indicator(shape, voxel_size, FAST_SMV_RADIUS_MM);
    let mut smv_hat = plan.make_spectrum();
    plan.forward(&sphere, &mut smv_hat)?;
    let smv: Vec<f32> = smv_hat.par_iter().map(|c| c.re / count as f32).collect();
    drop(smv_hat);
    let blend = |spec: &mut [Complex32]| {
        spec.par_iter_mut()
            .zip(fast_weight.par_iter().zip(smv.par_iter()))
            .with_min_len(MIN_LEN)
            .for_each(|(c, (&w, &h))| *c *= w + (1.0 - w) * h);
    };
    let field_hat = {
        let mut spec = plan.make_spectrum();
        plan.forward(&masked(local_field, mask), &mut spec)?;
        spec
    };
    let mut spec: Vec<Complex32> = field_hat
        .par_iter()
        .zip(kernel.par_iter())
        .map(|(&f, &d)| {
            if d > 0.0 {
                f
            } else if d < 0.0 {
                -f
            } else {
                Complex32::new(0.0, 0.0)
            }
        })
        .collect();
    let mut fast = vec![0.0f32; n];
    blend(&mut spec);
    plan.inverse(&mut spec, &mut fast)?;
    apply_mask(&mut fast, mask);
    plan.forward(&fast, &mut spec)?;
    blend(&mut spec);
    plan.inverse(&mut spec, &mut fast)?;
    apply_mask(&mut fast, mask);
    // TKD reference (eq. 12) and the line a·χ_fs + b fitted to it in the mask (eq. 13).
    let inverse = crate::inversion::truncated_inverse(&kernel, FAST_TKD_THRESHOLD as f32);
    let mut tkd_spec: Vec<Complex32> = field_hat
        .par_iter()
        .zip(inverse.par_iter())
        .map(|(&f, &q)| f * q)
        .collect();
    let mut tkd = vec![0.0f32; n];
    plan.inverse(&mut tkd_spec, &mut tkd)?;
    let sums = fast
        .par_iter()
        .zip(tkd.par_iter().zip(mask.par_iter()))
        .filter(|(_, (_, &m))| m != 0)
        .map(|(&x, (&y, _))| {
            let (x, y) = (x as f64, y as f64);
            [1.0, x, y, x * x, x * y]
        })
        .reduce(
            || [0.0; 5],
            |a, b| {
                [
                    a[0] + b[0],
                    a[1] + b[1],
                    a[2] + b[2],
                    a[3] + b[3],
                    a[4] + b[4],
                ]
            },
        );
    let [count, sx, sy, sxx, sxy] = sums;
    let det = count * sxx - sx * sx;
    let (slope, intercept) = if det > 0.0 {
        ((count * sxy - sx * sy) / det, (sxx * sy - sx * sxy) / det)
    } else {
        (0.0, if count > 0.0 { sy / count } else { 0.0 })
    };
    fast.par_iter_mut()
        .zip(mask.par_iter())
        .for_each(|(v, &m)| {
            *v = if m != 0 {
                (slope * *v as f64 + intercept) as f32
            } else {
                0.0
            }
        });
    Ok(fast)
}

/// A linear map volume → one 3-vector per voxel, written into the second argument.
type VolumeToVectors<'a> = &'a (dyn Fn(&[f32], &mut [Vec3]) -> CoreResult<()> + Sync);
/// A linear map one 3-vector per voxel → volume, written into the second argument.
type VectorsToVolume<'a> = &'a (dyn Fn(&[Vec3], &mut [f32]) -> CoreResult<()> + Sync);

/// Image-space LSQR (Paige & Saunders 1982) for min ‖A x − b‖ with A: volume → one
/// 3-vector per voxel, given as `a_op(x, out)` and `a_adj(y, out)` (Aᵀ). Same stopping
/// rule as [`ilsqr`]; `should_stop` sees `first_iteration + iteration`.
#[allow(clippy::too_many_arguments)]
fn lsqr_to_vectors(
    b: &[Vec3],
    n: usize,
    a_op: VolumeToVectors<'_>,
    a_adj: VectorsToVolume<'_>,
    tol: f64,
    max_iter: usize,
    first_iteration: usize,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
    let norm3 = |v: &[Vec3]| -> f64 {
        v.par_iter()
            .with_min_len(MIN_LEN)
            .map(|a| a.iter().map(|&c| (c as f64) * (c as f64)).sum::<f64>())
            .sum::<f64>()
            .sqrt()
    };
    let norm1 = |v: &[f32]| -> f64 {
        v.par_iter()
            .with_min_len(MIN_LEN)
            .map(|&c| (c as f64) * (c as f64))
            .sum::<f64>()
            .sqrt()
    };
    let scale3 = |v: &mut [Vec3], s: f64| {
        let s = s as f32;
        v.par_iter_mut()
            .with_min_len(MIN_LEN)
            .for_each(|a| a.iter_mut().for_each(|c| *c *= s));
    };
    let mut x = vec![0.0f32; n];
    let mut u: Vec<Vec3> = b.to_vec();
    let beta0 = norm3(&u);
    if beta0 == 0.0 {
        return Ok((x, 0));
    }
    scale3(&mut u, 1.0 / beta0);
    let mut v = vec![0.0f32; n];
    a_adj(&u, &mut v)?;
    let mut alpha = norm1(&v);
    if alpha == 0.0 {
        return Ok((x, 0));
    }
    {
        let inv = (1.0 / alpha) as f32;
        v.par_iter_mut().for_each(|c| *c *= inv);
    }
    let mut w_dir = v.clone();
    let mut av: Vec<Vec3> = vec![[0.0; 3]; n];
    let mut atu = vec![0.0f32; n];
    let mut rotation = LsqrRotation {
        phi_bar: beta0,
        rho_bar: alpha,
    };
    let mut a_norm_sq = 0.0f64;
    let mut iterations = 0;
    for iter in 1..=max_iter {
        if should_stop(first_iteration + iter) {
            return Err(CoreError::Interrupted);
        }
        iterations = iter;
        // β u = A v − α u.
        a_op(&v, &mut av)?;
        let a32 = alpha as f32;
        let beta = u
            .par_iter_mut()
            .zip(av.par_iter())
            .with_min_len(MIN_LEN)
            .map(|(u, a)| {
                let mut e = 0.0f64;
                for c in 0..3 {
                    u[c] = a[c] - a32 * u[c];
                    e += (u[c] as f64) * (u[c] as f64);
                }
                e
            })
            .sum::<f64>()
            .sqrt();
        if beta > 0.0 {
            scale3(&mut u, 1.0 / beta);
        }
        a_norm_sq += alpha * alpha + beta * beta;
        // α v = Aᵀu − β v.
        a_adj(&u, &mut atu)?;
        let b32 = beta as f32;
        alpha = v
            .par_iter_mut()
            .zip(atu.par_iter())
            .with_min_len(MIN_LEN)
            .map(|(v, &g)| {
                *v = g - b32 * *v;
                (*v as f64) * (*v as f64)
            })
            .sum::<f64>()
            .sqrt();
        let LsqrStep {
            step,
            back,
            inv_alpha,
            c,
        } = rotation.next(alpha, beta);
        let phi_bar = rotation.phi_bar;
        x.par_iter_mut()
            .zip(w_dir.par_iter_mut().zip(v.par_iter_mut()))
            .with_min_len(MIN_LEN)
            .for_each(|(x, (w, v))| {
                *x += *w * step;
                *v *= inv_alpha;
                *w = *v - *w * back;
            });
        let a_norm = a_norm_sq.sqrt();
        if phi_bar / beta0 < tol
            || (a_norm > 0.0 && phi_bar > 0.0 && alpha * c.abs() / a_norm < tol)
            || alpha == 0.0
        {
            break;
        }
    }
    Ok((x, iterations))
}

/// iLSQR (Li et al. 2015) in full: step 1 LSQR on the weighted dipole model
/// ([`ilsqr`], `lsqr`), step 2 the fast QSM estimate χ_fs ([`ilsqr_fast_estimate`]),
/// step 3 the streaking artefact χ_sa = argmin ‖W_G∘∇F⁻¹M_icF·x − W_G∘∇χ_LSQR‖² by LSQR
/// (M_ic: |D| < `ill_threshold`; W_G per axis from |∂ₐχ_fs|, eq. 15), step 4
/// χ = M·(χ_LSQR − χ_sa).
///
/// x starts at 0 and every LSQR direction is Aᵀ(…) = F⁻¹M_icF(…), so the iterates stay
/// in the range of F⁻¹M_icF and A·v is evaluated as W_G∘∇v (no FFT); Aᵀ costs one FFT
/// pair. `should_stop` sees 1..=lsqr.max_iter, then lsqr.max_iter + streaking iteration.
#[allow(clippy::too_many_arguments)]
pub fn ilsqr_streaking(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    lsqr: LsqrParams,
    streaking: StreakingParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, IlsqrIterations)> {
    use ilsqr_constants::GRADIENT_WEIGHT_PERCENTILES;
    check_field_and_mask(local_field, mask, shape)?;
    check_weight(weight, shape, "weight")?;
    check_iterations(lsqr.max_iter, lsqr.tol)?;
    check_iterations(streaking.max_iter, streaking.tol)?;
    check_positive(&[("iLSQR ill_threshold", streaking.ill_threshold)])?;
    let (chi_lsqr, lsqr_iterations) = ilsqr(
        local_field,
        weight,
        mask,
        shape,
        voxel_size,
        b0_dir,
        lsqr,
        should_stop,
    )?;
    let fast = ilsqr_fast_estimate(local_field, mask, shape, voxel_size, b0_dir)?;
    let n = shape.len();
    let inv_h = voxel_size.map(|h| (1.0 / h) as f32);
    // Gradient weights W_G (eq. 15) per axis from |∂ₐχ_fs| in the mask.
    let mut grad: Vec<Vec3> = vec![[0.0; 3]; n];
    gradient_into(&fast, shape, inv_h, &mut grad);
    drop(fast);
    let mut g_weight: Vec<Vec3> = vec![[0.0; 3]; n];
    for axis in 0..3 {
        let mut inside: Vec<f64> = grad
            .par_iter()
            .zip(mask.par_iter())
            .filter(|(_, &m)| m != 0)
            .map(|(g, _)| g[axis].abs() as f64)
            .collect();
        let lo = percentile(&mut inside, GRADIENT_WEIGHT_PERCENTILES[0]);
        let hi = percentile(&mut inside, GRADIENT_WEIGHT_PERCENTILES[1]);
        g_weight
            .par_iter_mut()
            .zip(grad.par_iter().zip(mask.par_iter()))
            .for_each(|(w, (g, &m))| {
                w[axis] = if m != 0 {
                    ramp_down(g[axis].abs() as f64, lo, hi)
                } else {
                    0.0
                };
            });
    }
    // b = W_G∘∇χ_LSQR.
    gradient_into(&chi_lsqr, shape, inv_h, &mut grad);
    grad.par_iter_mut()
        .zip(g_weight.par_iter())
        .for_each(|(g, w)| {
            for c in 0..3 {
                g[c] *= w[c];
            }
        });
    let rhs = grad;
    let mut kernel = dipole_kernel(shape, voxel_size, b0_dir)?;
    zero_nyquist_planes(&mut kernel, shape);
    let ill_threshold = streaking.ill_threshold as f32;
    let ill: Vec<f32> = kernel
        .par_iter()
        .map(|&d| if d.abs() < ill_threshold { 1.0 } else { 0.0 })
        .collect();
    drop(kernel);
    let plan = Fft3Plan::get(shape)?;
    let a_op = |v: &[f32], out: &mut [Vec3]| -> CoreResult<()> {
        weighted_gradient_into(v, &g_weight, shape, inv_h, out);
        Ok(())
    };
    // One spectrum buffer reused by every Aᵀ (the solver calls it from one thread).
    let spectrum = std::sync::Mutex::new(plan.make_spectrum());
    let a_adj = |y: &[Vec3], out: &mut [f32]| -> CoreResult<()> {
        weighted_divergence_into(y, &g_weight, shape, inv_h, out);
        let mut spec = spectrum
            .lock()
            .map_err(|_| CoreError::InvalidArgument("iLSQR workspace poisoned".into()))?;
        plan.forward(out, &mut spec)?;
        spec.par_iter_mut()
            .zip(ill.par_iter())
            .with_min_len(MIN_LEN)
            .for_each(|(c, &m)| *c *= m);
        plan.inverse(&mut spec, out)
    };
    let (artefact, streak_iterations) = lsqr_to_vectors(
        &rhs,
        n,
        &a_op,
        &a_adj,
        streaking.tol,
        streaking.max_iter,
        lsqr.max_iter,
        should_stop,
    )?;
    let mut chi = chi_lsqr;
    chi.par_iter_mut()
        .zip(artefact.par_iter().zip(mask.par_iter()))
        .for_each(|(c, (&a, &m))| *c = if m != 0 { *c - a } else { 0.0 });
    Ok((
        chi,
        IlsqrIterations {
            lsqr: lsqr_iterations,
            streaking: streak_iterations,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dipole::forward_field;
    use crate::test_support::masked_nrmse_pct as nrmse;

    fn blob_phantom(n: usize) -> (Vec<f32>, Vec<u8>, Shape3) {
        let shape = Shape3([n, n, n]);
        let c = (n as f64 - 1.0) / 2.0;
        let mut chi = vec![0.0f32; shape.len()];
        let mut mask = vec![0u8; shape.len()];
        for i in 0..n {
            for j in 0..n {
                for k in 0..n {
                    let r2 = (i as f64 - c).powi(2)
                        + (j as f64 - 0.9 * c).powi(2)
                        + (k as f64 - c).powi(2);
                    if r2 < (0.4 * n as f64).powi(2) {
                        mask[shape.idx(i, j, k)] = 1;
                        let rb = (i as f64 - 0.8 * c).powi(2)
                            + (j as f64 - c).powi(2)
                            + (k as f64 - c).powi(2);
                        chi[shape.idx(i, j, k)] = if rb < 9.0 { 0.1 } else { -0.01 };
                    }
                }
            }
        }
        (chi, mask, shape)
    }

    type Setup = (Vec<f32>, Vec<f32>, Vec<u8>, Shape3, [f64; 3], [f64; 3]);

    fn setup(n: usize) -> Setup {
        let (chi, mask, shape) = blob_phantom(n);
        let vs = [1.0, 1.0, 1.3];
        let b0 = [0.1, 0.2, 1.0];
        let field = forward_field(&chi, shape, vs, b0).unwrap();
        (chi, field, mask, shape, vs, b0)
    }

    #[test]
    fn every_iterative_solver_recovers_the_blob_and_stops_on_request() {
        let (chi, field, mask, shape, vs, b0) = setup(24);
        let ones = vec![1.0f32; shape.len()];
        let never = |_: usize| false;
        let tv = WeightedTvParams {
            alpha: 1e-4,
            mu_gradient: 1e-2,
            mu_data: 1.0,
            max_iter: 60,
            tol: 0.0,
            phase_scale: None,
            weak_harmonic: None,
        };
        let results = [
            (
                "tv",
                weighted_tv_admm(&field, &ones, None, &mask, shape, vs, b0, tv, &never),
            ),
            (
                "tv-wh",
                weighted_tv_admm(
                    &field,
                    &ones,
                    None,
                    &mask,
                    shape,
                    vs,
                    b0,
                    WeightedTvParams {
                        weak_harmonic: Some(WeakHarmonic { beta: 1.0, mu: 1.0 }),
                        ..tv
                    },
                    &never,
                ),
            ),
            (
                "tv-nonlinear",
                weighted_tv_admm(
                    &field,
                    &ones,
                    None,
                    &mask,
                    shape,
                    vs,
                    b0,
                    WeightedTvParams {
                        phase_scale: Some(10.0),
                        ..tv
                    },
                    &never,
                ),
            ),
            (
                "rts",
                rts(&field, &mask, shape, vs, b0, RtsParams::default(), &never),
            ),
            (
                "ndi",
                ndi(
                    &field,
                    &ones,
                    &mask,
                    shape,
                    vs,
                    b0,
                    NdiParams {
                        phase_scale: 10.0,
                        lambda: 1e-4,
                        step: 2.0,
                        max_iter: 100,
                        tol: 0.0,
                    },
                    &never,
                ),
            ),
            (
                "lsqr",
                ilsqr(
                    &field,
                    &ones,
                    &mask,
                    shape,
                    vs,
                    b0,
                    LsqrParams {
                        tol: 1e-3,
                        max_iter: 50,
                    },
                    &never,
                ),
            ),
        ];
        for (name, r) in results {
            let (est, it) = r.unwrap();
            assert!(it > 0);
            let e = nrmse(&est, &chi, &mask);
            assert!(e < 60.0, "{name}: NRMSE {e:.1} %");
            assert!(est.iter().zip(&mask).all(|(v, &m)| m != 0 || *v == 0.0));
        }
        let stop = |it: usize| it >= 2;
        assert_eq!(
            rts(&field, &mask, shape, vs, b0, RtsParams::default(), &stop),
            Err(CoreError::Interrupted)
        );
        let p = LsqrParams {
            tol: 0.0,
            max_iter: 10,
        };
        assert_eq!(
            ilsqr(&field, &ones, &mask, shape, vs, b0, p, &stop),
            Err(CoreError::Interrupted)
        );
    }

    #[test]
    fn ilsqr_streaking_improves_on_its_lsqr_core_and_stops_on_request() {
        let (chi, field, mask, shape, vs, b0) = setup(24);
        let ones = vec![1.0f32; shape.len()];
        let never = |_: usize| false;
        let lsqr = LsqrParams {
            tol: 1e-2,
            max_iter: 50,
        };
        let (core, _) = ilsqr(&field, &ones, &mask, shape, vs, b0, lsqr, &never).unwrap();
        let (full, it) = ilsqr_streaking(
            &field,
            &ones,
            &mask,
            shape,
            vs,
            b0,
            lsqr,
            StreakingParams::default(),
            &never,
        )
        .unwrap();
        assert!(it.lsqr > 0 && it.streaking > 0);
        let (e_core, e_full) = (nrmse(&core, &chi, &mask), nrmse(&full, &chi, &mask));
        assert!(
            e_full < e_core,
            "streaking {e_full:.1} % vs LSQR {e_core:.1} %"
        );
        assert!(full.iter().zip(&mask).all(|(v, &m)| m != 0 || *v == 0.0));
        let in_streaking = |i: usize| i > lsqr.max_iter + 1;
        let p = LsqrParams {
            tol: 0.0,
            max_iter: 50,
        };
        let s = StreakingParams {
            tol: 0.0,
            ..StreakingParams::default()
        };
        assert_eq!(
            ilsqr_streaking(&field, &ones, &mask, shape, vs, b0, p, s, &in_streaking),
            Err(CoreError::Interrupted)
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        let (_, field, mask, shape, vs, b0) = setup(8);
        let never = |_: usize| false;
        let bad_w = vec![-1.0f32; shape.len()];
        let p = LsqrParams {
            tol: 1e-2,
            max_iter: 5,
        };
        assert!(ilsqr(&field, &bad_w, &mask, shape, vs, b0, p, &never).is_err());
        let rp = RtsParams {
            delta: 0.0,
            ..RtsParams::default()
        };
        assert!(rts(&field, &mask, shape, vs, b0, rp, &never).is_err());
        assert!(edge_weight(&field, &mask, shape, vs, 1.5).is_err());
        let g = edge_weight(&field, &mask, shape, vs, 0.1).unwrap();
        let inside = mask.iter().filter(|&&m| m != 0).count() as f64;
        let edges = g.iter().filter(|&&v| v == 0.0).count() as f64;
        assert!((edges / inside - 0.1).abs() < 0.02, "{edges} / {inside}");
    }
}

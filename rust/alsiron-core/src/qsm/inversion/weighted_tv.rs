//! Weighted TV-ADMM, the engine of FANSI-style TV (weak-harmonic background term,
//! nonlinear data term) and MEDI-style magnitude-weighted L1 (with [`edge_weight`]).

use num_complex::Complex32;
use rayon::prelude::*;

use super::operators::*;
use super::*;
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::{Geometry, Shape3};
use crate::qsm::dipole::dipole_kernel;

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
pub fn weighted_tv_admm(
    local_field: &[f32],
    data_weight: &[f32],
    tv_weight: Option<&[f32]>,
    mask: &[u8],
    geometry: &Geometry,
    params: WeightedTvParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    check_field_and_mask(local_field, mask, shape)?;
    check_weight(data_weight, shape, "data weight")?;
    if let Some(g) = tv_weight {
        check_weight(g, shape, "TV weight")?;
    }
    params.check()?;
    let kernel = dipole_kernel(geometry)?;
    let e2 = gradient_energy(shape, voxel_size);
    let plan = Fft3Plan::get(shape)?;
    let n = shape.len();
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
    let per_voxel: Option<Vec<f32>> =
        tv_weight.map(|g| g.par_iter().map(|&g| alpha_over_mu * g).collect());
    let threshold = match &per_voxel {
        Some(t) => ShrinkThreshold::PerVoxel(t),
        None => ShrinkThreshold::Uniform(alpha_over_mu),
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
        let (change, norm) =
            shrink_update(&chi, &chi_prev, shape, inv_h, threshold, &mut u1, &mut w1);
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

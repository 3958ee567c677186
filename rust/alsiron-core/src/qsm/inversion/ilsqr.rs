//! LSQR (Paige & Saunders 1982) on the weighted dipole model, the core of iLSQR
//! (Li et al. 2015); its plane rotation is shared with the streaking step.

use num_complex::Complex32;
use rayon::prelude::*;

use super::*;
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::{Geometry, Shape3};
use crate::qsm::dipole::dipole_kernel;

/// LSQR's plane rotation (Paige & Saunders 1982): the scalar recurrences shared by the
/// k-space and the image-space LSQR loops.
pub(super) struct LsqrRotation {
    /// φ̄, the norm of the current residual.
    pub(super) phi_bar: f64,
    pub(super) rho_bar: f64,
}

/// What one rotation gives the vector updates: x += step·w, v ← v·inv_alpha,
/// w ← v − back·w; `c` (cosine) for the ‖Aᵀr‖ estimate φ̄·α·|c|.
pub(super) struct LsqrStep {
    pub(super) step: f32,
    pub(super) back: f32,
    pub(super) inv_alpha: f32,
    pub(super) c: f64,
}

impl LsqrRotation {
    pub(super) fn next(&mut self, alpha: f64, beta: f64) -> LsqrStep {
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
pub(super) fn zero_nyquist_planes(kernel: &mut [f32], shape: Shape3) {
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
pub fn ilsqr(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    geometry: &Geometry,
    params: LsqrParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, usize)> {
    let shape = geometry.shape();
    check_field_and_mask(local_field, mask, shape)?;
    check_weight(weight, shape, "weight")?;
    check_iterations(params.max_iter, params.tol)?;
    let plan = Fft3Plan::get(shape)?;
    let (mut x_hat, iterations) =
        lsqr_dipole_spectrum(local_field, weight, mask, geometry, params, 0, should_stop)?;
    let mut chi = vec![0.0f32; shape.len()];
    plan.inverse(&mut x_hat, &mut chi)?;
    apply_mask(&mut chi, mask);
    Ok((chi, iterations))
}

/// The LSQR iteration of [`ilsqr`]; returns the spectrum of the (unmasked) solution and
/// the iterations run. `should_stop` sees `first_iteration + iteration`.
pub(super) fn lsqr_dipole_spectrum(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    geometry: &Geometry,
    params: LsqrParams,
    first_iteration: usize,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<Complex32>, usize)> {
    let shape = geometry.shape();
    let mut kernel = dipole_kernel(geometry)?;
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

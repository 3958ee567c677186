//! Steps 2–4 of iLSQR (Li et al. 2015): the fast QSM estimate, the streaking estimate by
//! LSQR on the gradient domain, and the subtraction.

use num_complex::Complex32;
use rayon::prelude::*;

use super::ilsqr::*;
use super::operators::*;
use super::*;
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::Geometry;
use crate::qsm::dipole::dipole_kernel;

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
pub(super) fn percentile(values: &mut [f64], p: f64) -> f64 {
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
pub(super) fn ramp_down(v: f64, lo: f64, hi: f64) -> f32 {
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

/// Fast QSM estimate of iLSQR (Li et al. 2015, eqs. 8–14): χ̂ = sgn(D)·F{f·M}; in
/// k-space regions of small |D| (weight w from |D|ⁿ, eq. 10) the estimate is replaced by
/// its spherical mean (radius 3 mm) twice, with the mask applied in between (eqs. 9, 11);
/// the result is scaled to TKD (threshold 1/8) by a least-squares line a·χ + b over the
/// mask (eqs. 12–14). Returns χ_fs, 0 outside the mask.
pub fn ilsqr_fast_estimate(
    local_field: &[f32],
    mask: &[u8],
    geometry: &Geometry,
) -> CoreResult<Vec<f32>> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    use ilsqr_constants::*;
    check_field_and_mask(local_field, mask, shape)?;
    let kernel = dipole_kernel(geometry)?;
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
    let (sphere, count) = crate::qsm::bfr::sphere_indicator(shape, voxel_size, FAST_SMV_RADIUS_MM);
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
    let inverse = crate::qsm::inversion::truncated_inverse(&kernel, FAST_TKD_THRESHOLD as f32);
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
pub fn ilsqr_streaking(
    local_field: &[f32],
    weight: &[f32],
    mask: &[u8],
    geometry: &Geometry,
    lsqr: LsqrParams,
    streaking: StreakingParams,
    should_stop: StopFn<'_>,
) -> CoreResult<(Vec<f32>, IlsqrIterations)> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    use ilsqr_constants::GRADIENT_WEIGHT_PERCENTILES;
    check_field_and_mask(local_field, mask, shape)?;
    check_weight(weight, shape, "weight")?;
    check_iterations(lsqr.max_iter, lsqr.tol)?;
    check_iterations(streaking.max_iter, streaking.tol)?;
    check_positive(&[("iLSQR ill_threshold", streaking.ill_threshold)])?;
    let (chi_lsqr, lsqr_iterations) =
        ilsqr(local_field, weight, mask, geometry, lsqr, should_stop)?;
    let fast = ilsqr_fast_estimate(local_field, mask, geometry)?;
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
    let mut kernel = dipole_kernel(geometry)?;
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

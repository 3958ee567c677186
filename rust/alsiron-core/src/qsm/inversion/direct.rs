//! Closed-form inversions: truncated k-space division (TKD) and Tikhonov with gradient
//! regularisation, both evaluated in one fused filter pass.

use num_complex::Complex32;
use rayon::prelude::*;

use super::operators::*;
use super::*;
use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::Geometry;
use crate::qsm::dipole::DipoleSymbol;

/// Default TKD truncation threshold on |D|.
pub const TKD_DEFAULT_THRESHOLD: f64 = 0.19;

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
    geometry: &Geometry,
    threshold: f64,
) -> CoreResult<Vec<f32>> {
    let shape = geometry.shape();
    check_field_and_mask(local_field, mask, shape)?;
    if !(threshold.is_finite() && threshold > 0.0 && threshold <= 2.0 / 3.0) {
        return Err(CoreError::InvalidArgument(format!(
            "TKD threshold must be in (0, 2/3], got {threshold}"
        )));
    }
    let dipole = DipoleSymbol::new(geometry);
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
    geometry: &Geometry,
    lambda: f64,
) -> CoreResult<Vec<f32>> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    check_field_and_mask(local_field, mask, shape)?;
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "Tikhonov lambda must be positive, got {lambda}"
        )));
    }
    let b = geometry.b0_unit();
    let plan = Fft3Plan::get(shape)?;
    let [kx, ky, kz] = crate::qsm::dipole::half_spectrum_frequencies(shape, voxel_size);
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

//! Background field removal: total field [ppm] → local field [ppm] inside the mask.
//!
//! One file per method family, all re-exported here:
//! - `sharp.rs`: [`vsharp`], V-SHARP (Li et al. 2011; Wu et al. 2012), SMV filtering with
//!   varying sphere radii and a truncated deconvolution.
//! - `ismv.rs`: [`ismv`], iterative spherical mean value (Wen Y. et al., MRM 72:1065, 2014).
//! - `pdf.rs`: [`pdf`], projection onto dipole fields (Liu T. et al., NMR Biomed 24:1129,
//!   2011), with a k-space or image-space dipole kernel.
//! - `lbv.rs`: [`lbv`], Laplacian boundary value (Zhou D. et al., NMR Biomed 27:312, 2014).
//!
//! This file holds what they share: spheres, zero padding and cropping, periodic
//! convolution, the conjugate-gradient step and the input checks.

use num_complex::Complex32;
use rayon::prelude::*;

use crate::error::{CoreError, CoreResult};
use crate::fft::Fft3Plan;
use crate::grid::{check_voxel_size, Shape3};
use crate::qsm::dipole::apply_kernel;

mod ismv;
mod lbv;
mod pdf;
mod sharp;
#[cfg(test)]
mod tests;
#[cfg(feature = "timing")]
#[doc(hidden)]
pub mod timing;

pub use self::ismv::{ismv, IsmvParams};
pub use self::lbv::{lbv, LbvParams};
pub use self::pdf::{
    dipole_kernel_image_space, pdf, pdf_with_sources, DipoleDiscretisation, PdfParams,
};
pub use self::sharp::{default_radii_mm, vsharp, VSHARP_DEFAULT_THRESHOLD};

/// Unnormalised indicator of a sphere of radius `radius_mm` on a periodic grid of
/// `shape`, centred at voxel 0 (offsets wrap around). Returns (indicator, voxel count).
pub(crate) fn sphere_indicator(
    shape: Shape3,
    voxel_size: [f64; 3],
    radius_mm: f64,
) -> (Vec<f32>, usize) {
    let [nx, ny, nz] = shape.0;
    let reach = |h: f64| (radius_mm / h).floor() as isize;
    let (rx, ry, rz) = (
        reach(voxel_size[0]),
        reach(voxel_size[1]),
        reach(voxel_size[2]),
    );
    let mut sphere = vec![0.0f32; shape.len()];
    let mut count = 0;
    let wrap = |d: isize, n: usize| d.rem_euclid(n as isize) as usize;
    let r2 = radius_mm * radius_mm * (1.0 + 1e-9);
    for dx in -rx..=rx {
        for dy in -ry..=ry {
            for dz in -rz..=rz {
                let d2 = (dx as f64 * voxel_size[0]).powi(2)
                    + (dy as f64 * voxel_size[1]).powi(2)
                    + (dz as f64 * voxel_size[2]).powi(2);
                if d2 <= r2 {
                    let idx = shape.idx(wrap(dx, nx), wrap(dy, ny), wrap(dz, nz));
                    if sphere[idx] == 0.0 {
                        count += 1;
                    }
                    sphere[idx] = 1.0;
                }
            }
        }
    }
    (sphere, count)
}

pub(crate) fn pad(values: &[f32], shape: Shape3, padded: Shape3) -> Vec<f32> {
    let [_, ny, nz] = shape.0;
    let [_, pny, pnz] = padded.0;
    let mut out = vec![0.0f32; padded.len()];
    out.par_chunks_mut(pny * pnz)
        .zip(values.par_chunks(ny * nz))
        .for_each(|(dst, src)| {
            for j in 0..ny {
                dst[j * pnz..j * pnz + nz].copy_from_slice(&src[j * nz..(j + 1) * nz]);
            }
        });
    out
}

pub(crate) fn crop(values: &[f32], padded: Shape3, shape: Shape3) -> Vec<f32> {
    let [_, ny, nz] = shape.0;
    let [_, pny, pnz] = padded.0;
    let mut out = vec![0.0f32; shape.len()];
    out.par_chunks_mut(ny * nz)
        .zip(values.par_chunks(pny * pnz))
        .for_each(|(dst, src)| {
            for j in 0..ny {
                dst[j * nz..(j + 1) * nz].copy_from_slice(&src[j * pnz..j * pnz + nz]);
            }
        });
    out
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b.par_iter())
        .with_min_len(4096)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// `out = D ∗ x`: periodic convolution with a real half-spectrum kernel.
pub(super) fn convolve(
    plan: &Fft3Plan,
    kernel: &[f32],
    spectrum: &mut [Complex32],
    x: &[f32],
    out: &mut [f32],
) -> CoreResult<()> {
    plan.forward(x, spectrum)?;
    apply_kernel(spectrum, kernel);
    plan.inverse(spectrum, out)
}

pub(super) fn zero_inside(values: &mut [f32], outside: &[bool]) {
    values
        .par_iter_mut()
        .zip(outside.par_iter())
        .for_each(|(v, &p)| {
            if !p {
                *v = 0.0
            }
        });
}

pub(super) fn check_inputs(
    field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
) -> CoreResult<()> {
    shape.check_len(field.len(), "field")?;
    shape.check_len(mask.len(), "mask")?;
    check_voxel_size(voxel_size)?;
    if !mask.iter().any(|&m| m != 0) {
        return Err(CoreError::InvalidArgument("mask is empty".into()));
    }
    if field.iter().any(|v| !v.is_finite()) {
        return Err(CoreError::InvalidArgument(
            "field has non-finite values".into(),
        ));
    }
    Ok(())
}

/// One conjugate-gradient update once the operator has been applied to the search
/// direction (`product` = A·direction, `curvature` = direction·product): moves `x` and
/// the residual, then the direction. Returns the new squared residual norm.
pub(super) fn cg_step(
    x: &mut [f32],
    residual: &mut [f32],
    direction: &mut [f32],
    product: &[f32],
    rs: f64,
    curvature: f64,
) -> f64 {
    let alpha = (rs / curvature) as f32;
    x.par_iter_mut()
        .zip(direction.par_iter())
        .for_each(|(xi, &d)| *xi += alpha * d);
    residual
        .par_iter_mut()
        .zip(product.par_iter())
        .for_each(|(r, &q)| *r -= alpha * q);
    let rs_new = dot(residual, residual);
    let beta = (rs_new / rs) as f32;
    direction
        .par_iter_mut()
        .zip(residual.par_iter())
        .for_each(|(d, &r)| *d = r + beta * *d);
    rs_new
}

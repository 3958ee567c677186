//! Iterative background field removal: PDF and iSMV.
//!
//! - [`pdf`]: projection onto dipole fields (Liu T. et al., NMR Biomed 24:1129, 2011).
//!   The background field is the field of sources outside the mask; their susceptibility
//!   is fitted to the total field inside the mask by conjugate gradients on the normal
//!   equations, and the local field is what the fit leaves over. Uses the full dipole
//!   kernel, so the B0 direction and anisotropic voxels enter as in the forward model.
//! - [`ismv`]: iterative spherical mean value (Wen Y. et al., MRM 72:1065, 2014). Inside
//!   the mask eroded by the sphere the background field equals its own spherical mean;
//!   on the eroded rim it is taken to be the total field (local field ≈ 0 there). The
//!   fixed point f_b = E·(S∗f_b) + (M − E)·f is reached by iterating it.
//! - [`lbv`]: Laplacian boundary value (Zhou D. et al., NMR Biomed 27:312, 2014): the
//!   background is the harmonic function that equals the total field on the mask boundary.
//!
//! Both zero-pad to fast FFT sizes at the far end of each axis (the FFT is periodic, so
//! the padding surrounds the volume); PDF pads further by `pad_voxels` so that background
//! sources near one face do not wrap onto the opposite one.

use num_complex::Complex32;
use rayon::prelude::*;

use crate::bfr::{crop, pad, sphere_indicator};
use crate::dipole::{apply_kernel, dipole_kernel, fftfreq};
use crate::error::{CoreError, CoreResult};
use crate::fft::{fast_len, Fft3Plan};
use crate::grid::{check_voxel_size, unit_direction, Shape3};

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b.par_iter())
        .with_min_len(4096)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// `out = D ∗ x`: periodic convolution with a real half-spectrum kernel.
fn convolve(
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

fn zero_inside(values: &mut [f32], outside: &[bool]) {
    values
        .par_iter_mut()
        .zip(outside.par_iter())
        .for_each(|(v, &p)| {
            if !p {
                *v = 0.0
            }
        });
}

fn check_inputs(field: &[f32], mask: &[u8], shape: Shape3, voxel_size: [f64; 3]) -> CoreResult<()> {
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

/// Discretisation of the dipole kernel that PDF fits background sources with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DipoleDiscretisation {
    /// 1/3 − (k·b̂)²/|k|² sampled in k-space (the forward model of [`crate::dipole`]).
    KSpace,
    /// The point-dipole field V/(4π)·(3cos²θ − 1)/r³ sampled on the grid, then transformed:
    /// no band-limit ringing, so sources outside the mask cannot mimic fine texture inside.
    ImageSpace,
}

/// Half spectrum of the image-space dipole kernel on the periodic grid `shape`.
///
/// Offsets are the minimum-image voxel offsets times the voxel size [mm]; the kernel is
/// 0 at r = 0 (the Lorentz-sphere self term). Real because the kernel is even.
pub fn dipole_kernel_image_space(
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
) -> CoreResult<Vec<f32>> {
    shape.check_len(shape.len(), "dipole kernel grid")?;
    check_voxel_size(voxel_size)?;
    let b = unit_direction(b0_dir)?;
    let [nx, ny, nz] = shape.0;
    let offset = |i: usize, n: usize, h: f64| fftfreq(i, n) * n as f64 * h;
    let scale = voxel_size.iter().product::<f64>() / (4.0 * std::f64::consts::PI);
    let mut spatial = vec![0.0f32; shape.len()];
    spatial
        .par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, plane)| {
            let x = offset(i, nx, voxel_size[0]);
            for (j, row) in plane.chunks_mut(nz).enumerate() {
                let y = offset(j, ny, voxel_size[1]);
                for (k, d) in row.iter_mut().enumerate() {
                    let z = offset(k, nz, voxel_size[2]);
                    let r2 = x * x + y * y + z * z;
                    if r2 > 0.0 {
                        let rb = x * b[0] + y * b[1] + z * b[2];
                        *d = (scale * (3.0 * rb * rb / r2 - 1.0) / (r2 * r2.sqrt())) as f32;
                    }
                }
            }
        });
    let plan = Fft3Plan::get(shape)?;
    let mut spectrum = plan.make_spectrum();
    plan.forward(&spatial, &mut spectrum)?;
    Ok(spectrum.iter().map(|c| c.re).collect())
}

/// Parameters of [`pdf`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PdfParams {
    /// Zero padding added to each axis (voxels) before rounding up to a fast FFT size.
    pub pad_voxels: [usize; 3],
    /// Stop when the CG residual norm falls below `tol` times its initial value.
    pub tol: f64,
    /// Maximum number of CG iterations.
    pub max_iter: usize,
    /// Dipole kernel discretisation.
    pub kernel: DipoleDiscretisation,
}

impl Default for PdfParams {
    /// Tolerance from the head-phantom measurements in `python/alsiron/workflow.py`:
    /// CG stops after ~6 iterations there; early stopping is PDF's regularisation
    /// (tighter tolerances fit more of the cortical field into the background, looser
    /// ones leave more background). 16 voxels of padding.
    fn default() -> Self {
        PdfParams {
            pad_voxels: [16; 3],
            tol: 3e-3,
            max_iter: 100,
            kernel: DipoleDiscretisation::KSpace,
        }
    }
}

impl PdfParams {
    fn check(&self) -> CoreResult<()> {
        if !(self.tol.is_finite() && self.tol >= 0.0 && self.max_iter > 0) {
            return Err(CoreError::InvalidArgument(format!(
                "PDF needs tol >= 0 and max_iter > 0, got {self:?}"
            )));
        }
        if self.pad_voxels.iter().any(|&p| p > 4096) {
            return Err(CoreError::InvalidArgument(format!(
                "PDF padding {:?} voxels is unreasonably large",
                self.pad_voxels
            )));
        }
        Ok(())
    }
}

/// Projection onto dipole fields.
///
/// `field` total field [ppm], `mask` (nonzero = inside), `weight` optional per-voxel
/// reliability (e.g. magnitude or 1/σ of the field; ≥ 0, squared in the data term;
/// None = uniform). Solves P Dᵀ W² M D P x = P Dᵀ W² M f by CG, where P selects voxels
/// outside the mask in the padded grid and D is the dipole convolution. Returns the local
/// field M·(f − D P x) [ppm] (0 outside the mask) and the number of CG iterations run.
/// `should_stop(iter)` is polled every iteration; true aborts with `Interrupted`.
#[allow(clippy::too_many_arguments)]
pub fn pdf(
    field: &[f32],
    mask: &[u8],
    weight: Option<&[f32]>,
    shape: Shape3,
    voxel_size: [f64; 3],
    b0_dir: [f64; 3],
    params: PdfParams,
    should_stop: &(dyn Fn(usize) -> bool + Sync),
) -> CoreResult<(Vec<f32>, usize)> {
    check_inputs(field, mask, shape, voxel_size)?;
    params.check()?;
    let w2: Vec<f32> = match weight {
        Some(w) => {
            shape.check_len(w.len(), "weight")?;
            if w.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(CoreError::InvalidArgument(
                    "PDF weights must be finite and non-negative".into(),
                ));
            }
            w.iter()
                .zip(mask)
                .map(|(&v, &m)| if m != 0 { v * v } else { 0.0 })
                .collect()
        }
        None => mask.iter().map(|&m| (m != 0) as u8 as f32).collect(),
    };
    if !w2.iter().any(|&v| v > 0.0) {
        return Err(CoreError::InvalidArgument(
            "PDF weights are zero everywhere inside the mask".into(),
        ));
    }
    let padded = Shape3([0, 1, 2].map(|a| fast_len(shape.0[a] + params.pad_voxels[a])));
    let plan = Fft3Plan::get(padded)?;
    let kernel = match params.kernel {
        DipoleDiscretisation::KSpace => dipole_kernel(padded, voxel_size, b0_dir)?,
        DipoleDiscretisation::ImageSpace => dipole_kernel_image_space(padded, voxel_size, b0_dir)?,
    };
    let mask_f: Vec<f32> = mask.iter().map(|&m| (m != 0) as u8 as f32).collect();
    let outside: Vec<bool> = pad(&mask_f, shape, padded)
        .iter()
        .map(|&m| m < 0.5)
        .collect();
    let w2 = pad(&w2, shape, padded);
    let masked_field: Vec<f32> = field
        .iter()
        .zip(mask)
        .map(|(&f, &m)| if m != 0 { f } else { 0.0 })
        .collect();
    let f = pad(&masked_field, shape, padded);

    let mut spectrum = plan.make_spectrum();
    let n = padded.len();
    let mut tmp = vec![0.0f32; n];
    // Right-hand side b = P·D∗(W²·f).
    let weighted: Vec<f32> = f
        .par_iter()
        .zip(w2.par_iter())
        .map(|(a, b)| a * b)
        .collect();
    let mut residual = vec![0.0f32; n];
    convolve(&plan, &kernel, &mut spectrum, &weighted, &mut residual)?;
    zero_inside(&mut residual, &outside);
    let mut x = vec![0.0f32; n];
    let mut direction = residual.clone();
    let mut product = vec![0.0f32; n];
    let mut rs = dot(&residual, &residual);
    let stop = params.tol * rs.sqrt();
    let mut iterations = 0;
    while iterations < params.max_iter && rs.sqrt() > stop && rs > 0.0 {
        if should_stop(iterations) {
            return Err(CoreError::Interrupted);
        }
        // A·d = P·D∗(W²·D∗d); d is already zero inside the mask.
        convolve(&plan, &kernel, &mut spectrum, &direction, &mut tmp)?;
        tmp.par_iter_mut()
            .zip(w2.par_iter())
            .for_each(|(t, &w)| *t *= w);
        convolve(&plan, &kernel, &mut spectrum, &tmp, &mut product)?;
        zero_inside(&mut product, &outside);
        let curvature = dot(&direction, &product);
        if curvature <= 0.0 {
            break; // direction in the null space: nothing left to fit
        }
        rs = cg_step(
            &mut x,
            &mut residual,
            &mut direction,
            &product,
            rs,
            curvature,
        );
        iterations += 1;
    }
    // Background field D∗(P·x); local = M·(f − background).
    let mut background = vec![0.0f32; n];
    convolve(&plan, &kernel, &mut spectrum, &x, &mut background)?;
    let local: Vec<f32> = f
        .par_iter()
        .zip(background.par_iter().zip(outside.par_iter()))
        .map(|(&fv, (&bg, &p))| if p { 0.0 } else { fv - bg })
        .collect();
    Ok((crop(&local, padded, shape), iterations))
}

/// Parameters of [`ismv`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IsmvParams {
    /// Radius of the spherical mean value kernel [mm].
    pub radius_mm: f64,
    /// Stop when the change of the background field falls below `tol`·‖E·f‖.
    pub tol: f64,
    /// Maximum number of iterations.
    pub max_iter: usize,
}

impl IsmvParams {
    /// Wen et al.'s defaults: radius two (largest) voxels, tol 1e-3, 500 iterations.
    pub fn for_voxel_size(voxel_size: [f64; 3]) -> Self {
        IsmvParams {
            radius_mm: 2.0 * voxel_size.iter().cloned().fold(0.0, f64::max),
            tol: 1e-3,
            max_iter: 500,
        }
    }

    fn check(&self) -> CoreResult<()> {
        let ok = self.radius_mm.is_finite()
            && self.radius_mm > 0.0
            && self.tol.is_finite()
            && self.tol >= 0.0
            && self.max_iter > 0;
        if !ok {
            return Err(CoreError::InvalidArgument(format!(
                "iSMV needs radius_mm > 0, tol >= 0 and max_iter > 0, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// Iterative spherical mean value background removal.
///
/// `field` total field [ppm], `mask` (nonzero = inside). Returns the local field [ppm]
/// (0 outside the eroded mask), the mask eroded by the sphere (where the local field is
/// valid) and the number of iterations run. `should_stop(iter)` is polled every
/// iteration; true aborts with `Interrupted`.
pub fn ismv(
    field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    params: IsmvParams,
    should_stop: &(dyn Fn(usize) -> bool + Sync),
) -> CoreResult<(Vec<f32>, Vec<u8>, usize)> {
    check_inputs(field, mask, shape, voxel_size)?;
    params.check()?;
    let padded = Shape3(shape.0.map(fast_len));
    let plan = Fft3Plan::get(padded)?;
    let (sphere, count) = sphere_indicator(padded, voxel_size, params.radius_mm);
    if count < 2 {
        return Err(CoreError::InvalidArgument(format!(
            "iSMV radius {} mm is smaller than the voxel size {voxel_size:?}",
            params.radius_mm
        )));
    }
    let mut sphere_hat = plan.make_spectrum();
    plan.forward(&sphere, &mut sphere_hat)?;
    let count_f = count as f32;
    // Normalised sphere spectrum (real: the sphere is symmetric).
    let mean_kernel: Vec<f32> = sphere_hat.iter().map(|s| s.re / count_f).collect();

    let mask_f: Vec<f32> = mask.iter().map(|&m| (m != 0) as u8 as f32).collect();
    let inside = pad(&mask_f, shape, padded);
    let mut spectrum = plan.make_spectrum();
    plan.forward(&inside, &mut spectrum)?;
    spectrum
        .par_iter_mut()
        .zip(sphere_hat.par_iter())
        .for_each(|(m, s)| *m *= s.re);
    let n = padded.len();
    let mut work = vec![0.0f32; n];
    plan.inverse(&mut spectrum, &mut work)?;
    let eroded: Vec<bool> = work.par_iter().map(|&v| v > count_f - 0.5).collect();
    if !eroded.iter().any(|&e| e) {
        return Err(CoreError::InvalidArgument(format!(
            "the mask is too thin for an iSMV radius of {} mm: nothing survives erosion",
            params.radius_mm
        )));
    }

    let masked_field: Vec<f32> = field
        .iter()
        .zip(mask)
        .map(|(&f, &m)| if m != 0 { f } else { 0.0 })
        .collect();
    let f = pad(&masked_field, shape, padded);
    // Boundary condition: the total field on the rim M − E.
    let boundary: Vec<f32> = f
        .par_iter()
        .zip(inside.par_iter().zip(eroded.par_iter()))
        .map(|(&v, (&m, &e))| if m > 0.5 && !e { v } else { 0.0 })
        .collect();
    let eroded_norm = f
        .par_iter()
        .zip(eroded.par_iter())
        .map(|(&v, &e)| if e { v as f64 * v as f64 } else { 0.0 })
        .sum::<f64>()
        .sqrt();
    let stop = params.tol * eroded_norm;
    let mut background = f.clone();
    let mut iterations = 0;
    let mut change = f64::INFINITY;
    while iterations < params.max_iter && change > stop {
        if should_stop(iterations) {
            return Err(CoreError::Interrupted);
        }
        plan.forward(&background, &mut spectrum)?;
        apply_kernel(&mut spectrum, &mean_kernel);
        plan.inverse(&mut spectrum, &mut work)?;
        change = background
            .par_iter_mut()
            .zip(work.par_iter())
            .zip(eroded.par_iter().zip(boundary.par_iter()))
            .map(|((b, &smooth), (&e, &bc))| {
                let new = if e { smooth } else { bc };
                let d = (new - *b) as f64;
                *b = new;
                d * d
            })
            .sum::<f64>()
            .sqrt();
        iterations += 1;
    }
    let local: Vec<f32> = f
        .par_iter()
        .zip(background.par_iter().zip(eroded.par_iter()))
        .map(|(&fv, (&bg, &e))| if e { fv - bg } else { 0.0 })
        .collect();
    let eroded_f: Vec<f32> = eroded.iter().map(|&e| e as u8 as f32).collect();
    let final_mask = crop(&eroded_f, padded, shape)
        .iter()
        .map(|&v| (v > 0.5) as u8)
        .collect();
    Ok((crop(&local, padded, shape), final_mask, iterations))
}

/// Parameters of [`lbv`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbvParams {
    /// Stop when the CG residual falls below `tol` times its initial norm.
    pub tol: f64,
    /// Maximum number of CG iterations.
    pub max_iter: usize,
}

impl Default for LbvParams {
    fn default() -> Self {
        LbvParams {
            tol: 1e-4,
            max_iter: 2000,
        }
    }
}

/// `out = A·p` on the interior: the negative 7-point Laplacian (anisotropic spacing) with
/// homogeneous Dirichlet values outside the interior (`p` is zero there).
fn negative_laplacian(
    p: &[f32],
    out: &mut [f32],
    interior: &[bool],
    shape: Shape3,
    inv_h2: [f32; 3],
) {
    let [_, ny, nz] = shape.0;
    let strides = [ny * nz, nz, 1];
    let centre = 2.0 * (inv_h2[0] + inv_h2[1] + inv_h2[2]);
    out.par_iter_mut()
        .enumerate()
        .with_min_len(4096)
        .for_each(|(i, o)| {
            *o = if interior[i] {
                // Interior voxels have all six neighbours inside the volume (see `lbv`).
                let mut acc = centre * p[i];
                for a in 0..3 {
                    acc -= inv_h2[a] * (p[i + strides[a]] + p[i - strides[a]]);
                }
                acc
            } else {
                0.0
            };
        });
}

/// Laplacian boundary value background removal (Zhou D. et al., NMR Biomed 27:312, 2014).
///
/// The background field is harmonic inside the mask and equals the total field on the
/// mask's boundary voxels (those with a 6-neighbour outside the mask or the volume), i.e.
/// the local field is taken to be 0 there. The Dirichlet problem ∇²f_b = 0 on the interior
/// is solved by CG on the 7-point Laplacian (anisotropic spacing), started from f_b = f.
/// Returns the local field [ppm] (0 outside the interior), the interior mask and the CG
/// iterations run. `should_stop(iter)` is polled every iteration.
pub fn lbv(
    field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    params: LbvParams,
    should_stop: &(dyn Fn(usize) -> bool + Sync),
) -> CoreResult<(Vec<f32>, Vec<u8>, usize)> {
    check_inputs(field, mask, shape, voxel_size)?;
    if !(params.tol.is_finite() && params.tol >= 0.0 && params.max_iter > 0) {
        return Err(CoreError::InvalidArgument(format!(
            "LBV needs tol >= 0 and max_iter > 0, got {params:?}"
        )));
    }
    let [nx, ny, nz] = shape.0;
    let strides = [ny * nz, nz, 1];
    let dims = [nx, ny, nz];
    let inside = |i: usize| mask[i] != 0;
    let interior: Vec<bool> = (0..shape.len())
        .into_par_iter()
        .map(|i| {
            if !inside(i) {
                return false;
            }
            let coord = [i / strides[0], (i / strides[1]) % ny, i % nz];
            (0..3).all(|a| {
                coord[a] > 0
                    && coord[a] + 1 < dims[a]
                    && inside(i + strides[a])
                    && inside(i - strides[a])
            })
        })
        .collect();
    if !interior.iter().any(|&v| v) {
        return Err(CoreError::InvalidArgument(
            "the mask has no interior voxel (every voxel touches its boundary)".into(),
        ));
    }
    let inv_h2 = voxel_size.map(|h| (1.0 / (h * h)) as f32);
    // Right-hand side: boundary values enter the interior equations as known terms.
    let boundary: Vec<f32> = (0..shape.len())
        .into_par_iter()
        .map(|i| {
            if inside(i) && !interior[i] {
                field[i]
            } else {
                0.0
            }
        })
        .collect();
    let mut rhs = vec![0.0f32; shape.len()];
    rhs.par_iter_mut().enumerate().for_each(|(i, r)| {
        if interior[i] {
            *r = (0..3)
                .map(|a| inv_h2[a] * (boundary[i + strides[a]] + boundary[i - strides[a]]))
                .sum();
        }
    });
    let mut x: Vec<f32> = field
        .par_iter()
        .zip(interior.par_iter())
        .map(|(&f, &e)| if e { f } else { 0.0 })
        .collect();
    let mut product = vec![0.0f32; shape.len()];
    negative_laplacian(&x, &mut product, &interior, shape, inv_h2);
    let mut residual: Vec<f32> = rhs
        .par_iter()
        .zip(product.par_iter())
        .map(|(&b, &ax)| b - ax)
        .collect();
    let mut direction = residual.clone();
    let mut rs = dot(&residual, &residual);
    let stop = params.tol * dot(&rhs, &rhs).sqrt().max(rs.sqrt());
    let mut iterations = 0;
    while iterations < params.max_iter && rs.sqrt() > stop && rs > 0.0 {
        if should_stop(iterations) {
            return Err(CoreError::Interrupted);
        }
        negative_laplacian(&direction, &mut product, &interior, shape, inv_h2);
        let curvature = dot(&direction, &product);
        if curvature <= 0.0 {
            break;
        }
        rs = cg_step(
            &mut x,
            &mut residual,
            &mut direction,
            &product,
            rs,
            curvature,
        );
        iterations += 1;
    }
    let local: Vec<f32> = field
        .par_iter()
        .zip(x.par_iter().zip(interior.par_iter()))
        .map(|(&f, (&bg, &e))| if e { f - bg } else { 0.0 })
        .collect();
    let interior_u8 = interior.iter().map(|&e| e as u8).collect();
    Ok((local, interior_u8, iterations))
}

/// One conjugate-gradient update once the operator has been applied to the search
/// direction (`product` = A·direction, `curvature` = direction·product): moves `x` and
/// the residual, then the direction. Returns the new squared residual norm.
fn cg_step(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dipole::forward_field;
    use crate::test_support::{demeaned_in, masked_nrmse_pct};

    const NEVER: &(dyn Fn(usize) -> bool + Sync) = &|_| false;

    /// Ball mask of radius 11 voxels, a strong source outside it and a weak one inside;
    /// returns (total field, local field of the inside source, background, mask).
    fn two_sources(
        n: usize,
        b0: [f64; 3],
        vs: [f64; 3],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>) {
        let shape = Shape3([n, n, n]);
        let c = n as f64 / 2.0;
        let mut chi_out = vec![0.0f32; shape.len()];
        let mut chi_in = vec![0.0f32; shape.len()];
        let mut mask = vec![0u8; shape.len()];
        for i in 0..n {
            for j in 0..n {
                for k in 0..n {
                    let d2 = |a: f64, b: f64, e: f64| {
                        (i as f64 - a).powi(2) + (j as f64 - b).powi(2) + (k as f64 - e).powi(2)
                    };
                    let idx = shape.idx(i, j, k);
                    if d2(c, c, c) < 11.0f64.powi(2) {
                        mask[idx] = 1;
                    }
                    if d2(c + 3.0, c, c + 15.0) < 9.0 {
                        chi_out[idx] = 9.0;
                    }
                    if d2(c + 2.0, c - 3.0, c) < 16.0 {
                        chi_in[idx] = 0.1;
                    }
                }
            }
        }
        let bg = forward_field(&chi_out, shape, vs, b0).unwrap();
        let local = forward_field(&chi_in, shape, vs, b0).unwrap();
        let total = bg.iter().zip(&local).map(|(a, b)| a + b).collect();
        (total, local, bg, mask)
    }

    /// ‖a − b‖ / ‖b‖ over `sel` after demeaning both there.
    fn rel_error(a: &[f32], b: &[f32], sel: &[u8]) -> f64 {
        masked_nrmse_pct(a, b, sel) / 100.0
    }

    /// ‖v‖ over `sel` after demeaning there.
    fn demeaned_norm(v: &[f32], sel: &[u8]) -> f64 {
        demeaned_in(v, sel)
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn pdf_removes_an_outside_source_and_keeps_an_inside_one() {
        let n = 36;
        let shape = Shape3([n; 3]);
        for (b0, vs) in [
            ([0.0, 0.0, 1.0], [1.0; 3]),
            ([0.3, -0.2, 1.0], [1.0, 1.0, 1.5]),
        ] {
            let (total, local, bg, mask) = two_sources(n, b0, vs);
            let run = |f: &[f32]| {
                pdf(f, &mask, None, shape, vs, b0, PdfParams::default(), NEVER).unwrap()
            };
            let (bg_left, _) = run(&bg);
            let (got, iters) = run(&total);
            let removed = 1.0 - demeaned_norm(&bg_left, &mask) / demeaned_norm(&bg, &mask);
            let before = rel_error(&total, &local, &mask);
            let after = rel_error(&got, &local, &mask);
            // Measured: 97 % of the background removed; the error vs the local field falls
            // from 10.6 to 0.57 (oblique, anisotropic: 98 %, 7.5 to 0.55; the uniform inside sphere's field is partly projected
            // onto outside dipoles: PDF's known bias for piecewise-constant χ).
            assert!(iters > 1);
            assert!(removed > 0.95, "{b0:?} {vs:?}: removed {removed}");
            assert!(
                after < 0.65 && after < before / 10.0,
                "{b0:?} {vs:?}: {after}"
            );
            assert!(got.iter().zip(&mask).all(|(&v, &m)| m != 0 || v == 0.0));
        }
    }

    #[test]
    fn ismv_removes_an_outside_source_and_keeps_an_inside_one() {
        let n = 36;
        let shape = Shape3([n; 3]);
        let (total, local, bg, mask) = two_sources(n, [0.0, 0.0, 1.0], [1.0; 3]);
        let params = IsmvParams::for_voxel_size([1.0; 3]);
        let (got, eroded, iters) = ismv(&total, &mask, shape, [1.0; 3], params, NEVER).unwrap();
        assert!(iters > 1 && iters < params.max_iter);
        assert!(eroded.iter().zip(&mask).all(|(&e, &m)| e == 0 || m != 0));
        assert!(rel_error(&bg, &local, &eroded) > 1.5);
        let err = rel_error(&got, &local, &eroded);
        assert!(err < 0.35, "iSMV error {err}");
    }

    #[test]
    fn lbv_removes_an_outside_source_and_keeps_an_inside_one() {
        let n = 36;
        let shape = Shape3([n; 3]);
        let (total, local, bg, mask) = two_sources(n, [0.0, 0.0, 1.0], [1.0; 3]);
        let (got, interior, iters) =
            lbv(&total, &mask, shape, [1.0; 3], LbvParams::default(), NEVER).unwrap();
        assert!(iters > 1 && iters < LbvParams::default().max_iter);
        assert!(interior.iter().zip(&mask).all(|(&e, &m)| e == 0 || m != 0));
        let before = rel_error(&total, &local, &interior);
        let after = rel_error(&got, &local, &interior);
        assert!(rel_error(&bg, &local, &interior) > 1.5);
        // Measured: 35 iterations, error 7.15 -> 0.367 (the uniform inside sphere's field
        // reaches the mask boundary, where LBV assumes it is 0).
        assert!(after < 0.45, "LBV error {before} -> {after}");
        // A purely harmonic field (linear ramp) is removed to round-off.
        let ramp: Vec<f32> = (0..shape.len()).map(|i| (i % n) as f32 * 0.01).collect();
        let (flat, interior, _) =
            lbv(&ramp, &mask, shape, [1.0; 3], LbvParams::default(), NEVER).unwrap();
        let worst = flat
            .iter()
            .zip(&interior)
            .filter(|(_, &e)| e != 0)
            .map(|(v, _)| v.abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "ramp residual {worst}");
    }

    #[test]
    fn interrupts_and_bad_arguments_are_reported() {
        let shape = Shape3([10, 10, 10]);
        let f = vec![0.1f32; 1000];
        let mut m = vec![0u8; 1000];
        for i in 2..8 {
            for j in 2..8 {
                for k in 2..8 {
                    m[shape.idx(i, j, k)] = 1;
                }
            }
        }
        let stop: &(dyn Fn(usize) -> bool + Sync) = &|_| true;
        let pp = PdfParams::default();
        let ip = IsmvParams::for_voxel_size([1.0; 3]);
        let b0 = [0.0, 0.0, 1.0];
        assert_eq!(
            pdf(&f, &m, None, shape, [1.0; 3], b0, pp, stop).err(),
            Some(CoreError::Interrupted)
        );
        assert_eq!(
            ismv(&f, &m, shape, [1.0; 3], ip, stop).err(),
            Some(CoreError::Interrupted)
        );
        assert!(pdf(&f, &vec![0u8; 1000], None, shape, [1.0; 3], b0, pp, NEVER).is_err());
        assert!(pdf(&f, &m, Some(&[0.0; 1000]), shape, [1.0; 3], b0, pp, NEVER).is_err());
        assert!(pdf(&f, &m, Some(&[-1.0; 1000]), shape, [1.0; 3], b0, pp, NEVER).is_err());
        assert!(pdf(&f[..999], &m, None, shape, [1.0; 3], b0, pp, NEVER).is_err());
        let mut nan = f.clone();
        nan[5] = f32::NAN;
        assert!(ismv(&nan, &m, shape, [1.0; 3], ip, NEVER).is_err());
        let bad = IsmvParams {
            radius_mm: 0.5,
            ..ip
        };
        assert!(ismv(&f, &m, shape, [1.0; 3], bad, NEVER).is_err());
        let huge = IsmvParams {
            radius_mm: 5.0,
            ..ip
        };
        assert!(ismv(&f, &m, shape, [1.0; 3], huge, NEVER).is_err());
        let lp = LbvParams::default();
        // A constant field is already harmonic (no iteration, nothing to interrupt).
        let bumpy: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        assert_eq!(
            lbv(&bumpy, &m, shape, [1.0; 3], lp, stop).err(),
            Some(CoreError::Interrupted)
        );
        let mut thin = vec![0u8; 1000];
        thin[shape.idx(5, 5, 5)] = 1;
        assert!(lbv(&f, &thin, shape, [1.0; 3], lp, NEVER).is_err());
        assert!(lbv(
            &f,
            &vec![1u8; 1000][..],
            shape,
            [1.0; 3],
            LbvParams { tol: -1.0, ..lp },
            NEVER
        )
        .is_err());
    }
}

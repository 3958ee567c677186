//! Projection onto dipole fields (Liu T. et al., NMR Biomed 24:1129, 2011): the background
//! field is the field of sources outside the mask; their susceptibility is fitted to the
//! total field inside the mask by conjugate gradients on the normal equations, and the
//! local field is what the fit leaves over. Uses the full dipole kernel, so the B0
//! direction and anisotropic voxels enter as in the forward model. Zero-pads by
//! `pad_voxels` and then to fast FFT sizes so that background sources near one face do
//! not wrap onto the opposite one.

use rayon::prelude::*;

use super::{cg_step, check_inputs, convolve, crop, dot, pad, zero_inside};
use crate::error::{CoreError, CoreResult};
use crate::fft::{fast_len, Fft3Plan};
use crate::grid::{Geometry, Shape3};
use crate::qsm::dipole::{dipole_kernel, fftfreq};

/// Discretisation of the dipole kernel that PDF fits background sources with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DipoleDiscretisation {
    /// 1/3 − (k·b̂)²/|k|² sampled in k-space (the forward model of [`crate::qsm::dipole`]).
    KSpace,
    /// The point-dipole field V/(4π)·(3cos²θ − 1)/r³ sampled on the grid, then transformed:
    /// no band-limit ringing, so sources outside the mask cannot mimic fine texture inside.
    ImageSpace,
}

/// Half spectrum of the image-space dipole kernel on the periodic grid `shape`.
///
/// Offsets are the minimum-image voxel offsets times the voxel size [mm]; the kernel is
/// 0 at r = 0 (the Lorentz-sphere self term). Real because the kernel is even.
pub fn dipole_kernel_image_space(geometry: &Geometry) -> CoreResult<Vec<f32>> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    shape.check_len(shape.len(), "dipole kernel grid")?;
    let b = geometry.b0_unit();
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
    /// Weight λ [mm²] of a squared-gradient penalty λ‖∇χ_out‖² on the background sources,
    /// taken only between neighbouring source voxels; 0 = plain PDF. Background tissue
    /// (bone, scalp, air) is piecewise smooth, while sources that would mimic the field
    /// of cortex next to the mask edge must be rough, so the penalty keeps more of it.
    pub source_smoothing: f64,
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
            source_smoothing: 0.0,
        }
    }
}

impl PdfParams {
    fn check(&self) -> CoreResult<()> {
        if !(self.source_smoothing.is_finite() && self.source_smoothing >= 0.0) {
            return Err(CoreError::InvalidArgument(format!(
                "PDF source smoothing must be finite and >= 0, got {}",
                self.source_smoothing
            )));
        }
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
/// None = uniform). Solves (P Dᵀ W² M D P + λ P ∇ᵀ∇ P) x = P Dᵀ W² M f by CG, where P
/// selects voxels outside the mask in the padded grid, D is the dipole convolution and
/// ∇ the forward difference between neighbouring source voxels (periodic on the padded
/// grid; λ = `params.source_smoothing`, 0 = plain PDF). Returns the local
/// field M·(f − D P x) [ppm] (0 outside the mask) and the number of CG iterations run.
/// `should_stop(iter)` is polled every iteration; true aborts with `Interrupted`.
pub fn pdf(
    field: &[f32],
    mask: &[u8],
    weight: Option<&[f32]>,
    geometry: &Geometry,
    params: PdfParams,
    should_stop: &(dyn Fn(usize) -> bool + Sync),
) -> CoreResult<(Vec<f32>, usize)> {
    pdf_with_sources(field, mask, weight, None, geometry, params, should_stop)
}

/// [`pdf`] with the background sources restricted to `sources` (nonzero = a source may
/// sit there; the padding always may, the mask never). Voxels in neither hold no source
/// and no data: a single-step inversion that estimates χ over the whole brain needs its
/// background sources outside the brain, not in the rim between the brain's edge and the
/// eroded data mask, where they would absorb the cortex's own field. None = every voxel
/// outside the mask, as in [`pdf`].
pub fn pdf_with_sources(
    field: &[f32],
    mask: &[u8],
    weight: Option<&[f32]>,
    sources: Option<&[u8]>,
    geometry: &Geometry,
    params: PdfParams,
    should_stop: &(dyn Fn(usize) -> bool + Sync),
) -> CoreResult<(Vec<f32>, usize)> {
    let (shape, voxel_size) = (geometry.shape(), geometry.voxel_size());
    check_inputs(field, mask, shape, voxel_size)?;
    params.check()?;
    if let Some(s) = sources {
        shape.check_len(s.len(), "sources")?;
        if !s.iter().zip(mask).any(|(&s, &m)| s != 0 && m == 0) {
            return Err(CoreError::InvalidArgument(
                "PDF source mask has no voxel outside the data mask".into(),
            ));
        }
    }
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
        DipoleDiscretisation::KSpace => dipole_kernel(&geometry.with_shape(padded))?,
        DipoleDiscretisation::ImageSpace => {
            dipole_kernel_image_space(&geometry.with_shape(padded))?
        }
    };
    let mask_f: Vec<f32> = mask.iter().map(|&m| (m != 0) as u8 as f32).collect();
    let inside = pad(&mask_f, shape, padded);
    let outside: Vec<bool> = match sources {
        Some(s) => {
            // Voxels that may not hold a source; the padding is 0 here, so it may.
            let excluded = pad(
                &s.iter().map(|&v| (v == 0) as u8 as f32).collect::<Vec<_>>(),
                shape,
                padded,
            );
            inside
                .iter()
                .zip(&excluded)
                .map(|(&m, &e)| m < 0.5 && e < 0.5)
                .collect()
        }
        None => inside.iter().map(|&m| m < 0.5).collect(),
    };
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
        if params.source_smoothing > 0.0 {
            add_source_gradient_penalty(
                &mut product,
                &direction,
                &outside,
                padded,
                voxel_size,
                params.source_smoothing,
            );
        }
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
        .zip(background.par_iter().zip(inside.par_iter()))
        .map(|(&fv, (&bg, &m))| if m > 0.5 { fv - bg } else { 0.0 })
        .collect();
    Ok((crop(&local, padded, shape), iterations))
}

/// `out += λ · P ∇ᵀ(M_pair ∇x) / h²`: the gradient of ½λ‖∇x‖² over pairs of neighbouring
/// voxels that are both in `sources` (forward differences, periodic), h the spacing [mm].
pub(super) fn add_source_gradient_penalty(
    out: &mut [f32],
    x: &[f32],
    sources: &[bool],
    shape: Shape3,
    voxel_size: [f64; 3],
    lambda: f64,
) {
    let [nx, ny, nz] = shape.0;
    let w = voxel_size.map(|h| (lambda / (h * h)) as f32);
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, plane)| {
            let (ip, im) = ((i + 1) % nx, (i + nx - 1) % nx);
            for j in 0..ny {
                let (jp, jm) = ((j + 1) % ny, (j + ny - 1) % ny);
                for k in 0..nz {
                    let c = (i * ny + j) * nz + k;
                    if !sources[c] {
                        continue;
                    }
                    let (kp, km) = ((k + 1) % nz, (k + nz - 1) % nz);
                    let neighbours = [
                        ((ip * ny + j) * nz + k, 0),
                        ((im * ny + j) * nz + k, 0),
                        ((i * ny + jp) * nz + k, 1),
                        ((i * ny + jm) * nz + k, 1),
                        ((i * ny + j) * nz + kp, 2),
                        ((i * ny + j) * nz + km, 2),
                    ];
                    let mut acc = 0.0f32;
                    for (n, axis) in neighbours {
                        if sources[n] {
                            acc += w[axis] * (x[c] - x[n]);
                        }
                    }
                    plane[j * nz + k] += acc;
                }
            }
        });
}

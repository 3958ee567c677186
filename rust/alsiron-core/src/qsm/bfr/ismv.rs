//! Iterative spherical mean value (Wen Y. et al., MRM 72:1065, 2014). Inside the mask
//! eroded by the sphere the background field equals its own spherical mean; on the
//! eroded rim it is taken to be the total field (local field ≈ 0 there). The fixed point
//! f_b = E·(S∗f_b) + (M − E)·f is reached by iterating it.

use rayon::prelude::*;

use super::{check_inputs, crop, pad, sphere_indicator};
use crate::error::{CoreError, CoreResult};
use crate::fft::{fast_len, Fft3Plan};
use crate::grid::Shape3;
use crate::qsm::dipole::apply_kernel;

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

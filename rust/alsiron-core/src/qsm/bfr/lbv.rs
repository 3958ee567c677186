//! Laplacian boundary value (Zhou D. et al., NMR Biomed 27:312, 2014): the background is
//! the harmonic function that equals the total field on the mask boundary, found by
//! conjugate gradients on the 7-point Laplacian of the mask interior.

use rayon::prelude::*;

use super::{cg_step, check_inputs, dot};
use crate::error::{CoreError, CoreResult};
use crate::grid::Shape3;

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

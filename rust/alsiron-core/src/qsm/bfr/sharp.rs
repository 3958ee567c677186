//! Background field removal by V-SHARP (Li et al. 2011; Wu et al. 2012).
//!
//! Background fields are harmonic inside the brain, so they equal their spherical mean
//! value (SMV): f − S_r∗f removes them wherever the sphere of radius r fits in the mask.
//! Large spheres suppress noise better but reach less far to the brain edge, so each voxel
//! takes f − S_r∗f from the largest radius whose eroded mask contains it. The combined
//! high-passed field is deconvolved with the largest radius' kernel 1 − Ŝ_rmax, truncated
//! where |1 − Ŝ| < threshold.
//!
//! Spheres honour anisotropic voxels (offsets measured in mm). The volume is zero-padded
//! to fast FFT sizes (≥ the input size); the field outside the mask is set to zero before
//! filtering, so padding only changes the (periodic) boundary of the final deconvolution.

use rayon::prelude::*;

use num_complex::Complex32;

use super::{crop, pad, sphere_indicator};
use crate::error::{CoreError, CoreResult};
use crate::fft::{fast_len, Fft3Plan};
use crate::grid::{check_voxel_size, Shape3};

/// Default truncation of the deconvolution kernel 1 − Ŝ_rmax.
pub const VSHARP_DEFAULT_THRESHOLD: f64 = 0.05;

/// Default radii in mm: from 12 mm down to one (largest) voxel size in steps of one voxel.
///
/// 12 mm is the usual upper radius (large spheres filter noise and reach deep background
/// fields); one voxel is the smallest sphere that still contains neighbours along every
/// axis, so the final mask loses only the outer shell of the brain.
pub fn default_radii_mm(voxel_size: [f64; 3]) -> Vec<f64> {
    let step = voxel_size.iter().cloned().fold(0.0, f64::max);
    let mut radii = Vec::new();
    let mut r = 12.0f64.max(step);
    while r >= step * (1.0 - 1e-9) {
        radii.push(r);
        r -= step;
    }
    radii
}

/// [`first_fitting_radius`] of a voxel no sphere fits around.
const NO_RADIUS: u16 = u16::MAX;

/// For every voxel of the periodic grid `shape` (the FFT's), the index into `radii_desc`
/// (sorted in decreasing order) of the first radius whose lattice sphere around the voxel
/// (as in [`sphere_indicator`], offsets wrapping around) holds only mask voxels
/// (`mask` nonzero), or [`NO_RADIUS`].
///
/// A sphere of radius r fits around v exactly when the squared distance [mm²] from v to
/// the nearest voxel outside the mask exceeds r², so one separable squared Euclidean
/// distance transform along z, y and then x gives all radii. Only distances up to the
/// largest radius matter, so each pass is a min-plus over the offsets within that reach
/// (exact, and vectorised along z rows), not a general lower-envelope transform. Same
/// result as convolving the mask with each sphere and keeping full counts, in three
/// sweeps instead of one FFT convolution per radius.
pub(super) fn first_fitting_radius(
    mask: &[f32],
    shape: Shape3,
    voxel_size: [f64; 3],
    radii_desc: &[f64],
) -> Vec<u16> {
    let [nx, ny, nz] = shape.0;
    let plane = ny * nz;
    // Same slack as `sphere_indicator`'s membership test d² ≤ r²(1 + 1e-9).
    let limits: Vec<f64> = radii_desc.iter().map(|r| r * r * (1.0 + 1e-9)).collect();
    let cutoff = limits.first().copied().unwrap_or(0.0);
    // Offsets -reach..=reach along an axis, with their squared lengths [mm²].
    let window = |h: f64| -> Vec<(isize, f64)> {
        let reach = (cutoff.sqrt() / h).floor() as isize;
        (-reach..=reach)
            .map(|d| (d, (d as f64 * h).powi(2)))
            .collect()
    };
    let (wx, wy, wz) = (
        window(voxel_size[0]),
        window(voxel_size[1]),
        window(voxel_size[2]),
    );
    let wrap = |c: usize, d: isize, n: usize| (c as isize + d).rem_euclid(n as isize) as usize;

    // Along z: squared distance to the nearest outside voxel of the same row.
    let mut dist = vec![f64::INFINITY; shape.len()];
    let reach_z = wz.len() / 2;
    dist.par_chunks_mut(nz)
        .zip(mask.par_chunks(nz))
        .for_each_init(Vec::new, |ext, (out, row)| {
            // The row's cost (0 outside, +∞ inside) extended periodically by the reach.
            ext.clear();
            ext.extend((0..nz + 2 * reach_z).map(|q| {
                if row[wrap(q, -(reach_z as isize), nz)] == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            }));
            for (o, &(_, w)) in wz.iter().enumerate() {
                for (d, &c) in out.iter_mut().zip(&ext[o..o + nz]) {
                    *d = d.min(w + c);
                }
            }
        });
    // Along y, plane by plane: min over dy of (dy·hy)² + dist(row j + dy).
    dist.par_chunks_mut(plane).for_each(|p| {
        let source = p.to_vec();
        for j in 0..ny {
            let out = &mut p[j * nz..(j + 1) * nz];
            out.fill(f64::INFINITY);
            for &(d, w) in &wy {
                let j2 = wrap(j, d, ny);
                let src = &source[j2 * nz..(j2 + 1) * nz];
                for (o, &v) in out.iter_mut().zip(src) {
                    *o = o.min(w + v);
                }
            }
        }
    });
    // Along x, straight to the radius index.
    let mut first = vec![NO_RADIUS; shape.len()];
    first.par_chunks_mut(plane).enumerate().for_each(|(i, p)| {
        let mut row = vec![f64::INFINITY; nz];
        for j in 0..ny {
            row.fill(f64::INFINITY);
            for &(d, w) in &wx {
                let start = wrap(i, d, nx) * plane + j * nz;
                for (o, &v) in row.iter_mut().zip(&dist[start..start + nz]) {
                    *o = o.min(w + v);
                }
            }
            for (f, &d) in p[j * nz..(j + 1) * nz].iter_mut().zip(&row) {
                if let Some(r) = limits.iter().position(|&l| d > l) {
                    *f = r as u16;
                }
            }
        }
    });
    first
}

/// V-SHARP background field removal.
///
/// `field` total field [ppm], `mask` brain mask (nonzero inside), radii in mm (any
/// order; used from large to small), `threshold` on |1 − Ŝ_rmax|. Returns the local
/// field [ppm] (0 outside the returned mask) and the mask eroded by the smallest sphere.
pub fn vsharp(
    field: &[f32],
    mask: &[u8],
    shape: Shape3,
    voxel_size: [f64; 3],
    radii_mm: &[f64],
    threshold: f64,
) -> CoreResult<(Vec<f32>, Vec<u8>)> {
    shape.check_len(field.len(), "field")?;
    shape.check_len(mask.len(), "mask")?;
    check_voxel_size(voxel_size)?;
    if !mask.iter().any(|&m| m != 0) {
        return Err(CoreError::InvalidArgument("mask is empty".into()));
    }
    if radii_mm.is_empty() || radii_mm.iter().any(|r| !r.is_finite() || *r <= 0.0) {
        return Err(CoreError::InvalidArgument(format!(
            "V-SHARP radii must be a non-empty list of positive mm values, got {radii_mm:?}"
        )));
    }
    if !(threshold.is_finite() && threshold > 0.0 && threshold < 1.0) {
        return Err(CoreError::InvalidArgument(format!(
            "V-SHARP threshold must be in (0, 1), got {threshold}"
        )));
    }
    let mut radii = radii_mm.to_vec();
    radii.sort_by(|a, b| b.total_cmp(a));
    radii.dedup();
    if radii.len() >= NO_RADIUS as usize {
        return Err(CoreError::InvalidArgument(format!(
            "V-SHARP takes at most {} radii, got {}",
            NO_RADIUS - 1,
            radii.len()
        )));
    }

    let padded = Shape3(shape.0.map(fast_len));
    let plan = Fft3Plan::get(padded)?;
    let n = padded.len();
    let mask_f: Vec<f32> = mask
        .par_iter()
        .map(|&m| if m != 0 { 1.0 } else { 0.0 })
        .collect();
    let masked_field: Vec<f32> = field
        .par_iter()
        .zip(mask.par_iter())
        .map(|(&f, &m)| if m != 0 { f } else { 0.0 })
        .collect();
    let mut field_hat = plan.make_spectrum();
    plan.forward(&pad(&masked_field, shape, padded), &mut field_hat)?;

    // Which radius filters each voxel: the largest whose sphere around the voxel lies
    // inside the mask (the erosions are nested), from one distance transform instead
    // of one FFT convolution of the mask per radius.
    let first_radius =
        first_fitting_radius(&pad(&mask_f, shape, padded), padded, voxel_size, &radii);
    let mut local = vec![0.0f32; n];
    let mut sphere_hat = plan.make_spectrum();
    let mut work = plan.make_spectrum();
    let mut real = vec![0.0f32; n];
    let mut largest_kernel: Option<Vec<f32>> = None;

    for (index, &radius) in radii.iter().enumerate() {
        let (sphere, count) = sphere_indicator(padded, voxel_size, radius);
        if count < 2 {
            return Err(CoreError::InvalidArgument(format!(
                "V-SHARP radius {radius} mm is smaller than the voxel size {voxel_size:?}"
            )));
        }
        plan.forward(&sphere, &mut sphere_hat)?;
        // Ŝ of a symmetric sphere is real. High pass (δ − S_r)∗f with the normalised sphere.
        let count_f = count as f32;
        work.par_iter_mut()
            .zip(field_hat.par_iter().zip(sphere_hat.par_iter()))
            .for_each(|(w, (&f, &s))| *w = f * (1.0 - s.re / count_f));
        plan.inverse(&mut work, &mut real)?;
        let index = index as u16;
        local
            .par_iter_mut()
            .zip(first_radius.par_iter().zip(real.par_iter()))
            .for_each(|(l, (&first, &v))| {
                if first == index {
                    *l = v;
                }
            });
        if largest_kernel.is_none() {
            largest_kernel = Some(sphere_hat.iter().map(|s| 1.0 - s.re / count_f).collect());
        }
    }
    // Voxels with a fitting radius form the erosion by the smallest sphere, the final mask.
    let eroded: Vec<bool> = first_radius.par_iter().map(|&f| f != NO_RADIUS).collect();
    let Some(kernel) = largest_kernel else {
        return Err(CoreError::InvalidArgument("no V-SHARP radius".into()));
    };
    let thr = threshold as f32;
    plan.forward(&local, &mut work)?;
    work.par_iter_mut()
        .zip(kernel.par_iter())
        .for_each(|(w, &k)| {
            *w = if k.abs() >= thr {
                *w / k
            } else {
                Complex32::new(0.0, 0.0)
            };
        });
    plan.inverse(&mut work, &mut real)?;
    real.par_iter_mut()
        .zip(eroded.par_iter())
        .for_each(|(v, &e)| {
            if !e {
                *v = 0.0
            }
        });
    let local_field = crop(&real, padded, shape);
    let eroded_f: Vec<f32> = eroded.iter().map(|&e| e as u8 as f32).collect();
    let final_mask = crop(&eroded_f, padded, shape)
        .iter()
        .map(|&v| (v > 0.5) as u8)
        .collect();
    Ok((local_field, final_mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qsm::dipole::forward_field;
    use crate::test_support::geometry;

    #[test]
    fn default_radii_run_from_12mm_to_one_voxel() {
        let r = default_radii_mm([1.0, 1.0, 2.0]);
        assert_eq!(r, vec![12.0, 10.0, 8.0, 6.0, 4.0, 2.0]);
    }

    #[test]
    fn sphere_counts_match_the_lattice() {
        // Radius 1 voxel: centre + 6 face neighbours.
        let (_, c) = sphere_indicator(Shape3([8, 8, 8]), [1.0; 3], 1.0);
        assert_eq!(c, 7);
        // Anisotropic: radius 1 mm with z voxels of 2 mm reaches only x/y neighbours.
        let (_, c) = sphere_indicator(Shape3([8, 8, 8]), [1.0, 1.0, 2.0], 1.0);
        assert_eq!(c, 5);
    }

    #[test]
    fn removes_the_field_of_a_source_outside_the_mask() {
        let n = 40;
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
                    if d2(c, c, c) < 12.0f64.powi(2) {
                        mask[idx] = 1;
                    }
                    // Strong source next to the mask (air/bone stand-in).
                    if d2(c, c, c + 16.0) < 9.0 {
                        chi_out[idx] = 9.0;
                    }
                    if d2(c + 2.0, c - 3.0, c) < 16.0 {
                        chi_in[idx] = 0.1;
                    }
                }
            }
        }
        let vs = [1.0; 3];
        let b0 = [0.0, 0.0, 1.0];
        let bg = forward_field(&chi_out, &geometry(shape, vs, b0)).unwrap();
        let local_true = forward_field(&chi_in, &geometry(shape, vs, b0)).unwrap();
        let total: Vec<f32> = bg.iter().zip(&local_true).map(|(a, b)| a + b).collect();
        let vs_check = |radii: &[f64], tol: f64| {
            let (local, eroded) = vsharp(&total, &mask, shape, vs, radii, 0.05).unwrap();
            assert!(eroded.iter().zip(&mask).all(|(&e, &m)| e == 0 || m != 0));
            // Compare demeaned inside the eroded mask.
            let sel = |v: &[f32]| -> Vec<f64> {
                let xs: Vec<f64> = v
                    .iter()
                    .zip(&eroded)
                    .filter(|(_, &m)| m != 0)
                    .map(|(&x, _)| x as f64)
                    .collect();
                let mean = xs.iter().sum::<f64>() / xs.len() as f64;
                xs.iter().map(|x| x - mean).collect()
            };
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let (l, t, b) = (sel(&local), sel(&local_true), sel(&bg));
            let diff: Vec<f64> = l.iter().zip(&t).map(|(a, b)| a - b).collect();
            // The background dominates the total field, and gets removed.
            assert!(norm(&b) > 1.5 * norm(&t), "{} vs {}", norm(&b), norm(&t));
            assert!(
                norm(&diff) < tol * norm(&t),
                "radii {radii:?}: residual {} vs local {}",
                norm(&diff),
                norm(&t)
            );
        };
        // One radius: SHARP is accurate inside the eroded mask (residual is mostly the
        // lattice field of the source one voxel outside the mask, not exactly harmonic).
        vs_check(&[6.0], 0.25);
        // Several radii reach closer to the edge; edge voxels filtered by small spheres and
        // deconvolved with the largest kernel are the known V-SHARP approximation.
        vs_check(&[6.0, 4.0, 2.0, 1.0], 0.5);
    }

    /// The distance-transform erosion against the definition: every voxel of the
    /// (wrapped) lattice sphere inside the mask, on a small anisotropic periodic grid.
    #[test]
    fn fitting_radius_matches_direct_sphere_erosion() {
        let shape = Shape3([13, 11, 9]);
        let vs = [1.0, 0.8, 1.7];
        let radii = [4.0, 3.2, 2.0, 1.7, 1.0];
        let mut state = 7u64;
        let mask: Vec<f32> = (0..shape.len())
            .map(|v| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                let (i, j, k) = (v / 99, (v / 9) % 11, v % 9);
                let blob = (i as f64 - 6.0).powi(2) / 30.0
                    + (j as f64 - 4.0).powi(2) / 25.0
                    + (k as f64 - 4.0).powi(2) / 20.0;
                // A blob reaching the z faces (wrap-around matters) with a few holes.
                f32::from(blob < 1.0 && (state >> 60) != 0)
            })
            .collect();
        let first = first_fitting_radius(&mask, shape, vs, &radii);
        let spheres: Vec<Vec<f32>> = radii
            .iter()
            .map(|&r| sphere_indicator(shape, vs, r).0)
            .collect();
        let [nx, ny, nz] = shape.0;
        for (v, &got) in first.iter().enumerate() {
            let (i, j, k) = (v / (ny * nz), (v / nz) % ny, v % nz);
            let fits = |sphere: &[f32]| {
                (0..shape.len()).all(|o| {
                    let (a, b, c) = (o / (ny * nz), (o / nz) % ny, o % nz);
                    let u = shape.idx((i + a) % nx, (j + b) % ny, (k + c) % nz);
                    sphere[o] == 0.0 || mask[u] != 0.0
                })
            };
            let expected = spheres
                .iter()
                .position(|s| fits(s))
                .map_or(NO_RADIUS, |r| r as u16);
            assert_eq!(got, expected, "voxel {v}");
        }
        // Not a trivial case: several radii are the first that fits somewhere.
        let mut seen: Vec<u16> = first.clone();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() >= 4, "{seen:?}");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let shape = Shape3([8, 8, 8]);
        let f = vec![0.0; 512];
        let m = vec![1u8; 512];
        assert!(vsharp(&f, &m, shape, [1.0; 3], &[], 0.05).is_err());
        assert!(vsharp(&f, &m, shape, [1.0; 3], &[0.5], 0.05).is_err());
        assert!(vsharp(&f, &vec![0u8; 512], shape, [1.0; 3], &[2.0], 0.05).is_err());
        assert!(vsharp(&f, &m, shape, [1.0; 3], &[2.0], 1.5).is_err());
    }
}

//! Finite-difference operators shared by the inversions: k-space symbols of the periodic
//! forward differences, and gradient, divergence and Laplacian passes (per mm).

use num_complex::Complex32;
use rayon::prelude::*;

use crate::grid::Shape3;

/// k-space symbols of the periodic forward differences along each axis, on the half
/// spectrum: E_a(k) = (exp(2πi·k_a/N_a) − 1) / h_a. Stored per axis (1-D).
pub(crate) fn difference_symbols(shape: Shape3, voxel_size: [f64; 3]) -> [Vec<Complex32>; 3] {
    let [nx, ny, nz] = shape.0;
    let symbol = |n: usize, count: usize, h: f64| -> Vec<Complex32> {
        (0..count)
            .map(|i| {
                let w = 2.0 * std::f64::consts::PI * i as f64 / n as f64;
                Complex32::new(((w.cos() - 1.0) / h) as f32, (w.sin() / h) as f32)
            })
            .collect()
    };
    [
        symbol(nx, nx, voxel_size[0]),
        symbol(ny, ny, voxel_size[1]),
        symbol(nz, nz / 2 + 1, voxel_size[2]),
    ]
}

/// Σₐ|Eₐ(k)|² on the half spectrum: the symbol of ∇ᵀ∇ (minus the 7-point Laplacian) for
/// periodic forward differences scaled by the voxel size [mm⁻²].
pub(crate) fn gradient_energy(shape: Shape3, voxel_size: [f64; 3]) -> Vec<f32> {
    let [ex, ey, ez] = difference_symbols(shape, voxel_size);
    let half = shape.half_spectrum();
    let [_, hy, hz] = half.0;
    let mut out = vec![0.0f32; half.len()];
    out.par_chunks_mut(hy * hz)
        .enumerate()
        .for_each(|(i, plane)| {
            for (j, row) in plane.chunks_mut(hz).enumerate() {
                for (k, v) in row.iter_mut().enumerate() {
                    *v = ex[i].norm_sqr() + ey[j].norm_sqr() + ez[k].norm_sqr();
                }
            }
        });
    out
}

/// Per-voxel 3-vector (x, y, z components) of the ADMM split variables. The iteration
/// keeps the scaled dual u and w = z − u (all the χ-update needs), so the divergence pass
/// reads 12 bytes per voxel and the update pass streams u and w once.
pub(crate) type Vec3 = [f32; 3];

/// Periodic forward differences of `chi` at voxel (i, j, k) divided by the voxel size.
#[inline]
pub(crate) fn gradient_at(
    chi: &[f32],
    shape: Shape3,
    inv_h: [f32; 3],
    i: usize,
    j: usize,
    k: usize,
) -> [f32; 3] {
    let [nx, ny, nz] = shape.0;
    let c = chi[shape.idx(i, j, k)];
    let ip = if i + 1 == nx { 0 } else { i + 1 };
    let jp = if j + 1 == ny { 0 } else { j + 1 };
    let kp = if k + 1 == nz { 0 } else { k + 1 };
    [
        (chi[shape.idx(ip, j, k)] - c) * inv_h[0],
        (chi[shape.idx(i, jp, k)] - c) * inv_h[1],
        (chi[shape.idx(i, j, kp)] - c) * inv_h[2],
    ]
}

/// `out = scale · ∇ᵀw` for periodic forward differences (a backward difference with a
/// sign flip per axis).
pub(crate) fn divergence_into(
    w: &[Vec3],
    shape: Shape3,
    inv_h: [f32; 3],
    scale: f32,
    out: &mut [f32],
) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let im = if i == 0 { nx - 1 } else { i - 1 };
            for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                let jm = if j == 0 { ny - 1 } else { j - 1 };
                let here = &w[shape.idx(i, j, 0)..][..nz];
                let xm = &w[shape.idx(im, j, 0)..][..nz];
                let ym = &w[shape.idx(i, jm, 0)..][..nz];
                let mut zm = here[nz - 1][2];
                for k in 0..nz {
                    let h = here[k];
                    let d = (xm[k][0] - h[0]) * inv_h[0]
                        + (ym[k][1] - h[1]) * inv_h[1]
                        + (zm - h[2]) * inv_h[2];
                    out_row[k] = scale * d;
                    zm = h[2];
                }
            }
        });
}

/// Periodic 7-point Laplacian Σₐ (x[+1] − 2x + x[−1]) / hₐ² (symbol −Σ|Eₐ|²).
pub(crate) fn laplacian_into(x: &[f32], shape: Shape3, inv_h2: [f32; 3], out: &mut [f32]) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let im = if i == 0 { nx - 1 } else { i - 1 };
            let ip = if i + 1 == nx { 0 } else { i + 1 };
            for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                let jm = if j == 0 { ny - 1 } else { j - 1 };
                let jp = if j + 1 == ny { 0 } else { j + 1 };
                let c = &x[shape.idx(i, j, 0)..][..nz];
                let (xm, xp) = (
                    &x[shape.idx(im, j, 0)..][..nz],
                    &x[shape.idx(ip, j, 0)..][..nz],
                );
                let (ym, yp) = (
                    &x[shape.idx(i, jm, 0)..][..nz],
                    &x[shape.idx(i, jp, 0)..][..nz],
                );
                for k in 0..nz {
                    let zm = if k == 0 { c[nz - 1] } else { c[k - 1] };
                    let zp = if k + 1 == nz { c[0] } else { c[k + 1] };
                    let two_c = 2.0 * c[k];
                    out_row[k] = (xm[k] + xp[k] - two_c) * inv_h2[0]
                        + (ym[k] + yp[k] - two_c) * inv_h2[1]
                        + (zm + zp - two_c) * inv_h2[2];
                }
            }
        });
}

/// Periodic forward differences per mm of `x` into `out` (one 3-vector per voxel).
pub(crate) fn gradient_into(x: &[f32], shape: Shape3, inv_h: [f32; 3], out: &mut [Vec3]) {
    scaled_gradient_into(x, shape, inv_h, out, |_| [1.0; 3]);
}

/// `out = g∘∇x` (periodic forward differences per mm, weighted per axis by `g`).
pub(crate) fn weighted_gradient_into(
    x: &[f32],
    g: &[Vec3],
    shape: Shape3,
    inv_h: [f32; 3],
    out: &mut [Vec3],
) {
    scaled_gradient_into(x, shape, inv_h, out, |v| g[v]);
}

/// Forward differences per mm, each axis scaled by `scale(voxel)`; generic so that the
/// unweighted case compiles to plain differences (the multiplications by 1 fold away).
pub(crate) fn scaled_gradient_into<S: Fn(usize) -> Vec3 + Sync>(
    x: &[f32],
    shape: Shape3,
    inv_h: [f32; 3],
    out: &mut [Vec3],
    scale: S,
) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let ip = if i + 1 == nx { 0 } else { i + 1 };
            for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                let jp = if j + 1 == ny { 0 } else { j + 1 };
                let row = shape.idx(i, j, 0);
                let c = &x[row..][..nz];
                let xp = &x[shape.idx(ip, j, 0)..][..nz];
                let yp = &x[shape.idx(i, jp, 0)..][..nz];
                for k in 0..nz {
                    let zp = if k + 1 == nz { c[0] } else { c[k + 1] };
                    let w = scale(row + k);
                    out_row[k] = [
                        (xp[k] - c[k]) * inv_h[0] * w[0],
                        (yp[k] - c[k]) * inv_h[1] * w[1],
                        (zp - c[k]) * inv_h[2] * w[2],
                    ];
                }
            }
        });
}

/// `out = ∇ᵀ(g∘y)`, the adjoint of [`weighted_gradient_into`].
pub(crate) fn weighted_divergence_into(
    y: &[Vec3],
    g: &[Vec3],
    shape: Shape3,
    inv_h: [f32; 3],
    out: &mut [f32],
) {
    let [nx, ny, nz] = shape.0;
    out.par_chunks_mut(ny * nz)
        .enumerate()
        .for_each(|(i, out)| {
            let im = if i == 0 { nx - 1 } else { i - 1 };
            for (j, out_row) in out.chunks_exact_mut(nz).enumerate() {
                let jm = if j == 0 { ny - 1 } else { j - 1 };
                let here = shape.idx(i, j, 0);
                let (xm, ym) = (shape.idx(im, j, 0), shape.idx(i, jm, 0));
                let (yh, gh) = (&y[here..][..nz], &g[here..][..nz]);
                let (yx, gx) = (&y[xm..][..nz], &g[xm..][..nz]);
                let (yy, gy) = (&y[ym..][..nz], &g[ym..][..nz]);
                let mut zm = yh[nz - 1][2] * gh[nz - 1][2];
                for k in 0..nz {
                    let hz = yh[k][2] * gh[k][2];
                    out_row[k] = (yx[k][0] * gx[k][0] - yh[k][0] * gh[k][0]) * inv_h[0]
                        + (yy[k][1] * gy[k][1] - yh[k][1] * gh[k][1]) * inv_h[1]
                        + (zm - hz) * inv_h[2];
                    zm = hz;
                }
            }
        });
}

/// Soft-threshold level t of the TV split's z = soft(∇χ + u, t): one for the whole
/// volume (TV-ADMM, RTS: α/μ) or one per voxel (weighted TV: α·G/μ).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ShrinkThreshold<'a> {
    Uniform(f32),
    PerVoxel(&'a [f32]),
}

/// The fused z/u update of the TV split, one row of the volume at a time: with
/// v = ∇χ + u (periodic forward differences per mm), z = soft(v, t), u ← v − z and
/// w = z − u. Returns (‖χ − χ_prev‖², ‖χ‖²) for the convergence test.
pub(crate) fn shrink_update(
    chi: &[f32],
    chi_prev: &[f32],
    shape: Shape3,
    inv_h: [f32; 3],
    threshold: ShrinkThreshold<'_>,
    u: &mut [Vec3],
    w: &mut [Vec3],
) -> (f64, f64) {
    let [nx, ny, nz] = shape.0;
    u.par_chunks_mut(ny * nz)
        .zip(w.par_chunks_mut(ny * nz))
        .enumerate()
        .map(|(i, (u_plane, w_plane))| {
            let ip = if i + 1 == nx { 0 } else { i + 1 };
            let (mut change, mut norm) = (0.0f64, 0.0f64);
            let rows = u_plane
                .chunks_exact_mut(nz)
                .zip(w_plane.chunks_exact_mut(nz));
            for (j, (u_row, w_row)) in rows.enumerate() {
                let jp = if j + 1 == ny { 0 } else { j + 1 };
                let base = shape.idx(i, j, 0);
                let chi_rows = ChiRows {
                    c: &chi[base..][..nz],
                    cx: &chi[shape.idx(ip, j, 0)..][..nz],
                    cy: &chi[shape.idx(i, jp, 0)..][..nz],
                    prev: &chi_prev[base..][..nz],
                };
                // One monomorphised row loop per kind of threshold, so the uniform one
                // keeps its constant in a register.
                let (row_change, row_norm) = match threshold {
                    ShrinkThreshold::Uniform(t) => shrink_row(chi_rows, inv_h, u_row, w_row, |_| t),
                    ShrinkThreshold::PerVoxel(all) => {
                        let thr = &all[base..][..nz];
                        shrink_row(chi_rows, inv_h, u_row, w_row, |k| thr[k])
                    }
                };
                change += row_change as f64;
                norm += row_norm as f64;
            }
            (change, norm)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// One row of χ (voxels (i, j, ·)), its +x and +y neighbour rows, and the row of the
/// previous iterate.
struct ChiRows<'a> {
    c: &'a [f32],
    cx: &'a [f32],
    cy: &'a [f32],
    prev: &'a [f32],
}

/// [`shrink_update`] on one row; returns the row's (Σ(χ − χ_prev)², Σχ²) in f32.
#[inline(always)]
fn shrink_row(
    rows: ChiRows<'_>,
    inv_h: [f32; 3],
    u_row: &mut [Vec3],
    w_row: &mut [Vec3],
    threshold: impl Fn(usize) -> f32,
) -> (f32, f32) {
    let ChiRows { c, cx, cy, prev } = rows;
    let nz = c.len();
    let (mut row_change, mut row_norm) = (0.0f32, 0.0f32);
    for k in 0..nz {
        let ck = c[k];
        let cz = if k + 1 == nz { c[0] } else { c[k + 1] };
        let g = [
            (cx[k] - ck) * inv_h[0],
            (cy[k] - ck) * inv_h[1],
            (cz - ck) * inv_h[2],
        ];
        // z = soft(v, t) = v − clamp(v, ±t), so u = v − z = clamp(v)
        // and w = z − u = v − 2u: branch-free and vectorisable.
        let t = threshold(k);
        for a in 0..3 {
            let v = g[a] + u_row[k][a];
            let clamped = v.clamp(-t, t);
            u_row[k][a] = clamped;
            w_row[k][a] = v - 2.0 * clamped;
        }
        let d = ck - prev[k];
        row_change += d * d;
        row_norm += ck * ck;
    }
    (row_change, row_norm)
}

//! Deformable brain-surface evolution (BET-like, after Smith 2002, Hum Brain Mapp 17:143).
//!
//! A closed triangle mesh (vertices in mm of the voxel-index frame, i.e. index × voxel
//! size) is moved for a number of iterations by three forces per vertex: tangential
//! smoothing, curvature-dependent normal smoothing and an intensity term from the local
//! minimum/maximum of the image along the inward normal. The Python layer
//! (`alsiron.bet`) computes the thresholds, builds the mesh and rasterises the result;
//! this kernel is the hot loop. Its NumPy twin is `tests/twins_bet.py::evolve`.

use crate::{CoreError, CoreResult, Shape3};
use rayon::prelude::*;

/// Thresholds and force weights of the evolution (units: image intensity and mm).
#[derive(Debug, Clone, Copy)]
pub struct BetSettings {
    /// Robust minimum (background level) of the image.
    pub t2: f64,
    /// Brain/background threshold.
    pub t: f64,
    /// Median brain intensity (caps the local maximum and minimum).
    pub tm: f64,
    /// Fractional intensity threshold in (0, 1).
    pub f: f64,
    /// Number of update steps.
    pub iterations: usize,
    /// Sampling step along the inward normal, mm.
    pub step_mm: f64,
    /// Search depth for the local minimum, mm.
    pub d_min_mm: f64,
    /// Search depth for the local maximum, mm.
    pub d_max_mm: f64,
    /// Radii of curvature bounding the normal-smoothing sigmoid, mm.
    pub r_min_mm: f64,
    pub r_max_mm: f64,
    /// Weight of the intensity force per unit mean edge length.
    pub intensity_step: f64,
    /// Weight of the tangential smoothing.
    pub tangential_step: f64,
    /// Stop early when the mean vertex displacement over the last `SETTLE_WINDOW`
    /// iterations is below this (mm); 0 disables (always run `iterations`).
    pub settle_mm: f64,
}

/// Iterations between two convergence checks.
pub const SETTLE_WINDOW: usize = 100;
/// No convergence check before this many iterations (the surface is still growing).
pub const SETTLE_MIN_ITERATIONS: usize = 300;

/// Unique edges, CSR offsets and neighbour indices of a mesh.
type MeshGraph = (Vec<[usize; 2]>, Vec<usize>, Vec<usize>);

/// Unique undirected edges and per-vertex neighbour lists (CSR) of a triangle mesh.
fn neighbours(n_vertices: usize, faces: &[u32]) -> CoreResult<MeshGraph> {
    let mut edges: Vec<[usize; 2]> = Vec::with_capacity(faces.len());
    for tri in faces.chunks_exact(3) {
        for (a, b) in [(tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0])] {
            let (a, b) = (a as usize, b as usize);
            if a >= n_vertices || b >= n_vertices || a == b {
                return Err(CoreError::InvalidArgument(format!(
                    "face refers to vertex {a}/{b} of {n_vertices}"
                )));
            }
            edges.push(if a < b { [a, b] } else { [b, a] });
        }
    }
    edges.sort_unstable();
    edges.dedup();
    let mut degree = vec![0usize; n_vertices + 1];
    for e in &edges {
        degree[e[0] + 1] += 1;
        degree[e[1] + 1] += 1;
    }
    for i in 0..n_vertices {
        degree[i + 1] += degree[i];
    }
    let offsets = degree;
    let mut fill = offsets.clone();
    let mut list = vec![0usize; offsets[n_vertices]];
    for e in &edges {
        list[fill[e[0]]] = e[1];
        fill[e[0]] += 1;
        list[fill[e[1]]] = e[0];
        fill[e[1]] += 1;
    }
    if (0..n_vertices).any(|v| offsets[v + 1] == offsets[v]) {
        return Err(CoreError::InvalidArgument(
            "mesh has a vertex without neighbours".into(),
        ));
    }
    Ok((edges, offsets, list))
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn vertex(pos: &[f64], i: usize) -> [f64; 3] {
    [pos[3 * i], pos[3 * i + 1], pos[3 * i + 2]]
}

/// Evolve `vertices` (flat `[V][3]`, mm) on the image `mag` (C order, `shape`);
/// returns the number of iterations run.
///
/// Samples outside the image are ignored and vertices are kept within the field of view
/// (half a voxel beyond the edge voxel centres), so a cropped field of view neither
/// collapses the surface nor lets it escape.
pub fn bet_evolve(
    mag: &[f32],
    shape: Shape3,
    voxel_mm: [f64; 3],
    vertices: &mut [f64],
    faces: &[u32],
    s: &BetSettings,
) -> CoreResult<usize> {
    let [nx, ny, nz] = shape.0;
    if mag.len() != nx * ny * nz {
        return Err(CoreError::ShapeMismatch(format!(
            "image has {} values, shape {:?} needs {}",
            mag.len(),
            shape.0,
            nx * ny * nz
        )));
    }
    if vertices.len() % 3 != 0 || faces.len() % 3 != 0 || faces.is_empty() {
        return Err(CoreError::ShapeMismatch(
            "vertices and faces must be [N][3]".into(),
        ));
    }
    if voxel_mm.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(CoreError::InvalidArgument(format!(
            "voxel size {voxel_mm:?}"
        )));
    }
    if !(s.step_mm > 0.0 && s.d_min_mm >= 0.0 && s.r_max_mm > s.r_min_mm && s.r_min_mm > 0.0) {
        return Err(CoreError::InvalidArgument("bad BET settings".into()));
    }
    let nv = vertices.len() / 3;
    let (edges, offsets, list) = neighbours(nv, faces)?;
    let n_depths = ((s.d_min_mm + 1e-9) / s.step_mm).floor() as usize + 1;
    let n_max = (0..n_depths)
        .filter(|&k| k as f64 * s.step_mm <= s.d_max_mm)
        .count();
    let e_curv = 0.5 * (1.0 / s.r_min_mm + 1.0 / s.r_max_mm);
    let f_curv = 6.0 / (1.0 / s.r_min_mm - 1.0 / s.r_max_mm);
    let inv_vsz = [1.0 / voxel_mm[0], 1.0 / voxel_mm[1], 1.0 / voxel_mm[2]];
    let low = [-0.5 * voxel_mm[0], -0.5 * voxel_mm[1], -0.5 * voxel_mm[2]];
    let high = [
        (nx as f64 - 0.5) * voxel_mm[0],
        (ny as f64 - 0.5) * voxel_mm[1],
        (nz as f64 - 0.5) * voxel_mm[2],
    ];
    let dims = [nx as i64, ny as i64, nz as i64];
    let sample = |p: [f64; 3]| -> Option<f32> {
        let mut idx = [0usize; 3];
        for a in 0..3 {
            let i = (p[a] * inv_vsz[a]).round_ties_even();
            if !(i >= 0.0 && i < dims[a] as f64) {
                return None;
            }
            idx[a] = i as usize;
        }
        Some(mag[(idx[0] * ny + idx[1]) * nz + idx[2]])
    };

    let mut normals = vec![0.0f64; 3 * nv];
    let mut next = vec![0.0f64; 3 * nv];
    let mut checkpoint = vertices.to_vec();
    for iteration in 0..s.iterations {
        // Area-weighted vertex normals.
        normals.iter_mut().for_each(|x| *x = 0.0);
        for tri in faces.chunks_exact(3) {
            let (a, b, c) = (tri[0] as usize, tri[1] as usize, tri[2] as usize);
            let pa = vertex(vertices, a);
            let n = cross(sub(vertex(vertices, b), pa), sub(vertex(vertices, c), pa));
            for v in [a, b, c] {
                for k in 0..3 {
                    normals[3 * v + k] += n[k];
                }
            }
        }
        normals.chunks_exact_mut(3).for_each(|n| {
            let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt().max(1e-12);
            n.iter_mut().for_each(|x| *x /= len);
        });
        let mean_edge = edges
            .iter()
            .map(|e| {
                let d = sub(vertex(vertices, e[0]), vertex(vertices, e[1]));
                dot(d, d).sqrt()
            })
            .sum::<f64>()
            / edges.len() as f64;
        if !(mean_edge.is_finite() && mean_edge > 0.0) {
            return Err(CoreError::InvalidArgument(
                "the surface degenerated (zero or non-finite edge length)".into(),
            ));
        }
        let pos: &[f64] = vertices;
        let normals_ref: &[f64] = &normals;
        next.par_chunks_mut(3).enumerate().for_each(|(v, out)| {
            let p = vertex(pos, v);
            let n = vertex(normals_ref, v);
            let nb = &list[offsets[v]..offsets[v + 1]];
            let mut mean = [0.0f64; 3];
            for &j in nb {
                for k in 0..3 {
                    mean[k] += pos[3 * j + k];
                }
            }
            let inv_deg = 1.0 / nb.len() as f64;
            let sv = [
                mean[0] * inv_deg - p[0],
                mean[1] * inv_deg - p[1],
                mean[2] * inv_deg - p[2],
            ];
            let sn_len = dot(sv, n);
            let s_n = [sn_len * n[0], sn_len * n[1], sn_len * n[2]];
            let s_t = sub(sv, s_n);
            let inv_r = 2.0 * sn_len.abs() / (mean_edge * mean_edge);
            let f2 = 0.5 * (1.0 + (f_curv * (inv_r - e_curv)).tanh());
            let mut lo = f64::INFINITY;
            let mut hi = f64::NEG_INFINITY;
            for k in 0..n_depths {
                let d = k as f64 * s.step_mm;
                let q = [p[0] - d * n[0], p[1] - d * n[1], p[2] - d * n[2]];
                if let Some(value) = sample(q) {
                    let value = value as f64;
                    lo = lo.min(value);
                    if k < n_max {
                        hi = hi.max(value);
                    }
                }
            }
            let i_min = s.t2.max(s.tm.min(lo));
            let i_max = s.tm.min(s.t.max(hi));
            let local_t = s.t2 + s.f * (i_max - s.t2);
            let f3 = 2.0 * (i_min - local_t) / (i_max - s.t2).max(1e-12);
            let step3 = s.intensity_step * mean_edge * f3;
            for k in 0..3 {
                let moved = p[k] + s.tangential_step * s_t[k] + f2 * s_n[k] + step3 * n[k];
                out[k] = moved.clamp(low[k], high[k]);
            }
        });
        vertices.copy_from_slice(&next);
        let done = iteration + 1;
        if s.settle_mm > 0.0 && done % SETTLE_WINDOW == 0 {
            let moved = vertices
                .chunks_exact(3)
                .zip(checkpoint.chunks_exact(3))
                .map(|(a, b)| {
                    let d = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
                    dot(d, d).sqrt()
                })
                .sum::<f64>()
                / nv as f64;
            if done >= SETTLE_MIN_ITERATIONS && moved < s.settle_mm {
                return Ok(done);
            }
            checkpoint.copy_from_slice(vertices);
        }
    }
    Ok(s.iterations)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Icosahedron subdivided once (42 vertices), scaled and centred.
    fn sphere_mesh(radius: f64, centre: [f64; 3]) -> (Vec<f64>, Vec<u32>) {
        let g = (1.0 + 5f64.sqrt()) / 2.0;
        let mut v: Vec<[f64; 3]> = vec![
            [-1., g, 0.],
            [1., g, 0.],
            [-1., -g, 0.],
            [1., -g, 0.],
            [0., -1., g],
            [0., 1., g],
            [0., -1., -g],
            [0., 1., -g],
            [g, 0., -1.],
            [g, 0., 1.],
            [-g, 0., -1.],
            [-g, 0., 1.],
        ];
        let faces: Vec<[usize; 3]> = vec![
            [0, 11, 5],
            [0, 5, 1],
            [0, 1, 7],
            [0, 7, 10],
            [0, 10, 11],
            [1, 5, 9],
            [5, 11, 4],
            [11, 10, 2],
            [10, 7, 6],
            [7, 1, 8],
            [3, 9, 4],
            [3, 4, 2],
            [3, 2, 6],
            [3, 6, 8],
            [3, 8, 9],
            [4, 9, 5],
            [2, 4, 11],
            [6, 2, 10],
            [8, 6, 7],
            [9, 8, 1],
        ];
        let mut mid = std::collections::HashMap::new();
        let mut out = Vec::new();
        for t in faces {
            let mut m = [0usize; 3];
            for (slot, (a, b)) in [(t[0], t[1]), (t[1], t[2]), (t[2], t[0])]
                .into_iter()
                .enumerate()
            {
                let key = (a.min(b), a.max(b));
                m[slot] = *mid.entry(key).or_insert_with(|| {
                    v.push([
                        (v[a][0] + v[b][0]) / 2.0,
                        (v[a][1] + v[b][1]) / 2.0,
                        (v[a][2] + v[b][2]) / 2.0,
                    ]);
                    v.len() - 1
                });
            }
            for tri in [
                [t[0], m[0], m[2]],
                [m[0], t[1], m[1]],
                [m[2], m[1], t[2]],
                [m[0], m[1], m[2]],
            ] {
                out.extend(tri.iter().map(|&i| i as u32));
            }
        }
        let mut flat = Vec::new();
        for p in v {
            let len = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
            for k in 0..3 {
                flat.push(centre[k] + radius * p[k] / len);
            }
        }
        (flat, out)
    }

    fn settings() -> BetSettings {
        BetSettings {
            t2: 0.0,
            t: 0.1,
            tm: 1.0,
            f: 0.5,
            iterations: 200,
            step_mm: 1.0,
            d_min_mm: 20.0,
            d_max_mm: 10.0,
            r_min_mm: 3.33,
            r_max_mm: 10.0,
            intensity_step: 0.05,
            tangential_step: 0.5,
            settle_mm: 0.0,
        }
    }

    #[test]
    fn surface_grows_inside_a_bright_ball_and_stays_inside() {
        let n = 40usize;
        let shape = Shape3([n, n, n]);
        let c = 20.0;
        let mut mag = vec![0.0f32; n * n * n];
        for i in 0..n {
            for j in 0..n {
                for k in 0..n {
                    let r2 =
                        (i as f64 - c).powi(2) + (j as f64 - c).powi(2) + (k as f64 - c).powi(2);
                    if r2 <= 14.0f64.powi(2) {
                        mag[(i * n + j) * n + k] = 1.0;
                    }
                }
            }
        }
        let (mut v, f) = sphere_mesh(6.0, [c, c, c]);
        bet_evolve(&mag, shape, [1.0; 3], &mut v, &f, &settings()).unwrap();
        for p in v.chunks_exact(3) {
            let r = ((p[0] - c).powi(2) + (p[1] - c).powi(2) + (p[2] - c).powi(2)).sqrt();
            assert!(r > 10.0 && r < 16.0, "vertex at radius {r}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (mut v, f) = sphere_mesh(1.5, [2.0; 3]);
        let mag = vec![0.0f32; 10];
        assert!(bet_evolve(&mag, Shape3([4, 4, 4]), [1.0; 3], &mut v, &f, &settings()).is_err());
        let mag = vec![0.0f32; 64];
        let bad_faces = vec![0u32, 1, 99];
        assert!(bet_evolve(
            &mag,
            Shape3([4, 4, 4]),
            [1.0; 3],
            &mut v,
            &bad_faces,
            &settings()
        )
        .is_err());
        assert!(bet_evolve(
            &mag,
            Shape3([4, 4, 4]),
            [0.0, 1.0, 1.0],
            &mut v,
            &f,
            &settings()
        )
        .is_err());
    }
}

//! Exact spatial phase unwrapping of a 3-D volume by quality-guided region growing.
//!
//! The idea follows ROMEO (Dymerska et al., MRM 2021): every pair of 6-neighbours is
//! joined by an edge whose quality says how safe it is to unwrap one voxel from the
//! other; voxels are then reached one by one along the best remaining edge, starting
//! from a high-quality seed. Each newly reached voxel `t` reached from `s` takes
//! `φ_t + 2π·round((φ̃_s − φ_t)/2π)`, so the result differs from the input by exact
//! multiples of 2π ("exact" unwrapping: nothing is smoothed).
//!
//! Edge quality in [0, 1] is the product of
//! - phase coherence `1 − |wrap(φ_i − φ_j)|/π` (small wrapped differences are safe),
//! - magnitude coherence `min(m_i, m_j)/max(m_i, m_j)` (similar magnitudes),
//! - magnitude weight `min(1, min(m_i, m_j)/m_ref)` with `m_ref` the 90th percentile of the
//!   magnitude inside the mask (bright voxels have low phase noise).
//!
//! - with a second echo (ROMEO's multi-echo weight), phase-gradient coherence
//!   `max(0, 1 − |wrap(Δφ_a) − wrap(Δφ_b)·TE_a/TE_b|)`: the spatial phase step of the
//!   echo being unwrapped must agree with that of the other echo scaled to its echo time
//!   (a wrap or a noise jump in one of them breaks the agreement).
//!
//! Without a magnitude only phase coherence is used. Qualities are quantised to 256 cost
//! bins, so the priority queue is an array of 256 stacks and the whole growth is O(N).
//!
//! Disconnected parts of the mask are grown one after the other, each from its own
//! best voxel; each part is therefore determined up to its own constant 2πk (the seed
//! keeps its wrapped value). Voxels outside the mask or with non-finite phase (or
//! magnitude) are never reached and are returned unchanged (the input value).

use crate::error::{CoreError, CoreResult};
use crate::grid::Shape3;
use rayon::prelude::*;
use std::f64::consts::PI;

const TWO_PI: f64 = 2.0 * PI;
const N_BINS: usize = 256;

/// Round to the nearest integer (ties to even) without a libm call: the baseline x86-64
/// target has no rounding instruction, and `f64::round` dominated the unwrapping time.
/// Exact for |x| < 2^51; NaN stays NaN.
#[inline(always)]
pub fn round_fast(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    if x.abs() < 2_251_799_813_685_248.0 {
        (x + MAGIC) - MAGIC
    } else {
        x.round()
    }
}

/// Wrap an angle to [−π, π].
#[inline(always)]
pub fn wrap_angle(x: f64) -> f64 {
    x - TWO_PI * round_fast(x * (1.0 / TWO_PI))
}

/// Unwrap a wrapped 3-D phase [rad] (C order, `shape`), optionally guided by a magnitude
/// and restricted to a mask (nonzero = inside; `None` = everywhere).
///
/// Returns the unwrapped phase; voxels outside the mask or with non-finite input keep
/// their input value.
pub fn unwrap_phase_3d(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    mask: Option<&[u8]>,
    shape: Shape3,
) -> CoreResult<Vec<f32>> {
    unwrap_with_components(phase, magnitude, mask, shape).map(|u| u.phase)
}

/// A second echo for ROMEO's phase-gradient-coherence weight: its wrapped phase [rad]
/// (same shape as the phase being unwrapped) and `te_ratio = TE_unwrapped / TE_second`.
#[derive(Debug, Clone, Copy)]
pub struct SecondEcho<'a> {
    pub phase: &'a [f32],
    pub te_ratio: f32,
}

/// Result of [`unwrap_with_components`].
#[derive(Debug, Clone)]
pub struct Unwrapped {
    /// Unwrapped phase [rad]; unreached voxels keep their input value.
    pub phase: Vec<f32>,
    /// Flat indices of the reached voxels in the order they were reached.
    pub visit_order: Vec<u32>,
    /// `visit_order[component_starts[c]..component_starts[c + 1]]` is the c-th
    /// connected part (its first voxel is the seed); the last entry is `visit_order.len()`.
    pub component_starts: Vec<usize>,
}

impl Unwrapped {
    /// Number of separately grown parts.
    pub fn n_components(&self) -> usize {
        self.component_starts.len().saturating_sub(1)
    }

    /// Voxel indices of the c-th part.
    pub fn component(&self, c: usize) -> &[u32] {
        &self.visit_order[self.component_starts[c]..self.component_starts[c + 1]]
    }

    /// Per-voxel flag: true where the voxel was reached (unwrapped).
    pub fn reached(&self, n_voxels: usize) -> Vec<bool> {
        let mut reached = vec![false; n_voxels];
        for &v in &self.visit_order {
            reached[v as usize] = true;
        }
        reached
    }
}

/// Unwrapping as in [`unwrap_phase_3d`], also returning which voxels form each
/// separately grown part, so callers can fix the 2πk ambiguity of each part.
pub fn unwrap_with_components(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    mask: Option<&[u8]>,
    shape: Shape3,
) -> CoreResult<Unwrapped> {
    unwrap_romeo(phase, magnitude, None, mask, shape)
}

/// Unwrapping as in [`unwrap_with_components`] with, optionally, the phase-gradient
/// coherence of a second echo in the edge quality (ROMEO's multi-echo weights).
pub fn unwrap_romeo(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    second: Option<SecondEcho<'_>>,
    mask: Option<&[u8]>,
    shape: Shape3,
) -> CoreResult<Unwrapped> {
    shape.check_len(phase.len(), "phase")?;
    if let Some(s) = second {
        shape.check_len(s.phase.len(), "second-echo phase")?;
        if !(s.te_ratio.is_finite() && s.te_ratio > 0.0) {
            return Err(CoreError::InvalidArgument(format!(
                "echo-time ratio must be positive and finite, got {}",
                s.te_ratio
            )));
        }
    }
    if let Some(m) = magnitude {
        shape.check_len(m.len(), "magnitude")?;
    }
    if let Some(m) = mask {
        shape.check_len(m.len(), "mask")?;
    }
    let n = shape.len();
    // Queue entries pack (voxel index, direction of the source) into a u32.
    if n > u32::MAX as usize / 8 {
        return Err(CoreError::InvalidArgument(format!(
            "volume of {n} voxels is too large for the unwrapper (max {})",
            u32::MAX as usize / 8
        )));
    }

    let active: Vec<bool> = (0..n)
        .into_par_iter()
        .map(|i| {
            let inside = match mask {
                Some(m) => m[i] != 0,
                None => true,
            };
            let finite_mag = match magnitude {
                Some(m) => m[i].is_finite(),
                None => true,
            };
            let finite_second = match second {
                Some(s) => s.phase[i].is_finite(),
                None => true,
            };
            inside && finite_mag && finite_second && phase[i].is_finite()
        })
        .collect();

    let m_ref = magnitude.map(|m| magnitude_reference(m, &active));
    let costs = edge_costs(phase, magnitude, second, m_ref, &active, shape);
    let order = seed_order(&costs, &active);
    Ok(grow(phase, &costs, &active, &order, shape))
}

/// 90th percentile of the magnitude over active voxels (1 when there is none or it is ≤ 0).
///
/// Large volumes are subsampled (every 7th voxel, a stride coprime with typical matrix
/// sizes): a percentile of a million voxels is as good a reference as one of all, and the
/// selection was a visible part of the unwrapping time.
fn magnitude_reference(mag: &[f32], active: &[bool]) -> f32 {
    let stride = if mag.len() > (1 << 21) { 7 } else { 1 };
    let mut vals: Vec<f32> = mag
        .iter()
        .zip(active)
        .step_by(stride)
        .filter(|(_, &a)| a)
        .map(|(&m, _)| m.abs())
        .collect();
    if vals.is_empty() {
        return 1.0;
    }
    let k = (vals.len() * 9) / 10;
    let k = k.min(vals.len() - 1);
    let (_, v, _) = vals.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    if *v > 0.0 && v.is_finite() {
        *v
    } else {
        1.0
    }
}

/// Cost marking "no edge": the neighbour is outside the volume or inactive.
const NO_EDGE: u8 = u8::MAX;

/// Costs in 0..=254 (0 best) of the six edges of every voxel: `costs[6*v + e]` joins voxel
/// `v` to its neighbour `v + stride[e]` (e = 0..3, along axis e) or `v − stride[e−3]`
/// (e = 3..6). Edges leaving the volume or touching an inactive voxel are [`NO_EDGE`].
/// Each edge is stored from both ends so the growth reads one record per voxel.
fn edge_costs(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    second: Option<SecondEcho<'_>>,
    m_ref: Option<f32>,
    active: &[bool],
    shape: Shape3,
) -> Vec<u8> {
    let [nx, ny, nz] = shape.0;
    let dims = [nx, ny, nz];
    let strides = [ny * nz, nz, 1];
    let plane = ny * nz;
    let inv_ref = 1.0 / m_ref.unwrap_or(1.0);
    let cost = |v: usize, u: usize| -> u8 {
        // f32 is plenty here: the quality is quantised to 255 levels.
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: round to nearest for |x| < 2^22
        let d = (phase[u] - phase[v]) * std::f32::consts::FRAC_1_PI * 0.5;
        let turns = (d + MAGIC) - MAGIC;
        let step_turns = d - turns;
        let mut q = 1.0 - 2.0 * step_turns.abs();
        if let Some(s) = second {
            let d2 = (s.phase[u] - s.phase[v]) * std::f32::consts::FRAC_1_PI * 0.5;
            let step2_turns = d2 - ((d2 + MAGIC) - MAGIC);
            // Both wrapped steps in radians: 2π·turns.
            let mismatch = 2.0 * std::f32::consts::PI * (step_turns - step2_turns * s.te_ratio);
            q *= (1.0 - mismatch.abs()).max(0.0);
        }
        if let Some(m) = magnitude {
            let (a, b) = (m[u].abs(), m[v].abs());
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            let coherence = if hi > 0.0 { lo / hi } else { 0.0 };
            q *= coherence * (lo * inv_ref).min(1.0);
        }
        let q = q.clamp(0.0, 1.0);
        ((1.0 - q) * 254.0 + 0.5) as u8
    };
    // Pass 1: each edge once, stored at its lower end (forward direction).
    let mut forward = vec![NO_EDGE; 3 * shape.len()];
    forward
        .par_chunks_mut(3 * plane)
        .enumerate()
        .for_each(|(i, chunk)| {
            for j in 0..ny {
                for k in 0..nz {
                    let v = shape.idx(i, j, k);
                    if !active[v] {
                        continue;
                    }
                    let coords = [i, j, k];
                    for d in 0..3 {
                        if coords[d] + 1 < dims[d] && active[v + strides[d]] {
                            chunk[3 * (j * nz + k) + d] = cost(v, v + strides[d]);
                        }
                    }
                }
            }
        });
    // Pass 2: six-entry records, the backward edges copied from the neighbours below.
    let mut costs = vec![NO_EDGE; 6 * shape.len()];
    costs
        .par_chunks_mut(6 * plane)
        .enumerate()
        .for_each(|(i, chunk)| {
            for j in 0..ny {
                for k in 0..nz {
                    let v = shape.idx(i, j, k);
                    let record = &mut chunk[6 * (j * nz + k)..6 * (j * nz + k) + 6];
                    record[..3].copy_from_slice(&forward[3 * v..3 * v + 3]);
                    let coords = [i, j, k];
                    for d in 0..3 {
                        if coords[d] > 0 {
                            record[3 + d] = forward[3 * (v - strides[d]) + d];
                        }
                    }
                }
            }
        });
    costs
}

/// Active voxels ordered by decreasing seed quality (sum of the qualities of their
/// usable edges), by counting sort. The first not-yet-reached voxel of this list is the
/// best seed of the part of the mask it belongs to.
fn seed_order(costs: &[u8], active: &[bool]) -> Vec<u32> {
    const MAX_SCORE: usize = 6 * 255;
    let scores: Vec<u16> = costs
        .par_chunks(6)
        .zip(active.par_iter())
        .map(|(record, &a)| {
            if !a {
                return 0;
            }
            record
                .iter()
                .filter(|&&c| c != NO_EDGE)
                .map(|&c| 255 - c as u16)
                .sum()
        })
        .collect();
    let mut counts = vec![0usize; MAX_SCORE + 2];
    for (v, &s) in scores.iter().enumerate() {
        if active[v] {
            counts[MAX_SCORE - s as usize + 1] += 1;
        }
    }
    for b in 1..counts.len() {
        counts[b] += counts[b - 1];
    }
    let total = counts[MAX_SCORE + 1];
    let mut order = vec![0u32; total];
    for (v, &s) in scores.iter().enumerate() {
        if active[v] {
            let slot = &mut counts[MAX_SCORE - s as usize];
            order[*slot] = v as u32;
            *slot += 1;
        }
    }
    order
}

/// Region growing through the bucketed priority queue.
///
/// Memory traffic dominates, so the loop touches as little as possible: one byte of
/// state per voxel (inactive / pending / done), the output array (which still holds the
/// raw phase of voxels not yet reached) and the edge costs; membership of the parts is
/// recorded as the (sequentially written) visit order rather than a label volume.
fn grow(phase: &[f32], costs: &[u8], active: &[bool], order: &[u32], shape: Shape3) -> Unwrapped {
    const INACTIVE: u8 = 0;
    const PENDING: u8 = 1;
    const DONE: u8 = 2;
    let [_, ny, nz] = shape.0;
    let strides = [ny * nz, nz, 1];
    let mut out = phase.to_vec();
    let mut visit_order: Vec<u32> = Vec::with_capacity(order.len());
    let mut component_starts = Vec::new();
    let mut state: Vec<u8> = active
        .iter()
        .map(|&a| if a { PENDING } else { INACTIVE })
        .collect();
    let mut buckets: Vec<Vec<u32>> = (0..N_BINS).map(|_| Vec::new()).collect();

    // Push the edges from a freshly reached voxel `v` to its pending neighbours.
    // Entry = target * 8 + e, with e the edge index seen from the target: the source is
    // target − stride[e] (e = 0..3) or target + stride[e − 3] (e = 3..6).
    let offsets: [isize; 6] = [
        strides[0] as isize,
        strides[1] as isize,
        strides[2] as isize,
        -(strides[0] as isize),
        -(strides[1] as isize),
        -(strides[2] as isize),
    ];
    let push_neighbours = |v: usize, state: &[u8], buckets: &mut [Vec<u32>], top: &mut usize| {
        let record = &costs[6 * v..6 * v + 6];
        for e in 0..6 {
            let c = record[e];
            if c == NO_EDGE {
                continue;
            }
            let u = v.wrapping_add_signed(offsets[e]);
            if state[u] == PENDING {
                let c = c as usize;
                // u = v ± stride, so the source seen from u is u ∓ stride: same code e.
                buckets[c].push((u * 8 + e) as u32);
                *top = (*top).min(c);
            }
        }
    };

    for &seed in order {
        let seed = seed as usize;
        if state[seed] != PENDING {
            continue;
        }
        component_starts.push(visit_order.len());
        state[seed] = DONE;
        visit_order.push(seed as u32);
        let mut top = N_BINS;
        push_neighbours(seed, &state, &mut buckets, &mut top);
        while top < N_BINS {
            let Some(entry) = buckets[top].pop() else {
                top += 1;
                continue;
            };
            let t = (entry >> 3) as usize;
            if state[t] != PENDING {
                continue;
            }
            let dir = (entry & 7) as usize;
            let s = if dir < 3 {
                t - strides[dir]
            } else {
                t + strides[dir - 3]
            };
            let raw = out[t] as f64;
            let k = round_fast((out[s] as f64 - raw) * (1.0 / TWO_PI));
            out[t] = (raw + TWO_PI * k) as f32;
            state[t] = DONE;
            visit_order.push(t as u32);
            push_neighbours(t, &state, &mut buckets, &mut top);
        }
    }
    component_starts.push(visit_order.len());
    Unwrapped {
        phase: out,
        visit_order,
        component_starts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smooth_phase(shape: Shape3) -> Vec<f64> {
        let [nx, ny, nz] = shape.0;
        let mut v = Vec::with_capacity(shape.len());
        for i in 0..nx {
            for j in 0..ny {
                for k in 0..nz {
                    let (x, y, z) = (i as f64, j as f64, k as f64);
                    // Up to ~30 rad across the volume: many wraps, gradients < π per voxel.
                    v.push(0.9 * x + 0.02 * (y - 10.0).powi(2) - 0.5 * z + 2.0 * (0.3 * x).sin());
                }
            }
        }
        v
    }

    fn wrapped(truth: &[f64]) -> Vec<f32> {
        truth.iter().map(|&t| wrap_angle(t) as f32).collect()
    }

    /// Unwrapped − truth must be one constant multiple of 2π over the given voxels.
    fn assert_exact(out: &[f32], truth: &[f64], keep: impl Fn(usize) -> bool) {
        let mut offset = None;
        for (i, (&o, &t)) in out.iter().zip(truth).enumerate() {
            if !keep(i) {
                continue;
            }
            let d = o as f64 - t;
            let k = (d / TWO_PI).round();
            assert!(
                (d - k * TWO_PI).abs() < 1e-4,
                "voxel {i}: not a 2π multiple ({d})"
            );
            match offset {
                None => offset = Some(k),
                Some(k0) => assert_eq!(k0, k, "voxel {i}: offset {k} differs from {k0}"),
            }
        }
    }

    #[test]
    fn recovers_smooth_phase_with_many_wraps() {
        let shape = Shape3([24, 20, 16]);
        let truth = smooth_phase(shape);
        let out = unwrap_phase_3d(&wrapped(&truth), None, None, shape).unwrap();
        assert_exact(&out, &truth, |_| true);
        let span = truth.iter().cloned().fold(f64::MIN, f64::max)
            - truth.iter().cloned().fold(f64::MAX, f64::min);
        assert!(span > 4.0 * TWO_PI, "only {span} rad");
    }

    #[test]
    fn invariant_to_adding_two_pi_and_uses_magnitude() {
        let shape = Shape3([16, 18, 12]);
        let truth = smooth_phase(shape);
        let w = wrapped(&truth);
        let mag: Vec<f32> = (0..shape.len()).map(|i| 1.0 + (i % 7) as f32).collect();
        let a = unwrap_phase_3d(&w, Some(&mag), None, shape).unwrap();
        let shifted: Vec<f32> = w.iter().map(|&p| p + TWO_PI as f32).collect();
        let b = unwrap_phase_3d(&shifted, Some(&mag), None, shape).unwrap();
        // Same seed, same path: results differ by exactly the constant 2π added.
        for (x, y) in a.iter().zip(&b) {
            assert!((y - x - TWO_PI as f32).abs() < 1e-4);
        }
        assert_exact(&a, &truth, |_| true);
    }

    #[test]
    fn separate_components_and_outside_mask() {
        let shape = Shape3([20, 10, 10]);
        let truth = smooth_phase(shape);
        let w = wrapped(&truth);
        // Two slabs separated by an empty plane at i = 10; one NaN voxel inside.
        let mut mask: Vec<u8> = (0..shape.len()).map(|v| u8::from(v / 100 != 10)).collect();
        mask[0] = 1;
        let mut w_nan = w.clone();
        w_nan[shape.idx(15, 5, 5)] = f32::NAN;
        let unwrapped = unwrap_with_components(&w_nan, None, Some(&mask), shape).unwrap();
        let out = &unwrapped.phase;
        let nan_voxel = shape.idx(15, 5, 5);
        assert!(out[nan_voxel].is_nan() && !unwrapped.reached(shape.len())[nan_voxel]);
        assert_eq!(unwrapped.n_components(), 2);
        let sizes = [unwrapped.component(0).len(), unwrapped.component(1).len()];
        assert_eq!(sizes[0] + sizes[1], 1900 - 1);
        assert_exact(out, &truth, |v| v / 100 < 10);
        assert_exact(out, &truth, |v| v / 100 > 10 && v != nan_voxel);
        for v in 1000..1100 {
            assert_eq!(out[v], w[v], "outside-mask voxel changed");
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let shape = Shape3([4, 4, 4]);
        assert!(unwrap_phase_3d(&[0.0; 63], None, None, shape).is_err());
        assert!(unwrap_phase_3d(&[0.0; 64], Some(&[1.0; 10]), None, shape).is_err());
        assert!(unwrap_phase_3d(&[0.0; 64], None, Some(&[1; 3]), shape).is_err());
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release -p alsiron-core unwrap_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn unwrap_timing() {
        let shape = Shape3([256, 256, 176]);
        let [nx, ny, nz] = shape.0;
        let mut truth = Vec::with_capacity(shape.len());
        let mut mag = Vec::with_capacity(shape.len());
        for i in 0..nx {
            for j in 0..ny {
                for k in 0..nz {
                    let (x, y, z) = (
                        i as f64 / 128.0 - 1.0,
                        j as f64 / 128.0 - 1.0,
                        k as f64 / 88.0 - 1.0,
                    );
                    truth.push(40.0 * x * x + 30.0 * y * z + 20.0 * (3.0 * z).sin());
                    mag.push(1.0 + 0.1 * (((i * 7 + j * 13 + k * 31) % 17) as f32 / 17.0));
                }
            }
        }
        let phase: Vec<f32> = truth.iter().map(|&t| wrap_angle(t) as f32).collect();
        for _ in 0..2 {
            let t0 = std::time::Instant::now();
            let active = vec![true; shape.len()];
            let m_ref = magnitude_reference(&mag, &active);
            let t1 = t0.elapsed();
            let costs = edge_costs(&phase, Some(&mag), None, Some(m_ref), &active, shape);
            let t2 = t0.elapsed();
            let order = seed_order(&costs, &active);
            let t3 = t0.elapsed();
            let out = grow(&phase, &costs, &active, &order, shape);
            let t4 = t0.elapsed();
            eprintln!(
                "m_ref {t1:?} costs {t2:?} seeds {t3:?} grow {t4:?} ({} parts)",
                out.n_components()
            );
        }
    }
}

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

    // One byte of growth state per voxel (see `grow`); before the growth it only says
    // whether the voxel can be reached at all.
    let mut state: Vec<u8> = (0..n)
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
            if inside && finite_mag && finite_second && phase[i].is_finite() {
                OPEN
            } else {
                CLOSED
            }
        })
        .collect();

    let m_ref = magnitude.map(|m| magnitude_reference(m, &state));
    let inputs = CostInputs {
        phase,
        magnitude,
        second,
        inv_ref: 1.0 / m_ref.unwrap_or(1.0),
    };
    let (costs, first_seed) = edge_costs(&inputs, &state, shape);
    Ok(grow(phase, &costs, &mut state, first_seed, shape))
}

/// 90th percentile of the magnitude over usable voxels (1 when there is none or it is ≤ 0).
///
/// Large volumes are subsampled (every 7th voxel, a stride coprime with typical matrix
/// sizes): a percentile of a million voxels is as good a reference as one of all, and the
/// selection was a visible part of the unwrapping time.
fn magnitude_reference(mag: &[f32], state: &[u8]) -> f32 {
    let stride = if mag.len() > (1 << 21) { 7 } else { 1 };
    let mut vals: Vec<f32> = mag
        .iter()
        .zip(state)
        .step_by(stride)
        .filter(|(_, &s)| s != CLOSED)
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

/// Growth state of a voxel that is done (reached) or never reachable.
const CLOSED: u8 = 0;
/// Growth state of a reachable voxel with no edge queued towards it. A reachable voxel
/// whose best queued edge costs `c` has state `c + 1` (see `grow`).
const OPEN: u8 = u8::MAX;

/// What the edge quality is made of (see the module documentation).
struct CostInputs<'a> {
    phase: &'a [f32],
    magnitude: Option<&'a [f32]>,
    second: Option<SecondEcho<'a>>,
    /// 1 / reference magnitude.
    inv_ref: f32,
}

/// Quantised cost in 0..=254 (0 best) of the edge from voxel `a` to voxel `b`, given the
/// phases `pa`, `pb`, magnitudes `ma`, `mb` and second-echo phases `sa`, `sb` of both ends.
/// Every caller passes the lower-index voxel as `a`, so both ends of an edge see
/// bit-identical costs. Branch-free so that rows of edges vectorise; values for unusable
/// voxels are garbage (never NaN-trapping) and masked by the caller.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn quantised_cost<const MAG: bool, const SECOND: bool>(
    pa: f32,
    pb: f32,
    ma: f32,
    mb: f32,
    sa: f32,
    sb: f32,
    te_ratio: f32,
    inv_ref: f32,
) -> u8 {
    // f32 is plenty here: the quality is quantised to 255 levels.
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: round to nearest for |x| < 2^22
                                     // Wrapped differences in turns: no trigonometry needed.
    let d = (pb - pa) * std::f32::consts::FRAC_1_PI * 0.5;
    let step_turns = d - ((d + MAGIC) - MAGIC);
    let mut q = 1.0 - 2.0 * step_turns.abs();
    if SECOND {
        let d2 = (sb - sa) * std::f32::consts::FRAC_1_PI * 0.5;
        let step2_turns = d2 - ((d2 + MAGIC) - MAGIC);
        // Both wrapped steps in radians: 2π·turns.
        let mismatch = 2.0 * std::f32::consts::PI * (step_turns - step2_turns * te_ratio);
        q *= (1.0 - mismatch.abs()).max(0.0);
    }
    if MAG {
        let (a, b) = (mb.abs(), ma.abs());
        let (lo, hi) = (a.min(b), a.max(b));
        let coherence = if hi > 0.0 { lo / hi } else { 0.0 };
        q *= coherence * (lo * inv_ref).min(1.0);
    }
    let q = q.clamp(0.0, 1.0);
    ((1.0 - q) * 254.0 + 0.5) as u8
}

/// `out[k]` = cost of the edge from voxel `a0 + k` to voxel `b0 + k` (`a0 < b0`).
fn cost_run(inputs: &CostInputs<'_>, a0: usize, b0: usize, out: &mut [u8]) {
    // Absent inputs are replaced by the phase (never read: the flags switch them off).
    let mag = inputs.magnitude.unwrap_or(inputs.phase);
    let (second, te_ratio) = match inputs.second {
        Some(s) => (s.phase, s.te_ratio),
        None => (inputs.phase, 1.0),
    };
    let run = match (inputs.magnitude.is_some(), inputs.second.is_some()) {
        (true, true) => cost_run_with::<true, true>,
        (true, false) => cost_run_with::<true, false>,
        (false, true) => cost_run_with::<false, true>,
        (false, false) => cost_run_with::<false, false>,
    };
    run(
        [inputs.phase, mag, second],
        te_ratio,
        inputs.inv_ref,
        a0,
        b0,
        out,
    );
}

fn cost_run_with<const MAG: bool, const SECOND: bool>(
    [phase, mag, second]: [&[f32]; 3],
    te_ratio: f32,
    inv_ref: f32,
    a0: usize,
    b0: usize,
    out: &mut [u8],
) {
    let len = out.len();
    let (pa, pb) = (&phase[a0..a0 + len], &phase[b0..b0 + len]);
    let (ma, mb) = (&mag[a0..a0 + len], &mag[b0..b0 + len]);
    let (sa, sb) = (&second[a0..a0 + len], &second[b0..b0 + len]);
    for k in 0..len {
        out[k] = quantised_cost::<MAG, SECOND>(
            pa[k], pb[k], ma[k], mb[k], sa[k], sb[k], te_ratio, inv_ref,
        );
    }
}

/// Seed quality of a voxel from its edge record: sum of the qualities of its usable edges.
fn seed_score(record: &[u8]) -> u16 {
    record
        .iter()
        .filter(|&&c| c != NO_EDGE)
        .map(|&c| 255 - c as u16)
        .sum()
}

/// Costs in 0..=254 (0 best) of the six edges of every voxel: `costs[6*v + e]` joins voxel
/// `v` to its neighbour `v + stride[e]` (e = 0..3, along axis e) or `v − stride[e−3]`
/// (e = 3..6). Edges leaving the volume or touching an unusable voxel are [`NO_EDGE`].
/// Each edge is stored from both ends so the growth reads one record per voxel.
///
/// Also returns the first seed: the usable voxel of highest [`seed_score`] (lowest index
/// among equals), or `None` when no voxel is usable.
///
/// One parallel pass over planes; each row's edges are computed as contiguous runs
/// (vectorised), the backward x and y edges a second time rather than read back from the
/// previous plane or row, which costs less than a second pass over memory.
fn edge_costs(inputs: &CostInputs<'_>, state: &[u8], shape: Shape3) -> (Vec<u8>, Option<usize>) {
    let [nx, ny, nz] = shape.0;
    let plane = ny * nz;
    let mut costs = vec![NO_EDGE; 6 * shape.len()];
    let first_seed = costs
        .par_chunks_mut(6 * plane)
        .enumerate()
        .map(|(i, chunk)| {
            // Runs of forward x, backward x, forward y, backward y and forward z edges.
            let mut runs = vec![NO_EDGE; 5 * nz];
            let mut best: Option<(u16, usize)> = None;
            for j in 0..ny {
                let v0 = shape.idx(i, j, 0);
                let (fx, rest) = runs.split_at_mut(nz);
                let (bx, rest) = rest.split_at_mut(nz);
                let (fy, rest) = rest.split_at_mut(nz);
                let (by, fz) = rest.split_at_mut(nz);
                if i + 1 < nx {
                    cost_run(inputs, v0, v0 + plane, fx);
                }
                if i > 0 {
                    cost_run(inputs, v0 - plane, v0, bx);
                }
                if j + 1 < ny {
                    cost_run(inputs, v0, v0 + nz, fy);
                }
                if j > 0 {
                    cost_run(inputs, v0 - nz, v0, by);
                }
                if nz > 1 {
                    cost_run(inputs, v0, v0 + 1, &mut fz[..nz - 1]);
                }
                let usable = |u: usize| state[u] != CLOSED;
                for k in 0..nz {
                    let v = v0 + k;
                    if !usable(v) {
                        continue;
                    }
                    let record = [
                        if i + 1 < nx && usable(v + plane) {
                            fx[k]
                        } else {
                            NO_EDGE
                        },
                        if j + 1 < ny && usable(v + nz) {
                            fy[k]
                        } else {
                            NO_EDGE
                        },
                        if k + 1 < nz && usable(v + 1) {
                            fz[k]
                        } else {
                            NO_EDGE
                        },
                        if i > 0 && usable(v - plane) {
                            bx[k]
                        } else {
                            NO_EDGE
                        },
                        if j > 0 && usable(v - nz) {
                            by[k]
                        } else {
                            NO_EDGE
                        },
                        if k > 0 && usable(v - 1) {
                            fz[k - 1]
                        } else {
                            NO_EDGE
                        },
                    ];
                    let r = 6 * (j * nz + k);
                    chunk[r..r + 6].copy_from_slice(&record);
                    let score = seed_score(&record);
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, v));
                    }
                }
            }
            best
        })
        .reduce(
            || None,
            |a, b| match (a, b) {
                (Some((sa, va)), Some((sb, vb))) => {
                    if sb > sa || (sb == sa && vb < va) {
                        b
                    } else {
                        a
                    }
                }
                (x, None) | (None, x) => x,
            },
        );
    (costs, first_seed.map(|(_, v)| v))
}

/// Usable voxels not reached yet, ordered by decreasing [`seed_score`] (increasing index
/// among equals): the seeds of the parts of the mask after the first.
fn remaining_seeds(costs: &[u8], state: &[u8]) -> Vec<u32> {
    let mut rest: Vec<(u16, u32)> = state
        .par_iter()
        .enumerate()
        .filter(|(_, &s)| s != CLOSED)
        .map(|(v, _)| (seed_score(&costs[6 * v..6 * v + 6]), v as u32))
        .collect();
    rest.par_sort_unstable_by_key(|&(score, v)| (std::cmp::Reverse(score), v));
    rest.into_iter().map(|(_, v)| v).collect()
}

/// Region growing through the bucketed priority queue, from `first_seed` and then from the
/// best remaining voxel of each part not reached yet.
///
/// The queue is an array of 256 stacks, one per cost: the growth always pops the most
/// recently pushed edge of the lowest cost, so it is O(N) and deterministic.
///
/// Memory traffic dominates, so the loop touches as little as possible: the edge
/// records, the output array (which still holds the raw phase of voxels not yet reached)
/// and one byte of state per voxel: [`CLOSED`] (done or unusable), [`OPEN`], or `c + 1`
/// with `c` the cost of the best edge queued towards the voxel. An edge is queued only if
/// it costs no more than that best one: a costlier edge would be popped after the voxel
/// is done and skipped, so leaving it out changes nothing but the queue traffic (an edge
/// of equal cost is queued: being pushed later, it is popped first). Membership of the
/// parts is recorded as the (sequentially written) visit order, not as a label volume.
fn grow(
    phase: &[f32],
    costs: &[u8],
    state: &mut [u8],
    first_seed: Option<usize>,
    shape: Shape3,
) -> Unwrapped {
    let [_, ny, nz] = shape.0;
    let (plane, row) = ((ny * nz) as isize, nz as isize);
    // Neighbour of v through edge e is v + offsets[e]. A queue entry is target * 8 + e,
    // with e the edge seen from the source, so the source is target − offsets[e].
    let offsets: [isize; 6] = [plane, row, 1, -plane, -row, -1];
    let mut out = phase.to_vec();
    let mut visit_order: Vec<u32> = Vec::with_capacity(state.len());
    let mut component_starts = Vec::new();
    let mut buckets: Vec<Vec<u32>> = (0..N_BINS).map(|_| Vec::new()).collect();

    let push_neighbours =
        |v: usize, state: &mut [u8], buckets: &mut [Vec<u32>], top: &mut usize| {
            let record = &costs[6 * v..6 * v + 6];
            for (e, (&c, &offset)) in record.iter().zip(&offsets).enumerate() {
                // NO_EDGE never passes the test below; pointing it at v itself (CLOSED)
                // keeps the index inside the volume without a branch.
                let u = if c == NO_EDGE {
                    v
                } else {
                    v.wrapping_add_signed(offset)
                };
                if c < state[u] {
                    state[u] = c + 1;
                    buckets[c as usize].push((u * 8 + e) as u32);
                    *top = (*top).min(c as usize);
                }
            }
        };

    let mut seeds: Vec<u32> = first_seed.map(|s| s as u32).into_iter().collect();
    let mut next_seed = 0;
    let mut later_seeds_listed = false;
    loop {
        if next_seed == seeds.len() {
            if later_seeds_listed {
                break;
            }
            // After the first part, list the rest once (usually none or a few voxels).
            seeds = remaining_seeds(costs, state);
            next_seed = 0;
            later_seeds_listed = true;
            continue;
        }
        let seed = seeds[next_seed] as usize;
        next_seed += 1;
        if state[seed] == CLOSED {
            continue;
        }
        component_starts.push(visit_order.len());
        state[seed] = CLOSED;
        visit_order.push(seed as u32);
        let mut top = N_BINS;
        push_neighbours(seed, state, &mut buckets, &mut top);
        while top < N_BINS {
            let Some(entry) = buckets[top].pop() else {
                top += 1;
                continue;
            };
            let t = (entry >> 3) as usize;
            if state[t] == CLOSED {
                continue;
            }
            let s = t.wrapping_add_signed(-offsets[(entry & 7) as usize]);
            let raw = out[t] as f64;
            let k = round_fast((out[s] as f64 - raw) * (1.0 / TWO_PI));
            out[t] = (raw + TWO_PI * k) as f32;
            state[t] = CLOSED;
            visit_order.push(t as u32);
            push_neighbours(t, state, &mut buckets, &mut top);
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

    /// Process CPU time [s] (user + system) from /proc, 0 where unavailable.
    fn cpu_s() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = stat.rsplit(") ").next().unwrap_or("");
        let f: Vec<f64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        if f.len() > 12 {
            (f[11] + f[12]) / 100.0
        } else {
            0.0
        }
    }

    /// `cargo test --release -p alsiron-core unwrap_timing -- --ignored --nocapture`
    /// (a smooth field of many wraps with a second echo at 11/7 of the echo time).
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
        let later: Vec<f32> = truth
            .iter()
            .map(|&t| wrap_angle(t * 11.0 / 7.0) as f32)
            .collect();
        let second = SecondEcho {
            phase: &later,
            te_ratio: 7.0 / 11.0,
        };
        for _ in 0..3 {
            let (t0, c0) = (std::time::Instant::now(), cpu_s());
            let mut state = vec![OPEN; shape.len()];
            let m_ref = magnitude_reference(&mag, &state);
            let t1 = t0.elapsed();
            let inputs = CostInputs {
                phase: &phase,
                magnitude: Some(&mag),
                second: Some(second),
                inv_ref: 1.0 / m_ref,
            };
            let (costs, first_seed) = edge_costs(&inputs, &state, shape);
            let (t2, c2) = (t0.elapsed(), cpu_s());
            let out = grow(&phase, &costs, &mut state, first_seed, shape);
            let (t3, c3) = (t0.elapsed(), cpu_s());
            eprintln!(
                "wall: m_ref {t1:?} +costs+seed {t2:?} +grow {t3:?}; cpu: costs {:.2} s, \
                 grow {:.2} s ({} parts)",
                c2 - c0,
                c3 - c2,
                out.n_components()
            );
        }
    }
}

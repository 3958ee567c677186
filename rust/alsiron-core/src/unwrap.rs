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
    // Queue entries pack (node index, direction of the source) into a u32; the nodes
    // are the voxels after one plane of padding (see `grow`).
    let max_voxels = (u32::MAX as usize / 8).saturating_sub(shape.0[1] * shape.0[2]);
    if n > max_voxels {
        return Err(CoreError::InvalidArgument(format!(
            "volume of {n} voxels is too large for the unwrapper (max {max_voxels})"
        )));
    }

    // OPEN where the voxel can be reached at all, CLOSED where not.
    let usable: Vec<u8> = (0..n)
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

    let m_ref = magnitude.map(|m| magnitude_reference(m, &usable));
    let inputs = CostInputs {
        phase,
        magnitude,
        second,
        inv_ref: 1.0 / m_ref.unwrap_or(1.0),
    };
    let (mut nodes, first_seed) = build_nodes(&inputs, &usable, shape);
    drop(usable);
    Ok(grow(&mut nodes, first_seed, shape))
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

/// Seed quality of a voxel: sum of the qualities (255 − cost) of its usable edges.
fn seed_score(costs: [u8; 6]) -> u16 {
    costs
        .iter()
        .filter(|&&c| c != NO_EDGE)
        .map(|&c| 255 - c as u16)
        .sum()
}

// The growth works on one packed `u64` node per voxel, so that reaching a voxel costs
// one cache miss rather than one per array:
// - bits 0..32: its phase [rad] as f32 bits, raw until the voxel is reached, unwrapped after;
// - bits 32..56: costs in 0..=254 (0 best) of its forward edges, to the next voxel along
//   x, y and z ([`NO_EDGE`] where that voxel is outside the volume or either end is
//   unusable); the backward edges are the forward edges of the previous voxels;
// - bits 56..64: its growth state (see [`grow`]).
// Node `v + pad` holds voxel `v`; the `pad` = one plane of all-zero (CLOSED) nodes in
// front lets every voxel look one step back along each axis without a bounds test: at
// the low end of y or z that step lands on the last voxel of the previous row or plane,
// whose forward edge along that axis is NO_EDGE.
const STATE_SHIFT: u32 = 56;

#[inline(always)]
fn node_phase(node: u64) -> f32 {
    f32::from_bits(node as u32)
}

#[inline(always)]
fn node_forward(node: u64, axis: usize) -> u8 {
    (node >> (32 + 8 * axis)) as u8
}

#[inline(always)]
fn node_state(node: u64) -> u8 {
    (node >> STATE_SHIFT) as u8
}

#[inline(always)]
fn pack_node(phase: f32, forward: [u8; 3], state: u8) -> u64 {
    phase.to_bits() as u64
        | (forward[0] as u64) << 32
        | (forward[1] as u64) << 40
        | (forward[2] as u64) << 48
        | (state as u64) << STATE_SHIFT
}

/// Nodes of all voxels (after a zero pad of one plane, see above) from the phase and the
/// edge costs; `usable` is OPEN or CLOSED per voxel.
///
/// Also returns the first seed: the usable voxel of highest [`seed_score`] (lowest index
/// among equals), or `None` when no voxel is usable.
///
/// One parallel pass over planes; each row's edges are computed as contiguous runs
/// (vectorised); the backward x edges, needed here only for the seed score, are computed
/// a second time rather than read back from the previous plane.
fn build_nodes(inputs: &CostInputs<'_>, usable: &[u8], shape: Shape3) -> (Vec<u64>, Option<usize>) {
    let [nx, ny, nz] = shape.0;
    let plane = ny * nz;
    // All-zero allocation: pages are mapped lazily, in parallel by the pass below.
    let mut nodes = vec![0u64; shape.len() + plane];
    let first_seed = nodes[plane..]
        .par_chunks_mut(plane)
        .enumerate()
        .map(|(i, chunk)| {
            // Runs of forward x, backward x, forward y of this and the previous row,
            // and forward z edges.
            let mut runs = vec![NO_EDGE; 5 * nz];
            let mut best: Option<(u16, usize)> = None;
            let ok = |u: usize| usable[u] != CLOSED;
            for j in 0..ny {
                let v0 = shape.idx(i, j, 0);
                let (fx, rest) = runs.split_at_mut(nz);
                let (bx, rest) = rest.split_at_mut(nz);
                let (fy_pair, fz) = rest.split_at_mut(2 * nz);
                let (fy_even, fy_odd) = fy_pair.split_at_mut(nz);
                let (fy, by) = if j % 2 == 0 {
                    (fy_even, fy_odd)
                } else {
                    (fy_odd, fy_even)
                };
                if i + 1 < nx {
                    cost_run(inputs, v0, v0 + plane, fx);
                }
                if i > 0 {
                    cost_run(inputs, v0 - plane, v0, bx);
                }
                if j + 1 < ny {
                    cost_run(inputs, v0, v0 + nz, fy);
                }
                if nz > 1 {
                    cost_run(inputs, v0, v0 + 1, &mut fz[..nz - 1]);
                }
                let row_nodes = &mut chunk[j * nz..(j + 1) * nz];
                for (k, node) in row_nodes.iter_mut().enumerate() {
                    let v = v0 + k;
                    if !ok(v) {
                        *node = pack_node(inputs.phase[v], [NO_EDGE; 3], CLOSED);
                        continue;
                    }
                    let forward = [
                        if i + 1 < nx && ok(v + plane) {
                            fx[k]
                        } else {
                            NO_EDGE
                        },
                        if j + 1 < ny && ok(v + nz) {
                            fy[k]
                        } else {
                            NO_EDGE
                        },
                        if k + 1 < nz && ok(v + 1) {
                            fz[k]
                        } else {
                            NO_EDGE
                        },
                    ];
                    *node = pack_node(inputs.phase[v], forward, OPEN);
                    let score = seed_score([
                        forward[0],
                        forward[1],
                        forward[2],
                        if i > 0 && ok(v - plane) {
                            bx[k]
                        } else {
                            NO_EDGE
                        },
                        if j > 0 && ok(v - nz) { by[k] } else { NO_EDGE },
                        if k > 0 && ok(v - 1) {
                            fz[k - 1]
                        } else {
                            NO_EDGE
                        },
                    ]);
                    let better = match best {
                        Some((s, _)) => score > s,
                        None => true,
                    };
                    if better {
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
    (nodes, first_seed.map(|(_, v)| v))
}

/// Usable voxels not reached yet, ordered by decreasing [`seed_score`] (increasing index
/// among equals): the seeds of the parts of the mask after the first.
fn remaining_seeds(nodes: &[u64], shape: Shape3) -> Vec<u32> {
    let [_, ny, nz] = shape.0;
    let strides = [ny * nz, nz, 1];
    let pad = strides[0];
    let mut rest: Vec<(u16, u32)> = nodes[pad..]
        .par_iter()
        .enumerate()
        .filter(|(_, &node)| node_state(node) != CLOSED)
        .map(|(v, &node)| {
            let mut costs = [NO_EDGE; 6];
            for d in 0..3 {
                costs[d] = node_forward(node, d);
                // The pad plane is not a voxel (see above).
                if v >= strides[d] {
                    costs[3 + d] = node_forward(nodes[pad + v - strides[d]], d);
                }
            }
            (seed_score(costs), v as u32)
        })
        .collect();
    rest.par_sort_unstable_by_key(|&(score, v)| (std::cmp::Reverse(score), v));
    rest.into_iter().map(|(_, v)| v).collect()
}

/// How far below the top of the current stack the growth prefetches (measured: 4–8).
const PREFETCH_DEPTH: usize = 4;

/// Hint the CPU to bring `value`'s cache line in (no-op where unsupported).
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch only hints the
        // cache (it never faults or reads into the program) for a valid reference.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Region growing through the bucketed priority queue, from `first_seed` and then from the
/// best remaining voxel of each part not reached yet; returns the unwrapped phase.
///
/// The queue is an array of 256 stacks, one per cost: the growth always pops the most
/// recently pushed edge of the lowest cost, so it is O(N) and deterministic.
///
/// Memory latency dominates, so the loop touches as little as possible: the nodes and
/// the sequentially written visit order (membership of the parts, rather than a label
/// volume). A node's state is [`CLOSED`] (done or unusable), [`OPEN`], or `c + 1` with
/// `c` the cost of the best edge queued towards it. An edge is queued only if it costs no
/// more than that best one: a costlier edge would be popped after the voxel is done and
/// skipped, so leaving it out changes nothing but the queue traffic (an edge of equal
/// cost is queued: being pushed later, it is popped first).
fn grow(nodes: &mut [u64], first_seed: Option<usize>, shape: Shape3) -> Unwrapped {
    let [_, ny, nz] = shape.0;
    let strides = [ny * nz, nz, 1];
    let pad = strides[0];
    // Neighbour of node v through edge e is v + offsets[e]. A queue entry is
    // target node * 8 + e, with e the edge seen from the source: the source is
    // target − offsets[e].
    let offsets: [isize; 6] = [
        strides[0] as isize,
        strides[1] as isize,
        1,
        -(strides[0] as isize),
        -(strides[1] as isize),
        -1,
    ];
    let mut visit_order: Vec<u32> = Vec::with_capacity(nodes.len() - pad);
    let mut component_starts = Vec::new();
    let mut buckets: Vec<Vec<u32>> = (0..N_BINS).map(|_| Vec::new()).collect();

    let push_neighbours =
        |v: usize, nodes: &mut [u64], buckets: &mut [Vec<u32>], top: &mut usize| {
            let node = nodes[v];
            for (d, &stride) in strides.iter().enumerate() {
                let c = node_forward(node, d);
                // NO_EDGE never passes the test below; pointing it at v itself (CLOSED)
                // keeps the index inside the volume without a branch.
                let u = if c == NO_EDGE { v } else { v + stride };
                let target = nodes[u];
                if c < node_state(target) {
                    nodes[u] = (target & !(0xFF << STATE_SHIFT)) | ((c as u64 + 1) << STATE_SHIFT);
                    buckets[c as usize].push((u * 8 + d) as u32);
                    *top = (*top).min(c as usize);
                }
            }
            for (d, &stride) in strides.iter().enumerate() {
                // In bounds: v ≥ pad ≥ stride.
                let u = v - stride;
                let target = nodes[u];
                let c = node_forward(target, d);
                if c < node_state(target) {
                    nodes[u] = (target & !(0xFF << STATE_SHIFT)) | ((c as u64 + 1) << STATE_SHIFT);
                    buckets[c as usize].push((u * 8 + 3 + d) as u32);
                    *top = (*top).min(c as usize);
                }
            }
        };
    let close = |node: u64, phase: f32| -> u64 {
        (node & !(0xFF << STATE_SHIFT) & !0xFFFF_FFFF) | phase.to_bits() as u64
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
            seeds = remaining_seeds(nodes, shape);
            next_seed = 0;
            later_seeds_listed = true;
            continue;
        }
        let seed = seeds[next_seed] as usize;
        next_seed += 1;
        let seed_node = nodes[pad + seed];
        if node_state(seed_node) == CLOSED {
            continue;
        }
        component_starts.push(visit_order.len());
        nodes[pad + seed] = close(seed_node, node_phase(seed_node));
        visit_order.push(seed as u32);
        let mut top = N_BINS;
        push_neighbours(pad + seed, nodes, &mut buckets, &mut top);
        while top < N_BINS {
            let Some(entry) = buckets[top].pop() else {
                top += 1;
                continue;
            };
            // Popping is latency-bound: an entry deep in a stack was pushed long ago
            // and its node and neighbours (touched when it is reached) are cold. Fetch
            // those of the entry PREFETCH_DEPTH below the top now; most of the time it
            // is popped a few iterations later.
            let stack = &buckets[top];
            if stack.len() >= PREFETCH_DEPTH {
                let ahead = (stack[stack.len() - PREFETCH_DEPTH] >> 3) as usize;
                prefetch(&nodes[ahead]);
                // ahead ≥ pad ≥ the strides.
                prefetch(&nodes[ahead - strides[0]]);
                prefetch(&nodes[ahead - strides[1]]);
                if ahead + strides[0] < nodes.len() {
                    prefetch(&nodes[ahead + strides[0]]);
                    prefetch(&nodes[ahead + strides[1]]);
                }
            }
            let t = (entry >> 3) as usize;
            let node = nodes[t];
            if node_state(node) == CLOSED {
                continue;
            }
            let s = t.wrapping_add_signed(-offsets[(entry & 7) as usize]);
            let raw = node_phase(node) as f64;
            let k = round_fast((node_phase(nodes[s]) as f64 - raw) * (1.0 / TWO_PI));
            nodes[t] = close(node, (raw + TWO_PI * k) as f32);
            visit_order.push((t - pad) as u32);
            push_neighbours(t, nodes, &mut buckets, &mut top);
        }
    }
    component_starts.push(visit_order.len());
    Unwrapped {
        phase: nodes[pad..]
            .par_iter()
            .map(|&node| node_phase(node))
            .collect(),
        visit_order,
        component_starts,
    }
}

#[cfg(test)]
#[path = "unwrap_reference.rs"]
mod reference;

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

    /// Noisy wrapped phase (residues, so the path matters), a magnitude, a second echo
    /// and a mask of several parts with holes and non-finite voxels.
    fn noisy_case(shape: Shape3, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>) {
        let mut state = seed;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let truth = smooth_phase(shape);
        let n = shape.len();
        let mut phase = Vec::with_capacity(n);
        let mut later = Vec::with_capacity(n);
        let mut mag = Vec::with_capacity(n);
        let mut mask = Vec::with_capacity(n);
        for (v, &t) in truth.iter().enumerate() {
            phase.push(wrap_angle(t + 1.5 * (uniform() - 0.5)) as f32);
            later.push(wrap_angle(1.6 * t + 1.5 * (uniform() - 0.5)) as f32);
            mag.push((0.05 + uniform() * uniform()) as f32);
            // Slabs along x (a gap at i = 8) with random holes.
            mask.push(u8::from(
                v / (shape.0[1] * shape.0[2]) != 8 && uniform() > 0.1,
            ));
        }
        phase[7] = f32::NAN;
        mag[11] = f32::INFINITY;
        (phase, mag, later, mask)
    }

    #[test]
    fn same_output_as_the_reference_growth() {
        let shape = Shape3([19, 17, 13]);
        for seed in 0..4 {
            let (phase, mag, later, mask) = noisy_case(shape, seed);
            let second = SecondEcho {
                phase: &later,
                te_ratio: 0.625,
            };
            for (m, s, k) in [
                (Some(&mag[..]), Some(second), Some(&mask[..])),
                (Some(&mag[..]), None, Some(&mask[..])),
                (None, Some(second), None),
                (None, None, Some(&mask[..])),
            ] {
                let fast = unwrap_romeo(&phase, m, s, k, shape).unwrap();
                let slow = reference::unwrap_reference(&phase, m, s, k, shape);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast.phase), bits(&slow.phase), "seed {seed}");
                assert_eq!(fast.visit_order, slow.visit_order, "seed {seed}");
                assert_eq!(fast.component_starts, slow.component_starts, "seed {seed}");
                if k.is_some() {
                    assert!(fast.n_components() > 1, "seed {seed}: one part only");
                }
            }
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

    /// The field-mapping bench's data (bench/bench_fit.py `_data`): echoes 2 and 3 of a
    /// noisy ellipsoid with several wraps, noise (SNR 100 inside, 5 outside).
    fn bench_echoes(shape: Shape3) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let [nx, ny, nz] = shape.0;
        let mut state = 12345u64;
        let mut normal = move || {
            let mut u = || {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            let (a, b) = (u(), u());
            (-2.0 * a.ln()).sqrt() * (TWO_PI * b).cos()
        };
        let axis = |i: usize, n: usize| -1.0 + 2.0 * i as f64 / (n - 1) as f64;
        let (mut phase1, mut phase2, mut mag1) = (vec![], vec![], vec![]);
        for i in 0..nx {
            for j in 0..ny {
                for k in 0..nz {
                    let (x, y, z) = (axis(i, nx), axis(j, ny), axis(k, nz));
                    let inside = (x / 0.9).powi(2) + (y / 0.85).powi(2) + (z / 0.8).powi(2) < 1.0;
                    let mag0 = if inside {
                        1.0 + 0.3 * (3.0 * x).cos()
                    } else {
                        0.05
                    };
                    let omega = TWO_PI * (120.0 * z * z - 60.0 * x * y + 30.0 * x);
                    let r2 = if inside { 20.0 + 30.0 * x * x } else { 5.0 };
                    for (te, phase, mag) in [
                        (0.007, &mut phase1, Some(&mut mag1)),
                        (0.011, &mut phase2, None),
                    ] {
                        let a = 100.0 * mag0 * f64::exp(-r2 * te);
                        let noise = normal();
                        let re = a * (0.3 + omega * te).cos() + noise;
                        let im = a * (0.3 + omega * te).sin() + noise;
                        phase.push(im.atan2(re) as f32);
                        if let Some(m) = mag {
                            m.push(re.hypot(im) as f32);
                        }
                    }
                }
            }
        }
        (phase1, mag1, phase2)
    }

    /// `cargo test --release -p alsiron-core unwrap_timing -- --ignored --nocapture`:
    /// stage times of the unwrapping of the bench's data, and the reference growth.
    #[test]
    #[ignore]
    fn unwrap_timing() {
        let shape = Shape3([256, 256, 176]);
        let (phase, mag, later) = bench_echoes(shape);
        let second = SecondEcho {
            phase: &later,
            te_ratio: 7.0 / 11.0,
        };
        for _ in 0..3 {
            let (t0, c0) = (std::time::Instant::now(), cpu_s());
            let usable = vec![OPEN; shape.len()];
            let m_ref = magnitude_reference(&mag, &usable);
            let t1 = t0.elapsed();
            let inputs = CostInputs {
                phase: &phase,
                magnitude: Some(&mag),
                second: Some(second),
                inv_ref: 1.0 / m_ref,
            };
            let (mut nodes, first_seed) = build_nodes(&inputs, &usable, shape);
            let (t2, c2) = (t0.elapsed(), cpu_s());
            let out = grow(&mut nodes, first_seed, shape);
            let (t3, c3) = (t0.elapsed(), cpu_s());
            let slow = reference::unwrap_reference(&phase, Some(&mag), Some(second), None, shape);
            let (t4, c4) = (t0.elapsed(), cpu_s());
            assert_eq!(out.visit_order, slow.visit_order);
            eprintln!("reference: wall {:?} cpu {:.2} s", t4 - t3, c4 - c3);
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

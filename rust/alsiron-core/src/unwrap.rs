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
//!
//! Volumes of more than 2²² voxels are grown block-wise (`unwrap_blocks`): blocks of
//! x-planes × y-rows × all z, sized from the shape alone (≈ 2¹⁶ voxels, 512 KB of nodes,
//! so each growth runs in the core's L2 cache) are grown independently and in parallel,
//! each from its own best seed; then the parts of the blocks are joined across the
//! block faces. For each pair of touching parts, every edge across their face votes,
//! weighted by its quality, for the 2πk between its unwrapped ends; the winning k and
//! its margin over the runner-up define a link, and a maximum spanning forest over the
//! links (largest margin first) fixes each part's 2πk relative to the part holding the
//! best seed of its joined component, which keeps its values. The result is still exact
//! (input + 2π·integer everywhere) and does not depend on the number of threads; it
//! can differ from one global queue where a block's growth takes a different path
//! through noise (measured: identical on the bench volume, 99.98–100 % of the in-mask
//! voxels of a noisy brain phantom). Smaller volumes give exactly the single-queue
//! result (`unwrap_reference.rs`, the first implementation, is kept as the test oracle).

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
    unwrap_romeo_phase(phase, magnitude, None, mask, shape)
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
    /// Flat indices of the reached voxels grouped by part, in the order they were
    /// reached (block-wise growth: block by block, see the module documentation).
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
    unwrap_with_default_blocks(phase, magnitude, second, mask, shape, true)
}

/// The unwrapped phase [rad] of [`unwrap_romeo`] alone (the same values, without
/// listing the parts, which large volumes grown block-wise would assemble for nothing).
pub fn unwrap_romeo_phase(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    second: Option<SecondEcho<'_>>,
    mask: Option<&[u8]>,
    shape: Shape3,
) -> CoreResult<Vec<f32>> {
    unwrap_with_default_blocks(phase, magnitude, second, mask, shape, false).map(|u| u.phase)
}

/// Checks the inputs, then unwraps with the block layout chosen from the shape (see
/// [`unwrap_checked`]); `components` asks for the part lists.
fn unwrap_with_default_blocks(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    second: Option<SecondEcho<'_>>,
    mask: Option<&[u8]>,
    shape: Shape3,
    components: bool,
) -> CoreResult<Unwrapped> {
    check_inputs(phase, magnitude, second, mask, shape)?;
    Ok(unwrap_checked(
        phase,
        magnitude,
        second,
        mask,
        shape,
        default_block_side(shape),
        components,
    ))
}

/// The unwrapping of [`unwrap_romeo`] on checked inputs: one queue over the volume if
/// `block_side` is `None`, else block-wise (see [`unwrap_blocks`]) over blocks of
/// `block_side` x-planes × `block_side` y-rows × all z. Without `components` the
/// block-wise result lists no parts (empty visit order).
fn unwrap_checked(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    second: Option<SecondEcho<'_>>,
    mask: Option<&[u8]>,
    shape: Shape3,
    block_side: Option<usize>,
    components: bool,
) -> Unwrapped {
    // Whether the voxel can be reached at all.
    let usable_at = |i: usize| -> bool {
        mask.map_or(true, |m| m[i] != 0)
            && magnitude.map_or(true, |m| m[i].is_finite())
            && second.map_or(true, |s| s.phase[i].is_finite())
            && phase[i].is_finite()
    };
    let m_ref = magnitude.map(|m| magnitude_reference(m, usable_at));
    let inputs = CostInputs {
        phase,
        magnitude,
        second,
        inv_ref: 1.0 / m_ref.unwrap_or(1.0),
    };
    if let Some(side) = block_side {
        let blocks = Blocks::new(shape, side);
        if blocks.count() > 1 {
            return unwrap_blocks(&inputs, &usable_at, shape, &blocks, components);
        }
    }
    let usable: Vec<u8> = (0..shape.len())
        .into_par_iter()
        .map(|i| if usable_at(i) { OPEN } else { CLOSED })
        .collect();
    let (mut nodes, first_seed) = build_nodes(&inputs, &usable, shape, true);
    drop(usable);
    grow(&mut nodes, first_seed, shape)
}

/// Lengths, echo-time ratio and size checks of [`unwrap_romeo`].
fn check_inputs(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    second: Option<SecondEcho<'_>>,
    mask: Option<&[u8]>,
    shape: Shape3,
) -> CoreResult<()> {
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
    Ok(())
}

/// 90th percentile of the magnitude over usable voxels (1 when there is none or it is ≤ 0).
///
/// Large volumes are subsampled (every 7th voxel, a stride coprime with typical matrix
/// sizes): a percentile of a million voxels is as good a reference as one of all, and the
/// selection was a visible part of the unwrapping time.
fn magnitude_reference(mag: &[f32], usable_at: impl Fn(usize) -> bool) -> f32 {
    let stride = if mag.len() > (1 << 21) { 7 } else { 1 };
    let mut vals: Vec<f32> = (0..mag.len())
        .step_by(stride)
        .filter(|&i| usable_at(i))
        .map(|i| mag[i].abs())
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
    let flags = (inputs.magnitude.is_some(), inputs.second.is_some());
    let values = [inputs.phase, mag, second];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { cost_run_avx2(flags, values, te_ratio, inputs.inv_ref, a0, b0, out) };
        return;
    }
    cost_run_dispatch(flags, values, te_ratio, inputs.inv_ref, a0, b0, out);
}

/// [`cost_run_with`] for the inputs present (`flags` = magnitude, second echo).
#[inline(always)]
fn cost_run_dispatch(
    flags: (bool, bool),
    values: [&[f32]; 3],
    te_ratio: f32,
    inv_ref: f32,
    a0: usize,
    b0: usize,
    out: &mut [u8],
) {
    // Direct calls (not a function pointer), so that they inline into the AVX2 build.
    match flags {
        (true, true) => cost_run_with::<true, true>(values, te_ratio, inv_ref, a0, b0, out),
        (true, false) => cost_run_with::<true, false>(values, te_ratio, inv_ref, a0, b0, out),
        (false, true) => cost_run_with::<false, true>(values, te_ratio, inv_ref, a0, b0, out),
        (false, false) => cost_run_with::<false, false>(values, te_ratio, inv_ref, a0, b0, out),
    }
}

/// [`cost_run_dispatch`] compiled for AVX2 (twice the vector width of the x86-64
/// baseline). Bit-identical to the baseline build: the same IEEE operations in the same
/// order (Rust forms no fused multiply-adds on its own).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn cost_run_avx2(
    flags: (bool, bool),
    values: [&[f32]; 3],
    te_ratio: f32,
    inv_ref: f32,
    a0: usize,
    b0: usize,
    out: &mut [u8],
) {
    cost_run_dispatch(flags, values, te_ratio, inv_ref, a0, b0, out);
}

#[inline(always)]
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
fn build_nodes(
    inputs: &CostInputs<'_>,
    usable: &[u8],
    shape: Shape3,
    parallel: bool,
) -> (Vec<u64>, Option<usize>) {
    let [nx, ny, nz] = shape.0;
    let plane = ny * nz;
    // All-zero allocation: pages are mapped lazily, in parallel by the pass below.
    let mut nodes = vec![0u64; shape.len() + plane];
    let build_plane = |(i, chunk): (usize, &mut [u64])| {
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
    };
    let better_seed = |a: Option<(u16, usize)>, b: Option<(u16, usize)>| match (a, b) {
        (Some((sa, va)), Some((sb, vb))) => {
            if sb > sa || (sb == sa && vb < va) {
                b
            } else {
                a
            }
        }
        (x, None) | (None, x) => x,
    };
    let first_seed = if parallel {
        nodes[plane..]
            .par_chunks_mut(plane)
            .enumerate()
            .map(build_plane)
            .reduce(|| None, better_seed)
    } else {
        nodes[plane..]
            .chunks_mut(plane)
            .enumerate()
            .map(build_plane)
            .fold(None, better_seed)
    };
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
        .map(|(v, _)| (node_seed_score(nodes, v, strides), v as u32))
        .collect();
    rest.par_sort_unstable_by_key(|&(score, v)| (std::cmp::Reverse(score), v));
    rest.into_iter().map(|(_, v)| v).collect()
}

/// [`seed_score`] of voxel `v` from the nodes (padded as in [`grow`]; the edge costs
/// survive the growth, so this holds before and after it).
fn node_seed_score(nodes: &[u64], v: usize, strides: [usize; 3]) -> u16 {
    let pad = strides[0];
    let mut costs = [NO_EDGE; 6];
    for d in 0..3 {
        costs[d] = node_forward(nodes[pad + v], d);
        // The pad plane is not a voxel (see above).
        if v >= strides[d] {
            costs[3 + d] = node_forward(nodes[pad + v - strides[d]], d);
        }
    }
    seed_score(costs)
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
    let (visit_order, component_starts) = grow_parts::<true>(nodes, first_seed, shape);
    let pad = shape.0[1] * shape.0[2];
    Unwrapped {
        phase: nodes[pad..]
            .par_iter()
            .map(|&node| node_phase(node))
            .collect(),
        visit_order,
        component_starts,
    }
}

/// The growth of [`grow`], leaving the unwrapped phases in the nodes; returns the visit
/// order and the part starts (as in [`Unwrapped`]). `PREFETCH`: fetch the nodes of
/// queued voxels ahead (for nodes far larger than the caches).
fn grow_parts<const PREFETCH: bool>(
    nodes: &mut [u64],
    first_seed: Option<usize>,
    shape: Shape3,
) -> (Vec<u32>, Vec<usize>) {
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
            if PREFETCH && stack.len() >= PREFETCH_DEPTH {
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
    (visit_order, component_starts)
}

// Block-wise growth of large volumes. One queue over the whole volume spends most of its
// time waiting for memory: its nodes (8 bytes per voxel) are far larger than the caches
// and the growth front jumps around them. So a large volume is cut into blocks (a range
// of x-planes × a range of y-rows × all of z), each grown on its own, in cache and in
// parallel; the parts grown in the blocks ("regions") are then joined across the block
// faces.

/// Volumes of up to this many voxels are grown as one queue (their output is that of
/// the reference growth); larger ones block-wise.
const SINGLE_QUEUE_MAX_VOXELS: usize = 1 << 22;
/// Voxels per block aimed at: 512 KB of nodes, so that a block's growth runs in the
/// core's own (L2) cache.
const BLOCK_VOXELS: usize = 1 << 16;
/// Fewest x-planes and y-rows per block.
const MIN_BLOCK_SIDE: usize = 8;

/// x-planes and y-rows per block for a volume of this shape, or `None` for one queue
/// (from the shape only, so the result never depends on the number of threads).
fn default_block_side(shape: Shape3) -> Option<usize> {
    if shape.len() <= SINGLE_QUEUE_MAX_VOXELS {
        return None;
    }
    let per_row = BLOCK_VOXELS / shape.0[2].max(1);
    // Integer square root (exact for these small numbers).
    let side = (per_row as f64).sqrt().floor() as usize;
    Some(side.max(MIN_BLOCK_SIDE))
}

/// The blocks: block `(bx, by)` holds x-planes `x[bx]..x[bx + 1]`, y-rows
/// `y[by]..y[by + 1]` and all of z; along each axis the fewest ranges of at most `side`,
/// as even as possible. Blocks are numbered `bx · n_y + by`.
#[derive(Debug, Clone)]
struct Blocks {
    x: Vec<usize>,
    y: Vec<usize>,
}

impl Blocks {
    fn new(shape: Shape3, side: usize) -> Self {
        let bounds = |n: usize| {
            let count = n.div_ceil(side.max(1)).max(1);
            (0..=count).map(|s| s * n / count).collect::<Vec<_>>()
        };
        Self {
            x: bounds(shape.0[0]),
            y: bounds(shape.0[1]),
        }
    }

    fn n_x(&self) -> usize {
        self.x.len() - 1
    }

    fn n_y(&self) -> usize {
        self.y.len() - 1
    }

    fn count(&self) -> usize {
        self.n_x() * self.n_y()
    }
}

/// Marks a voxel that its block's growth did not reach.
const UNREACHED: u32 = u32::MAX;

/// What the growth of one block leaves for the merge (its phases and part labels are
/// written to the volume).
struct BlockParts {
    /// Indices of the reached voxels within the block (C order over the block's own
    /// shape), grouped by part in the order they were reached.
    visit_order: Vec<u32>,
    /// Part starts in `visit_order`, as in [`Unwrapped`].
    component_starts: Vec<usize>,
    /// [`seed_score`] (within the block) of each part's seed, its first voxel.
    seed_scores: Vec<u16>,
}

/// Grow block `(bx, by)` as a volume of its own (single-threaded: blocks run in
/// parallel). `slab_phase` and `slab_labels` are the x-planes of the block's slab
/// (all y): the block writes its voxels' phases and part labels there.
#[allow(clippy::too_many_arguments)]
fn grow_block(
    inputs: &CostInputs<'_>,
    usable_at: &(impl Fn(usize) -> bool + Sync),
    shape: Shape3,
    blocks: &Blocks,
    (bx, by): (usize, usize),
    slab_phase: &mut [f32],
    slab_labels: &mut [u32],
) -> BlockParts {
    let [_, ny, nz] = shape.0;
    let (x0, x1, y0, y1) = (
        blocks.x[bx],
        blocks.x[bx + 1],
        blocks.y[by],
        blocks.y[by + 1],
    );
    let block_shape = Shape3([x1 - x0, y1 - y0, nz]);
    // The block is x1 − x0 runs of (y1 − y0)·nz voxels, contiguous in the volume.
    let run = (y1 - y0) * nz;
    let runs = || (x0..x1).map(|i| shape.idx(i, y0, 0));
    let gather = |values: &[f32]| {
        let mut local = Vec::with_capacity(block_shape.len());
        for start in runs() {
            local.extend_from_slice(&values[start..start + run]);
        }
        local
    };
    let phase = gather(inputs.phase);
    let magnitude = inputs.magnitude.map(gather);
    let second = inputs.second.map(|s| gather(s.phase));
    let mut usable: Vec<u8> = Vec::with_capacity(block_shape.len());
    for start in runs() {
        usable.extend((start..start + run).map(|i| if usable_at(i) { OPEN } else { CLOSED }));
    }
    let block_inputs = CostInputs {
        phase: &phase,
        magnitude: magnitude.as_deref(),
        second: inputs
            .second
            .zip(second.as_deref())
            .map(|(s, p)| SecondEcho {
                phase: p,
                te_ratio: s.te_ratio,
            }),
        inv_ref: inputs.inv_ref,
    };
    let (mut nodes, seed) = build_nodes(&block_inputs, &usable, block_shape, false);
    drop(usable);
    // A block's nodes are in cache: prefetching would only cost.
    let (visit_order, component_starts) = grow_parts::<false>(&mut nodes, seed, block_shape);
    let strides = [run, nz, 1];
    let seed_scores = component_starts[..component_starts.len() - 1]
        .iter()
        .map(|&c| node_seed_score(&nodes, visit_order[c] as usize, strides))
        .collect();
    let mut labels = vec![UNREACHED; block_shape.len()];
    for (part, c) in component_starts.windows(2).enumerate() {
        for &v in &visit_order[c[0]..c[1]] {
            labels[v as usize] = part as u32;
        }
    }
    for i in 0..x1 - x0 {
        let (local, slab) = (i * run, (i * ny + y0) * nz);
        for (out, &node) in slab_phase[slab..slab + run]
            .iter_mut()
            .zip(&nodes[run + local..run + local + run])
        {
            *out = node_phase(node);
        }
        slab_labels[slab..slab + run].copy_from_slice(&labels[local..local + run]);
    }
    BlockParts {
        visit_order,
        component_starts,
        seed_scores,
    }
}

/// A candidate join of two regions across a block face: region `b` gets `k` turns (2πk)
/// more than region `a` to agree with it; `margin` is how decisively the face's edges
/// voted for `k`.
struct Link {
    margin: u64,
    a: u32,
    b: u32,
    k: i64,
}

/// The joins across one block face, given as runs `(a0, b0, len)` of edges from voxel
/// `a0 + t` (block of regions `base_a + label`) to voxel `b0 + t` (regions
/// `base_b + label`), `a0 < b0`.
///
/// Every edge across the face with both ends reached votes, with its quality
/// 255 − cost, for the number of turns `round((u_a − u_b)/2π)` between its unwrapped
/// ends; per pair of regions the turns with most votes win, and the margin over the
/// runner-up says how far the join can be trusted. Votes rather than one edge, so that
/// a single noisy edge cannot decide a whole region.
fn face_links(
    inputs: &CostInputs<'_>,
    unwrapped: &[f32],
    labels: &[u32],
    runs: impl Iterator<Item = (usize, usize, usize)>,
    base_a: u32,
    base_b: u32,
) -> Vec<Link> {
    let mut costs = Vec::new();
    let mut votes: Vec<((u32, u32, i64), u64)> = Vec::new();
    for (a0, b0, len) in runs {
        costs.resize(len, NO_EDGE);
        cost_run(inputs, a0, b0, &mut costs);
        for (t, &cost) in costs.iter().enumerate() {
            let (label_a, label_b) = (labels[a0 + t], labels[b0 + t]);
            if label_a == UNREACHED || label_b == UNREACHED {
                continue;
            }
            let turns = (unwrapped[a0 + t] as f64 - unwrapped[b0 + t] as f64) * (1.0 / TWO_PI);
            let key = (base_a + label_a, base_b + label_b, round_fast(turns) as i64);
            let weight = 255 - cost as u64;
            // Faces are mostly one pair of regions with one vote: merge runs on the fly.
            match votes.last_mut() {
                Some((last, w)) if *last == key => *w += weight,
                _ => votes.push((key, weight)),
            }
        }
    }
    votes.sort_unstable_by_key(|&(key, _)| key);
    let mut links: Vec<Link> = Vec::new();
    let mut i = 0;
    while i < votes.len() {
        let (a, b) = (votes[i].0 .0, votes[i].0 .1);
        // Sum the votes per turns, keep the best two (lowest k among equals).
        let (mut best, mut best_k, mut second) = (0u64, 0i64, 0u64);
        while i < votes.len() && (votes[i].0 .0, votes[i].0 .1) == (a, b) {
            let k = votes[i].0 .2;
            let mut total = 0;
            while i < votes.len() && votes[i].0 == (a, b, k) {
                total += votes[i].1;
                i += 1;
            }
            if total > best {
                second = best;
                (best, best_k) = (total, k);
            } else if total > second {
                second = total;
            }
        }
        links.push(Link {
            margin: best - second,
            a,
            b,
            k: best_k,
        });
    }
    links
}

/// Union-find over regions that also keeps each region's turns relative to its parent.
struct TurnsForest {
    parent: Vec<u32>,
    /// Turns of a region minus those of its parent.
    turns: Vec<i64>,
    size: Vec<u32>,
}

impl TurnsForest {
    fn new(n: usize) -> Self {
        Self {
            parent: (0..n as u32).collect(),
            turns: vec![0; n],
            size: vec![1; n],
        }
    }

    /// Root of `x` and the turns of `x` minus those of the root.
    fn find(&mut self, x: u32) -> (u32, i64) {
        let (mut root, mut total) = (x, 0);
        while self.parent[root as usize] != root {
            total += self.turns[root as usize];
            root = self.parent[root as usize];
        }
        // Point the path straight at the root.
        let (mut v, mut rest) = (x, total);
        while self.parent[v as usize] != v {
            let next = self.parent[v as usize];
            let own = self.turns[v as usize];
            self.parent[v as usize] = root;
            self.turns[v as usize] = rest;
            rest -= own;
            v = next;
        }
        (root, total)
    }

    /// Join so that turns(b) = turns(a) + k, unless a and b are joined already.
    fn join(&mut self, a: u32, b: u32, k: i64) -> bool {
        let ((ra, ta), (rb, tb)) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        // turns(rb) − turns(ra) = (turns(b) − tb) − (turns(a) − ta) = k − tb + ta.
        let rb_minus_ra = k - tb + ta;
        let (child, root, child_turns) = if self.size[ra as usize] < self.size[rb as usize] {
            (ra, rb, -rb_minus_ra)
        } else {
            (rb, ra, rb_minus_ra)
        };
        self.parent[child as usize] = root;
        self.turns[child as usize] = child_turns;
        self.size[root as usize] += self.size[child as usize];
        true
    }
}

/// Block-wise unwrapping of a volume of several `blocks`.
///
/// Every block is grown on its own (edges across block faces ignored), each from its
/// own best seed. The regions (parts of blocks) are then joined by a maximum spanning
/// forest over the face links, most decisive margin first (Kruskal), each join fixing
/// the relative 2πk of its two regions; in each joined part the region of the best seed
/// (highest [`seed_score`] within its block, lowest index among equals) keeps its
/// values, the others are shifted by their 2πk from the input phase. The joined parts
/// are the components, ordered by their best seed like the parts of [`grow`]; each
/// lists its anchor region first (so its first voxel is the seed), then the other
/// regions by block, each in the order its voxels were reached.
fn unwrap_blocks(
    inputs: &CostInputs<'_>,
    usable_at: &(impl Fn(usize) -> bool + Sync),
    shape: Shape3,
    blocks: &Blocks,
    components: bool,
) -> Unwrapped {
    let [_, ny, nz] = shape.0;
    let plane = ny * nz;
    let mut phase = vec![0.0f32; shape.len()];
    let mut labels = vec![UNREACHED; shape.len()];
    // The blocks of one slab of x-planes write to its part of the volume, one by one.
    let slab_sizes: Vec<usize> = blocks.x.windows(2).map(|x| (x[1] - x[0]) * plane).collect();
    let parts: Vec<BlockParts> = split_sizes(&mut phase, &slab_sizes)
        .into_par_iter()
        .zip(split_sizes(&mut labels, &slab_sizes))
        .enumerate()
        .flat_map_iter(|(bx, (slab_phase, slab_labels))| {
            (0..blocks.n_y())
                .map(|by| {
                    grow_block(
                        inputs,
                        usable_at,
                        shape,
                        blocks,
                        (bx, by),
                        slab_phase,
                        slab_labels,
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();

    // Region r of block b is part r − base[b] of that block.
    let mut base = vec![0u32; parts.len() + 1];
    for (b, block) in parts.iter().enumerate() {
        base[b + 1] = base[b] + block.seed_scores.len() as u32;
    }
    let n_regions = base[parts.len()] as usize;
    let n_y = blocks.n_y();
    // Faces: (lower block, upper block, axis) for the x and y neighbours.
    let faces: Vec<(usize, usize, usize)> = (0..blocks.count())
        .flat_map(|b| {
            let (bx, by) = (b / n_y, b % n_y);
            let x_face = (bx + 1 < blocks.n_x()).then_some((b, b + n_y, 0));
            let y_face = (by + 1 < n_y).then_some((b, b + 1, 1));
            x_face.into_iter().chain(y_face)
        })
        .collect();
    let mut links: Vec<Link> = faces
        .par_iter()
        .flat_map_iter(|&(lower, upper, axis)| {
            let (bx, by) = (upper / n_y, upper % n_y);
            let (x0, x1, y0, y1) = (
                blocks.x[bx],
                blocks.x[bx + 1],
                blocks.y[by],
                blocks.y[by + 1],
            );
            // Runs of edges from the last plane (row) of `lower` to the first of `upper`.
            let runs: Vec<(usize, usize, usize)> = if axis == 0 {
                (y0..y1)
                    .map(|j| (shape.idx(x0 - 1, j, 0), shape.idx(x0, j, 0), nz))
                    .collect()
            } else {
                (x0..x1)
                    .map(|i| (shape.idx(i, y0 - 1, 0), shape.idx(i, y0, 0), nz))
                    .collect()
            };
            face_links(
                inputs,
                &phase,
                &labels,
                runs.into_iter(),
                base[lower],
                base[upper],
            )
        })
        .collect();
    links.sort_unstable_by_key(|l| (std::cmp::Reverse(l.margin), l.a, l.b));
    let mut forest = TurnsForest::new(n_regions);
    for link in &links {
        forest.join(link.a, link.b, link.k);
    }

    // Seed (score, voxel) of every region; the best of each joined part is its anchor.
    let block_of_region: Vec<usize> = (0..parts.len())
        .flat_map(|b| std::iter::repeat(b).take(parts[b].seed_scores.len()))
        .collect();
    let to_volume = |b: usize, v: u32| -> u32 {
        let (bx, by) = (b / n_y, b % n_y);
        let run = (blocks.y[by + 1] - blocks.y[by]) * nz;
        let (i, rest) = (v as usize / run, v as usize % run);
        (shape.idx(blocks.x[bx] + i, blocks.y[by], 0) + rest) as u32
    };
    let seeds: Vec<(u16, u32)> = (0..n_regions)
        .map(|r| {
            let b = block_of_region[r];
            let part = r - base[b] as usize;
            let seed = parts[b].visit_order[parts[b].component_starts[part]];
            (parts[b].seed_scores[part], to_volume(b, seed))
        })
        .collect();
    let seed_rank = |r: usize| (std::cmp::Reverse(seeds[r].0), seeds[r].1);
    let roots: Vec<(u32, i64)> = (0..n_regions as u32).map(|r| forest.find(r)).collect();
    let mut anchor: Vec<Option<usize>> = vec![None; n_regions];
    for (r, &(root, _)) in roots.iter().enumerate() {
        let best = &mut anchor[root as usize];
        if best.map_or(true, |b| seed_rank(r) < seed_rank(b)) {
            *best = Some(r);
        }
    }
    let anchor_of = |r: usize| anchor[roots[r].0 as usize].unwrap_or(r);
    // Turns to add to each region: its turns relative to its part's anchor.
    let shift: Vec<i64> = (0..n_regions)
        .map(|r| roots[r].1 - roots[anchor_of(r)].1)
        .collect();

    // Shift the regions, from the input phase as `grow` would have reached them.
    phase
        .par_chunks_mut(nz)
        .zip(labels.par_chunks(nz))
        .enumerate()
        .for_each(|(row, (out, row_labels))| {
            let (i, j) = (row / ny, row % ny);
            let b = blocks.x.partition_point(|&x| x <= i) - 1;
            let block = b * n_y + blocks.y.partition_point(|&y| y <= j) - 1;
            let raw_row = &inputs.phase[row * nz..(row + 1) * nz];
            for ((u, &label), &raw) in out.iter_mut().zip(row_labels).zip(raw_row) {
                if label == UNREACHED {
                    continue;
                }
                let turns = shift[base[block] as usize + label as usize];
                if turns != 0 {
                    let raw = raw as f64;
                    let k = round_fast((*u as f64 - raw) * (1.0 / TWO_PI)) + turns as f64;
                    *u = (raw + TWO_PI * k) as f32;
                }
            }
        });
    if !components {
        return Unwrapped {
            phase,
            visit_order: Vec::new(),
            component_starts: vec![0],
        };
    }

    // Components: the joined parts by their anchor's seed, anchor region first.
    let mut regions: Vec<usize> = (0..n_regions).collect();
    regions.sort_unstable_by_key(|&r| {
        let a = anchor_of(r);
        (seed_rank(a), r != a, r)
    });
    let region_voxels = |r: usize| {
        let b = block_of_region[r];
        let part = r - base[b] as usize;
        let c = &parts[b].component_starts;
        (b, &parts[b].visit_order[c[part]..c[part + 1]])
    };
    let mut component_starts = Vec::new();
    let mut sizes = Vec::with_capacity(n_regions);
    let mut total = 0;
    for (i, &r) in regions.iter().enumerate() {
        if i == 0 || anchor_of(r) != anchor_of(regions[i - 1]) {
            component_starts.push(total);
        }
        sizes.push(region_voxels(r).1.len());
        total += sizes[i];
    }
    component_starts.push(total);
    let mut visit_order = vec![0u32; total];
    split_sizes(&mut visit_order, &sizes)
        .into_par_iter()
        .zip(regions.par_iter())
        .for_each(|(out, &r)| {
            let (b, voxels) = region_voxels(r);
            for (o, &v) in out.iter_mut().zip(voxels) {
                *o = to_volume(b, v);
            }
        });
    Unwrapped {
        phase,
        visit_order,
        component_starts,
    }
}

/// `values` cut into consecutive pieces of the given sizes (which must not exceed it).
fn split_sizes<'a, T>(values: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
    let mut pieces = Vec::with_capacity(sizes.len());
    let mut rest = values;
    for &size in sizes {
        let (piece, tail) = rest.split_at_mut(size);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

#[cfg(test)]
#[path = "unwrap_reference.rs"]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::normal_source;

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

    /// Two slabs of a 20×10×10 volume separated by an empty plane at i = 10, with one
    /// NaN voxel inside: (shape, true phase, wrapped phase, wrapped phase with the NaN,
    /// mask, index of the NaN voxel).
    fn two_slabs_with_a_nan() -> (Shape3, Vec<f64>, Vec<f32>, Vec<f32>, Vec<u8>, usize) {
        let shape = Shape3([20, 10, 10]);
        let truth = smooth_phase(shape);
        let w = wrapped(&truth);
        let mut mask: Vec<u8> = (0..shape.len()).map(|v| u8::from(v / 100 != 10)).collect();
        mask[0] = 1;
        let mut w_nan = w.clone();
        let nan_voxel = shape.idx(15, 5, 5);
        w_nan[nan_voxel] = f32::NAN;
        (shape, truth, w, w_nan, mask, nan_voxel)
    }

    #[test]
    fn separate_components_and_outside_mask() {
        let (shape, truth, w, w_nan, mask, nan_voxel) = two_slabs_with_a_nan();
        let unwrapped = unwrap_with_components(&w_nan, None, Some(&mask), shape).unwrap();
        let out = &unwrapped.phase;
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

    /// Block-wise unwrapping with blocks of `side` x-planes × `side` y-rows.
    fn unwrap_blocks_of(
        phase: &[f32],
        magnitude: Option<&[f32]>,
        second: Option<SecondEcho<'_>>,
        mask: Option<&[u8]>,
        shape: Shape3,
        side: usize,
    ) -> Unwrapped {
        assert!(Blocks::new(shape, side).count() > 1, "one block only");
        let out = unwrap_checked(phase, magnitude, second, mask, shape, Some(side), true);
        // The phase-only path gives the same values.
        let alone = unwrap_checked(phase, magnitude, second, mask, shape, Some(side), false);
        assert!(out
            .phase
            .iter()
            .zip(&alone.phase)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        out
    }

    /// Every reached voxel listed once, unreached ones keep their input value, and every
    /// output is its input plus a multiple of 2π.
    fn assert_consistent(out: &Unwrapped, input: &[f32]) {
        let reached = out.reached(input.len());
        assert_eq!(
            out.visit_order.len(),
            reached.iter().filter(|&&r| r).count()
        );
        for (v, (&o, &i)) in out.phase.iter().zip(input).enumerate() {
            if !reached[v] {
                assert_eq!(o.to_bits(), i.to_bits(), "voxel {v}: unreached but changed");
                continue;
            }
            let turns = (o as f64 - i as f64) / TWO_PI;
            assert!(
                (turns - turns.round()).abs() < 1e-4,
                "voxel {v}: {turns} turns"
            );
        }
    }

    #[test]
    fn small_volumes_use_one_queue_and_large_ones_blocks() {
        assert_eq!(default_block_side(Shape3([160, 160, 160])), None);
        // 256×256×176: 65 536 / 176 = 372 voxels per z-row → 19 × 19 × 176 blocks.
        assert_eq!(default_block_side(Shape3([256, 256, 176])), Some(19));
        assert_eq!(
            default_block_side(Shape3([64, 64, 2048])),
            Some(MIN_BLOCK_SIDE)
        );
        let blocks = Blocks::new(Shape3([256, 256, 176]), 19);
        assert_eq!((blocks.n_x(), blocks.n_y()), (14, 14));
        assert!(blocks
            .x
            .windows(2)
            .all(|w| (18..=19).contains(&(w[1] - w[0]))));
    }

    #[test]
    fn blocks_recover_smooth_phase_with_many_wraps() {
        let shape = Shape3([24, 20, 16]);
        let truth = smooth_phase(shape);
        let w = wrapped(&truth);
        // 6 × 5 blocks: wraps cross every face.
        let out = unwrap_blocks_of(&w, None, None, None, shape, 4);
        assert_eq!(out.n_components(), 1);
        assert_eq!(out.visit_order.len(), shape.len());
        assert_exact(&out.phase, &truth, |_| true);
        assert_consistent(&out, &w);
    }

    #[test]
    fn u_shaped_part_cut_by_a_block_face_is_one_part() {
        let shape = Shape3([20, 16, 8]);
        let truth = smooth_phase(shape);
        let w = wrapped(&truth);
        // Two arms along x (y in 2..6 and 10..14) joined by a bridge at x ≥ 16; the
        // block of x < 10 holds the two arms as separate parts.
        let inside = |v: usize| {
            let (i, j) = (v / (16 * 8), (v / 8) % 16);
            (2..6).contains(&j) || (10..14).contains(&j) || (i >= 16 && (2..14).contains(&j))
        };
        let mask: Vec<u8> = (0..shape.len()).map(|v| u8::from(inside(v))).collect();
        let out = unwrap_blocks_of(&w, None, None, Some(&mask), shape, 16);
        assert_eq!(out.n_components(), 1);
        assert_exact(&out.phase, &truth, inside);
        assert_consistent(&out, &w);
        // The growth of the first block alone does see two parts.
        let first_block: Vec<u8> = mask[..10 * 16 * 8].to_vec();
        let alone = unwrap_with_components(
            &w[..10 * 16 * 8],
            None,
            Some(&first_block),
            Shape3([10, 16, 8]),
        )
        .unwrap();
        assert_eq!(alone.n_components(), 2);
    }

    #[test]
    fn separate_parts_stay_separate_across_block_faces() {
        let (shape, truth, _, w_nan, mask, nan_voxel) = two_slabs_with_a_nan();
        let out = unwrap_blocks_of(&w_nan, None, None, Some(&mask), shape, 4);
        assert_eq!(out.n_components(), 2);
        assert!(out.phase[nan_voxel].is_nan() && !out.reached(shape.len())[nan_voxel]);
        assert_eq!(out.component(0).len() + out.component(1).len(), 1900 - 1);
        assert_exact(&out.phase, &truth, |v| v / 100 < 10);
        assert_exact(&out.phase, &truth, |v| v / 100 > 10 && v != nan_voxel);
        assert_consistent(&out, &w_nan);
        // Each component is one side of the gap and starts with its seed.
        for c in 0..2 {
            let side = out.component(c)[0] / 1000;
            assert!(out.component(c).iter().all(|&v| v / 1000 == side));
        }
    }

    /// A brain-like phantom: an ellipsoid (the mask) with a smooth field of many wraps,
    /// a dark patch, complex Gaussian noise (SNR ≈ 8 in tissue, ≈ 1 in the patch), and the
    /// same field at a later echo.
    fn noisy_brain(shape: Shape3) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>) {
        let [nx, ny, nz] = shape.0;
        let mut normal = normal_source(7u64);
        let axis = |i: usize, n: usize| -1.0 + 2.0 * i as f64 / (n - 1) as f64;
        let (mut phase, mut later, mut mag, mut mask) = (vec![], vec![], vec![], vec![]);
        for i in 0..nx {
            for j in 0..ny {
                for k in 0..nz {
                    let (x, y, z) = (axis(i, nx), axis(j, ny), axis(k, nz));
                    let inside = (x / 0.9).powi(2) + (y / 0.8).powi(2) + (z / 0.85).powi(2) < 1.0;
                    let dark = (x - 0.3).powi(2) + (y + 0.2).powi(2) + z * z < 0.04;
                    let a = match (inside, dark) {
                        (false, _) => 0.0,
                        (true, true) => 1.0,
                        (true, false) => 8.0 * (1.0 + 0.3 * (3.0 * x).cos()),
                    };
                    let field = 9.0 * x + 6.0 * y * y - 5.0 * z + 4.0 * (x * y * 3.0).sin();
                    for (scale, out, keep_mag) in
                        [(1.0, &mut phase, true), (1.6, &mut later, false)]
                    {
                        let re = a * (scale * field).cos() + normal();
                        let im = a * (scale * field).sin() + normal();
                        out.push(im.atan2(re) as f32);
                        if keep_mag {
                            mag.push(re.hypot(im) as f32);
                        }
                    }
                    mask.push(u8::from(inside));
                }
            }
        }
        (phase, mag, later, mask)
    }

    #[test]
    fn blocks_agree_with_the_single_queue_on_a_noisy_brain() {
        let shape = Shape3([48, 44, 40]);
        let (phase, mag, later, mask) = noisy_brain(shape);
        let second = SecondEcho {
            phase: &later,
            te_ratio: 0.625,
        };
        let single = unwrap_checked(
            &phase,
            Some(&mag),
            Some(second),
            Some(&mask),
            shape,
            None,
            true,
        );
        let reference =
            reference::unwrap_reference(&phase, Some(&mag), Some(second), Some(&mask), shape);
        assert_eq!(single.visit_order, reference.visit_order);
        let in_mask = mask.iter().filter(|&&m| m != 0).count();
        for side in [12, 20] {
            let blocks =
                unwrap_blocks_of(&phase, Some(&mag), Some(second), Some(&mask), shape, side);
            assert_consistent(&blocks, &phase);
            let same = (0..shape.len())
                .filter(|&v| mask[v] != 0 && single.phase[v].to_bits() == blocks.phase[v].to_bits())
                .count();
            let agree = same as f64 / in_mask as f64;
            eprintln!(
                "blocks of side {side}: {:.4} % of {in_mask} in-mask voxels agree",
                100.0 * agree
            );
            assert!(
                agree >= 0.999,
                "side {side}: only {:.4} % agree",
                100.0 * agree
            );
            assert_eq!(blocks.n_components(), single.n_components());
        }
    }

    #[test]
    fn blocks_do_not_depend_on_the_thread_count() {
        let shape = Shape3([40, 36, 24]);
        let (phase, mag, later, mask) = noisy_brain(shape);
        let second = SecondEcho {
            phase: &later,
            te_ratio: 0.625,
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                unwrap_blocks_of(&phase, Some(&mag), Some(second), Some(&mask), shape, 8)
            })
        };
        let (one, two) = (run(1), run(2));
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.phase), bits(&two.phase));
        assert_eq!(one.visit_order, two.visit_order);
        assert_eq!(one.component_starts, two.component_starts);
    }

    #[test]
    fn blocks_handle_empty_masks_and_flat_volumes() {
        let shape = Shape3([16, 12, 6]);
        let w = wrapped(&smooth_phase(shape));
        let empty = vec![0u8; shape.len()];
        let out = unwrap_blocks_of(&w, None, None, Some(&empty), shape, 4);
        assert_eq!((out.n_components(), out.visit_order.len()), (0, 0));
        assert_consistent(&out, &w);
        // One z-row per (x, y): blocks of 4 × 4 × 1.
        let flat = Shape3([24, 20, 1]);
        let truth: Vec<f64> = smooth_phase(Shape3([24, 20, 16]))
            .into_iter()
            .step_by(16)
            .collect();
        let w = wrapped(&truth);
        let out = unwrap_blocks_of(&w, None, None, None, flat, 4);
        assert_eq!(out.n_components(), 1);
        assert_exact(&out.phase, &truth, |_| true);
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
    use crate::test_support::normal_source;

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
        let mut normal = normal_source(12345u64);
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
    /// times of the block-wise unwrapping of the bench's data (`UNWRAP_TIMING_SIDE`
    /// overrides the block side) and, with `UNWRAP_TIMING_SINGLE` set, of the
    /// single-queue growth, and how far the two agree.
    #[test]
    #[ignore]
    fn unwrap_timing() {
        let shape = Shape3([256, 256, 176]);
        let (phase, mag, later) = bench_echoes(shape);
        let second = SecondEcho {
            phase: &later,
            te_ratio: 7.0 / 11.0,
        };
        let side = std::env::var("UNWRAP_TIMING_SIDE")
            .ok()
            .and_then(|p| p.parse().ok())
            .or(default_block_side(shape));
        let mut best = f64::INFINITY;
        let mut blocks = None;
        for _ in 0..3 {
            let (t0, c0) = (std::time::Instant::now(), cpu_s());
            let out = unwrap_checked(&phase, Some(&mag), Some(second), None, shape, side, false);
            let (t1, c1) = (t0.elapsed().as_secs_f64(), cpu_s());
            best = best.min(t1);
            eprintln!(
                "blocks of side {side:?}: wall {:.0} ms, cpu {:.0} ms",
                t1 * 1e3,
                (c1 - c0) * 1e3,
            );
            blocks = Some(out);
        }
        eprintln!("best block-wise: {:.0} ms", best * 1e3);
        let blocks = blocks.unwrap();
        if std::env::var_os("UNWRAP_TIMING_SINGLE").is_none() {
            return;
        }
        let (t0, c0) = (std::time::Instant::now(), cpu_s());
        let usable = vec![OPEN; shape.len()];
        let m_ref = magnitude_reference(&mag, |_| true);
        let inputs = CostInputs {
            phase: &phase,
            magnitude: Some(&mag),
            second: Some(second),
            inv_ref: 1.0 / m_ref,
        };
        let (mut nodes, first_seed) = build_nodes(&inputs, &usable, shape, true);
        let (t2, c2) = (t0.elapsed(), cpu_s());
        let single = grow(&mut nodes, first_seed, shape);
        let (t3, c3) = (t0.elapsed(), cpu_s());
        let same = single
            .phase
            .iter()
            .zip(&blocks.phase)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        eprintln!(
            "single queue: wall costs+seed {t2:?} +grow {t3:?}; cpu: costs {:.2} s, \
             grow {:.2} s; {:.4} % of voxels identical to the block-wise",
            c2 - c0,
            c3 - c2,
            100.0 * same as f64 / shape.len() as f64
        );
    }
}

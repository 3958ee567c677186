//! The single-queue region growth: packed per-voxel nodes (phase, forward edge costs,
//! state), their construction, and the growth through 256 cost-bucket stacks.

use super::cost::{cost_run, seed_score, CostInputs, CLOSED, NO_EDGE, OPEN};
use super::{round_fast, Unwrapped, N_BINS, TWO_PI};
use crate::grid::Shape3;
use rayon::prelude::*;

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
pub(super) const STATE_SHIFT: u32 = 56;

#[inline(always)]
pub(super) fn node_phase(node: u64) -> f32 {
    f32::from_bits(node as u32)
}

#[inline(always)]
pub(super) fn node_forward(node: u64, axis: usize) -> u8 {
    (node >> (32 + 8 * axis)) as u8
}

#[inline(always)]
pub(super) fn node_state(node: u64) -> u8 {
    (node >> STATE_SHIFT) as u8
}

#[inline(always)]
pub(super) fn pack_node(phase: f32, forward: [u8; 3], state: u8) -> u64 {
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
pub(super) fn build_nodes(
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
pub(super) fn remaining_seeds(nodes: &[u64], shape: Shape3) -> Vec<u32> {
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
pub(super) fn node_seed_score(nodes: &[u64], v: usize, strides: [usize; 3]) -> u16 {
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
pub(super) const PREFETCH_DEPTH: usize = 4;

/// Hint the CPU to bring `value`'s cache line in (no-op where unsupported).
#[inline(always)]
pub(super) fn prefetch<T>(value: &T) {
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
pub(super) fn grow(nodes: &mut [u64], first_seed: Option<usize>, shape: Shape3) -> Unwrapped {
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
pub(super) fn grow_parts<const PREFETCH: bool>(
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

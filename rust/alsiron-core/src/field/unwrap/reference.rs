//! The first, straightforward implementation of the growth (separate cost records,
//! a full seed sort, one state array), kept for the tests: the optimised growth
//! (`queue.rs`) must reproduce its output bit for bit.

use super::cost::NO_EDGE;
use super::{round_fast, SecondEcho, Unwrapped, N_BINS, TWO_PI};
use crate::grid::Shape3;
use rayon::prelude::*;

/// Unwrapping exactly as the first implementation did (inputs already checked).
pub(super) fn unwrap_reference(
    phase: &[f32],
    magnitude: Option<&[f32]>,
    second: Option<SecondEcho<'_>>,
    mask: Option<&[u8]>,
    shape: Shape3,
) -> Unwrapped {
    let n = shape.len();
    let active: Vec<bool> = (0..n)
        .map(|i| {
            mask.map_or(true, |m| m[i] != 0)
                && magnitude.map_or(true, |m| m[i].is_finite())
                && second.map_or(true, |s| s.phase[i].is_finite())
                && phase[i].is_finite()
        })
        .collect();
    let m_ref = magnitude.map(|m| magnitude_reference(m, &active));
    let costs = edge_costs(phase, magnitude, second, m_ref, &active, shape);
    let order = seed_order(&costs, &active);
    grow(phase, &costs, &active, &order, shape)
}

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

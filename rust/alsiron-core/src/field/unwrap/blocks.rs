//! Block-wise growth of large volumes and the merge of the blocks' parts across the
//! block faces (weighted 2πk votes, maximum spanning forest).

use super::cost::{cost_run, CostInputs, CLOSED, NO_EDGE, OPEN};
use super::queue::*;
use super::{round_fast, SecondEcho, Unwrapped, TWO_PI};
use crate::grid::Shape3;
use rayon::prelude::*;

// Block-wise growth of large volumes. One queue over the whole volume spends most of its
// time waiting for memory: its nodes (8 bytes per voxel) are far larger than the caches
// and the growth front jumps around them. So a large volume is cut into blocks (a range
// of x-planes × a range of y-rows × all of z), each grown on its own, in cache and in
// parallel; the parts grown in the blocks ("regions") are then joined across the block
// faces.

/// Volumes of up to this many voxels are grown as one queue (their output is that of
/// the reference growth); larger ones block-wise.
pub(super) const SINGLE_QUEUE_MAX_VOXELS: usize = 1 << 22;
/// Voxels per block aimed at: 512 KB of nodes, so that a block's growth runs in the
/// core's own (L2) cache.
pub(super) const BLOCK_VOXELS: usize = 1 << 16;
/// Fewest x-planes and y-rows per block.
pub(super) const MIN_BLOCK_SIDE: usize = 8;

/// x-planes and y-rows per block for a volume of this shape, or `None` for one queue
/// (from the shape only, so the result never depends on the number of threads).
pub(super) fn default_block_side(shape: Shape3) -> Option<usize> {
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
pub(super) struct Blocks {
    pub(super) x: Vec<usize>,
    pub(super) y: Vec<usize>,
}

impl Blocks {
    pub(super) fn new(shape: Shape3, side: usize) -> Self {
        let bounds = |n: usize| {
            let count = n.div_ceil(side.max(1)).max(1);
            (0..=count).map(|s| s * n / count).collect::<Vec<_>>()
        };
        Self {
            x: bounds(shape.0[0]),
            y: bounds(shape.0[1]),
        }
    }

    pub(super) fn n_x(&self) -> usize {
        self.x.len() - 1
    }

    pub(super) fn n_y(&self) -> usize {
        self.y.len() - 1
    }

    pub(super) fn count(&self) -> usize {
        self.n_x() * self.n_y()
    }
}

/// Marks a voxel that its block's growth did not reach.
pub(super) const UNREACHED: u32 = u32::MAX;

/// What the growth of one block leaves for the merge (its phases and part labels are
/// written to the volume).
pub(super) struct BlockParts {
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
pub(super) fn grow_block(
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
pub(super) struct Link {
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
pub(super) fn face_links(
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
pub(super) struct TurnsForest {
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
pub(super) fn unwrap_blocks(
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
pub(super) fn split_sizes<'a, T>(values: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
    let mut pieces = Vec::with_capacity(sizes.len());
    let mut rest = values;
    for &size in sizes {
        let (piece, tail) = rest.split_at_mut(size);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

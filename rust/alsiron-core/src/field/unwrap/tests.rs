//! Unit tests of the unwrapper: exactness, invariance, parts, agreement with the
//! reference growth and of the block-wise growth with the single queue.

use super::blocks::*;
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
                for (scale, out, keep_mag) in [(1.0, &mut phase, true), (1.6, &mut later, false)] {
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
        let blocks = unwrap_blocks_of(&phase, Some(&mag), Some(second), Some(&mask), shape, side);
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
        pool.install(|| unwrap_blocks_of(&phase, Some(&mag), Some(second), Some(&mask), shape, 8))
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

//! Unit tests of PDF, iSMV and LBV on a two-source phantom (one source outside the
//! mask, one inside), and their refusals and interrupts.

use super::*;
use crate::qsm::dipole::forward_field;
use crate::test_support::geometry;
use crate::test_support::{demeaned_in, masked_nrmse_pct};

const NEVER: &(dyn Fn(usize) -> bool + Sync) = &|_| false;

/// Ball mask of radius 11 voxels, a strong source outside it and a weak one inside;
/// returns (total field, local field of the inside source, background, mask).
fn two_sources(n: usize, b0: [f64; 3], vs: [f64; 3]) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>) {
    let shape = Shape3([n, n, n]);
    let c = n as f64 / 2.0;
    let mut chi_out = vec![0.0f32; shape.len()];
    let mut chi_in = vec![0.0f32; shape.len()];
    let mut mask = vec![0u8; shape.len()];
    each_voxel(n, |idx, d2| {
        if d2(c, c, c) < 11.0f64.powi(2) {
            mask[idx] = 1;
        }
        if d2(c + 3.0, c, c + 15.0) < 9.0 {
            chi_out[idx] = 9.0;
        }
        if d2(c + 2.0, c - 3.0, c) < 16.0 {
            chi_in[idx] = 0.1;
        }
    });
    let bg = forward_field(&chi_out, &geometry(shape, vs, b0)).unwrap();
    let local = forward_field(&chi_in, &geometry(shape, vs, b0)).unwrap();
    let total = bg.iter().zip(&local).map(|(a, b)| a + b).collect();
    (total, local, bg, mask)
}

/// Calls `visit(index, d2)` for every voxel of an n³ grid, where `d2(a, b, e)` is the
/// squared distance [voxels²] from the voxel to the point (a, b, e).
fn each_voxel(n: usize, mut visit: impl FnMut(usize, &dyn Fn(f64, f64, f64) -> f64)) {
    let shape = Shape3([n; 3]);
    for i in 0..n {
        for j in 0..n {
            for k in 0..n {
                let d2 = |a: f64, b: f64, e: f64| {
                    (i as f64 - a).powi(2) + (j as f64 - b).powi(2) + (k as f64 - e).powi(2)
                };
                visit(shape.idx(i, j, k), &d2);
            }
        }
    }
}

/// ‖a − b‖ / ‖b‖ over `sel` after demeaning both there.
fn rel_error(a: &[f32], b: &[f32], sel: &[u8]) -> f64 {
    masked_nrmse_pct(a, b, sel) / 100.0
}

/// ‖v‖ over `sel` after demeaning there.
fn demeaned_norm(v: &[f32], sel: &[u8]) -> f64 {
    demeaned_in(v, sel)
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
}

#[test]
fn pdf_removes_an_outside_source_and_keeps_an_inside_one() {
    let n = 36;
    let shape = Shape3([n; 3]);
    for (b0, vs) in [
        ([0.0, 0.0, 1.0], [1.0; 3]),
        ([0.3, -0.2, 1.0], [1.0, 1.0, 1.5]),
    ] {
        let (total, local, bg, mask) = two_sources(n, b0, vs);
        let run = |f: &[f32]| {
            pdf(
                f,
                &mask,
                None,
                &geometry(shape, vs, b0),
                PdfParams::default(),
                NEVER,
            )
            .unwrap()
        };
        let (bg_left, _) = run(&bg);
        let (got, iters) = run(&total);
        let removed = 1.0 - demeaned_norm(&bg_left, &mask) / demeaned_norm(&bg, &mask);
        let before = rel_error(&total, &local, &mask);
        let after = rel_error(&got, &local, &mask);
        // Measured: 97 % of the background removed; the error vs the local field falls
        // from 10.6 to 0.57 (oblique, anisotropic: 98 %, 7.5 to 0.55; the uniform inside sphere's field is partly projected
        // onto outside dipoles: PDF's known bias for piecewise-constant χ).
        assert!(iters > 1);
        assert!(removed > 0.95, "{b0:?} {vs:?}: removed {removed}");
        assert!(
            after < 0.65 && after < before / 10.0,
            "{b0:?} {vs:?}: {after}"
        );
        assert!(got.iter().zip(&mask).all(|(&v, &m)| m != 0 || v == 0.0));
    }
}

#[test]
fn ismv_removes_an_outside_source_and_keeps_an_inside_one() {
    let n = 36;
    let shape = Shape3([n; 3]);
    let (total, local, bg, mask) = two_sources(n, [0.0, 0.0, 1.0], [1.0; 3]);
    let params = IsmvParams::for_voxel_size([1.0; 3]);
    let (got, eroded, iters) = ismv(&total, &mask, shape, [1.0; 3], params, NEVER).unwrap();
    assert!(iters > 1 && iters < params.max_iter);
    assert!(eroded.iter().zip(&mask).all(|(&e, &m)| e == 0 || m != 0));
    assert!(rel_error(&bg, &local, &eroded) > 1.5);
    let err = rel_error(&got, &local, &eroded);
    assert!(err < 0.35, "iSMV error {err}");
}

#[test]
fn lbv_removes_an_outside_source_and_keeps_an_inside_one() {
    let n = 36;
    let shape = Shape3([n; 3]);
    let (total, local, bg, mask) = two_sources(n, [0.0, 0.0, 1.0], [1.0; 3]);
    let (got, interior, iters) =
        lbv(&total, &mask, shape, [1.0; 3], LbvParams::default(), NEVER).unwrap();
    assert!(iters > 1 && iters < LbvParams::default().max_iter);
    assert!(interior.iter().zip(&mask).all(|(&e, &m)| e == 0 || m != 0));
    let before = rel_error(&total, &local, &interior);
    let after = rel_error(&got, &local, &interior);
    assert!(rel_error(&bg, &local, &interior) > 1.5);
    // Measured: 35 iterations, error 7.15 -> 0.367 (the uniform inside sphere's field
    // reaches the mask boundary, where LBV assumes it is 0).
    assert!(after < 0.45, "LBV error {before} -> {after}");
    // A purely harmonic field (linear ramp) is removed to round-off.
    let ramp: Vec<f32> = (0..shape.len()).map(|i| (i % n) as f32 * 0.01).collect();
    let (flat, interior, _) =
        lbv(&ramp, &mask, shape, [1.0; 3], LbvParams::default(), NEVER).unwrap();
    let worst = flat
        .iter()
        .zip(&interior)
        .filter(|(_, &e)| e != 0)
        .map(|(v, _)| v.abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "ramp residual {worst}");
}

#[test]
fn interrupts_and_bad_arguments_are_reported() {
    let shape = Shape3([10, 10, 10]);
    let f = vec![0.1f32; 1000];
    let mut m = vec![0u8; 1000];
    for i in 2..8 {
        for j in 2..8 {
            for k in 2..8 {
                m[shape.idx(i, j, k)] = 1;
            }
        }
    }
    let stop: &(dyn Fn(usize) -> bool + Sync) = &|_| true;
    let pp = PdfParams::default();
    let ip = IsmvParams::for_voxel_size([1.0; 3]);
    let b0 = [0.0, 0.0, 1.0];
    assert_eq!(
        pdf(&f, &m, None, &geometry(shape, [1.0; 3], b0), pp, stop).err(),
        Some(CoreError::Interrupted)
    );
    assert_eq!(
        ismv(&f, &m, shape, [1.0; 3], ip, stop).err(),
        Some(CoreError::Interrupted)
    );
    assert!(pdf(
        &f,
        &vec![0u8; 1000],
        None,
        &geometry(shape, [1.0; 3], b0),
        pp,
        NEVER
    )
    .is_err());
    assert!(pdf(
        &f,
        &m,
        Some(&[0.0; 1000]),
        &geometry(shape, [1.0; 3], b0),
        pp,
        NEVER
    )
    .is_err());
    assert!(pdf(
        &f,
        &m,
        Some(&[-1.0; 1000]),
        &geometry(shape, [1.0; 3], b0),
        pp,
        NEVER
    )
    .is_err());
    assert!(pdf(
        &f[..999],
        &m,
        None,
        &geometry(shape, [1.0; 3], b0),
        pp,
        NEVER
    )
    .is_err());
    let mut nan = f.clone();
    nan[5] = f32::NAN;
    assert!(ismv(&nan, &m, shape, [1.0; 3], ip, NEVER).is_err());
    let bad = IsmvParams {
        radius_mm: 0.5,
        ..ip
    };
    assert!(ismv(&f, &m, shape, [1.0; 3], bad, NEVER).is_err());
    let huge = IsmvParams {
        radius_mm: 5.0,
        ..ip
    };
    assert!(ismv(&f, &m, shape, [1.0; 3], huge, NEVER).is_err());
    let lp = LbvParams::default();
    // A constant field is already harmonic (no iteration, nothing to interrupt).
    let bumpy: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
    assert_eq!(
        lbv(&bumpy, &m, shape, [1.0; 3], lp, stop).err(),
        Some(CoreError::Interrupted)
    );
    let mut thin = vec![0u8; 1000];
    thin[shape.idx(5, 5, 5)] = 1;
    assert!(lbv(&f, &thin, shape, [1.0; 3], lp, NEVER).is_err());
    assert!(lbv(
        &f,
        &vec![1u8; 1000][..],
        shape,
        [1.0; 3],
        LbvParams { tol: -1.0, ..lp },
        NEVER
    )
    .is_err());
}

#[test]
fn pdf_with_smooth_sources_still_removes_an_outside_source() {
    let n = 36;
    let shape = Shape3([n; 3]);
    let (b0, vs) = ([0.3, -0.2, 1.0], [1.0, 1.0, 1.5]);
    let (total, local, _, mask) = two_sources(n, b0, vs);
    let run = |lambda: f64| {
        let params = PdfParams {
            source_smoothing: lambda,
            ..PdfParams::default()
        };
        pdf(&total, &mask, None, &geometry(shape, vs, b0), params, NEVER).unwrap()
    };
    let before = rel_error(&total, &local, &mask);
    let mut errors = vec![];
    for lambda in [0.0, 3e-4, 1e-2] {
        let (got, iters) = run(lambda);
        assert!(iters > 1);
        assert!(got.iter().zip(&mask).all(|(&v, &m)| m != 0 || v == 0.0));
        errors.push(rel_error(&got, &local, &mask));
    }
    // Measured: error vs the local field 7.52 before, 0.55 plain, 0.66 at λ = 3e-4, 1.60
    // at 1e-2. The outside source here is a compact sphere, i.e. rough, so the penalty
    // resists it more the larger λ is: a small λ still removes it.
    assert!(errors[1] < before / 10.0, "{errors:?}");
    assert!(errors[0] < errors[1] && errors[1] < errors[2], "{errors:?}");
}

#[test]
fn source_gradient_penalty_is_symmetric_non_negative_and_blind_to_constants() {
    let shape = Shape3([6, 5, 7]);
    let vs = [1.0, 1.2, 1.5];
    let sources: Vec<bool> = (0..shape.len()).map(|i| i % 5 != 0).collect();
    let ramp = |a: f32, b: f32| -> Vec<f32> {
        (0..shape.len())
            .map(|i| {
                if sources[i] {
                    ((i as f32) * a).sin() + b
                } else {
                    0.0
                }
            })
            .collect()
    };
    let (x, y) = (ramp(0.37, 0.0), ramp(0.91, 0.2));
    let apply = |v: &[f32]| {
        let mut out = vec![0.0f32; shape.len()];
        super::pdf::add_source_gradient_penalty(&mut out, v, &sources, shape, vs, 0.5);
        out
    };
    let (ax, ay) = (apply(&x), apply(&y));
    let (xay, yax) = (dot(&x, &ay), dot(&y, &ax));
    assert!((xay - yax).abs() < 1e-5 * xay.abs().max(1.0), "{xay} {yax}");
    assert!(dot(&x, &ax) > 0.0);
    let constant: Vec<f32> = sources.iter().map(|&s| if s { 2.5 } else { 0.0 }).collect();
    assert!(apply(&constant).iter().all(|v| v.abs() < 1e-6));
}

#[test]
fn pdf_refuses_a_negative_or_non_finite_source_smoothing() {
    let n = 12;
    let shape = Shape3([n; 3]);
    let (total, _, _, mask) = two_sources(n, [0.0, 0.0, 1.0], [1.0; 3]);
    for lambda in [-1e-3, f64::NAN, f64::INFINITY] {
        let params = PdfParams {
            source_smoothing: lambda,
            ..PdfParams::default()
        };
        let geom = geometry(shape, [1.0; 3], [0.0, 0.0, 1.0]);
        assert!(pdf(&total, &mask, None, &geom, params, NEVER).is_err());
    }
}

/// Data mask a ball of radius 10, "brain" a ball of radius 13; the fields of a strong
/// source outside the brain and of a weak one inside the data mask next to its edge (as
/// cortex is next to an eroded brain mask's edge). Returns (background field, edge-source
/// field, data mask, brain mask).
fn rim_and_outside_sources(n: usize, b0: [f64; 3]) -> (Vec<f32>, Vec<f32>, Vec<u8>, Vec<u8>) {
    let shape = Shape3([n; 3]);
    let c = n as f64 / 2.0;
    let (mut chi_out, mut chi_rim) = (vec![0.0f32; shape.len()], vec![0.0f32; shape.len()]);
    let (mut mask, mut brain) = (vec![0u8; shape.len()], vec![0u8; shape.len()]);
    each_voxel(n, |idx, d2| {
        mask[idx] = (d2(c, c, c) < 100.0) as u8;
        brain[idx] = (d2(c, c, c) < 169.0) as u8;
        if d2(c + 8.0, c, c + 15.0) < 9.0 {
            chi_out[idx] = 9.0;
        }
        if d2(c, c + 8.0, c + 1.0) < 2.25 {
            chi_rim[idx] = 0.5;
        }
    });
    let geom = geometry(shape, [1.0; 3], b0);
    let bg = forward_field(&chi_out, &geom).unwrap();
    let rim = forward_field(&chi_rim, &geom).unwrap();
    (bg, rim, mask, brain)
}

#[test]
fn pdf_with_sources_outside_the_brain_keeps_more_of_a_source_at_the_mask_edge() {
    let n = 40;
    let shape = Shape3([n; 3]);
    let b0 = [0.2, 0.1, 1.0];
    let (bg, rim, mask, brain) = rim_and_outside_sources(n, b0);
    let geom = geometry(shape, [1.0; 3], b0);
    let params = PdfParams {
        tol: 1e-6,
        max_iter: 60,
        ..PdfParams::default()
    };
    let outside_brain: Vec<u8> = brain.iter().map(|&b| (b == 0) as u8).collect();
    let run = |field: &[f32], sources: Option<&[u8]>| {
        pdf_with_sources(field, &mask, None, sources, &geom, params, NEVER)
            .unwrap()
            .0
    };
    assert_eq!(
        run(&bg, None),
        pdf(&bg, &mask, None, &geom, params, NEVER).unwrap().0
    );
    // The field of the edge source alone: plain PDF explains part of it by sources right
    // next to the mask; sources kept outside the brain, 3 voxels further out, less.
    let (rim_plain, rim_kept) = (run(&rim, None), run(&rim, Some(&outside_brain)));
    assert!(rim_kept
        .iter()
        .zip(&mask)
        .all(|(&v, &m)| m != 0 || v == 0.0));
    let kept_plain = 1.0 - rel_error(&rim_plain, &rim, &mask);
    let kept = 1.0 - rel_error(&rim_kept, &rim, &mask);
    // The background alone: both remove it.
    let left_plain = demeaned_norm(&run(&bg, None), &mask) / demeaned_norm(&bg, &mask);
    let left = demeaned_norm(&run(&bg, Some(&outside_brain)), &mask) / demeaned_norm(&bg, &mask);
    eprintln!(
        "edge field kept: plain {kept_plain:.3}, outside brain {kept:.3}; \
               background left: plain {left_plain:.4}, outside brain {left:.4}"
    );
    // Measured (1 − relative error): plain 0.204, outside the brain 0.306; background left
    // 0.0066 and 0.0058 of its norm.
    assert!(
        kept > 1.3 * kept_plain && kept_plain > 0.1,
        "{kept} {kept_plain}"
    );
    assert!(left < 0.05 && left_plain < 0.05, "{left} {left_plain}");
}

#[test]
fn pdf_refuses_a_source_mask_without_a_voxel_outside_the_data_mask() {
    let n = 12;
    let shape = Shape3([n; 3]);
    let (total, _, _, mask) = two_sources(n, [0.0, 0.0, 1.0], [1.0; 3]);
    let geom = geometry(shape, [1.0; 3], [0.0, 0.0, 1.0]);
    let p = PdfParams::default();
    let inside_only = mask.clone();
    assert!(pdf_with_sources(&total, &mask, None, Some(&inside_only), &geom, p, NEVER).is_err());
    assert!(pdf_with_sources(&total, &mask, None, Some(&mask[1..]), &geom, p, NEVER).is_err());
}

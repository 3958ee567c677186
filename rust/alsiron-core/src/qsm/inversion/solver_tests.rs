//! Unit tests of the iterative solvers (weighted TV, MEDI, RTS, NDI, iLSQR) on a blob
//! phantom, their interrupts and their refusals.

use super::*;
use crate::qsm::dipole::forward_field;
use crate::test_support::geometry;
use crate::test_support::masked_nrmse_pct as nrmse;

fn blob_phantom(n: usize) -> (Vec<f32>, Vec<u8>, Shape3) {
    let shape = Shape3([n, n, n]);
    let c = (n as f64 - 1.0) / 2.0;
    let mut chi = vec![0.0f32; shape.len()];
    let mut mask = vec![0u8; shape.len()];
    for i in 0..n {
        for j in 0..n {
            for k in 0..n {
                let r2 =
                    (i as f64 - c).powi(2) + (j as f64 - 0.9 * c).powi(2) + (k as f64 - c).powi(2);
                if r2 < (0.4 * n as f64).powi(2) {
                    mask[shape.idx(i, j, k)] = 1;
                    let rb = (i as f64 - 0.8 * c).powi(2)
                        + (j as f64 - c).powi(2)
                        + (k as f64 - c).powi(2);
                    chi[shape.idx(i, j, k)] = if rb < 9.0 { 0.1 } else { -0.01 };
                }
            }
        }
    }
    (chi, mask, shape)
}

type Setup = (Vec<f32>, Vec<f32>, Vec<u8>, Shape3, [f64; 3], [f64; 3]);

fn setup(n: usize) -> Setup {
    let (chi, mask, shape) = blob_phantom(n);
    let vs = [1.0, 1.0, 1.3];
    let b0 = [0.1, 0.2, 1.0];
    let field = forward_field(&chi, &geometry(shape, vs, b0)).unwrap();
    (chi, field, mask, shape, vs, b0)
}

#[test]
fn every_iterative_solver_recovers_the_blob_and_stops_on_request() {
    let (chi, field, mask, shape, vs, b0) = setup(24);
    let ones = vec![1.0f32; shape.len()];
    let never = |_: usize| false;
    let tv = WeightedTvParams {
        alpha: 1e-4,
        mu_gradient: 1e-2,
        mu_data: 1.0,
        max_iter: 60,
        tol: 0.0,
        phase_scale: None,
        weak_harmonic: None,
    };
    let results = [
        (
            "tv",
            weighted_tv_admm(
                &field,
                &ones,
                None,
                &mask,
                &geometry(shape, vs, b0),
                tv,
                &never,
            ),
        ),
        (
            "tv-wh",
            weighted_tv_admm(
                &field,
                &ones,
                None,
                &mask,
                &geometry(shape, vs, b0),
                WeightedTvParams {
                    weak_harmonic: Some(WeakHarmonic { beta: 1.0, mu: 1.0 }),
                    ..tv
                },
                &never,
            ),
        ),
        (
            "tv-nonlinear",
            weighted_tv_admm(
                &field,
                &ones,
                None,
                &mask,
                &geometry(shape, vs, b0),
                WeightedTvParams {
                    phase_scale: Some(10.0),
                    ..tv
                },
                &never,
            ),
        ),
        (
            "rts",
            rts(
                &field,
                &mask,
                &geometry(shape, vs, b0),
                RtsParams::default(),
                &never,
            ),
        ),
        (
            "ndi",
            ndi(
                &field,
                &ones,
                &mask,
                &geometry(shape, vs, b0),
                NdiParams {
                    phase_scale: 10.0,
                    lambda: 1e-4,
                    step: 2.0,
                    max_iter: 100,
                    tol: 0.0,
                },
                &never,
            ),
        ),
        (
            "lsqr",
            ilsqr(
                &field,
                &ones,
                &mask,
                &geometry(shape, vs, b0),
                LsqrParams {
                    tol: 1e-3,
                    max_iter: 50,
                },
                &never,
            ),
        ),
    ];
    for (name, r) in results {
        let (est, it) = r.unwrap();
        assert!(it > 0);
        let e = nrmse(&est, &chi, &mask);
        assert!(e < 60.0, "{name}: NRMSE {e:.1} %");
        assert!(est.iter().zip(&mask).all(|(v, &m)| m != 0 || *v == 0.0));
    }
    let stop = |it: usize| it >= 2;
    assert_eq!(
        rts(
            &field,
            &mask,
            &geometry(shape, vs, b0),
            RtsParams::default(),
            &stop
        ),
        Err(CoreError::Interrupted)
    );
    let p = LsqrParams {
        tol: 0.0,
        max_iter: 10,
    };
    assert_eq!(
        ilsqr(&field, &ones, &mask, &geometry(shape, vs, b0), p, &stop),
        Err(CoreError::Interrupted)
    );
}

#[test]
fn ilsqr_streaking_improves_on_its_lsqr_core_and_stops_on_request() {
    let (chi, field, mask, shape, vs, b0) = setup(24);
    let ones = vec![1.0f32; shape.len()];
    let never = |_: usize| false;
    let lsqr = LsqrParams {
        tol: 1e-2,
        max_iter: 50,
    };
    let (core, _) = ilsqr(&field, &ones, &mask, &geometry(shape, vs, b0), lsqr, &never).unwrap();
    let (full, it) = ilsqr_streaking(
        &field,
        &ones,
        &mask,
        &geometry(shape, vs, b0),
        lsqr,
        StreakingParams::default(),
        &never,
    )
    .unwrap();
    assert!(it.lsqr > 0 && it.streaking > 0);
    let (e_core, e_full) = (nrmse(&core, &chi, &mask), nrmse(&full, &chi, &mask));
    assert!(
        e_full < e_core,
        "streaking {e_full:.1} % vs LSQR {e_core:.1} %"
    );
    assert!(full.iter().zip(&mask).all(|(v, &m)| m != 0 || *v == 0.0));
    let in_streaking = |i: usize| i > lsqr.max_iter + 1;
    let p = LsqrParams {
        tol: 0.0,
        max_iter: 50,
    };
    let s = StreakingParams {
        tol: 0.0,
        ..StreakingParams::default()
    };
    assert_eq!(
        ilsqr_streaking(
            &field,
            &ones,
            &mask,
            &geometry(shape, vs, b0),
            p,
            s,
            &in_streaking
        ),
        Err(CoreError::Interrupted)
    );
}

#[test]
fn bad_arguments_are_refused() {
    let (_, field, mask, shape, vs, b0) = setup(8);
    let never = |_: usize| false;
    let bad_w = vec![-1.0f32; shape.len()];
    let p = LsqrParams {
        tol: 1e-2,
        max_iter: 5,
    };
    assert!(ilsqr(&field, &bad_w, &mask, &geometry(shape, vs, b0), p, &never).is_err());
    let rp = RtsParams {
        delta: 0.0,
        ..RtsParams::default()
    };
    assert!(rts(&field, &mask, &geometry(shape, vs, b0), rp, &never).is_err());
    assert!(edge_weight(&field, &mask, shape, vs, 1.5).is_err());
    let g = edge_weight(&field, &mask, shape, vs, 0.1).unwrap();
    let inside = mask.iter().filter(|&&m| m != 0).count() as f64;
    let edges = g.iter().filter(|&&v| v == 0.0).count() as f64;
    assert!((edges / inside - 0.1).abs() < 0.02, "{edges} / {inside}");
}

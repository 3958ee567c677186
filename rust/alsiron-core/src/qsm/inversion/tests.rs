//! Unit tests of TKD, Tikhonov and TV-ADMM.

use super::operators::*;
use super::*;
use crate::fft::Fft3Plan;
use crate::qsm::dipole::forward_field;
use crate::qsm::dipole::{apply_kernel, dipole_kernel};
use crate::test_support::geometry;
use crate::test_support::masked_nrmse_pct as nrmse;
use crate::test_support::{max_abs, max_abs_diff};

/// Smooth blob (Gaussian) in the middle of an n³ grid, and a ball mask.
fn phantom(n: usize) -> (Vec<f32>, Vec<u8>, Shape3) {
    let shape = Shape3([n, n, n]);
    let c = (n as f64 - 1.0) / 2.0;
    let mut chi = vec![0.0f32; shape.len()];
    let mut mask = vec![0u8; shape.len()];
    for i in 0..n {
        for j in 0..n {
            for k in 0..n {
                let r2 =
                    (i as f64 - c).powi(2) + (j as f64 - 0.8 * c).powi(2) + (k as f64 - c).powi(2);
                chi[shape.idx(i, j, k)] = (0.1 * (-r2 / (2.0 * 9.0)).exp()) as f32;
                if r2 < (0.4 * n as f64).powi(2) {
                    mask[shape.idx(i, j, k)] = 1;
                }
            }
        }
    }
    (chi, mask, shape)
}

#[test]
fn truncated_inverse_rules() {
    let inv = truncated_inverse(&[0.0, 0.5, -0.5, 0.1, -0.1], 0.2);
    assert_eq!(inv, vec![0.0, 2.0, -2.0, 5.0, -5.0]);
}

#[test]
fn tkd_recovers_a_smooth_source_from_a_noiseless_field() {
    let (chi, mask, shape) = phantom(32);
    let b0 = [0.2, 0.1, 1.0];
    let field = forward_field(&chi, &geometry(shape, [1.0, 1.0, 1.2], b0)).unwrap();
    let est = tkd(
        &field,
        &vec![1; shape.len()],
        &geometry(shape, [1.0, 1.0, 1.2], b0),
        0.19,
    )
    .unwrap();
    let err = nrmse(&est, &chi, &mask);
    // The smooth source lives mostly where |D| > t; truncation costs a few percent.
    assert!(err < 25.0, "TKD NRMSE {err:.1}%");
    // Lower threshold -> closer to the exact inverse on noiseless data.
    let est = tkd(
        &field,
        &vec![1; shape.len()],
        &geometry(shape, [1.0, 1.0, 1.2], b0),
        0.05,
    )
    .unwrap();
    let err_low = nrmse(&est, &chi, &mask);
    assert!(err_low < err, "{err_low} !< {err}");
}

#[test]
fn fused_tkd_equals_the_kernel_array_version() {
    // The former implementation: kernel arrays, forward, multiply, inverse, mask.
    for (n, voxel, b0) in [
        (16, [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]),
        (15, [1.0, 1.1, 1.3], [0.2, -0.1, 1.0]),
    ] {
        let (chi, mask, _) = phantom(n);
        let shape = Shape3([n, n + 2, n - 3]);
        let chi = &chi[..shape.len()];
        let mask = &mask[..shape.len()];
        let field = forward_field(chi, &geometry(shape, voxel, b0)).unwrap();
        let inverse_kernel =
            truncated_inverse(&dipole_kernel(&geometry(shape, voxel, b0)).unwrap(), 0.19);
        let plan = Fft3Plan::get(shape).unwrap();
        let mut spectrum = plan.make_spectrum();
        plan.forward(&masked(&field, mask), &mut spectrum).unwrap();
        apply_kernel(&mut spectrum, &inverse_kernel);
        let mut want = vec![0.0f32; shape.len()];
        plan.inverse(&mut spectrum, &mut want).unwrap();
        apply_mask(&mut want, mask);
        let got = tkd(&field, mask, &geometry(shape, voxel, b0), 0.19).unwrap();
        let scale = max_abs(&want);
        let err = max_abs_diff(&want, &got);
        assert!(err <= 1e-5 * scale, "max err {err} (scale {scale})");
        assert!(got.iter().zip(mask).all(|(v, &m)| m != 0 || *v == 0.0));
    }
}

#[test]
fn fused_tikhonov_equals_the_kernel_array_version() {
    let (chi, mask, _) = phantom(15);
    let shape = Shape3([15, 17, 12]);
    let (chi, mask) = (&chi[..shape.len()], &mask[..shape.len()]);
    let (voxel, b0, lambda) = ([1.0, 1.1, 1.3], [0.2, -0.1, 1.0], 2e-2);
    let field = forward_field(chi, &geometry(shape, voxel, b0)).unwrap();
    let d = dipole_kernel(&geometry(shape, voxel, b0)).unwrap();
    let [ex, ey, ez] = difference_symbols(shape, voxel);
    let half = shape.half_spectrum();
    let mut filter = vec![0.0f32; half.len()];
    for (i, exi) in ex.iter().enumerate().take(half.0[0]) {
        for (j, eyj) in ey.iter().enumerate().take(half.0[1]) {
            for (k, ezk) in ez.iter().enumerate().take(half.0[2]) {
                let idx = half.idx(i, j, k);
                let e2 = (exi.norm_sqr() + eyj.norm_sqr() + ezk.norm_sqr()) as f64;
                let dk = d[idx] as f64;
                if idx != 0 {
                    filter[idx] = (dk / (dk * dk + lambda * e2)) as f32;
                }
            }
        }
    }
    let plan = Fft3Plan::get(shape).unwrap();
    let mut spectrum = plan.make_spectrum();
    plan.forward(&masked(&field, mask), &mut spectrum).unwrap();
    apply_kernel(&mut spectrum, &filter);
    let mut want = vec![0.0f32; shape.len()];
    plan.inverse(&mut spectrum, &mut want).unwrap();
    apply_mask(&mut want, mask);
    let got = tikhonov(&field, mask, &geometry(shape, voxel, b0), lambda).unwrap();
    let scale = max_abs(&want);
    let err = max_abs_diff(&want, &got);
    assert!(err <= 1e-5 * scale, "max err {err} (scale {scale})");
}

#[test]
fn tkd_output_is_zero_outside_mask_and_refuses_empty_masks() {
    let (chi, mask, shape) = phantom(16);
    let field = forward_field(&chi, &geometry(shape, [1.0; 3], [0.0, 0.0, 1.0])).unwrap();
    let est = tkd(
        &field,
        &mask,
        &geometry(shape, [1.0; 3], [0.0, 0.0, 1.0]),
        0.19,
    )
    .unwrap();
    assert!(est.iter().zip(&mask).all(|(v, &m)| m != 0 || *v == 0.0));
    assert!(tkd(
        &field,
        &vec![0; shape.len()],
        &geometry(shape, [1.0; 3], [0.0, 0.0, 1.0]),
        0.19
    )
    .is_err());
    assert!(tkd(
        &field,
        &mask,
        &geometry(shape, [1.0; 3], [0.0, 0.0, 1.0]),
        0.0
    )
    .is_err());
}

#[test]
fn admm_decreases_the_objective_and_stops_on_request() {
    let (chi, mask, shape) = phantom(24);
    let b0 = [0.0, 0.3, 1.0];
    let vs = [1.0, 1.0, 1.5];
    let field = forward_field(&chi, &geometry(shape, vs, b0)).unwrap();
    let all = vec![1u8; shape.len()];
    let alpha = 1e-4;
    let run = |iters: usize| {
        let p = TvAdmmParams {
            alpha,
            mu: 1e-2,
            max_iter: iters,
            tol: 0.0,
        };
        tv_admm(&field, &all, &geometry(shape, vs, b0), p, &|_| false).unwrap()
    };
    let obj = |x: &[f32]| tv_objective(x, &field, &all, &geometry(shape, vs, b0), alpha).unwrap();
    let zero = vec![0.0f32; shape.len()];
    let (chi1, n1) = run(1);
    let (chi30, n30) = run(30);
    assert_eq!((n1, n30), (1, 30));
    let (o0, o1, o30) = (obj(&zero), obj(&chi1), obj(&chi30));
    assert!(o1 < o0 && o30 < o1, "objective {o0} -> {o1} -> {o30}");
    assert!(nrmse(&chi30, &chi, &mask) < 30.0);

    let p = TvAdmmParams {
        max_iter: 50,
        ..TvAdmmParams::default()
    };
    let stopped = tv_admm(&field, &all, &geometry(shape, vs, b0), p, &|it| it >= 3);
    assert_eq!(stopped, Err(CoreError::Interrupted));
}

//! Unit tests of the single-step Laplacian TV solver ([`sstv_admm`]): objective descent,
//! recovery from noiseless Laplacian data, reduction to TV-ADMM without the Laplacian
//! term, determinism, the stopping rule and the refusals.

use super::operators::laplacian_into;
use super::*;
use crate::qsm::dipole::forward_field;
use crate::test_support::geometry;

const VS: [f64; 3] = [1.0, 1.0, 1.3];
const B0: [f64; 3] = [0.1, 0.2, 1.0];
const NEVER: &(dyn Fn(usize) -> bool + Sync) = &|_| false;

/// Two smooth Gaussian blobs of opposite sign [ppm] on an n³ grid.
fn smooth_chi(n: usize) -> (Vec<f32>, Shape3) {
    let shape = Shape3([n; 3]);
    let c = n as f64 / 2.0;
    let mut chi = vec![0.0f32; shape.len()];
    for i in 0..n {
        for j in 0..n {
            for k in 0..n {
                let r = |x: f64, y: f64, z: f64| {
                    (i as f64 - x).powi(2) + (j as f64 - y).powi(2) + (k as f64 - z).powi(2)
                };
                let v = 0.1 * (-r(c - 3.0, c, c) / 8.0).exp()
                    - 0.05 * (-r(c + 4.0, c + 2.0, c - 1.0) / 12.0).exp();
                chi[shape.idx(i, j, k)] = v as f32;
            }
        }
    }
    (chi, shape)
}

/// (Dχ [ppm], L·Dχ [ppm/mm²]) of `chi`.
fn fields(chi: &[f32], shape: Shape3) -> (Vec<f32>, Vec<f32>) {
    let d = forward_field(chi, &geometry(shape, VS, B0)).unwrap();
    let mut ld = vec![0.0f32; shape.len()];
    let inv_h2 = VS.map(|h| (1.0 / (h * h)) as f32);
    laplacian_into(&d, shape, inv_h2, &mut ld);
    (d, ld)
}

fn demeaned(x: &[f32]) -> Vec<f64> {
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    x.iter().map(|&v| v as f64 - mean).collect()
}

/// ‖a − b‖ / ‖b‖ after removing each one's mean (χ's mean is free).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let (a, b) = (demeaned(a), demeaned(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// A noiseless problem: the dipole field and its Laplacian of a smooth χ, and the 0/1
/// weights the tests switch the two data terms with.
struct Problem {
    shape: Shape3,
    local_field: Vec<f32>,
    laplacian: Vec<f32>,
    ones: Vec<f32>,
    zeros: Vec<f32>,
}

impl Problem {
    fn new(n: usize) -> (Self, Vec<f32>) {
        let (chi_true, shape) = smooth_chi(n);
        let (local_field, laplacian) = fields(&chi_true, shape);
        let (ones, zeros) = (vec![1.0f32; shape.len()], vec![0.0f32; shape.len()]);
        let problem = Problem {
            shape,
            local_field,
            laplacian,
            ones,
            zeros,
        };
        (problem, chi_true)
    }

    /// The data with the Laplacian term on or off and the anchor on or off.
    fn data(&self, laplacian_on: bool, anchor_on: bool) -> SstvData<'_> {
        let weight = |on: bool| if on { &self.ones[..] } else { &self.zeros[..] };
        SstvData {
            laplacian: &self.laplacian,
            laplacian_weight: weight(laplacian_on),
            local_field: &self.local_field,
            local_weight: weight(anchor_on),
        }
    }
}

fn params(alpha: f64, beta: f64, max_iter: usize) -> SstvParams {
    SstvParams {
        max_iter,
        tol: 0.0,
        ..SstvParams::new(alpha, beta)
    }
}

#[test]
fn objective_decreases_over_the_iterations() {
    let (problem, chi_true) = Problem::new(24);
    let (shape, data) = (problem.shape, problem.data(true, true));
    let g = geometry(shape, VS, B0);
    // α small enough for the TV term not to dominate these ~1e-3 ppm/mm² data.
    let (alpha, beta) = (1e-5, 0.5);
    let objective = |chi: &[f32]| sstv_objective(chi, data, &g, alpha, beta).unwrap();
    let zero = objective(&vec![0.0; shape.len()]);
    let mut previous = zero;
    for max_iter in [5, 20, 80] {
        let p = SstvParams {
            mu1: 1e-3,
            ..params(alpha, beta, max_iter)
        };
        let (chi, it) = sstv_admm(data, &g, p, NEVER).unwrap();
        assert_eq!(it, max_iter);
        let value = objective(&chi);
        assert!(
            value < previous,
            "{max_iter} iterations: {value} !< {previous}"
        );
        previous = value;
    }
    // The truth fits both fidelity terms exactly (its objective is its TV); the minimum
    // lies below it (measured: 0 → 1.29e-2, truth 2.305e-4, 80 iterations 2.297e-4).
    let at_truth = objective(&chi_true);
    assert!(
        previous < at_truth,
        "{previous} vs truth {at_truth} (0: {zero})"
    );
}

#[test]
fn noiseless_laplacian_data_alone_recovers_a_smooth_chi() {
    let (problem, chi_true) = Problem::new(32);
    let (shape, data) = (problem.shape, problem.data(true, false));
    // Nearly no TV: what the Laplacian data leave free (the cone D = 0) stays near 0;
    // measured relative error 2.7 % (α = 1e-6, μ₁ = 1e-3, 100 iterations; 2.7 % at 800).
    let p = SstvParams {
        mu1: 1e-3,
        ..params(1e-6, 0.0, 100)
    };
    let (chi, _) = sstv_admm(data, &geometry(shape, VS, B0), p, NEVER).unwrap();
    let err = rel_diff(&chi, &chi_true);
    assert!(err < 0.04, "relative error {err}");
}

#[test]
fn without_the_laplacian_term_it_is_tv_admm_on_the_anchor() {
    // W_L = 0, W_P = 1: min (β/2)‖f − Dχ‖² + α‖∇χ‖₁, i.e. TV-ADMM with α/β.
    let (problem, _) = Problem::new(24);
    let (shape, data) = (problem.shape, problem.data(false, true));
    let d = &problem.local_field;
    let g = geometry(shape, VS, B0);
    let (alpha, beta) = (2e-3, 2.0);
    let (chi, _) = sstv_admm(data, &g, params(alpha, beta, 400), NEVER).unwrap();
    let tv = TvAdmmParams {
        alpha: alpha / beta,
        mu: 10.0 * alpha / beta,
        max_iter: 400,
        tol: 0.0,
    };
    let mask = vec![1u8; shape.len()];
    let (reference, _) = tv_admm(d, &mask, &g, tv, NEVER).unwrap();
    let diff = rel_diff(&chi, &reference);
    assert!(diff < 1e-2, "relative difference to TV-ADMM {diff}");
}

#[test]
fn iteration_is_deterministic_and_stops_on_tolerance_or_request() {
    let (problem, _) = Problem::new(24);
    let (shape, data) = (problem.shape, problem.data(true, true));
    let g = geometry(shape, VS, B0);
    let p = SstvParams {
        tol: 1e-2,
        ..SstvParams::new(1e-3, 0.5)
    };
    let (a, it_a) = sstv_admm(data, &g, p, NEVER).unwrap();
    let (b, it_b) = sstv_admm(data, &g, p, NEVER).unwrap();
    assert_eq!(it_a, it_b);
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(
        (SSTV_MIN_ITER..p.max_iter).contains(&it_a),
        "{it_a} iterations"
    );
    // A loose tolerance stops at the minimum iteration count, not before.
    let loose = SstvParams { tol: 10.0, ..p };
    assert_eq!(sstv_admm(data, &g, loose, NEVER).unwrap().1, SSTV_MIN_ITER);
    let stop_at_3 = |iter: usize| iter == 3;
    assert!(matches!(
        sstv_admm(data, &g, p, &stop_at_3),
        Err(CoreError::Interrupted)
    ));
}

#[test]
fn bad_arguments_are_refused() {
    let shape = Shape3([8, 8, 8]);
    let g = geometry(shape, VS, B0);
    let ones = vec![1.0f32; shape.len()];
    let short = vec![1.0f32; shape.len() - 1];
    let mut negative = ones.clone();
    negative[5] = -1.0;
    let mut nan = ones.clone();
    nan[3] = f32::NAN;
    let data = SstvData {
        laplacian: &ones,
        laplacian_weight: &ones,
        local_field: &ones,
        local_weight: &ones,
    };
    let p = SstvParams::new(1e-3, 0.5);
    let bad_data = [
        SstvData {
            laplacian: &short,
            ..data
        },
        SstvData {
            laplacian_weight: &negative,
            ..data
        },
        SstvData {
            local_weight: &nan,
            ..data
        },
        SstvData {
            local_field: &nan,
            ..data
        },
    ];
    for d in bad_data {
        assert!(sstv_admm(d, &g, p, NEVER).is_err());
    }
    let bad_params = [
        SstvParams { mu1: 0.0, ..p },
        SstvParams { mu2: -1.0, ..p },
        SstvParams { mu3: 0.0, ..p },
        SstvParams { alpha: -1.0, ..p },
        SstvParams { max_iter: 0, ..p },
        SstvParams { tol: f64::NAN, ..p },
    ];
    for q in bad_params {
        assert!(
            matches!(
                sstv_admm(data, &g, q, NEVER),
                Err(CoreError::InvalidArgument(_))
            ),
            "{q:?}"
        );
    }
    // β = 0 with μ₃ = 0 is the Laplacian term alone, not an error.
    assert!(sstv_admm(data, &g, SstvParams::new(1e-3, 0.0), NEVER).is_ok());
}

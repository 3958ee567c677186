//! Unit tests of the R2* fits: noiseless recovery, Rician model, quality maps, refusals.

use super::*;

fn simulate(r2: &[f64], s0: &[f64], tes: &[f64]) -> Vec<f32> {
    let mut mag = Vec::new();
    for &t in tes {
        for (r, s) in r2.iter().zip(s0) {
            mag.push((s * (-r * t).exp()) as f32);
        }
    }
    mag
}

fn run(mag: &[f32], n: usize, tes: &[f64], opts: R2starOptions) -> [Vec<f32>; 4] {
    let (mut r2, mut s0, mut sd, mut gof) =
        (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut st = vec![0u8; n];
    fit_r2star_into(
        mag,
        tes,
        None,
        &opts,
        R2starOutputs {
            r2star: &mut r2,
            s0: &mut s0,
            sd: &mut sd,
            gof: &mut gof,
            status: &mut st,
        },
    )
    .unwrap();
    assert!(st.iter().all(|&s| s == 0), "status {st:?}");
    [r2, s0, sd, gof]
}

#[test]
fn noiseless_every_method_recovers_r2star() {
    let n = 1500;
    let r2: Vec<f64> = (0..n).map(|i| 5.0 + 0.06 * i as f64).collect();
    let s0 = vec![300.0; n];
    for tes in [
        vec![0.003, 0.006, 0.009, 0.012, 0.015, 0.018, 0.021, 0.024],
        // Uneven spacing (ARLO's non-uniform Simpson rule); ΔTE·R2* ≤ 0.5.
        vec![0.002, 0.005, 0.009, 0.012, 0.017, 0.021, 0.026],
    ] {
        let mag = simulate(&r2, &s0, &tes);
        for method in [
            R2starMethod::LogLinear,
            R2starMethod::Weighted,
            R2starMethod::Arlo,
            R2starMethod::Nlls,
        ] {
            let opts = R2starOptions {
                method,
                ..Default::default()
            };
            let [fr2, fs0, _, gof] = run(&mag, n, &tes, opts);
            for i in 0..n {
                let rel = (fr2[i] as f64 / r2[i] - 1.0).abs();
                assert!(rel < 1e-3, "{method:?} R2* {} vs {}", fr2[i], r2[i]);
                assert!((fs0[i] as f64 / 300.0 - 1.0).abs() < 1e-3);
                assert!(gof[i] > 0.9999);
            }
        }
    }
}

#[test]
fn fast_f32_exp_matches_std() {
    let mut x = -87.0f32;
    while x < 87.0 {
        let err = (exp_fast_f32(x) as f64 / (x as f64).exp() - 1.0).abs();
        assert!(err < 5e-7, "exp({x}): relative error {err}");
        x += 0.0137;
    }
    assert!(exp_fast_f32(f32::NAN).is_nan());
}

#[test]
fn bessel_and_rician_mean() {
    // Reference values of scipy.special.i0e / i1e.
    for (x, i0e, i1e) in [
        (0.0, 1.0, 0.0),
        (1.0, 0.465_759_607_593_640_4, 0.207_910_415_349_708_5),
        (5.0, 0.183_540_812_609_328_3, 0.163_972_266_944_542_3),
        (50.0, 0.056_561_626_647_454_2, 0.055_993_123_892_895_4),
    ] {
        let (a, b) = bessel_i0e_i1e(x);
        assert!((a - i0e).abs() < 1e-6 * i0e.max(1e-3), "i0e({x})");
        assert!((b - i1e).abs() < 1e-6 * i1e.max(1e-3), "i1e({x})");
    }
    // Zero amplitude: the Rayleigh mean σ√(π/2); large amplitude: a + σ²/2a.
    let (mu, g) = rician_mean(0.0, 2.0);
    assert!((mu - 2.0 * 1.253_314_137_315_5).abs() < 1e-9 && g == 0.0);
    let (mu, g) = rician_mean(100.0, 1.0);
    assert!((mu - 100.005).abs() < 1e-4 && (g - 1.0).abs() < 1e-4);
    // Derivative by finite differences.
    for a in [0.3, 1.0, 3.0, 10.0] {
        let h = 1e-5;
        let fd = (rician_mean(a + h, 1.0).0 - rician_mean(a - h, 1.0).0) / (2.0 * h);
        assert!((fd - rician_mean(a, 1.0).1).abs() < 1e-5, "a {a}");
    }
}

#[test]
fn rician_fit_of_noise_floor_mean_is_exact() {
    // Data equal to the Rician mean: the Rician-aware fit returns the truth,
    // the Gaussian one does not.
    let tes: Vec<f64> = (1..=12).map(|k| 0.004 * k as f64).collect();
    let y: Vec<f64> = tes
        .iter()
        .map(|t| rician_mean(30.0 * (-100.0 * t).exp(), 1.0).0)
        .collect();
    let fit = levenberg_marquardt(&y, &tes, 20.0, 50.0, Some(1.0), 100);
    assert!(fit.converged);
    assert!((fit.r2star / 100.0 - 1.0).abs() < 1e-6, "{fit:?}");
    let plain = levenberg_marquardt(&y, &tes, 20.0, 50.0, None, 100);
    assert!(plain.r2star < 95.0, "{plain:?}");
}

#[test]
fn refusals_and_bad_voxels() {
    let n = 3;
    let tes = [0.005, 0.010];
    let mag = vec![1.0f32; 6];
    type Bufs = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>);
    let go = |mag: &[f32], tes: &[f64], opts: R2starOptions| -> CoreResult<Bufs> {
        let mut b: Bufs = (
            vec![0.0; n],
            vec![0.0; n],
            vec![0.0; n],
            vec![0.0; n],
            vec![0; n],
        );
        fit_r2star_into(
            mag,
            tes,
            None,
            &opts,
            R2starOutputs {
                r2star: &mut b.0,
                s0: &mut b.1,
                sd: &mut b.2,
                gof: &mut b.3,
                status: &mut b.4,
            },
        )?;
        Ok(b)
    };
    let arlo = R2starOptions {
        method: R2starMethod::Arlo,
        ..Default::default()
    };
    assert_eq!(
        go(&mag, &tes, arlo),
        Err(CoreError::TooFewEchoes { needed: 3, got: 2 })
    );
    let bad_sigma = R2starOptions {
        noise_sigma: Some(-1.0),
        ..Default::default()
    };
    assert!(go(&mag, &tes, bad_sigma).is_err());
    assert!(R2starMethod::from_name("lm").is_err());
    // NaN / zero magnitudes → status 1 and NaN everywhere, for every method.
    let tes3 = [0.005, 0.010, 0.015];
    let mag3 = [100.0f32, f32::NAN, 100.0, 80.0, 80.0, 0.0, 64.0, 64.0, 64.0];
    for method in [
        R2starMethod::Arlo,
        R2starMethod::Nlls,
        R2starMethod::LogLinear,
    ] {
        let opts = R2starOptions {
            method,
            ..Default::default()
        };
        let bufs = go(&mag3, &tes3, opts).unwrap();
        assert_eq!(bufs.4, vec![0, 1, 1], "{method:?}");
        assert!(bufs.0[1].is_nan() && bufs.2[2].is_nan() && bufs.3[1].is_nan());
        assert!((bufs.0[0] - 44.628).abs() < 0.01, "{}", bufs.0[0]);
    }
}

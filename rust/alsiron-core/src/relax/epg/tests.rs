//! Unit tests of the EPG simulation (against a Bloch isochromat simulation) and the fit.

use super::*;

fn seq(alpha: f64) -> CpmgSequence {
    CpmgSequence {
        n_echo: 32,
        echo_spacing: 0.01,
        refocusing_deg: alpha,
        t1: 1.0,
    }
}

#[test]
fn perfect_refocusing_is_monoexponential() {
    let s = seq(180.0);
    let mut work = EpgWork::new(32);
    let mut out = vec![0.0; 32];
    cpmg_echoes(&s, 0.08, 1.0, &mut work, &mut out);
    for (k, e) in out.iter().enumerate() {
        let expect = (-(k as f64 + 1.0) * 0.01 / 0.08).exp();
        assert!((e - expect).abs() < 1e-12, "echo {k}: {e} vs {expect}");
    }
}

#[test]
fn dual_derivatives_match_finite_differences() {
    let s = seq(150.0);
    let mut work = EpgWork::new(32);
    let mut wd = EpgWork::new(32);
    let (mut a, mut b) = (vec![0.0; 32], vec![0.0; 32]);
    let mut d = vec![Dual::default(); 32];
    let (t2, b1) = (0.07, 0.9);
    cpmg_echoes_dual(&s, t2, b1, &mut wd, &mut d);
    let h = 1e-6;
    cpmg_echoes(&s, t2 + h, b1, &mut work, &mut a);
    cpmg_echoes(&s, t2 - h, b1, &mut work, &mut b);
    for k in 0..32 {
        assert!(((a[k] - b[k]) / (2.0 * h) - d[k].d_t2).abs() < 1e-6 * (1.0 + d[k].d_t2.abs()));
    }
    cpmg_echoes(&s, t2, b1 + h, &mut work, &mut a);
    cpmg_echoes(&s, t2, b1 - h, &mut work, &mut b);
    for k in 0..32 {
        assert!(((a[k] - b[k]) / (2.0 * h) - d[k].d_b1).abs() < 1e-6 * (1.0 + d[k].d_b1.abs()));
    }
}

#[test]
fn noiseless_fit_recovers_t2_and_b1() {
    let s = seq(180.0);
    let opts = EpgFitOptions {
        sequence: s,
        t2_bounds: (0.005, 2.0),
        b1_min: 0.3,
        max_iter: 100,
    };
    let cases = [(0.08, 0.7), (0.05, 0.85), (0.12, 0.95), (0.2, 0.78)];
    let n = cases.len();
    let mut mag = vec![0.0f32; 32 * n];
    let mut work = EpgWork::new(32);
    let mut e = vec![0.0; 32];
    for (v, &(t2, b1)) in cases.iter().enumerate() {
        cpmg_echoes(&s, t2, b1, &mut work, &mut e);
        for k in 0..32 {
            mag[k * n + v] = (500.0 * e[k]) as f32;
        }
    }
    let (mut t2, mut s0, mut b1, mut gof) =
        (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut st = vec![9u8; n];
    fit_t2_epg_into(
        &mag,
        None,
        &opts,
        EpgOutputs {
            t2: &mut t2,
            s0: &mut s0,
            b1: &mut b1,
            gof: &mut gof,
            status: &mut st,
        },
    )
    .unwrap();
    for (v, &(tt, bb)) in cases.iter().enumerate() {
        assert_eq!(st[v], 0);
        assert!(
            (t2[v] as f64 / tt - 1.0).abs() < 1e-4,
            "T2 {} vs {tt}",
            t2[v]
        );
        assert!(
            (b1[v] as f64 / bb - 1.0).abs() < 1e-4,
            "B1 {} vs {bb}",
            b1[v]
        );
        assert!((s0[v] / 500.0 - 1.0).abs() < 1e-4);
    }
}

#[test]
fn bad_sequences_are_refused() {
    let mut s = seq(150.0);
    s.echo_spacing = 0.0;
    assert!(s.validate().is_err());
    s = seq(190.0);
    assert!(s.validate().is_err());
    s = seq(150.0);
    s.n_echo = 2;
    assert!(s.validate().is_err());
}

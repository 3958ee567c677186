//! Per-part CPU times of the EPG fit (the machine is shared, so thread CPU time, not
//! wall; not a test; run through `tests/timing.rs`, see there).

use super::fit::{Dictionary, VoxelFitter};
use super::*;
/// Seconds this thread has been on a CPU (the machine is shared; wall time is not).
use crate::test_support::thread_cpu_seconds as cpu;
pub fn epg_parts_timing() {
    let s = CpmgSequence {
        n_echo: 32,
        echo_spacing: 0.01,
        refocusing_deg: 180.0,
        t1: 1.0,
    };
    let mut work = EpgWork::new(32);
    let mut d = vec![Dual::default(); 32];
    let mut e = vec![0.0; 32];
    let n = 20000;
    let t0 = cpu();
    let mut acc = 0.0;
    for i in 0..n {
        cpmg_echoes_dual(&s, 0.05 + 1e-6 * i as f64, 0.9, &mut work, &mut d);
        acc += d[5].v;
    }
    eprintln!("dual {:.2} µs cpu", (cpu() - t0) / n as f64 * 1e6);
    let t0 = cpu();
    for i in 0..n {
        cpmg_echoes(&s, 0.05 + 1e-6 * i as f64, 0.9, &mut work, &mut e);
        acc += e[5];
    }
    eprintln!("value {:.2} µs cpu", (cpu() - t0) / n as f64 * 1e6);
    let dict = Dictionary::new(&s, (0.005, 2.0), (0.3, 1.0));
    let y: Vec<f32> = e.iter().map(|&v| v as f32).collect();
    let mut corr = vec![0.0f32; Dictionary::N_T2 * Dictionary::N_B1];
    let t0 = cpu();
    for _ in 0..n {
        acc += dict.start(&y, &mut corr).0;
    }
    eprintln!("dict {:.2} µs cpu {acc}", (cpu() - t0) / n as f64 * 1e6);
    let opts = EpgFitOptions {
        sequence: s,
        t2_bounds: (0.005, 2.0),
        b1_min: 0.3,
        max_iter: 200,
    };
    let mut fitter = VoxelFitter::new(&opts);
    let mut state = 12345u64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let m = 4000;
    let mut ys = Vec::new();
    let mut truth = Vec::new();
    for _ in 0..m {
        let (t2, b1) = (0.04 + 0.08 * uniform(), 0.7 + 0.3 * uniform());
        truth.push((t2, b1));
        cpmg_echoes(&s, t2, b1, &mut work, &mut e);
        ys.push(
            e.iter()
                .map(|v| 1000.0 * v + 10.0 * (uniform() - 0.5) * 3.46)
                .collect::<Vec<f64>>(),
        );
    }
    let t0 = cpu();
    let mut total = 0;
    let mut hist = [0usize; 12];
    for (y, tr) in ys.iter().zip(&truth) {
        let f = fitter.fit(y, &dict);
        let ev = f.evaluations;
        if ev >= 11 && std::env::var("EPG_DEBUG").is_ok() {
            // The slow tail: long T2 with B1·α near 180°, where the cost is flat in B1.
            eprintln!("{tr:?} -> {:.4} {:.4} {}", f.t2, f.b1, f.converged);
        }
        total += ev;
        hist[ev.min(11)] += 1;
    }
    eprintln!("evaluation histogram {hist:?}");
    // The whole fit_t2_epg_into (AVX2 dispatch, chunking) on a 1-thread pool.
    let mut mag = vec![0.0f32; 32 * m];
    for (v, y) in ys.iter().enumerate() {
        for k in 0..32 {
            mag[k * m + v] = y[k].abs() as f32;
        }
    }
    let (mut t2, mut s0, mut b1, mut gof) =
        (vec![0.0; m], vec![0.0; m], vec![0.0; m], vec![0.0; m]);
    let mut st = vec![0u8; m];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let whole = pool.install(|| {
        let t0 = cpu();
        let outputs = EpgOutputs {
            t2: &mut t2,
            s0: &mut s0,
            b1: &mut b1,
            gof: &mut gof,
            status: &mut st,
        };
        fit_t2_epg_into(&mag, None, &opts, outputs).unwrap();
        cpu() - t0
    });
    eprintln!(
        "fit_t2_epg_into 1 thread: {:.2} µs cpu per voxel (dictionary included)",
        whole / m as f64 * 1e6
    );
    eprintln!(
        "fit {:.2} µs cpu, {:.2} evaluations",
        (cpu() - t0) / m as f64 * 1e6,
        total as f64 / m as f64
    );
}

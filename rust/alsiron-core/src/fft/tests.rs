//! Unit tests of the FFT plans against a direct O(N²) DFT and of the fused passes.

use super::*;
use crate::test_support::max_abs_diff;

/// Direct O(N²) 3-D DFT in f64: the obviously correct reference.
fn naive_rdft(x: &[f32], shape: [usize; 3]) -> Vec<(f64, f64)> {
    let [nx, ny, nz] = shape;
    let nh = nz / 2 + 1;
    let mut out = Vec::with_capacity(nx * ny * nh);
    let tau = 2.0 * std::f64::consts::PI;
    for kx in 0..nx {
        for ky in 0..ny {
            for kz in 0..nh {
                let (mut re, mut im) = (0.0, 0.0);
                for i in 0..nx {
                    for j in 0..ny {
                        for k in 0..nz {
                            let ph = -tau
                                * ((kx * i) as f64 / nx as f64
                                    + (ky * j) as f64 / ny as f64
                                    + (kz * k) as f64 / nz as f64);
                            let v = x[(i * ny + j) * nz + k] as f64;
                            re += v * ph.cos();
                            im += v * ph.sin();
                        }
                    }
                }
                out.push((re, im));
            }
        }
    }
    out
}

fn test_volume(n: usize, seed: u64) -> Vec<f32> {
    // Small LCG: deterministic, no dev-dependency needed.
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        })
        .collect()
}

#[test]
fn fast_len_has_only_small_factors() {
    assert_eq!(fast_len(1), 1);
    assert_eq!(fast_len(7), 8);
    assert_eq!(fast_len(11), 12);
    assert_eq!(fast_len(97), 100);
    assert_eq!(fast_len(176), 180);
    assert_eq!(fast_len(256), 256);
}

#[test]
fn forward_matches_naive_dft_on_odd_and_even_shapes() {
    for shape in [[4, 6, 8], [5, 3, 7], [1, 4, 5], [3, 1, 1], [17, 19, 20]] {
        let s = Shape3(shape);
        let x = test_volume(s.len(), 7);
        let got = forward(&x, s).unwrap();
        let want = naive_rdft(&x, shape);
        let norm: f64 = want.iter().map(|(r, i)| r * r + i * i).sum::<f64>().sqrt();
        let err: f64 = got
            .iter()
            .zip(&want)
            .map(|(g, (r, i))| (g.re as f64 - r).powi(2) + (g.im as f64 - i).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(err / norm < 1e-5, "shape {shape:?}: rel err {}", err / norm);
    }
}

#[test]
fn inverse_undoes_forward() {
    for shape in [[8, 6, 10], [7, 9, 5], [33, 20, 17], [2, 2, 1]] {
        let s = Shape3(shape);
        let x = test_volume(s.len(), 3);
        let back = inverse(&forward(&x, s).unwrap(), s).unwrap();
        let err = max_abs_diff(&x, &back);
        assert!(err < 1e-5, "shape {shape:?}: max err {err}");
    }
}

#[test]
fn filter_equals_forward_multiply_inverse_with_masks() {
    // Even/odd axes, odd nz, and the degenerate axes (nx = 1, ny = 1, nz = 1).
    for shape in [
        [8, 6, 10],
        [7, 9, 5],
        [12, 10, 9],
        [1, 4, 5],
        [1, 1, 1],
        [5, 1, 3],
        [4, 6, 1],
        [33, 20, 17],
    ] {
        let s = Shape3(shape);
        let n = s.len();
        let nh = shape[2] / 2 + 1;
        let inner = shape[1] * nh;
        let x = test_volume(n, 11);
        let mask_in: Vec<u8> = (0..n).map(|i| u8::from(i * 7 % 5 != 0)).collect();
        let mask_out: Vec<u8> = (0..n).map(|i| u8::from(i * 3 % 4 != 0)).collect();
        // An arbitrary real filter of (x bin, column).
        let h = |a: usize, c: usize| ((a * 31 + c * 17) % 13) as f32 / 13.0 - 0.3;
        let plan = Fft3Plan::get(s).unwrap();
        for (m_in, m_out) in [(None, None), (Some(&mask_in[..]), Some(&mask_out[..]))] {
            let masked_in: Vec<f32> = match m_in {
                Some(m) => x.iter().zip(m).map(|(&v, &k)| v * f32::from(k)).collect(),
                None => x.clone(),
            };
            let mut spec = plan.make_spectrum();
            plan.forward(&masked_in, &mut spec).unwrap();
            for (idx, v) in spec.iter_mut().enumerate() {
                *v *= h(idx / inner, idx % inner);
            }
            let mut want = vec![0.0f32; n];
            plan.inverse(&mut spec, &mut want).unwrap();
            if let Some(m) = m_out {
                want.iter_mut()
                    .zip(m)
                    .for_each(|(v, &k)| *v *= f32::from(k));
            }
            let mut got = vec![1.0f32; n];
            plan.filter(&x, m_in, &mut got, m_out, |c, values, _| {
                for (a, v) in values.iter_mut().enumerate() {
                    *v *= h(a, c);
                }
            })
            .unwrap();
            let err = max_abs_diff(&want, &got);
            assert!(err < 1e-5, "shape {shape:?}: max err {err}");
            if let Some(m) = m_out {
                assert!(got.iter().zip(m).all(|(v, &k)| k != 0 || *v == 0.0));
            }
        }
    }
}

#[test]
fn filter_refuses_wrong_lengths() {
    let plan = Fft3Plan::get(Shape3([4, 3, 5])).unwrap();
    let (x, mut out) = (vec![0.0f32; 60], vec![0.0f32; 60]);
    let id = |_: usize, _: &mut [Complex32], _: &mut [f32]| {};
    assert!(plan.filter(&x[..59], None, &mut out, None, id).is_err());
    assert!(plan.filter(&x, None, &mut out[..59], None, id).is_err());
    assert!(plan.filter(&x, Some(&[1; 59]), &mut out, None, id).is_err());
    assert!(plan.filter(&x, None, &mut out, Some(&[1; 61]), id).is_err());
    assert!(plan.filter(&x, None, &mut out, None, id).is_ok());
}

#[test]
fn zeroed_complex_is_zero_and_sized() {
    for len in [0, 1, 7, 1 << 20] {
        let v = zeroed_complex(len);
        assert_eq!(v.len(), len);
        assert!(v.iter().all(|c| c.re == 0.0 && c.im == 0.0));
    }
}

#[test]
fn plan_cache_keeps_the_most_recently_used_shapes() {
    let mut cache = MruCache::new(3);
    let mut built = 0;
    let mut get = |cache: &mut MruCache<u32, u32>, key: u32| {
        cache.get_or_insert_with(key, || {
            built += 1;
            key * 10
        })
    };
    for key in [1, 2, 3, 1, 4] {
        get(&mut cache, key);
    }
    // 1 was used again before 4 came, so 2 (least recently used) was dropped.
    assert_eq!(
        cache.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        [4, 1, 3]
    );
    assert_eq!(get(&mut cache, 3), 30);
    assert_eq!(get(&mut cache, 2), 20);
    assert_eq!(built, 5);
    assert_eq!(cache.entries.len(), 3);
}

#[test]
fn plans_are_cached_and_wrong_lengths_refused() {
    let a = Fft3Plan::get(Shape3([4, 4, 4])).unwrap();
    let b = Fft3Plan::get(Shape3([4, 4, 4])).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let mut spec = a.make_spectrum();
    assert!(a.forward(&[0.0; 63], &mut spec).is_err());
    assert!(a.forward(&[0.0; 64], &mut spec[..10]).is_err());
    assert!(Fft3Plan::get(Shape3([0, 4, 4])).is_err());
}

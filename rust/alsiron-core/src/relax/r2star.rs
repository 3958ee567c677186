//! Mono-exponential R2* fit `S(TE) = S0·exp(−R2*·TE)` by log-linear least squares.
//!
//! Data are echo-major `[E][N]` (N voxels): a Fortran-ordered nibabel `(X, Y, Z, E)` array
//! and a C-ordered `(E, X, Y, Z)` stack both have this memory layout.
//!
//! - Unweighted: ordinary least squares of `ln S_k` on `TE_k`. Both estimates are fixed
//!   linear combinations of the log-signals, `R2* = −Σ c_k ln S_k` and
//!   `ln S0 = Σ a_k ln S_k`, with coefficients computed once from the echo times, so the
//!   per-voxel work is one logarithm and two multiply-adds per echo.
//! - Weighted: one-step weighted least squares with weights `S_k²` (the variance of
//!   `ln S` is ≈ σ²/S²), markedly less biased at low SNR (hMRI toolbox default).
//!
//! Voxels are processed in chunks with the echo loop outside, so each echo row is read
//! as a contiguous stream and the inner loop vectorises. Logarithms and sums are f32
//! (4 SIMD lanes instead of 2; twice as fast as f64 sums), with the weighted fit's echo
//! times centred so that its determinant does not cancel: R2* keeps ≲ 2e-5 relative
//! accuracy on noiseless data (the f32 rounding of ln S), far inside any noise.
//!
//! Failed voxels get NaN for R2* and S0 and a non-zero status (see [`R2starStatus`]);
//! nothing is clamped. A negative R2* from noise is a valid fit (status 0).

use crate::error::{CoreError, CoreResult};
use crate::field::fieldmap::check_echo_times;
use crate::grid::check_echo_major;
use rayon::prelude::*;

/// Reason codes of the per-voxel status map.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum R2starStatus {
    /// Fit succeeded.
    Ok = 0,
    /// A magnitude was zero, negative or non-finite in at least one echo.
    BadMagnitude = 1,
    /// The fit was degenerate (weights concentrated on one echo) or its result not finite.
    DegenerateFit = 2,
    /// The voxel is outside the mask (not fitted).
    OutsideMask = 3,
}

/// Per-voxel maps of [`fit_r2star_loglinear`].
#[derive(Debug, Clone)]
pub struct R2starFit {
    /// R2* [s⁻¹].
    pub r2star: Vec<f32>,
    /// S0 (same units as the magnitude).
    pub s0: Vec<f32>,
    /// [`R2starStatus`] code per voxel.
    pub status: Vec<u8>,
}

/// Voxels per work unit: big enough to amortise scheduling, small enough for L1/L2.
pub(crate) const CHUNK: usize = 1024;

/// Memory layout of a multi-echo magnitude array of E echoes and N voxels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EchoLayout {
    /// `[E][N]`: a C-ordered (E, X, Y, Z) stack or a Fortran-ordered nibabel (X, Y, Z, E).
    #[default]
    EchoMajor,
    /// `[N][E]`: a C-ordered (X, Y, Z, E) array (echoes of one voxel adjacent). Each
    /// chunk is transposed into an L1-sized echo-major buffer before fitting, so the
    /// kernels are the same and no full-size copy is made.
    VoxelMajor,
}

/// Echo rows of one chunk of voxels: `row(k)` is echo k of the chunk's `len` voxels.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    base: &'a [f32],
    stride: usize,
    offset: usize,
    pub len: usize,
}

impl<'a> Rows<'a> {
    #[inline(always)]
    pub(crate) fn row(&self, k: usize) -> &'a [f32] {
        &self.base[k * self.stride + self.offset..][..self.len]
    }

    /// Rows of voxels `start..start+len` of `magnitude` (E·N values, E = `n_echo`);
    /// voxel-major data are transposed into `buffer` (resized to E·CHUNK as needed).
    pub(crate) fn of_chunk(
        magnitude: &'a [f32],
        n_echo: usize,
        layout: EchoLayout,
        start: usize,
        len: usize,
        buffer: &'a mut Vec<f32>,
    ) -> Self {
        match layout {
            EchoLayout::EchoMajor => Rows {
                base: magnitude,
                stride: magnitude.len() / n_echo,
                offset: start,
                len,
            },
            EchoLayout::VoxelMajor => {
                buffer.resize(n_echo * CHUNK, 0.0);
                let src = &magnitude[start * n_echo..(start + len) * n_echo];
                transpose_to_rows(src, n_echo, buffer);
                Rows {
                    base: buffer,
                    stride: CHUNK,
                    offset: 0,
                    len,
                }
            }
        }
    }
}

/// True when the running CPU has AVX2 (std caches the detection): the chunk kernels are
/// compiled twice, for the x86-64 baseline (SSE2, 4 f32 lanes) and for AVX2 (8 lanes),
/// and the AVX2 copy is used where available.
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Define `$name(args)` that runs the `#[inline(always)]` body `$body(args)` compiled
/// with AVX2 enabled when the CPU has it, else the baseline build of the same body.
macro_rules! avx2_dispatch {
    ($vis:vis fn $name:ident / $avx:ident => $body:ident ($($arg:ident : $ty:ty),* $(,)?)) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if crate::relax::r2star::has_avx2() {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { $avx($($arg),*) };
            }
            $body($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx($($arg: $ty),*) {
            $body($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

avx2_dispatch!(fn transpose_to_rows / transpose_to_rows_avx2 => transpose_body(
    src: &[f32], n_echo: usize, dst: &mut [f32]));

/// `dst[k·CHUNK + i] = src[i·E + k]` for the chunk's voxels; the common echo counts get a
/// compile-time stride so that the loop vectorises as an interleaved load.
#[inline(always)]
fn transpose_body(src: &[f32], n_echo: usize, dst: &mut [f32]) {
    #[inline(always)]
    fn fixed<const E: usize>(src: &[f32], dst: &mut [f32]) {
        let dst = &mut dst[..E * CHUNK];
        for (i, voxel) in src.chunks_exact(E).take(CHUNK).enumerate() {
            for k in 0..E {
                dst[k * CHUNK + i] = voxel[k];
            }
        }
    }
    match n_echo {
        2 => fixed::<2>(src, dst),
        3 => fixed::<3>(src, dst),
        4 => fixed::<4>(src, dst),
        5 => fixed::<5>(src, dst),
        6 => fixed::<6>(src, dst),
        7 => fixed::<7>(src, dst),
        8 => fixed::<8>(src, dst),
        10 => fixed::<10>(src, dst),
        12 => fixed::<12>(src, dst),
        16 => fixed::<16>(src, dst),
        e => {
            for (i, voxel) in src.chunks_exact(e).take(CHUNK).enumerate() {
                for (k, &s) in voxel.iter().enumerate() {
                    dst[k * CHUNK + i] = s;
                }
            }
        }
    }
}

/// Allocating wrapper around [`fit_r2star_loglinear_into`].
pub fn fit_r2star_loglinear(
    magnitude: &[f32],
    n_voxels: usize,
    echo_times: &[f64],
    mask: Option<&[u8]>,
    weighted: bool,
) -> CoreResult<R2starFit> {
    let mut fit = R2starFit {
        r2star: vec![0.0; n_voxels],
        s0: vec![0.0; n_voxels],
        status: vec![0; n_voxels],
    };
    fit_r2star_loglinear_into(
        magnitude,
        echo_times,
        mask,
        weighted,
        &mut fit.r2star,
        &mut fit.s0,
        &mut fit.status,
    )?;
    Ok(fit)
}

/// Fit into caller-provided outputs of length N; `magnitude` has `E·N` elements,
/// echo-major, `echo_times` [s] (E ≥ 2, strictly increasing), `mask` N bytes or `None`.
pub fn fit_r2star_loglinear_into(
    magnitude: &[f32],
    echo_times: &[f64],
    mask: Option<&[u8]>,
    weighted: bool,
    r2star: &mut [f32],
    s0: &mut [f32],
    status: &mut [u8],
) -> CoreResult<()> {
    fit_r2star_loglinear_layout_into(
        magnitude,
        EchoLayout::EchoMajor,
        echo_times,
        mask,
        weighted,
        r2star,
        s0,
        status,
    )
}

/// [`fit_r2star_loglinear_into`] for either memory layout of `magnitude`.
#[allow(clippy::too_many_arguments)]
pub fn fit_r2star_loglinear_layout_into(
    magnitude: &[f32],
    layout: EchoLayout,
    echo_times: &[f64],
    mask: Option<&[u8]>,
    weighted: bool,
    r2star: &mut [f32],
    s0: &mut [f32],
    status: &mut [u8],
) -> CoreResult<()> {
    check_echo_times(echo_times, 2)?;
    let n_echo = echo_times.len();
    let n = check_echo_major(
        magnitude.len(),
        n_echo,
        &[r2star.len(), s0.len(), status.len()],
    )?;
    if let Some(m) = mask {
        if m.len() != n {
            return Err(CoreError::ShapeMismatch(format!(
                "mask has {} elements, expected {n}",
                m.len()
            )));
        }
    }

    // Ordinary least-squares coefficients: slope = Σ c_k y_k, intercept = Σ a_k y_k.
    let e = n_echo as f64;
    let t_mean = echo_times.iter().sum::<f64>() / e;
    let sxx: f64 = echo_times.iter().map(|t| (t - t_mean).powi(2)).sum();
    let slope_coef: Vec<f64> = echo_times.iter().map(|t| (t - t_mean) / sxx).collect();
    let intercept_coef: Vec<f64> = slope_coef.iter().map(|c| 1.0 / e - t_mean * c).collect();

    r2star
        .par_chunks_mut(CHUNK)
        .zip(s0.par_chunks_mut(CHUNK))
        .zip(status.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each_init(Vec::new, |buffer, (chunk, ((r2_out, s0_out), st_out))| {
            let start = chunk * CHUNK;
            let len = r2_out.len();
            let rows = Rows::of_chunk(magnitude, n_echo, layout, start, len, buffer);
            let mut bad = [false; CHUNK];
            if weighted {
                fit_chunk_weighted(rows, echo_times, r2_out, s0_out, &mut bad[..len]);
            } else {
                fit_chunk_ols(
                    rows,
                    &slope_coef,
                    &intercept_coef,
                    r2_out,
                    s0_out,
                    &mut bad[..len],
                );
            }
            let mask = mask.map(|m| &m[start..start + len]);
            finish_status(mask, &bad[..len], None, r2_out, s0_out, st_out);
        });
    Ok(())
}

/// Status code of every voxel of a chunk (see [`R2starStatus`]; 4 = not converged) and
/// NaN R2*/S0 wherever it is not 0. `mask` and `not_converged` cover the chunk only.
/// Written as selects so that the loop vectorises.
pub(crate) fn finish_status(
    mask: Option<&[u8]>,
    bad: &[bool],
    not_converged: Option<&[bool]>,
    r2: &mut [f32],
    s0: &mut [f32],
    status: &mut [u8],
) {
    let len = r2.len();
    let (bad, s0, status) = (&bad[..len], &mut s0[..len], &mut status[..len]);
    for i in 0..len {
        let outside = mask.is_some_and(|m| m[i] == 0);
        let unconverged = not_converged.is_some_and(|c| c[i]);
        let finite = r2[i].is_finite() & s0[i].is_finite();
        let mut code = if unconverged { 4 } else { 0 };
        code = if finite {
            code
        } else {
            R2starStatus::DegenerateFit as u8
        };
        code = if bad[i] {
            R2starStatus::BadMagnitude as u8
        } else {
            code
        };
        code = if outside {
            R2starStatus::OutsideMask as u8
        } else {
            code
        };
        status[i] = code;
        let ok = code == 0;
        r2[i] = if ok { r2[i] } else { f32::NAN };
        s0[i] = if ok { s0[i] } else { f32::NAN };
    }
}

/// True where a magnitude cannot be log-transformed (≤ 0, NaN or ±∞); written without
/// branches so the echo loop vectorises.
/// Magnitudes below the smallest normal f32 (≈1.2e-38, i.e. effectively zero) count as
/// bad too, because [`ln_fast_f32`] reads the exponent bits.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // NaN must count as bad: `!(s >= MIN)` is true for NaN
pub(crate) fn not_loggable(s: f32) -> bool {
    !(s >= f32::MIN_POSITIVE) | (s == f32::INFINITY)
}

/// exp(x) to ~1e-10 relative for the f32 S0 output, branch-free so the output loop
/// vectorises. x is clamped to ±110: beyond that the f32 result is 0 or +∞ anyway
/// (exp(110) ≈ 6e47 > f32::MAX), so clamping changes nothing; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_fast(x: f64) -> f64 {
    use std::f64::consts::{LN_2, LOG2_E};
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52: rounds and exposes the integer
    let x = x.clamp(-110.0, 110.0);
    let shifted = x * LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let n_int = shifted.to_bits().wrapping_sub(MAGIC.to_bits()); // n as two's complement
    let r = x - n * LN_2; // |r| ≤ ln2/2: Taylor to r⁹ leaves < 1e-10 relative error
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0
                            + r * (1.0 / 720.0
                                + r * (1.0 / 5040.0 + r * (1.0 / 40320.0 + r / 362880.0))))))));
    let scale = f64::from_bits(n_int.wrapping_add(1023) << 52);
    p * scale
}

avx2_dispatch!(pub(crate) fn fit_chunk_ols / fit_chunk_ols_avx2 => fit_chunk_ols_body(
    rows: Rows<'_>, slope_coef: &[f64], intercept_coef: &[f64], r2_out: &mut [f32],
    s0_out: &mut [f32], bad: &mut [bool]));

#[inline(always)]
fn fit_chunk_ols_body(
    rows: Rows<'_>,
    slope_coef: &[f64],
    intercept_coef: &[f64],
    r2_out: &mut [f32],
    s0_out: &mut [f32],
    bad: &mut [bool],
) {
    let len = r2_out.len();
    // f32 sums (4 SIMD lanes): the coefficients are O(1/ΔTE) and sum to zero, so the slope
    // keeps ~1e-6 relative accuracy — the f32 rounding of ln S dominates either way.
    let mut slope = [0.0f32; CHUNK];
    let mut intercept = [0.0f32; CHUNK];
    for (k, (&c, &a)) in slope_coef.iter().zip(intercept_coef).enumerate() {
        let row = &rows.row(k)[..len];
        let (c, a) = (c as f32, a as f32);
        let (slope, intercept, bad) = (&mut slope[..len], &mut intercept[..len], &mut bad[..len]);
        for i in 0..len {
            let s = row[i];
            bad[i] |= not_loggable(s);
            let y = ln_fast_f32(s);
            slope[i] += c * y;
            intercept[i] += a * y;
        }
    }
    for i in 0..len {
        r2_out[i] = -slope[i];
        s0_out[i] = exp_fast(intercept[i] as f64) as f32;
    }
}

avx2_dispatch!(pub(crate) fn fit_chunk_weighted / fit_chunk_weighted_avx2 =>
    fit_chunk_weighted_body(rows: Rows<'_>, echo_times: &[f64], r2_out: &mut [f32],
    s0_out: &mut [f32], bad: &mut [bool]));

#[inline(always)]
fn fit_chunk_weighted_body(
    rows: Rows<'_>,
    echo_times: &[f64],
    r2_out: &mut [f32],
    s0_out: &mut [f32],
    bad: &mut [bool],
) {
    let len = r2_out.len();
    // Sums in f32 (4 SIMD lanes instead of 2) about the mean echo time, which keeps the
    // cancellations in the determinant and the slope small: relative error of R2* ~1e-6.
    let t_mean = echo_times.iter().sum::<f64>() / echo_times.len() as f64;
    // Σw, Σw·t, Σw·t², Σw·y, Σw·t·y per voxel (t centred).
    let mut sw = [0.0f32; CHUNK];
    let mut swt = [0.0f32; CHUNK];
    let mut swtt = [0.0f32; CHUNK];
    let mut swy = [0.0f32; CHUNK];
    let mut swty = [0.0f32; CHUNK];
    for (k, &t) in echo_times.iter().enumerate() {
        let row = &rows.row(k)[..len];
        let t = (t - t_mean) as f32;
        let (sw, swt, swtt) = (&mut sw[..len], &mut swt[..len], &mut swtt[..len]);
        let (swy, swty, bad) = (&mut swy[..len], &mut swty[..len], &mut bad[..len]);
        for i in 0..len {
            let s = row[i];
            bad[i] |= not_loggable(s);
            let y = ln_fast_f32(s);
            let w = s * s;
            let wt = w * t;
            sw[i] += w;
            swt[i] += wt;
            swtt[i] += wt * t;
            swy[i] += w * y;
            swty[i] += wt * y;
        }
    }
    for i in 0..len {
        let (sw, swt, swtt) = (sw[i] as f64, swt[i] as f64, swtt[i] as f64);
        let (swy, swty) = (swy[i] as f64, swty[i] as f64);
        let det = sw * swtt - swt * swt;
        // Degenerate when (nearly) all weight sits on one echo: det ≈ 0 relative to Σw·Σwt².
        // Written as a select (not a branch) so the loop vectorises; NaN marks the failure.
        let ok = det > 1e-6 * sw * swtt;
        let slope = (sw * swty - swt * swy) / det;
        let slope = if ok { slope } else { f64::NAN };
        let intercept = (swy - slope * swt) / sw - slope * t_mean;
        r2_out[i] = (-slope) as f32;
        s0_out[i] = exp_fast(intercept) as f32;
    }
}

/// Natural logarithm of a positive normal f32, branch-free so the echo loop vectorises
/// (`f32::ln` is a libm call per element and dominated the fit time).
///
/// `s = 2^e·m` with m in [√½, √2); `ln m = 2·atanh(u)`, `u = (m−1)/(m+1)`, |u| ≤ 0.172,
/// by its odd series to u⁹ (truncation < 1e-9), all in f32: absolute error ≲ 1e-5 over
/// the whole f32 range (f32 rounding of e·ln 2 + ln m). Garbage for inputs that
/// [`not_loggable`] flags; those voxels are discarded.
#[inline(always)]
pub(crate) fn ln_fast_f32(s: f32) -> f32 {
    const LN2: f32 = std::f32::consts::LN_2;
    let bits = s.to_bits();
    let shifted = bits.wrapping_sub(0x3f35_04f3);
    let exponent = ((shifted as i32) >> 23) as f32;
    let m = f32::from_bits((shifted & 0x007f_ffff).wrapping_add(0x3f35_04f3));
    let u = (m - 1.0) / (m + 1.0);
    let u2 = u * u;
    let series = 2.0 + u2 * (2.0 / 3.0 + u2 * (2.0 / 5.0 + u2 * (2.0 / 7.0 + u2 * (2.0 / 9.0))));
    exponent * LN2 + u * series
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn noiseless_fit_is_exact_both_modes() {
        let n = 3000; // several chunks, last one partial
        let r2: Vec<f64> = (0..n).map(|i| 5.0 + 0.03 * i as f64).collect();
        let s0: Vec<f64> = (0..n).map(|i| 200.0 + (i % 17) as f64).collect();
        let tes = [0.002, 0.006, 0.011, 0.015, 0.020, 0.030];
        let mag = simulate(&r2, &s0, &tes);
        for weighted in [false, true] {
            let fit = fit_r2star_loglinear(&mag, n, &tes, None, weighted).unwrap();
            for i in 0..n {
                assert_eq!(fit.status[i], 0);
                assert!((fit.r2star[i] as f64 - r2[i]).abs() < 1e-3 + 1e-5 * r2[i]);
                assert!((fit.s0[i] as f64 / s0[i] - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn bad_voxels_get_nan_and_status() {
        let n = 6;
        let tes = [0.005, 0.010, 0.015];
        let mut mag = simulate(&[20.0; 6], &[100.0; 6], &tes);
        mag[0] = 0.0;
        mag[n + 1] = f32::NAN;
        mag[2 * n + 2] = -1.0;
        mag[3] = f32::INFINITY;
        let mask = [1u8, 1, 1, 1, 0, 1];
        for weighted in [false, true] {
            let fit = fit_r2star_loglinear(&mag, n, &tes, Some(&mask), weighted).unwrap();
            assert_eq!(fit.status, vec![1, 1, 1, 1, 3, 0]);
            for i in 0..5 {
                assert!(fit.r2star[i].is_nan() && fit.s0[i].is_nan());
            }
            assert!((fit.r2star[5] - 20.0).abs() < 1e-3);
        }
        // Weighted fit with all weight on one echo is degenerate.
        let tiny = [1.0f32, 1e-30, 1e-30];
        let fit = fit_r2star_loglinear(&tiny, 1, &tes, None, true).unwrap();
        assert_eq!(fit.status, vec![2]);
        assert!(fit.r2star[0].is_nan());
    }

    #[test]
    fn fast_log_matches_std() {
        let mut worst = 0.0f64;
        let mut s = f32::MIN_POSITIVE;
        while s < 1e30 {
            for m in [1.0f32, 1.1, 1.3, 1.41, 1.42, 1.7, 1.99] {
                let x = s * m;
                // f32 rounding of the result: relative to 1 + |ln x|.
                let exact = (x as f64).ln();
                let err = (ln_fast_f32(x) as f64 - exact).abs() / (1.0 + exact.abs());
                worst = worst.max(err);
            }
            s *= 2.0;
        }
        assert!(worst < 2e-7, "worst error {worst} relative to 1 + |ln x|");
        for x in [-103.0, -50.0, -1.0, -0.3, 0.0, 0.2, 1.0, 7.5, 88.0, 109.0] {
            assert!((exp_fast(x) / x.exp() - 1.0).abs() < 1e-9, "exp({x})");
        }
        assert!((exp_fast(800.0) as f32).is_infinite() && exp_fast(f64::NAN).is_nan());
        assert_eq!(exp_fast(-800.0) as f32, 0.0);
        assert!(not_loggable(0.0) && not_loggable(-1.0) && not_loggable(f32::NAN));
        assert!(not_loggable(1e-40) && not_loggable(f32::INFINITY) && !not_loggable(1e-30));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let mag = vec![1.0f32; 12];
        assert!(fit_r2star_loglinear(&mag, 12, &[0.01], None, false).is_err());
        assert!(fit_r2star_loglinear(&mag, 6, &[0.01, 0.005], None, false).is_err());
        assert!(fit_r2star_loglinear(&mag, 5, &[0.01, 0.02], None, false).is_err());
        assert!(fit_r2star_loglinear(&mag, 6, &[0.01, 0.02], Some(&[1; 5]), false).is_err());
        assert!(fit_r2star_loglinear(&mag, 6, &[0.01, f64::NAN], None, false).is_err());
    }
}

#[cfg(feature = "timing")]
#[doc(hidden)]
pub mod timing;
